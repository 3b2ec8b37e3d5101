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


app = Starlette(routes=[
    Route("/", index),
    Route("/users/{name}", user, name="user"),
    Route("/count", count, methods=["POST"]),
])
