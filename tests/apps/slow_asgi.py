"""An ASGI application for the slow-request tests: awaits ?s= seconds."""

import asyncio
import json
import os
from urllib.parse import parse_qs


async def application(scope, receive, send):
    if scope["type"] != "http":
        return
    seconds = float(parse_qs(scope["query_string"].decode()).get("s", ["1"])[0])
    await asyncio.sleep(seconds)
    body = json.dumps({"pid": os.getpid()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
