"""A Starlette application: routes with path parameters, the request body read
as a stream, a JSON answer naming what Starlette saw of the mount."""

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route


async def index(request):
    return PlainTextResponse("Hello from Starlette!")


async def user(request):
    return JSONResponse({"name": request.path_params["name"], "path": request.url.path,
                         "root_path": request.scope["root_path"], "query": dict(request.query_params),
                         "url_for": str(request.url_for("user", name="x"))})


async def count(request):
    length, pieces = 0, 0
    async for chunk in request.stream():
        length += len(chunk)
        pieces += 1 if chunk else 0
    return JSONResponse({"length": length, "pieces": pieces})


async def poll_disconnect(request):
    """What an SSE or long-poll loop does between events: asks, again and again,
    whether the client left (each ask cancels a receive() that waits)."""
    seen = [await request.is_disconnected() for _ in range(3)]
    return JSONResponse({"seen": seen})


app = Starlette(routes=[
    Route("/poll", poll_disconnect),
    Route("/", index),
    Route("/users/{name}", user, name="user"),
    Route("/count", count, methods=["POST"]),
])
