"""Routes by URL prefix to the ASGI benchmark applications, for servers that host a single
application (uvicorn, gunicorn, granian, hypercorn). Gateway mounts each at its prefix."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import asgi_hello  # noqa: E402
import asgi_sleep50  # noqa: E402

MOUNTS = {
    "/hello": asgi_hello.application,
    "/sleep": asgi_sleep50.application,
}
NOT_FOUND = [(b"content-type", b"text/plain"), (b"content-length", b"9")]


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        await asgi_hello.lifespan(receive, send)
        return
    path = scope["path"]
    prefix = "/" + path.split("/", 2)[1] if path.startswith("/") else ""
    app = MOUNTS.get(prefix)
    if app is None:
        await send({"type": "http.response.start", "status": 404, "headers": NOT_FOUND})
        await send({"type": "http.response.body", "body": b"not found"})
        return
    # ASGI's path keeps the mount point; root_path names it, as a mount at the prefix would.
    scope["root_path"] = scope.get("root_path", "") + prefix
    await app(scope, receive, send)
