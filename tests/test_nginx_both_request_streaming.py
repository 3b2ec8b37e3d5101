"""nginx passes request bodies to the application as they arrive, embedded (WSGI
on a thread, ASGI on the event loop) and in daemon mode: the application has the
first piece while the client still holds the rest, a large upload is never
spooled to client_body_temp, chunked and HTTP/2 bodies stream too; a client that
leaves or stalls mid-upload fails the application's read, and a chunked body
past client_max_body_size gets a 413. The applications are tests/apps/upload.py."""

import hashlib
import json
import os
import socket
import threading
import time

import h2.config
import h2.connection
import pytest

from harness import VENV, Mount, Nginx, battery_settings, built, h2_request, token

pytestmark = pytest.mark.skipif(not built("nginx"), reason="the nginx module or gateway-daemon is not built")

GROUP = "uploads"
# The mount of each interface; /limited_* take at most 1 MiB (client_max_body_size).
PREFIXES = {"wsgi": "/upload", "asgi": "/aupload"}
LIMITED = {"wsgi": "/limited_upload", "asgi": "/limited_aupload"}
CALLABLES = {"wsgi": "application", "asgi": "asgi"}


class UploadNginx(Nginx):
    """nginx whose /limited_* locations have a client_max_body_size of 1 MiB."""

    def location(self, m: Mount) -> str:
        location = super().location(m)
        if m.prefix.startswith("/limited"):
            location = location[:-1] + "client_max_body_size 1m; }"
        return location


@pytest.fixture(scope="module", params=["embedded", "daemon"])
def srv(request):
    mode = request.param
    group = GROUP if mode == "daemon" else None
    mounts = [Mount(prefix, "upload.py", CALLABLES[iface], mode=mode, group=group, interface=iface)
              for table in (PREFIXES, LIMITED) for iface, prefix in table.items()]
    server = UploadNginx(mounts, battery_settings(), http2=True, http_extra="client_body_timeout 2s;")
    server.settings.python_path = [str(server.apps / "lib")]
    if group:
        server.settings.daemons = {GROUP: f"processes=1 threads=4 python-home={VENV}"}
    with server:
        yield server


IFACES = pytest.mark.parametrize("iface", ["wsgi", "asgi"])


def wait_for_marker(srv, name, timeout=10.0) -> str:
    path = srv.marker(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text()):
            return text
        time.sleep(0.02)
    raise AssertionError(f"no marker {name} after {timeout}s:\n{srv.log_text()[-3000:]}")


def recv_all(s) -> bytes:
    chunks = []
    while data := s.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def reply_json(reply: bytes) -> dict:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:500]
    return json.loads(body)


def spooled(srv) -> list[str]:
    """The files in nginx's client_body_temp_path."""
    return [str(p) for p in (srv.dir / "tmp-body").rglob("*") if p.is_file()]


@IFACES
def test_the_application_has_the_first_piece_before_the_client_sends_the_rest(srv, iface):
    t = token()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        s.sendall(f"POST {PREFIXES[iface]}?progress={t} HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n"
                  "Connection: close\r\n\r\n".encode() + b"x" * 100000)
        assert 0 < int(wait_for_marker(srv, t)) <= 100000
        s.sendall(b"y" * 100000)
        out = reply_json(recv_all(s))
    assert out["length"] == 200000
    assert out["sha256"] == hashlib.sha256(b"x" * 100000 + b"y" * 100000).hexdigest()


@IFACES
def test_a_ten_mib_upload_arrives_intact_and_is_never_spooled(srv, iface):
    payload = os.urandom(10 << 20)
    half = len(payload) // 2
    t = token()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(f"POST {PREFIXES[iface]}?progress={t} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n"
                  "Connection: close\r\n\r\n".encode() + payload[:half])
        # Half is sent (some of it still in the sockets' buffers): nothing is on disk.
        wait_for_marker(srv, t)
        assert spooled(srv) == []
        s.sendall(payload[half:])
        out = reply_json(recv_all(s))
    assert out == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    assert "buffered to a temporary file" not in srv.log_text()


@IFACES
def test_a_chunked_upload_streams(srv, iface):
    t = token()
    pieces = [os.urandom(n) for n in (1, 70000, 5, 300000, 4096)]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        s.sendall(f"POST {PREFIXES[iface]}?progress={t} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  "Connection: close\r\n\r\n".encode())
        for i, piece in enumerate(pieces):
            s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            if i == 1:
                assert int(wait_for_marker(srv, t)) > 0
        s.sendall(b"0\r\n\r\n")
        out = reply_json(recv_all(s))
    body = b"".join(pieces)
    assert out == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@IFACES
def test_an_http2_upload_streams(srv, iface):
    payload = os.urandom(3 << 20)  # far past every HTTP/2 window
    headers, data = h2_request(srv.h2_port, "POST", PREFIXES[iface], body=payload, timeout=60)
    assert headers[":status"] == "200"
    assert json.loads(data) == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


@IFACES
def test_a_client_that_leaves_mid_upload_fails_the_read(srv, iface):
    t = token()
    path = f"{PREFIXES[iface]}?progress={t}"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode() + b"x" * 100000)
        wait_for_marker(srv, t)
    seen = wait_for_marker(srv, t + ".error")
    assert seen == ("http.disconnect" if iface == "asgi" else "OSError OSError=True"), seen
    srv.wait_for_log(f"gateway: POST {path}: the client closed the connection while sending the request body")
    assert reply_json_of(srv, iface)["length"] == 3


@IFACES
def test_an_application_that_does_not_read_holds_the_client_back(srv, iface):
    """While the application holds on to its first piece, nginx reads only a
    bounded amount ahead: the client's sending stalls far before the 64 MiB are
    out. Once the application reads on, all arrives intact."""
    t, hold = token(), token()
    size = 64 << 20
    chunk = os.urandom(1 << 20)
    sent = 0
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        s.sendall(f"POST {PREFIXES[iface]}?progress={t}&hold={hold} HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode())
        s.settimeout(2)
        try:
            while sent < size:
                sent += s.send(chunk[:min(len(chunk), size - sent)])
        except TimeoutError:
            pass
        assert sent < size // 2, f"{sent} bytes went out while the application did not read"
        srv.marker(hold).write_text("go")
        s.settimeout(30)
        while sent < size:
            sent += s.send(chunk[:min(len(chunk), size - sent)])
        out = reply_json(recv_all(s))
    whole = (chunk * 64)[:size]
    assert out == {"length": size, "sha256": hashlib.sha256(whole).hexdigest()}


@IFACES
def test_an_http2_upload_waits_for_the_application_past_client_body_timeout(srv, iface):
    """While the application holds on to its first piece for longer than
    client_body_timeout (2 s here), the HTTP/2 client is held back by its
    window, and that wait is not the client's: the upload then completes."""
    t, hold = token(), token()
    payload = os.urandom(2 << 20)
    result = {}

    def upload():
        result["reply"] = h2_request(srv.h2_port, "POST", f"{PREFIXES[iface]}?progress={t}&hold={hold}",
                                     body=payload, timeout=30)

    client = threading.Thread(target=upload)
    client.start()
    wait_for_marker(srv, t)
    time.sleep(3.5)
    srv.marker(hold).write_text("go")
    client.join(30)
    headers, data = result["reply"]
    assert headers[":status"] == "200", data
    assert json.loads(data) == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


@IFACES
def test_an_http2_client_that_resets_mid_upload_fails_the_read(srv, iface):
    t = token()
    path = f"{PREFIXES[iface]}?progress={t}"
    with socket.create_connection(("127.0.0.1", srv.h2_port), timeout=15) as s:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":path", path), (":scheme", "http"),
                              (":authority", "x"), ("content-length", "1000000")])
        for _ in range(3):  # within the stream's first window
            conn.send_data(1, b"x" * 16384)
        s.sendall(conn.data_to_send())
        wait_for_marker(srv, t)
        conn.reset_stream(1)
        s.sendall(conn.data_to_send())
        seen = wait_for_marker(srv, t + ".error")
    assert seen == ("http.disconnect" if iface == "asgi" else "OSError OSError=True"), seen
    srv.wait_for_log(f"gateway: POST {path}: the client closed the connection while sending the request body")
    assert reply_json_of(srv, iface)["length"] == 3


@IFACES
def test_a_client_that_stalls_mid_upload_is_cut_by_client_body_timeout(srv, iface):
    t = token()
    path = f"{PREFIXES[iface]}?progress={t}"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode() + b"x" * 100000)
        wait_for_marker(srv, t)
        seen = wait_for_marker(srv, t + ".error", timeout=10)
        assert s.recv(65536) == b""  # nginx closed the connection
    assert seen == ("http.disconnect" if iface == "asgi" else "OSError OSError=True"), seen
    srv.wait_for_log(f"gateway: POST {path}: the client sent nothing of the request body for client_body_timeout")
    assert reply_json_of(srv, iface)["length"] == 3


@IFACES
def test_a_chunked_body_past_client_max_body_size_gets_413(srv, iface):
    t = token()
    path = f"{LIMITED[iface]}?progress={t}"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"%x\r\n" % 65536 + b"z" * 65536 + b"\r\n"
        s.sendall(piece)
        wait_for_marker(srv, t)
        reply = b""
        try:
            for _ in range(40):  # 2.5 MiB, past the 1 MiB limit
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            reply = recv_all(s)
        except ConnectionResetError:
            pass
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    seen = wait_for_marker(srv, t + ".error")
    assert seen == ("http.disconnect" if iface == "asgi" else "OSError OSError=True"), seen
    srv.wait_for_log(f"gateway: POST {path}: the request body is larger than client_max_body_size; answering 413")


def test_a_content_length_past_client_max_body_size_gets_413_before_the_application_runs(srv):
    t = token()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        s.sendall(f"POST {LIMITED['wsgi']}?progress={t} HTTP/1.1\r\nHost: x\r\nContent-Length: {2 << 20}\r\n"
                  "\r\n".encode())
        assert recv_all(s).startswith(b"HTTP/1.1 413")
    assert not srv.marker(t).exists() and not srv.marker(t + ".error").exists()


def test_an_asgi_application_detected_at_its_first_request_streams_it_too():
    """Without interface=, the first request runs on a thread while the
    application's protocol is found out; its body streams there too."""
    with UploadNginx([Mount("/detected", "upload.py", "asgi")], battery_settings()) as srv:
        t = token()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            s.sendall(f"POST /detected?progress={t} HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n"
                      "Connection: close\r\n\r\n".encode() + b"x" * 100000)
            assert 0 < int(wait_for_marker(srv, t)) <= 100000
            s.sendall(b"x" * 100000)
            assert reply_json(recv_all(s))["length"] == 200000


def test_clients_that_leave_mid_upload_leave_no_thread_behind():
    """With one module thread, uploads whose clients left do not keep it: the
    next uploads are served."""
    with UploadNginx([Mount("/upload", "upload.py")], battery_settings(), workers=1, threads=1) as srv:
        for _ in range(4):
            t = token()
            with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
                s.sendall(f"POST /upload?progress={t} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
                          "\r\n".encode() + b"x" * 100000)
                wait_for_marker(srv, t)
            wait_for_marker(srv, t + ".error")
        for _ in range(3):
            resp, data = srv.request("POST", "/upload", body=os.urandom(300000), timeout=10)
            assert resp.status == 200 and json.loads(data)["length"] == 300000


def test_a_worker_that_stops_mid_upload_lets_the_application_finish():
    """nginx -s stop while a body arrives: the application's read fails, its
    thread ends, and the worker exits without a thread left busy."""
    srv = UploadNginx([Mount("/upload", "upload.py")], battery_settings(), workers=1)
    with srv:
        t = token()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            s.sendall(f"POST /upload?progress={t} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
                      "\r\n".encode() + b"x" * 100000)
            wait_for_marker(srv, t)
            srv.stop()
        assert wait_for_marker(srv, t + ".error") == "OSError OSError=True"
        assert "still busy" not in srv.log_text(), srv.log_text()[-2000:]


def reply_json_of(srv, iface) -> dict:
    """The server still serves: a small upload's answer."""
    resp, data = srv.request("POST", PREFIXES[iface], body=b"abc")
    assert resp.status == 200, data
    return json.loads(data)
