"""ASGI applications for the tests: plain callables without a framework, one per
behaviour. Markers (files under the server's markers/ directory) tell the tests
what happened where they cannot see it in the response: lifespan events, a
client's disconnect, the exception send() raised, a cancelled task.

Applications that take no part in lifespan raise on its scope, as the ASGI spec
tells them to; the server then serves them without lifespan.
"""

import asyncio
import hashlib
import json
import os
import threading
import time
from urllib.parse import parse_qs

MARKERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "markers")

# Where the `lifespan` application writes a line per lifespan event: "startup PID" / "shutdown PID".
LIFESPAN_LOG = "lifespan.log"


def query(scope):
    return {k: v[0] for k, v in parse_qs(scope["query_string"].decode("latin-1")).items()}


def marker_path(name):
    return os.path.join(MARKERS, os.path.basename(name))


def touch(name, text=""):
    with open(marker_path(name), "w") as f:
        f.write(text)


def append(name, line):
    with open(marker_path(name), "a") as f:
        f.write(line + "\n")


async def wait_for(name, timeout=10.0):
    """Whether the marker `name` appeared within `timeout` seconds (the loop runs meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(marker_path(name)):
            return True
        await asyncio.sleep(0.01)
    return False


def loop_module():
    """The module of the running event loop's class: "uvloop" or "asyncio.unix_events"."""
    return type(asyncio.get_running_loop()).__module__


def http_only(scope):
    if scope["type"] != "http":
        raise RuntimeError(f"this application serves only http, not {scope['type']}")


async def respond(send, body, status=200, content_type=b"text/plain", headers=()):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send, obj, status=200):
    await respond(send, json.dumps(obj).encode(), status, b"application/json")


async def read_body(receive):
    """The whole request body (for small bodies)."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def serve_lifespan(receive, send, startup=None, shutdown=None):
    """The lifespan protocol: `startup()` and `shutdown()` run at their events; an
    exception in startup is reported as lifespan.startup.failed with its message."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                if startup:
                    startup()
            except Exception as e:
                await send({"type": "lifespan.startup.failed", "message": str(e)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if shutdown:
                shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


# --- Serving ---

async def hello(scope, receive, send):
    http_only(scope)
    await respond(send, b"Hello from ASGI!")


def jsonable_state(state):
    return {k: v for k, v in state.items() if isinstance(v, (str, int, float, bool, type(None)))}


async def scope(scope, receive, send):
    """The request's scope as JSON: bytes as latin-1 strings, headers as [name,
    value] lists in order, the type of every value, the first message received,
    the event loop's module. Its lifespan startup puts `answer` in the state; each
    request then marks its own copy of the state, which the next must not see."""
    if scope["type"] == "lifespan":
        def startup():
            scope["state"]["answer"] = 42
            scope["state"]["started_by"] = os.getpid()

        return await serve_lifespan(receive, send, startup)
    http_only(scope)
    first = await receive()
    state = scope.get("state")
    state_seen = jsonable_state(state) if state is not None else None
    if state is not None:
        state["marked_by_a_request"] = True
    headers = scope["headers"]
    await respond_json(send, {
        "keys": sorted(scope),
        "type": scope["type"],
        "asgi": scope["asgi"],
        "http_version": scope["http_version"],
        "method": scope["method"],
        "scheme": scope["scheme"],
        "path": scope["path"],
        "raw_path": scope["raw_path"].decode("latin-1") if scope.get("raw_path") is not None else None,
        "root_path": scope["root_path"],
        "query_string": scope["query_string"].decode("latin-1"),
        "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers],
        "client": list(scope["client"]) if scope.get("client") else None,
        "server": list(scope["server"]) if scope.get("server") else None,
        "state": state_seen,
        "types": {
            "path": type(scope["path"]).__name__,
            "root_path": type(scope["root_path"]).__name__,
            "raw_path": type(scope.get("raw_path")).__name__,
            "query_string": type(scope["query_string"]).__name__,
            "header_parts": sorted({type(part).__name__ for pair in headers for part in pair}),
            "header_pairs": sorted({len(pair) for pair in headers}),
            "client_port": type(scope["client"][1]).__name__ if scope.get("client") else None,
            "server_port": type(scope["server"][1]).__name__ if scope.get("server") else None,
        },
        "first_message": {"type": first["type"], "body": first.get("body", b"").decode("latin-1"),
                          "body_type": type(first.get("body", b"")).__name__,
                          "more_body": first.get("more_body", False)},
        "loop": loop_module(),
        "pid": os.getpid(),
    })


async def body(scope, receive, send):
    """Reads the body message by message without keeping it: its length, SHA-256,
    how many http.request messages carried it and the largest. With ?progress=NAME,
    writes the bytes received so far to that marker after each message."""
    http_only(scope)
    progress = query(scope).get("progress")
    digest, length, messages, largest, types = hashlib.sha256(), 0, 0, 0, set()
    while True:
        message = await receive()
        types.add(message["type"])
        if message["type"] != "http.request":
            break
        data = message.get("body", b"")
        if not isinstance(data, bytes):
            raise TypeError(f"http.request body is {type(data).__name__}, not bytes")
        digest.update(data)
        length += len(data)
        messages += 1
        largest = max(largest, len(data))
        if progress:
            touch(progress, str(length))
        if not message.get("more_body", False):
            break
    await respond_json(send, {"length": length, "sha256": digest.hexdigest(), "messages": messages,
                              "largest": largest, "types": sorted(types)})


async def stream(scope, receive, send):
    """Sends a piece, then waits until the client says it received it (the marker
    ?token=), then two more: only a piece flushed at once lets the client answer."""
    http_only(scope)
    token = query(scope)["token"]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"first;", "more_body": True})
    acked = await wait_for(token)
    await send({"type": "http.response.body", "body": b"acked;" if acked else b"timeout;", "more_body": True})
    await send({"type": "http.response.body", "body": b"done"})


async def flood(scope, receive, send):
    """Sends ?mib= MiB a MiB at a time; after each send() returns, the marker
    ?token= says how many MiB went. A slow client makes send() wait."""
    http_only(scope)
    q = query(scope)
    mib, token = int(q.get("mib", "64")), q["token"]
    block = b"x" * (1 << 20)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", str(mib << 20).encode())]})
    for i in range(mib):
        await send({"type": "http.response.body", "body": block, "more_body": i < mib - 1})
        touch(token, str(i + 1))


async def sleep(scope, receive, send):
    """Awaits asyncio.sleep(?s=1): the event loop serves other requests meanwhile."""
    http_only(scope)
    seconds = float(query(scope).get("s", "1"))
    started = time.monotonic()
    await asyncio.sleep(seconds)
    await respond_json(send, {"pid": os.getpid(), "slept": time.monotonic() - started, "loop": loop_module(),
                              "thread": threading.current_thread().name})


# --- The client going away ---

async def disconnect(scope, receive, send):
    """Reads the body, marks ?token=.waiting, then awaits receive(): the marker
    ?token= gets the type of the message that came (http.disconnect once the
    client left); then the marker ?token=.send says what send() did after it."""
    http_only(scope)
    token = query(scope)["token"]
    await read_body(receive)
    touch(token + ".waiting", "waiting")
    message = await receive()
    touch(token, message["type"])
    try:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"too late", "more_body": True})
        await send({"type": "http.response.body", "body": b"really too late"})
        outcome = "no exception"
    except Exception as e:
        outcome = f"{type(e).__name__} OSError={isinstance(e, OSError)}"
    touch(token + ".send", outcome)


async def endless(scope, receive, send):
    """Streams a piece every 50 ms until send() raises (the client left); the
    marker ?token= names the exception and whether it is an OSError."""
    http_only(scope)
    token = query(scope)["token"]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    deadline = time.monotonic() + 30
    sent = 0
    try:
        while time.monotonic() < deadline:
            await send({"type": "http.response.body", "body": b"tick;", "more_body": True})
            sent += 1
            await asyncio.sleep(0.05)
    except Exception as e:
        touch(token, f"{type(e).__name__} OSError={isinstance(e, OSError)} after {sent}")
        return
    touch(token, "send() never raised")


# --- Broken applications ---

async def raise_before(scope, receive, send):
    http_only(scope)
    raise ValueError("boom before http.response.start")


async def raise_after(scope, receive, send):
    http_only(scope)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"first part;", "more_body": True})
    raise ValueError("boom halfway through the ASGI body")


async def no_response(scope, receive, send):
    """Returns without sending anything."""
    http_only(scope)
    await read_body(receive)


async def crlf_header(scope, receive, send):
    http_only(scope)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"x-ok", b"1"),
                            (b"x-split", b"v\r\nX-Injected: evil=1")]})
    await send({"type": "http.response.body", "body": b"evil"})


async def bad_status(scope, receive, send):
    """?status=99 sends the int 99; ?status=str sends the string "200"."""
    http_only(scope)
    wanted = query(scope).get("status", "99")
    status = "200" if wanted == "str" else int(wanted)
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"evil"})


# --- Lifespan ---

async def lifespan(scope, receive, send):
    """Lifespan with markers: startup and shutdown each append "EVENT PID" to
    lifespan.log; startup puts `connection` in the state. Requests answer with the
    process, the state they got and the event loop's module."""
    if scope["type"] == "lifespan":
        def startup():
            append(LIFESPAN_LOG, f"startup {os.getpid()}")
            scope["state"]["connection"] = f"opened by {os.getpid()}"

        def shutdown():
            append(LIFESPAN_LOG, f"shutdown {os.getpid()}")

        return await serve_lifespan(receive, send, startup, shutdown)
    http_only(scope)
    q = query(scope)
    if "s" in q:
        await asyncio.sleep(float(q["s"]))
    await respond_json(send, {"pid": os.getpid(), "state": jsonable_state(scope.get("state") or {}),
                              "loop": loop_module()})


async def lifespan_fails(scope, receive, send):
    """Startup fails with lifespan.startup.failed: the application must never serve."""
    if scope["type"] == "lifespan":
        def startup():
            raise RuntimeError("the database is unreachable (gateway test)")

        return await serve_lifespan(receive, send, startup)
    await respond(send, b"served although startup failed")


async def lifespan_raises(scope, receive, send):
    """Raises on the lifespan scope: served without lifespan."""
    http_only(scope)
    await respond(send, b"served without lifespan")


async def stuck(scope, receive, send):
    """Awaits for two minutes; the marker ?token= records what ended it (the
    cancellation a request-timeout brings)."""
    http_only(scope)
    token = query(scope).get("token", "stuck")
    touch(token + ".started", "started")
    try:
        await asyncio.sleep(120)
    except BaseException as e:
        touch(token, type(e).__name__)
        raise
    await respond(send, b"finished")


# --- Detection ---

class Detected:
    """An object whose __call__ is a coroutine function: ASGI without interface=."""

    async def __call__(self, scope, receive, send):
        http_only(scope)
        await respond_json(send, {"interface": "asgi", "kind": "instance", "loop": loop_module()})


detected_instance = Detected()


async def detected_function(scope, receive, send):
    http_only(scope)
    await respond_json(send, {"interface": "asgi", "kind": "function", "loop": loop_module()})


async def _explicit(scope, receive, send):
    http_only(scope)
    await respond_json(send, {"interface": "asgi", "kind": "explicit", "loop": loop_module()})


def explicit(scope, receive, send):
    """A plain function returning the coroutine (as wrappers do): detection sees
    WSGI, so only interface=asgi serves it."""
    return _explicit(scope, receive, send)
