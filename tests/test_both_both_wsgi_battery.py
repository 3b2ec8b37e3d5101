"""The WSGI battery: every behaviour a WSGI application relies on, checked with
real HTTP requests against every server kind (see harness.SERVERS)."""

import hashlib
import json
import os
import socket
import time

import pytest

from harness import get_json, pipelined, token


def raw_request(server, request: bytes, timeout=15.0) -> bytes:
    """Sends raw bytes, returns everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


# --- Serving and the environ ---

def test_hello(server):
    resp, data = server.get("/hello")
    assert resp.status == 200
    assert data == b"Hello, world!"
    assert resp.getheader("Content-Type") == "text/plain"


def test_environ_cgi_variables(server):
    env = get_json(server, "/environ/a%20b/%C3%A9?x=1&y=%20z",
                   headers={"X-Custom": "yes", "Content-Type": "text/x-test", "Content-Length": "0"})
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == "/environ"
    # Decoded, and UTF-8 bytes carried as latin-1 code points (PEP 3333).
    assert env["PATH_INFO"] == "/a b/" + "é".encode().decode("latin-1")
    assert env["QUERY_STRING"] == "x=1&y=%20z"
    assert env["REQUEST_URI"] == "/environ/a%20b/%C3%A9?x=1&y=%20z"
    assert env["CONTENT_TYPE"] == "text/x-test"
    assert env["CONTENT_LENGTH"] == "0"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["SERVER_PORT"] == str(server.port)
    assert env["SERVER_NAME"]
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert int(env["REMOTE_PORT"]) > 0
    assert "HTTPS" not in env
    assert env["HTTP_X_CUSTOM"] == "yes"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env


def test_environ_wsgi_and_gateway_keys(server):
    env = get_json(server, "/environ")
    assert env["wsgi.version"] == [1, 0]
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.run_once"] is False
    assert env["wsgi.input_terminated"] is True
    assert isinstance(env["wsgi.multithread"], bool) and isinstance(env["wsgi.multiprocess"], bool)
    assert env["wsgi.file_wrapper"].startswith("<")
    if server.name.endswith("-daemon"):
        assert env["gateway.mode"] == "daemon"
        assert env["gateway.process_group"] == "battery"
    else:
        assert env["gateway.mode"] == "embedded"
        assert env["gateway.process_group"] == ""
    assert env["gateway.server"] in ("apache", "nginx")
    assert env["gateway.version"]
    assert env["PATH_INFO"] == "" and env["SCRIPT_NAME"] == "/environ"


def test_multithread_follows_the_server(server):
    env = get_json(server, "/environ")
    if server.name == "apache-prefork":
        assert env["wsgi.multithread"] is False
        assert env["wsgi.multiprocess"] is True
    elif server.name == "apache-event":
        assert env["wsgi.multithread"] is True
    elif server.name.endswith("-daemon"):
        # The battery's group: processes=2 threads=4.
        assert env["wsgi.multithread"] is True
        assert env["wsgi.multiprocess"] is True
    elif server.name == "nginx":
        # Two workers, each with several Python threads (gateway_threads).
        assert env["wsgi.multithread"] is True
        assert env["wsgi.multiprocess"] is True


def test_spoofable_headers_are_dropped(server):
    env = get_json(server, "/environ", headers={"Remote_User": "admin", "X_Forwarded_For": "1.2.3.4",
                                                "Proxy": "http://evil", "X-Ok": "1"})
    assert "REMOTE_USER" not in env
    assert not any(k.startswith("HTTP_X_FORWARDED") for k in env)
    assert "HTTP_PROXY" not in env
    assert env["HTTP_X_OK"] == "1"


@pytest.mark.parametrize("method,path,headers,body", [
    ("GET", "/environ/", {}, None),
    ("POST", "/echo_validated?how=readn", {"Content-Type": "application/x-www-form-urlencoded"}, b"a=1&b=2"),
    ("PUT", "/echo_validated?how=readline", {}, b"line1\nline2\nlast"),
    ("DELETE", "/environ/x/y/", {"Accept": "*/*", "Cookie": "a=1"}, None),
    ("OPTIONS", "/environ", {}, None),
    ("PATCH", "/echo_validated?how=iter", {"Content-Type": "text/plain"}, b"x\n" * 1000),
    ("GET", "/environ/%7Euser/%2Bplus?q=%E2%9C%93&empty=", {"Accept-Language": "fr"}, None),
    ("GET", "/environ?" + "k=v&" * 300, {"X-Long": "v" * 4000}, None),
])
def test_request_battery_passes_wsgiref_validate(server, method, path, headers, body):
    """Every request shape reaches a validator-wrapped app without a PEP 3333 complaint."""
    resp, data = server.request(method, path, body=body, headers=headers)
    assert resp.status == 200, (resp.status, data[:500], server.log_text()[-3000:])
    assert "AssertionError" not in server.log_text()


# --- Request bodies ---

@pytest.mark.parametrize("how", ["read", "readn", "readline", "readline_n", "readlines", "iter"])
def test_input_methods(server, how):
    payload = b"".join(b"line %d of the body\n" % i for i in range(5000)) + b"no newline at the end"
    out = get_json(server, f"/echo?how={how}", method="POST", body=payload)
    assert out["length"] == len(payload)
    assert out["sha256"] == hashlib.sha256(payload).hexdigest()
    assert out["content_length"] == str(len(payload))


@pytest.mark.parametrize("how", ["readn", "readline", "readlines", "iter"])
def test_input_methods_under_validator(server, how):
    payload = b"abc\n" * 20000
    out = get_json(server, f"/echo_validated?how={how}", method="POST", body=payload)
    assert out["length"] == len(payload)


def test_large_body(server):
    payload = os.urandom(1 << 20) * 24  # 24 MiB
    out = get_json(server, "/echo?how=readn", method="POST", body=payload, timeout=120)
    assert out["length"] == len(payload)
    assert out["sha256"] == hashlib.sha256(payload).hexdigest()


def test_chunked_body(server):
    pieces = [os.urandom(n) for n in (1, 100, 65536, 3, 1 << 20, 7)]

    def gen():
        yield from pieces

    conn = server.connect()
    conn.request("POST", "/echo?how=read", body=gen(), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    payload = b"".join(pieces)
    assert resp.status == 200
    assert out["length"] == len(payload)
    assert out["sha256"] == hashlib.sha256(payload).hexdigest()
    assert out["content_length"] in (None, "")
    assert out["input_terminated"] is True


def test_unread_body_keeps_connection_usable(server):
    conn = server.connect()
    conn.request("POST", "/hello", body=b"x" * 100000)
    resp = conn.getresponse()
    assert resp.read() == b"Hello, world!"
    conn.request("GET", "/hello")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"Hello, world!"
    conn.close()


def test_pipelined_requests_are_answered_in_order(server):
    """Requests sent back to back in one packet: a fixed-length response, one whose
    unread body must be skipped, a chunked one, then the last one closes."""
    requests = (b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde"
                b"GET /writer HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    responses, rest = pipelined(server.port, requests, ["GET", "POST", "GET", "GET"])
    for response in responses:
        assert not isinstance(response, Exception) and response[0] == 200, server.log_text()[-2000:]
    assert rest == b""
    assert [body for _, _, body in responses] == [b"Hello, world!", b"Hello, world!", b"written by write()",
                                                  b"Hello, world!"]



# --- Responses ---

def test_streaming_sends_each_chunk_at_once(server):
    """The app waits for the client to acknowledge the first chunk: that only
    completes if the first chunk was flushed before the generator resumed."""
    t = token()
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        s.sendall(f"GET /stream?token={t} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while b"first;" not in received:
            data = s.recv(65536)
            assert data, received
            received += data
        server.marker(t).write_text("ack")
        while True:
            data = s.recv(65536)
            if not data:
                break
            received += data
    assert b"acked;" in received, received
    assert b"done" in received
    assert b"Transfer-Encoding: chunked" in received  # no Content-Length: the server chunks


def test_single_item_response_gets_a_content_length(server):
    resp, data = server.get("/single")
    assert data == b"one piece"
    assert resp.getheader("Content-Length") == "9"
    assert resp.getheader("Transfer-Encoding") is None


def test_write_callable(server):
    resp, data = server.get("/writer")
    assert resp.status == 200
    assert data == b"written by write()"


def test_close_is_called(server):
    t = token()
    resp, data = server.get(f"/closing?token={t}&chunks=3")
    assert resp.status == 200 and len(data) == 3 * 65536
    assert server.marker(t).read_text() == "closed"


def test_close_is_called_when_client_disconnects(server):
    t = token()
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        s.sendall(f"GET /closing?token={t}&chunks=200&delay=0.05 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(65536)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not server.marker(t).exists():
        time.sleep(0.05)
    assert server.marker(t).exists(), "close() was not called after the client went away"
    resp, data = server.get("/hello")
    assert data == b"Hello, world!"


def _make_file(server, size):
    name = f"file-{token()}"
    content = os.urandom(size)
    server.marker(name).write_bytes(content)
    server.marker(name).chmod(0o644)
    return name, content


def test_file_wrapper_uses_the_server_file_path(server):
    name, content = _make_file(server, 5 * 1024 * 1024 + 123)
    t = token()
    resp, data = server.get(f"/filewrapper?file={name}&token={t}")
    assert resp.status == 200
    assert data == content
    assert server.marker(t + ".closed").exists(), "close() of the file wrapper was not called"
    assert not server.marker(t + ".read").exists(), "the file was read through Python, not sent by the server"


def test_file_wrapper_offset_and_length(server):
    name, content = _make_file(server, 100000)
    resp, data = server.get(f"/filewrapper?file={name}&token={token()}&offset=1000&length=5000")
    assert resp.status == 200
    assert data == content[1000:6000]


def test_file_wrapper_iterated_when_wrapped(server):
    name, content = _make_file(server, 300000)
    t = token()
    resp, data = server.get(f"/filewrapper_validated?file={name}&token={t}")
    assert resp.status == 200 and data == content
    assert server.marker(t + ".closed").exists()


def test_head(server):
    resp, data = server.request("HEAD", "/hello")
    assert resp.status == 200
    assert data == b""
    assert resp.getheader("Content-Length") == "13"


def test_many_set_cookie_headers(server):
    resp, _ = server.get("/cookies?n=25")
    cookies = resp.headers.get_all("Set-Cookie")
    assert len(cookies) == 25
    assert cookies[0].startswith("c0=0") and cookies[24].startswith("c24=24")


def test_custom_status_and_empty_response(server):
    resp, data = server.get("/status?code=404+Not+Here")
    assert resp.status == 404 and resp.reason == "Not Here" and data == b"404 Not Here"
    resp, data = server.get("/empty")
    assert resp.status == 204 and data == b""


def test_exc_info_replaces_response_before_headers(server):
    resp, data = server.get("/exc_info_before")
    assert resp.status == 500
    assert resp.reason == "Handled Error"
    assert data == b"handled: custom error page"


def test_flask_app(server):
    resp, data = server.get("/flask/")
    assert resp.status == 200 and data == b"Hello from Flask"
    out = get_json(server, "/flask/items/42?x=1", method="POST", body=json.dumps({"a": 1}),
                   headers={"Content-Type": "application/json"})
    assert out == {"id": 42, "method": "POST", "payload": {"a": 1}, "script_root": "/flask",
                   "path": "/items/42", "args": {"x": "1"}}
    resp, data = server.get("/flask/missing")
    assert resp.status == 404 and json.loads(data)["path"] == "/missing"


# --- The interpreter ---

def test_virtualenv_extensions_and_python_path(server):
    info = get_json(server, "/extensions")
    assert info["ssl"].startswith("OpenSSL")
    assert info["sqlite"] and info["decimal"]
    assert info["numpy"] and info["numpy_sum"] == 45
    assert os.path.realpath(info["prefix"]) == os.path.realpath(server.settings.python_home)
    assert info["helper"] == "from the python path"
    # Python installed no signal handlers: the server owns signals.
    assert "default_int_handler" not in info["signal_handlers"]["SIGINT"]


def test_threads_keep_their_python_thread_state(server):
    conn = server.connect()
    counts = []
    for _ in range(40):
        conn.request("GET", "/threadlocal")
        resp = conn.getresponse()
        counts.append(json.loads(resp.read())["count"])
    conn.close()
    assert max(counts) > 1, "threading.local was reset between requests: thread states are not kept"


def test_gil_is_released_while_reading_the_body(server):
    """A request stalled in the middle of its body must not block other requests."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        s.sendall(b"POST /echo?how=read HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.3)  # let the app start reading and block in the server
        resp, data = server.get("/hello", timeout=10)
        assert data == b"Hello, world!"
        s.sendall(b"x" * 99000)
        reply = b""
        while b'"length": 100000' not in reply:
            chunk = s.recv(65536)
            assert chunk, reply
            reply += chunk


def test_slow_app_does_not_block_others(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        s.sendall(b"GET /slow?s=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.2)
        start = time.monotonic()
        resp, data = server.get("/hello", timeout=10)
        assert data == b"Hello, world!"
        assert time.monotonic() - start < 2.5, "a sleeping application blocked another request"
        assert b"slept" in s.recv(65536) + s.recv(65536)


# --- Broken applications ---

# (path, message in the log, whether the error has a Python traceback)
BROKEN = [
    ("/raise_before", "boom before start_response", True),
    ("/raise_after", "boom after start_response", True),
    ("/bad_status", "status must be a str", True),
    ("/crlf_header", "CR, LF, NUL or another control character", True),
    ("/str_body", "chunks must be bytes, got str", False),
    ("/no_start_response", "before calling start_response", False),
    ("/returns_none", "is not iterable", False),
]


@pytest.mark.parametrize("path,message,traceback", BROKEN)
def test_broken_app_gets_500_and_logged_traceback(server, path, message, traceback):
    probe = token()
    resp, data = server.get(f"{path}?probe={probe}")
    assert resp.status == 500
    assert b"evil" not in data
    server.wait_for_log(message)
    lines = [line for line in server.log_text().splitlines() if probe in line]
    assert any(message in line for line in lines), lines
    assert all(f"gateway: GET {path}?probe={probe}: " in line for line in lines), lines
    if traceback:
        assert any("Traceback (most recent call last)" in line for line in lines), lines
        assert any("battery.py" in line for line in lines), lines
    assert server.get("/hello")[1] == b"Hello, world!"


def test_crlf_header_never_reaches_the_client(server):
    raw = raw_request(server, b"GET /crlf_header HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 500")
    assert b"evil=1" not in raw and b"X-Injected" not in raw


def test_exception_midway_cuts_the_response(server):
    raw = raw_request(server, b"GET /raise_midway HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"first part;" in raw
    # The connection was closed without the last chunk: the client sees a truncated body.
    assert not raw.endswith(b"0\r\n\r\n")
    server.wait_for_log("boom halfway through the body")
    assert "gateway: GET /raise_midway" in server.log_text()


def test_exc_info_after_headers_reraises(server):
    raw = raw_request(server, b"GET /exc_info_after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and b"partial " in raw and b"never sent" not in raw
    assert not raw.endswith(b"0\r\n\r\n")
    server.wait_for_log("late failure after headers")


def test_close_raising_is_logged(server):
    resp, data = server.get("/close_raises")
    assert resp.status == 200 and data == b"body"
    server.wait_for_log("close() failed")


def test_server_survives_a_burst_of_failures(server):
    for _ in range(30):
        for path, _, _ in BROKEN[:3]:
            assert server.get(path)[0].status == 500
    assert server.get("/hello")[1] == b"Hello, world!"


def test_django_app(server):
    if "/django" not in [m.prefix for m in server.mounts]:
        pytest.skip("no Django mount on this server")
    out = get_json(server, "/django/items/7/?q=1", method="POST", body=b"x" * 5000,
                   headers={"Content-Type": "application/octet-stream"})
    assert out["framework"] == "django"
    assert out["path"] == "/django/items/7/" and out["script_name"] == "/django"
    assert out["query"] == {"q": "1"} and out["body_length"] == 5000
    resp, _ = server.get("/django/missing/")
    assert resp.status == 404


def test_output_streams_go_to_the_error_log(server):
    tag = token()
    assert server.get(f"/prints?tag={tag}")[1] == b"printed"
    for stream in ("wsgi.errors", "stderr", "stdout", "stdout.buffer", "stderr.buffer"):
        server.wait_for_log(f"{stream} says {tag}")
    lines = [line for line in server.log_text().splitlines() if tag in line]
    assert any(f"gateway: GET /prints?tag={tag}: wsgi.errors says {tag}" in line for line in lines), lines
    assert any(f"gateway: python stderr: stderr says {tag}" in line for line in lines), lines
    assert any(f"gateway: python stdout: stdout says {tag}" in line for line in lines), lines
    # The split character arrives whole (Apache's own log escapes non-ASCII bytes).
    euro = ("\u20ac", "\\xe2\\x82\\xac")
    assert any(f"gateway: python stdout: stdout.buffer says {tag} {e}" in line
               for line in lines for e in euro), lines
    assert any(f"gateway: python stderr: stderr.buffer says {tag}" in line for line in lines), lines
