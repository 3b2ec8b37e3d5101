"""Real ASGI frameworks from the test virtualenv, on every server kind: FastAPI
(path and query parameters, validation, StreamingResponse, UploadFile,
BackgroundTasks, lifespan), Starlette, Django's get_asgi_application() with an
async view using the ORM through sync_to_async, and Quart. Starlette and Quart
are mounted without interface= (detected); FastAPI and Django name it."""

import hashlib
import json
import os
import socket
import time

import pytest

from harness import (BATTERY_GROUP, SERVERS, Mount, battery_settings, daemon_options, get_json, is_daemon_kind,
                     make_server, token)


def framework_mounts(mode="embedded", group=None):
    def mount(prefix, script, name, interface=None):
        return Mount(prefix, script, name, mode=mode, group=group, interface=interface)

    return [mount("/fastapi", "fastapi_app.py", "app", "asgi"),
            mount("/starlette", "starlette_app.py", "app"),
            mount("/quart", "quart_app.py", "app"),
            mount("/django", "django_asgi/site_asgi.py", "application", "asgi")]


@pytest.fixture(scope="module", params=SERVERS)
def site(request):
    """A server of each kind serving the four frameworks (one interpreter per process)."""
    kind = request.param
    daemon = is_daemon_kind(kind)
    mounts = framework_mounts("daemon", BATTERY_GROUP) if daemon else framework_mounts()
    srv = make_server(kind, mounts, battery_settings())
    srv.settings.python_path = [str(srv.apps / "lib")]
    if daemon:
        srv.settings.daemons = {BATTERY_GROUP: daemon_options(srv)}
    with srv:
        yield srv


def ack_stream(srv, path, t) -> bytes:
    """GETs a response that waits for the marker `t` after its first piece; sets
    the marker once the first piece arrived. Returns everything received."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while b"first;" not in received:
            data = s.recv(65536)
            assert data, received
            received += data
        srv.marker(t).write_text("ack")
        while data := s.recv(65536):
            received += data
    return received


# --- FastAPI ---

def test_fastapi_path_and_query_parameters_and_lifespan_state(site):
    out = get_json(site, "/fastapi/items/3?q=hi&limit=5")
    assert (out["item_id"], out["q"], out["limit"]) == (3, "hi", 5)
    assert (out["path"], out["root_path"]) == ("/fastapi/items/3", "/fastapi")
    # The state the lifespan yielded, from this process's own startup.
    assert out["started_by"] == out["pid"]
    events = site.marker("fastapi-lifespan.log").read_text().splitlines()
    assert events.count(f"startup {out['pid']}") == 1, events


def test_fastapi_validation_answers_422(site):
    resp, data = site.get("/fastapi/items/abc")
    assert resp.status == 422
    assert json.loads(data)["detail"][0]["loc"] == ["path", "item_id"]
    resp, data = site.get("/fastapi/items/3?limit=many")
    assert resp.status == 422
    assert json.loads(data)["detail"][0]["loc"] == ["query", "limit"]


def test_fastapi_docs_know_the_mount(site):
    resp, data = site.get("/fastapi/docs")
    assert resp.status == 200 and b"/fastapi/openapi.json" in data
    assert get_json(site, "/fastapi/openapi.json")["paths"]["/items/{item_id}"]


def test_fastapi_streaming_response(site):
    t = token()
    received = ack_stream(site, f"/fastapi/stream?token={t}", t)
    assert received.startswith(b"HTTP/1.1 200")
    assert b"acked;" in received and b"done" in received, received


def test_fastapi_upload_file(site):
    content = os.urandom(5 << 20)
    boundary = "gateway-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"data.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    out = get_json(site, "/fastapi/upload", method="POST", body=body,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
    assert out == {"filename": "data.bin", "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def test_fastapi_background_task_runs_after_the_response(site):
    t = token()
    assert get_json(site, f"/fastapi/tasks?token={t}", method="POST") == {"queued": t}
    deadline = time.monotonic() + 10
    while not (site.marker(t).exists() and site.marker(t).read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert site.marker(t).read_text().startswith("background task ran in "), site.log_text()[-3000:]


# --- Starlette ---

def test_starlette_routes_and_url_for(site):
    out = get_json(site, "/starlette/users/bob?k=v")
    assert (out["name"], out["path"], out["root_path"], out["query"]) == \
        ("bob", "/starlette/users/bob", "/starlette", {"k": "v"})
    assert out["url_for"] == f"http://127.0.0.1:{site.port}/starlette/users/x"
    resp, data = site.get("/starlette/")
    assert (resp.status, data) == (200, b"Hello from Starlette!")


def test_starlette_asks_whether_the_client_left_again_and_again(site):
    # Each is_disconnected() cancels a receive() that waits: the next one must not
    # find it still waiting (it raised RuntimeError before).
    assert get_json(site, "/starlette/poll") == {"seen": [False, False, False]}


def test_starlette_reads_a_chunked_body_as_a_stream(site):
    pieces = [os.urandom(n) for n in (10, 70000, 1 << 20)]
    conn = site.connect()
    conn.request("POST", "/starlette/count", body=iter(pieces), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    assert resp.status == 200
    assert out["length"] == sum(map(len, pieces)) and out["pieces"] >= 1


# --- Django ---

def test_django_asgi_async_view_uses_the_orm(site):
    text = token()
    first = get_json(site, f"/django/notes/?text={text}", method="POST")
    second = get_json(site, f"/django/notes/?text={text}", method="POST")
    assert (first["same_text"], second["same_text"]) == (1, 2)
    assert second["id"] > first["id"]
    assert (first["path"], first["script_name"], first["path_info"], first["async_view"]) == \
        ("/django/notes/", "/django", "/notes/", True)


def test_django_asgi_sync_view_and_urls(site):
    out = get_json(site, "/django/items/3/?a=b")
    assert (out["item"], out["path"], out["script_name"], out["path_info"], out["query"]) == \
        (3, "/django/items/3/", "/django", "/items/3/", {"a": "b"})
    resp, data = site.get("/django/")
    assert (resp.status, data) == (200, b"Hello from Django ASGI!")
    resp, _ = site.get("/django/no-such-page/")
    assert resp.status == 404


# --- Quart ---

def test_quart_routes_json_and_before_serving(site):
    out = get_json(site, "/quart/items/3")
    assert (out["item"], out["root_path"], out["url_for"]) == (3, "/quart", "/quart/items/7")
    assert out["started_by"] == out["pid"]
    out = get_json(site, "/quart/echo", method="POST", body=json.dumps({"a": [1, 2]}),
                   headers={"Content-Type": "application/json"})
    assert out == {"echo": {"a": [1, 2]}, "method": "POST"}
    resp, data = site.get("/quart/")
    assert (resp.status, data) == (200, b"Hello from Quart!")
