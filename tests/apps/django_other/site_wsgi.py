"""A second one-file Django project, whose settings differ from django_site's:
in one interpreter, one of the two would run with the other's settings."""

from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="gateway-test-only-other",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[],
    )

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


def index(request):
    return JsonResponse({"project": "other", "path": request.path})


urlpatterns = [path("", index)]

application = get_wsgi_application()
