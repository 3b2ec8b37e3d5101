"""Hello world as a plain ASGI application: the same 13 bytes as hello.py."""

HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"13")]


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b"Hello, world!"})


async def lifespan(receive, send):
    """Acknowledges startup and shutdown: there is nothing to set up."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
