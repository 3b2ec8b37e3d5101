"""A one-file Django project: settings, a view with a form post, and the WSGI entry point."""

import os
import sys

from django.conf import settings

HERE = os.path.dirname(os.path.abspath(__file__))

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="gateway-test-only",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
        INSTALLED_APPS=[],
        USE_TZ=True,
    )

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


def index(request, item=None):
    return JsonResponse({
        "framework": "django",
        "method": request.method,
        "path": request.path,
        "script_name": request.META.get("SCRIPT_NAME"),
        "query": request.GET.dict(),
        "body_length": len(request.body),
        "python_prefix": sys.prefix,
    })


urlpatterns = [path("", index), path("items/<int:item>/", index)]

application = get_wsgi_application()
