"""Routes by URL prefix to the benchmark applications, for servers that host a single
WSGI application (gunicorn). Other servers mount each application at its prefix."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flask_app  # noqa: E402
import hello  # noqa: E402
import kib64  # noqa: E402
import sleep50  # noqa: E402
import stream  # noqa: E402
import upload  # noqa: E402

MOUNTS = {
    "/hello": hello.application,
    "/64k": kib64.application,
    "/stream": stream.application,
    "/upload": upload.application,
    "/sleep": sleep50.application,
    "/flask": flask_app.application,
}


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    prefix = "/" + path.split("/", 2)[1] if path.startswith("/") else ""
    app = MOUNTS.get(prefix)
    if app is None:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
        return [b"not found"]
    environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
    environ["PATH_INFO"] = path[len(prefix):]
    return app(environ, start_response)
