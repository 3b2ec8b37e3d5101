"""An ASGI application whose /exit starts a background task that raises SystemExit
on the event loop (as a careless library might); / answers which loop serves it."""

import asyncio
import os


async def _leave():
    await asyncio.sleep(0.05)
    raise SystemExit(0)


async def application(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"].endswith("/exit"):
        asyncio.get_running_loop().create_task(_leave())
    body = f"{os.getpid()} {id(asyncio.get_running_loop())}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
