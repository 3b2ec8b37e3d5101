"""Awaits a 50 ms sleep per request (ASGI): how many requests a server keeps in flight
when waiting holds no thread. The same response as sleep50.py."""

import asyncio

HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"5")]


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    await asyncio.sleep(0.05)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b"slept"})


# Its own copy of asgi_hello's: Gateway loads each application file on its own.
async def lifespan(receive, send):
    """Acknowledges startup and shutdown: there is nothing to set up."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
