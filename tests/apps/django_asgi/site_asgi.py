"""A one-file Django project served through get_asgi_application(): an async
view that reads and writes the database with the ORM through sync_to_async, and
a sync view Django runs in a thread. The database is SQLite in the server's
markers/ directory (writable by the server's user)."""

import os
import sys

import django
from django.conf import settings

HERE = os.path.dirname(os.path.abspath(__file__))
MARKERS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "markers")

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="gateway-test-only",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
        INSTALLED_APPS=[],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                               "NAME": os.path.join(MARKERS, "django-asgi.sqlite3"),
                               "OPTIONS": {"timeout": 20}}},
        USE_TZ=True,
    )
django.setup()

from asgiref.sync import sync_to_async  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.db import connection, models  # noqa: E402
from django.http import HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


class Note(models.Model):
    text = models.CharField(max_length=200)

    class Meta:
        app_label = "gateway_notes"
        db_table = "gateway_notes"
        managed = False


def create_table():
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS gateway_notes "
                       "(id INTEGER PRIMARY KEY AUTOINCREMENT, text VARCHAR(200) NOT NULL)")


def add_note(text):
    create_table()
    note = Note.objects.create(text=text)
    return note.id, Note.objects.filter(text=text).count()


async def index(request):
    return HttpResponse("Hello from Django ASGI!", content_type="text/plain")


async def notes(request):
    """POST ?text= adds a note; both answer with what the ORM says."""
    text = request.GET.get("text", "")
    note_id, same = await sync_to_async(add_note)(text)
    return JsonResponse({"id": note_id, "same_text": same, "method": request.method, "path": request.path,
                         "script_name": request.META.get("SCRIPT_NAME"), "path_info": request.path_info,
                         "async_view": True})


def items(request, item):
    return JsonResponse({"item": item, "path": request.path, "script_name": request.META.get("SCRIPT_NAME"),
                         "path_info": request.path_info, "query": request.GET.dict(), "python_prefix": sys.prefix})


urlpatterns = [path("", index), path("notes/", notes), path("items/<int:item>/", items)]

application = get_asgi_application()
