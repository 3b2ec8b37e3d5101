"""A FastAPI application: path and query parameters, validation (422), a
streaming response, an upload, a background task and a lifespan that puts a
value in every request's state. Markers go to the server's markers/ directory."""

import asyncio
import hashlib
import os
import time
from contextlib import asynccontextmanager

from fastapi import BackgroundTasks, FastAPI, Request, UploadFile
from fastapi.responses import PlainTextResponse, StreamingResponse

MARKERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "markers")


def marker(name):
    return os.path.join(MARKERS, os.path.basename(name))


def log_event(event):
    with open(marker("fastapi-lifespan.log"), "a") as f:
        f.write(f"{event} {os.getpid()}\n")


@asynccontextmanager
async def lifespan(app):
    log_event("startup")
    yield {"started_by": os.getpid()}
    log_event("shutdown")


app = FastAPI(lifespan=lifespan)


@app.get("/", response_class=PlainTextResponse)
async def index():
    return "Hello from FastAPI!"


@app.get("/items/{item_id}")
async def read_item(item_id: int, request: Request, q: str | None = None, limit: int = 10):
    return {"item_id": item_id, "q": q, "limit": limit, "path": request.url.path,
            "root_path": request.scope["root_path"], "started_by": request.state.started_by, "pid": os.getpid()}


@app.post("/upload")
async def upload(file: UploadFile):
    digest, size = hashlib.sha256(), 0
    while chunk := await file.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return {"filename": file.filename, "size": size, "sha256": digest.hexdigest()}


@app.get("/stream")
async def stream(token: str):
    async def pieces():
        yield b"first;"
        deadline = time.monotonic() + 10
        while not os.path.exists(marker(token)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        yield b"acked;" if os.path.exists(marker(token)) else b"timeout;"
        yield b"done"

    return StreamingResponse(pieces(), media_type="text/plain")


def write_marker(token: str, text: str):
    with open(marker(token), "w") as f:
        f.write(text)


@app.post("/tasks")
async def tasks(token: str, background_tasks: BackgroundTasks):
    background_tasks.add_task(write_marker, token, f"background task ran in {os.getpid()}")
    return {"queued": token}
