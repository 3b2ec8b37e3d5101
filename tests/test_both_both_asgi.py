"""The ASGI battery: the HTTP scope, request bodies in pieces, streamed responses
with backpressure, the client going away, broken applications, lifespan,
detection without interface=, and WSGI beside ASGI in one server, one virtual
host and one daemon group; over HTTP/1.1 and cleartext HTTP/2 (nginx's h2c,
Apache's mod_http2), on every server kind (see harness.SERVERS). The
applications are plain ASGI callables (tests/apps/asgi_apps.py)."""

import hashlib
import json
import os
import re
import socket
import threading
import time

import h2.config
import h2.connection
import h2.events
import pytest

from harness import (BATTERY_GROUP, EACH_SERVER_AND_MODE, SERVERS, Mount, battery_settings, daemon_options,
                     get_json, h2_request, is_daemon_kind, make_server, token)

ASGI = "asgi_apps.py"

# The callables of asgi_apps.py mounted at /NAME with interface=asgi.
BATTERY = ["hello", "scope", "body", "stream", "flood", "sleep", "disconnect", "endless", "raise_before",
           "raise_after", "no_response", "crlf_header", "bad_status", "lifespan", "lifespan_fails",
           "lifespan_raises", "explicit"]
# Mounted without interface=: detected as ASGI.
DETECTED = ["detected_instance", "detected_function"]
MIXED_HOST = "mixed.test"


def asgi_mounts(mode="embedded", group=None):
    """The ASGI battery, with WSGI applications of battery.py beside it, and a
    virtual host serving one of each."""
    def mount(prefix, script, name, interface=None, vhost=None):
        return Mount(prefix, script, name, mode=mode, group=group, interface=interface, vhost=vhost)

    return ([mount(f"/{name}", ASGI, name, "asgi") for name in BATTERY]
            + [mount(f"/{name}", ASGI, name) for name in DETECTED]
            + [mount("/wsgi_hello", "battery.py", "hello"), mount("/wsgi_environ", "battery.py", "environ"),
               mount("/asgi", ASGI, "scope", "asgi", vhost=MIXED_HOST),
               mount("/wsgi", "battery.py", "hello", vhost=MIXED_HOST)])


def asgi_server(kind, mounts):
    """A server of `kind` with `mounts` (their mode and group set for "-daemon"
    kinds), the test virtualenv (with uvloop), and cleartext HTTP/2."""
    srv = make_server(kind, mounts, battery_settings(), http2=True)
    srv.settings.python_path = [str(srv.apps / "lib")]
    if is_daemon_kind(kind):
        srv.settings.daemons = {BATTERY_GROUP: daemon_options(srv)}
    return srv


@pytest.fixture(scope="module", params=SERVERS)
def asgi(request):
    """A server of each kind serving the ASGI battery, shared by this module."""
    kind = request.param
    mounts = asgi_mounts("daemon", BATTERY_GROUP) if is_daemon_kind(kind) else asgi_mounts()
    with asgi_server(kind, mounts) as srv:
        yield srv


def raw_request(srv, request: bytes, timeout=15.0) -> bytes:
    """Sends raw bytes, returns everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def wait_for_marker(srv, name, timeout=10.0) -> str:
    """The text of the marker `name` once it exists (and was written)."""
    path = srv.marker(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text()):
            return text
        time.sleep(0.02)
    assert path.exists(), f"no marker {name} after {timeout}s:\n{srv.log_text()[-3000:]}"
    return path.read_text()


def recv_until(s, needle: bytes, received=b"") -> bytes:
    while needle not in received:
        data = s.recv(65536)
        assert data, received
        received += data
    return received


def lifespan_events(srv) -> list[str]:
    path = srv.marker("lifespan.log")
    return path.read_text().splitlines() if path.exists() else []


# --- Serving, detection, WSGI beside ASGI ---

def test_hello(asgi):
    resp, data = asgi.get("/hello")
    assert (resp.status, data) == (200, b"Hello from ASGI!")
    assert resp.getheader("Content-Type") == "text/plain"
    assert resp.getheader("Content-Length") == "16"


@pytest.mark.parametrize("path,kind", [("/detected_instance", "instance"), ("/detected_function", "function"),
                                       ("/explicit", "explicit")])
def test_asgi_is_detected_or_named(asgi, path, kind):
    """Without interface=, an `async def` callable or an object whose __call__ is
    one is ASGI; interface=asgi serves what detection cannot tell (a plain
    function returning a coroutine)."""
    out = get_json(asgi, path)
    assert (out["interface"], out["kind"]) == ("asgi", kind)


def test_wsgi_and_asgi_side_by_side(asgi):
    """One server (and, in daemon kinds, one daemon group) serves both; so does one
    virtual host."""
    assert asgi.get("/wsgi_hello")[1] == b"Hello, world!"
    env = get_json(asgi, "/wsgi_environ")
    if is_daemon_kind(asgi.name):
        assert (env["gateway.mode"], env["gateway.process_group"]) == ("daemon", BATTERY_GROUP)
    assert asgi.get("/hello")[1] == b"Hello from ASGI!"
    assert asgi.get("/wsgi", host=MIXED_HOST)[1] == b"Hello, world!"
    out = get_json(asgi, "/asgi/x", host=MIXED_HOST)
    assert (out["root_path"], out["path"]) == ("/asgi", "/asgi/x")


def test_uvloop_runs_the_applications_when_the_virtualenv_has_it(asgi):
    """The test virtualenv has uvloop: the event loop is uvloop's, and the error
    log said so when it started."""
    assert get_json(asgi, "/sleep?s=0")["loop"].startswith("uvloop")
    assert any("gateway:" in line and "uvloop" in line for line in asgi.log_text().splitlines()), \
        asgi.log_text()[-3000:]


# --- The scope ---

def scope_of(srv, path, headers=()):
    """The scope the `scope` application saw for a GET of `path` with `headers`
    sent in this order (repeats kept)."""
    conn = srv.connect()
    try:
        conn.putrequest("GET", path)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, (resp.status, data[:2000], srv.log_text()[-3000:])
    return json.loads(data)


def test_scope_has_every_field_the_spec_asks_for(asgi):
    scope = scope_of(asgi, "/scope/a%20b/%C3%A9?x=1&y=%20z",
                     [("X-First", "1"), ("X-Repeat", "a"), ("X-Repeat", "b"), ("X-Latin", "café"),
                      ("X-Last", "z")])
    for key in ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path",
                "query_string", "headers", "client", "server", "state"):
        assert key in scope["keys"], (key, scope["keys"])
    assert scope["type"] == "http"
    assert scope["asgi"]["version"] == "3.0"
    assert tuple(int(n) for n in scope["asgi"]["spec_version"].split(".")) >= (2, 4), scope["asgi"]
    assert (scope["http_version"], scope["method"], scope["scheme"]) == ("1.1", "GET", "http")
    # path: the full path, percent-decoded and UTF-8 decoded; root_path: the mount.
    assert scope["path"] == "/scope/a b/é"
    assert scope["root_path"] == "/scope"
    assert scope["raw_path"] == "/scope/a%20b/%C3%A9"
    assert scope["query_string"] == "x=1&y=%20z"
    assert scope["types"] == {"path": "str", "root_path": "str", "raw_path": "bytes", "query_string": "bytes",
                              "header_parts": ["bytes"], "header_pairs": [2], "client_port": "int",
                              "server_port": "int"}
    # Lower-case names, in the order sent, repeats kept, values as sent (latin-1).
    names = [name for name, _ in scope["headers"]]
    assert all(name == name.lower() for name in names), names
    ours = [pair for pair in scope["headers"] if pair[0].startswith("x-")]
    # nginx keeps a repeated header's lines; Apache's core joins them (RFC 9110, 5.3)
    # before any module sees the request.
    repeated = [["x-repeat", "a, b"]] if asgi.name.startswith("apache") else [["x-repeat", "a"], ["x-repeat", "b"]]
    assert ours == [["x-first", "1"], *repeated, ["x-latin", "café"], ["x-last", "z"]]
    assert ["host", f"127.0.0.1:{asgi.port}"] in scope["headers"]
    assert scope["client"][0] == "127.0.0.1" and scope["client"][1] > 0
    assert scope["server"] == ["127.0.0.1", asgi.port]
    assert scope["first_message"] == {"type": "http.request", "body": "", "body_type": "bytes", "more_body": False}


def test_mount_root_and_query_less_paths(asgi):
    scope = get_json(asgi, "/scope")
    assert (scope["path"], scope["root_path"], scope["raw_path"], scope["query_string"]) == \
        ("/scope", "/scope", "/scope", "")
    scope = get_json(asgi, "/scope/")
    assert (scope["path"], scope["root_path"]) == ("/scope/", "/scope")


def test_http_1_0(asgi):
    raw = raw_request(asgi, b"GET /scope HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"), head
    assert json.loads(body)["http_version"] == "1.0"


def test_lifespan_state_reaches_every_request_as_a_copy(asgi):
    """The state the lifespan startup filled reaches each request; what a request
    puts in its copy does not reach the next one."""
    for _ in range(4):
        scope = get_json(asgi, "/scope")
        assert scope["state"] == {"answer": 42, "started_by": scope["pid"]}, scope["state"]


# --- Request bodies ---

def test_large_upload_arrives_in_pieces(asgi):
    size = 32 << 20
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    for _ in range(size >> 20):
        digest.update(block)

    def blocks():
        for _ in range(size >> 20):
            yield block

    conn = asgi.connect(timeout=120)
    conn.request("POST", "/body", body=blocks(), headers={"Content-Length": str(size)})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    assert (out["length"], out["sha256"]) == (size, digest.hexdigest())
    # Never whole in memory: many http.request messages, none of them large.
    assert out["messages"] > 1 and out["largest"] <= 1 << 20, out
    assert out["types"] == ["http.request"]


def test_chunked_upload(asgi):
    pieces = [os.urandom(n) for n in (1, 100, 65536, 3, 1 << 20, 7)]
    conn = asgi.connect()
    conn.request("POST", "/body", body=iter(pieces), encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    payload = b"".join(pieces)
    assert resp.status == 200
    assert (out["length"], out["sha256"]) == (len(payload), hashlib.sha256(payload).hexdigest())


def test_empty_body_is_one_message(asgi):
    out = get_json(asgi, "/body", method="POST", body=b"")
    assert (out["length"], out["messages"], out["types"]) == (0, 1, ["http.request"])


def test_body_reaches_the_application_as_it_arrives(asgi):
    """Half a body is already the application's while the client holds the other
    half."""
    t = token()
    with socket.create_connection(("127.0.0.1", asgi.port), timeout=15) as s:
        s.sendall(f"POST /body?progress={t} HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n"
                  "Connection: close\r\n\r\n".encode() + b"x" * 100000)
        assert int(wait_for_marker(asgi, t)) > 0
        s.sendall(b"x" * 100000)
        reply = recv_until(s, b"}")
    assert b'"length": 200000' in reply, reply


# --- Responses ---

def test_streaming_sends_each_piece_at_once(asgi):
    """The application waits for the client to acknowledge its first piece: that
    only completes if the piece was flushed before the application went on."""
    t = token()
    with socket.create_connection(("127.0.0.1", asgi.port), timeout=15) as s:
        s.sendall(f"GET /stream?token={t} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = recv_until(s, b"first;")
        asgi.marker(t).write_text("ack")
        while data := s.recv(65536):
            received += data
    assert b"acked;" in received and b"done" in received, received
    assert b"Transfer-Encoding: chunked" in received  # no Content-Length: the server chunks
    assert received.endswith(b"0\r\n\r\n")


def test_a_slow_client_makes_send_wait(asgi):
    """A client that does not read holds the application in send(): it cannot
    produce far ahead of what the client took."""
    t, mib = token(), 128
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.settimeout(30)
        s.connect(("127.0.0.1", asgi.port))
        s.sendall(f"GET /flood?mib={mib}&token={t} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        time.sleep(1.5)
        sent = int(asgi.marker(t).read_text() or 0) if asgi.marker(t).exists() else 0
        assert sent < 48, f"the application sent {sent} MiB to a client that read nothing"
        total = 0
        while data := s.recv(1 << 20):
            total += len(data)
    assert total > mib << 20
    deadline = time.monotonic() + 5
    while asgi.marker(t).read_text() != str(mib) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert asgi.marker(t).read_text() == str(mib)


# --- The client going away ---

def test_disconnect_reaches_an_application_awaiting_receive(asgi):
    """The client leaves while the application awaits receive() after the body:
    it gets http.disconnect, and send() then raises an OSError."""
    t = token()
    with socket.create_connection(("127.0.0.1", asgi.port), timeout=15) as s:
        s.sendall(f"POST /disconnect?token={t} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".encode())
        wait_for_marker(asgi, t + ".waiting")
    assert wait_for_marker(asgi, t, timeout=5) == "http.disconnect"
    assert "OSError=True" in wait_for_marker(asgi, t + ".send", timeout=5)
    assert asgi.get("/hello")[1] == b"Hello from ASGI!"


def test_send_raises_oserror_once_the_client_left(asgi):
    """A streaming application learns that its client left from send(), and stops."""
    t = token()
    with socket.create_connection(("127.0.0.1", asgi.port), timeout=15) as s:
        s.sendall(f"GET /endless?token={t} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        recv_until(s, b"tick;")
    outcome = wait_for_marker(asgi, t, timeout=10)
    assert "OSError=True" in outcome, outcome


# --- Broken applications ---

# (path, message in the log or None, whether the error has a Python traceback)
BROKEN = [
    ("/raise_before", "boom before http.response.start", True),
    ("/no_response", None, False),
    ("/crlf_header", None, False),
    ("/bad_status?status=99", None, False),
    ("/bad_status?status=str", None, False),
]


@pytest.mark.parametrize("path,message,traceback", BROKEN, ids=[p for p, _, _ in BROKEN])
def test_broken_app_gets_500_and_a_logged_error(asgi, path, message, traceback):
    probe = token()
    uri = f"{path}{'&' if '?' in path else '?'}probe={probe}"
    resp, data = asgi.get(uri)
    assert resp.status == 500
    assert b"evil" not in data
    deadline = time.monotonic() + 10
    while not (lines := [line for line in asgi.log_text().splitlines() if probe in line]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines, asgi.log_text()[-3000:]
    if message:
        asgi.wait_for_log(message)
        lines = [line for line in asgi.log_text().splitlines() if probe in line]
        assert any(message in line for line in lines), lines
    assert all(f"gateway: GET {uri}: " in line for line in lines), lines
    if traceback:
        assert any("Traceback (most recent call last)" in line for line in lines), lines
        assert any("asgi_apps.py" in line for line in lines), lines
    assert asgi.get("/hello")[1] == b"Hello from ASGI!"


def test_crlf_header_never_reaches_the_client(asgi):
    raw = raw_request(asgi, b"GET /crlf_header HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 500"), raw[:300]
    assert b"X-Injected" not in raw and b"x-injected" not in raw and b"evil" not in raw


def test_exception_after_the_start_cuts_the_response(asgi):
    raw = raw_request(asgi, b"GET /raise_after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    assert b"first part;" in raw
    # Closed without the last chunk: the client sees a truncated body.
    assert not raw.endswith(b"0\r\n\r\n")
    asgi.wait_for_log("boom halfway through the ASGI body")
    assert "gateway: GET /raise_after" in asgi.log_text()


# --- Lifespan ---

def test_lifespan_starts_once_per_process_before_it_serves(asgi):
    pids = set()
    for _ in range(8):
        out = get_json(asgi, "/lifespan")
        assert out["state"] == {"connection": f"opened by {out['pid']}"}, out
        pids.add(out["pid"])
    events = lifespan_events(asgi)
    for pid in pids:
        assert events.count(f"startup {pid}") == 1, events


def test_failed_startup_answers_503_and_logs_the_apps_error(asgi):
    for _ in range(2):
        resp, data = asgi.get("/lifespan_fails")
        assert resp.status == 503, (resp.status, data[:300])
        assert b"served although" not in data
    asgi.wait_for_log("the database is unreachable (gateway test)")
    line = next(line for line in asgi.log_text().splitlines() if "the database is unreachable" in line)
    assert "gateway:" in line, line
    # The server keeps serving everything else.
    assert asgi.get("/hello")[1] == b"Hello from ASGI!"
    assert asgi.get("/wsgi_hello")[1] == b"Hello, world!"


def test_an_app_raising_on_lifespan_is_served_without_it(asgi):
    resp, data = asgi.get("/lifespan_raises")
    assert (resp.status, data) == (200, b"served without lifespan")


# --- HTTP/2 ---

def test_http2_scope_body_and_errors(asgi):
    headers, data = h2_request(asgi.h2_port, "GET", "/scope/x?y=1")
    assert headers[":status"] == "200", (headers, data[:500])
    scope = json.loads(data)
    assert (scope["http_version"], scope["method"], scope["path"], scope["root_path"], scope["query_string"]) == \
        ("2", "GET", "/scope/x", "/scope", "y=1")
    assert all(not name.startswith(":") for name, _ in scope["headers"]), scope["headers"]
    payload = os.urandom(1 << 20)
    headers, data = h2_request(asgi.h2_port, "POST", "/body", body=payload)
    out = json.loads(data)
    assert (headers[":status"], out["length"], out["sha256"]) == \
        ("200", len(payload), hashlib.sha256(payload).hexdigest())
    headers, data = h2_request(asgi.h2_port, "GET", "/raise_before")
    assert headers[":status"] == "500" and b"evil" not in data
    # A response that breaks after its start is reset, never completed.
    with pytest.raises(AssertionError, match="stream reset"):
        h2_request(asgi.h2_port, "GET", "/raise_after")


def test_http2_streaming_sends_each_piece_at_once(asgi):
    t = token()

    def ack(received):
        if b"first;" in received:
            asgi.marker(t).write_text("ack")

    headers, data = h2_request(asgi.h2_port, "GET", f"/stream?token={t}", on_data=ack)
    assert (headers[":status"], data) == ("200", b"first;acked;done")


def test_http2_stream_reset_reaches_the_application_as_disconnect(asgi):
    t = token()
    with socket.create_connection(("127.0.0.1", asgi.h2_port), timeout=15) as s:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":path", f"/disconnect?token={t}"), (":scheme", "http"),
                              (":authority", "x")], end_stream=True)
        s.sendall(conn.data_to_send())
        wait_for_marker(asgi, t + ".waiting")
        conn.reset_stream(1)
        s.sendall(conn.data_to_send())
        assert wait_for_marker(asgi, t, timeout=5) == "http.disconnect"
    assert "OSError=True" in wait_for_marker(asgi, t + ".send", timeout=5)


# --- Lifespan shutdown: each test has its own server ---

def lifespan_server(kind):
    group = BATTERY_GROUP if is_daemon_kind(kind) else None
    mode = "daemon" if group else "embedded"
    return asgi_server(kind, [Mount("/lifespan", ASGI, "lifespan", mode=mode, group=group, interface="asgi")])


def served_pids(srv, requests=12):
    """Pids of the processes that answered `requests` concurrent requests."""
    pids, lock = set(), threading.Lock()

    def one():
        out = get_json(srv, "/lifespan?s=0.2")
        with lock:
            pids.add(out["pid"])

    threads = [threading.Thread(target=one) for _ in range(requests)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    return pids


def wait_for_shutdowns(srv, pids, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = lifespan_events(srv)
        if all(f"shutdown {pid}" in events for pid in pids):
            return events
        time.sleep(0.05)
    raise AssertionError(f"no lifespan shutdown for some of {pids}: {lifespan_events(srv)}\n{srv.log_text()[-3000:]}")


@pytest.mark.parametrize("kind", SERVERS)
def test_lifespan_shutdown_runs_when_the_server_stops(kind):
    srv = lifespan_server(kind)
    with srv:
        pids = served_pids(srv)
        events = lifespan_events(srv)
        assert all(events.count(f"startup {pid}") == 1 for pid in pids), events
        srv.wait_for_no_connections()
    started = {int(e.split()[1]) for e in lifespan_events(srv) if e.startswith("startup")}
    events = wait_for_shutdowns(srv, started, timeout=5)
    # Each process shut down once, after its startup.
    for pid in started:
        assert events.count(f"shutdown {pid}") == 1, events
        assert events.index(f"startup {pid}") < events.index(f"shutdown {pid}"), events


@pytest.mark.parametrize("kind", EACH_SERVER_AND_MODE)
def test_lifespan_shutdown_runs_at_a_graceful_reload(kind):
    """The processes a graceful reload retires shut their applications down; the
    new ones start them up before serving."""
    srv = lifespan_server(kind)
    with srv:
        before = served_pids(srv)
        srv.graceful()
        wait_for_shutdowns(srv, before)
        deadline = time.monotonic() + 10
        while (after := served_pids(srv, requests=4)) & before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not after & before, (before, after)
        events = lifespan_events(srv)
        assert all(events.count(f"startup {pid}") == 1 for pid in after), events
        assert not any(f"shutdown {pid}" in events for pid in after), events
    # Nothing in the log says a lifespan went wrong.
    assert not re.search(r"gateway: .*lifespan.*(failed|error)", srv.log_text(), re.I), srv.log_text()[-3000:]
