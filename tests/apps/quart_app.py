"""A Quart application (Flask's API on asyncio): JSON in and out, a path
converter, url_for under the mount, and a before_serving hook (Quart's lifespan
startup) whose value every request sees."""

import os

from quart import Quart, request, url_for

app = Quart(__name__)
started = {}


@app.before_serving
async def startup():
    started["pid"] = os.getpid()


@app.route("/")
async def index():
    return "Hello from Quart!"


@app.route("/items/<int:item>")
async def item(item):
    return {"item": item, "path": request.path, "root_path": request.root_path,
            "url_for": url_for("item", item=7), "started_by": started.get("pid"), "pid": os.getpid()}


@app.route("/echo", methods=["POST"])
async def echo():
    data = await request.get_json()
    return {"echo": data, "method": request.method}
