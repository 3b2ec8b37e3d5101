"""Applications that read an upload piece by piece, for the tests of request
bodies streamed as they arrive (WSGI `application`, ASGI `asgi`). With
?progress=NAME each writes the bytes received so far to the marker NAME after
every piece; a read that fails writes what it saw to the marker NAME.error.
With ?hold=NAME they stop reading after the first piece until the marker NAME
exists. Both answer with the body's length and SHA-256."""

import asyncio
import hashlib
import json
import os
import time
from urllib.parse import parse_qs

MARKERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "markers")


def touch(name, text):
    with open(os.path.join(MARKERS, os.path.basename(name)), "w") as f:
        f.write(text)


def param(query_string, name):
    values = parse_qs(query_string).get(name)
    return values[0] if values else None


def held(name):
    return name is not None and not os.path.exists(os.path.join(MARKERS, os.path.basename(name)))


def application(environ, start_response):
    progress, hold = (param(environ.get("QUERY_STRING", ""), name) for name in ("progress", "hold"))
    digest, length = hashlib.sha256(), 0
    stream = environ["wsgi.input"]
    while True:
        try:
            data = stream.read(16384)
        except Exception as e:
            if progress:
                touch(progress + ".error", f"{type(e).__name__} OSError={isinstance(e, OSError)}")
            raise
        if not data:
            break
        digest.update(data)
        length += len(data)
        if progress:
            touch(progress, str(length))
        while held(hold):
            time.sleep(0.02)
    body = json.dumps({"length": length, "sha256": digest.hexdigest()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        raise RuntimeError(f"this application serves only http, not {scope['type']}")
    progress, hold = (param(scope["query_string"].decode("latin-1"), name) for name in ("progress", "hold"))
    digest, length = hashlib.sha256(), 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            if progress:
                touch(progress + ".error", message["type"])
            return
        data = message.get("body", b"")
        digest.update(data)
        length += len(data)
        if progress and data:
            touch(progress, str(length))
        while held(hold):
            await asyncio.sleep(0.02)
        if not message.get("more_body", False):
            break
    body = json.dumps({"length": length, "sha256": digest.hexdigest()}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
