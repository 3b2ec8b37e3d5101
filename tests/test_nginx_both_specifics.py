"""What only nginx has: its configuration test, locations and server blocks, the
Python threads inside each worker, temp-file bodies, HTTP/2, backpressure
towards slow clients, reload and graceful quit; embedded mostly, and type filters
in both modes."""

import gzip
import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import h2.config
import h2.connection
import h2.events
import pytest

from harness import MODULES, VENV, Mount, Nginx, Settings, battery_settings, built, get_json, h2_request, run_make

pytestmark = pytest.mark.skipif(not built("nginx", daemon=False),
                                reason="ngx_http_gateway_module.so is not built (make nginx)")


def make(mounts, **kw):
    srv = Nginx(mounts, battery_settings(), **kw)
    srv.settings.python_path = [str(srv.apps / "lib")]
    return srv


def threads_of(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- Filters by type ---

@pytest.mark.parametrize("mode", ["embedded", "daemon"])
def test_type_filters_see_the_media_type_of_a_type_with_a_charset(mode):
    """gzip_types (like charset_types, sub_filter_types, ssi_types) matches the
    media type alone: `text/html; charset=utf-8` from the application is
    compressed, and the client gets the Content-Type as the application sent it."""
    group = "g" if mode == "daemon" else None
    srv = make([Mount("/typed", "battery.py", "typed", mode=mode, group=group)],
               http_extra="gzip on; gzip_types text/html text/css;")
    if group:
        srv.settings.daemons = {"g": f"python-home={VENV}"}
    with srv:
        for ctype in ("text/html; charset=utf-8", 'text/css;charset="UTF-8"', "text/html"):
            resp, data = srv.request("GET", f"/typed?type={quote(ctype)}",
                                     headers={"Accept-Encoding": "gzip"})
            assert resp.status == 200
            assert resp.getheader("Content-Type") == ctype
            assert resp.getheader("Content-Encoding") == "gzip", (ctype, resp.getheaders())
            assert gzip.decompress(data).startswith(b"<p>gateway ")
        resp, _ = srv.request("GET", f"/typed?type={quote('text/plain; charset=utf-8')}",
                              headers={"Accept-Encoding": "gzip"})
        assert resp.getheader("Content-Encoding") is None


# --- Configuration test ---

def test_configtest_passes_on_a_valid_configuration():
    srv = make([Mount("/hello", "battery.py", "hello")], http_extra="gateway_threads 4;\ngateway_daemon g processes=2 threads=3;")
    r = srv.configtest()
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr


@pytest.mark.parametrize("directive,message", [
    ("gateway_daemon g colour=red;", "unknown daemon option 'colour'"),
    ("gateway_threads 0;", "needs a number of threads from 1 to 1024, got '0'"),
    ("gateway_threads many;", "got 'many'"),
    ("gateway_mode daemon;", "'daemon' needs the name of a daemon process group"),
    ("gateway_python_home /nonexistent/venv;", "'/nonexistent/venv' is not a directory"),
    ("gateway_python_home {apps}/venv-py27;", "was made by Python 2.7.18, but Gateway embeds Python 3."),
    ("gateway_threads 4; gateway_threads 5;", "is duplicate"),
])
def test_configtest_names_file_and_line_of_a_bad_directive(directive, message):
    srv = make([Mount("/hello", "battery.py", "hello")])
    directive = directive.format(apps=srv.apps)
    srv.http_extra = directive
    srv.settings.python_home = None
    r = srv.configtest()
    assert r.returncode != 0
    name = directive.split()[0]
    where = f"in {srv.conf}:{srv.line_of(directive)}"
    assert any(f'"{name}" directive' in line and message in line and line.endswith(where)
               for line in r.stderr.splitlines()), r.stderr


def test_configtest_fails_on_an_unreadable_app_file():
    srv = make([Mount("/missing", "no_such_app.py")])
    r = srv.configtest()
    assert r.returncode != 0
    assert "cannot read the WSGI script" in r.stderr and "no_such_app.py" in r.stderr, r.stderr
    assert f"in {srv.conf}:{srv.line_of('no_such_app.py')}" in r.stderr, r.stderr


def test_configtest_rejects_gateway_app_outside_a_location():
    srv = make([Mount("/hello", "battery.py", "hello")], http_extra=f"gateway_app {MODULES}/x.py;")
    r = srv.configtest()
    assert r.returncode != 0 and '"gateway_app" directive is not allowed here' in r.stderr, r.stderr


# --- Locations and servers ---

def test_locations_and_servers_mount_different_apps():
    mounts = [
        Mount("/hello", "battery.py", "hello"),
        Mount("/who/", "serving.py", "whoami"),
        Mount("/", "serving.py", "whoami"),
        Mount("~ ^/re/(.*)$", "serving.py", "whoami"),
        Mount("/hello", "serving.py", "whoami", vhost="other.test"),
    ]
    with make(mounts) as srv:
        assert srv.get("/hello")[1] == b"Hello, world!"
        who = get_json(srv, "/who/a/b")
        assert (who["script_name"], who["path_info"]) == ("/who", "/a/b")
        root = get_json(srv, "/elsewhere/x")
        assert (root["script_name"], root["path_info"]) == ("", "/elsewhere/x")
        # A regex location has no prefix: SCRIPT_NAME is empty, PATH_INFO the whole path.
        regex = get_json(srv, "/re/x")
        assert (regex["script_name"], regex["path_info"]) == ("", "/re/x")
        # The same path in another server block runs that server's application.
        other = get_json(srv, "/hello/there", host="other.test")
        assert (other["script_name"], other["path_info"]) == ("/hello", "/there")


# --- Threads ---

def test_python_runs_on_module_threads_only():
    with make([Mount("/who", "serving.py", "whoami")]) as srv:
        who = get_json(srv, "/who")
        assert who["pid"] in srv.children()
        # The event loop is the worker's main thread (tid == pid): Python never runs there.
        assert who["tid"] != who["pid"]
        # The master never starts Python: it has no threads besides its own.
        assert threads_of(srv.pid()) == 1


def test_cache_helper_processes_do_not_start_python():
    srv = make([Mount("/who", "serving.py", "whoami")], workers=1)
    srv.http_extra = f"proxy_cache_path {srv.dir}/cache keys_zone=gatewaytest:1m;"
    with srv:
        assert get_json(srv, "/who")["pid"] in srv.children()
        kids = srv.children()
        assert len(kids) >= 2, kids  # the worker, the cache manager (and the loader for a while)
        assert sorted(threads_of(k) for k in kids) == [1] * (len(kids) - 1) + [1 + 8]
        assert len(srv.workers_started()) == 1


def test_sleeping_request_does_not_delay_others_in_one_worker():
    with make([Mount("/slow", "battery.py", "slow"), Mount("/hello", "battery.py", "hello")], workers=1) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            s.sendall(b"GET /slow?s=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            time.sleep(0.2)
            start = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                bodies = list(pool.map(lambda _: srv.get("/hello", timeout=10)[1], range(12)))
            elapsed = time.monotonic() - start
            assert bodies == [b"Hello, world!"] * 12
            assert elapsed < 1.0, f"requests waited {elapsed:.2f}s behind a sleeping one"
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"slept")


def test_client_leaving_a_silent_application_ends_the_request_at_once():
    notice = "the client closed the connection while the application was running"
    with make([Mount("/slow", "battery.py", "slow"), Mount("/hello", "battery.py", "hello")],
              workers=1, http2=True) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            s.sendall(b"GET /slow?s=3 HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
        start = time.monotonic()
        srv.wait_for_log(notice, timeout=2)
        assert time.monotonic() - start < 1.5, "nginx noticed only when the application wrote"
        # HTTP/2: the client cancels the stream.
        with socket.create_connection(("127.0.0.1", srv.h2_port), timeout=15) as s:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "GET"), (":path", "/slow?s=3"), (":scheme", "http"),
                                  (":authority", "x")], end_stream=True)
            s.sendall(conn.data_to_send())
            time.sleep(0.3)
            conn.reset_stream(1)
            s.sendall(conn.data_to_send())
            start = time.monotonic()
            while time.monotonic() - start < 2 and srv.log_text().count(notice) < 2:
                time.sleep(0.05)
            assert srv.log_text().count(notice) == 2, srv.log_text()[-2000:]
        assert srv.get("/hello")[1] == b"Hello, world!"


# --- Bodies ---

def test_body_larger_than_the_body_buffer_arrives_intact_and_is_never_spooled():
    """A body far past client_body_buffer_size streams through that buffer to the
    application: nginx writes none of it to a temporary file."""
    with make([Mount("/echo", "battery.py", "echo")], http_extra="client_body_buffer_size 1k;") as srv:
        payload = os.urandom(3 << 20)
        resp, data = srv.request("POST", "/echo?how=readn", body=payload, timeout=60)
        out = json.loads(data)
        assert out["length"] == len(payload) and out["sha256"] == hashlib.sha256(payload).hexdigest()
        assert "a client request body is buffered to a temporary file" not in srv.log_text()


@pytest.mark.parametrize("sendfile", [True, False])
def test_file_wrapper_with_and_without_sendfile(sendfile):
    with make([Mount("/file", "battery.py", "filewrapper")], sendfile=sendfile) as srv:
        content = os.urandom(3 << 20)
        srv.marker("payload").write_bytes(content)
        srv.marker("payload").chmod(0o644)
        resp, data = srv.get("/file?file=payload&token=t1&offset=10")
        assert resp.status == 200 and data == content[10:]
        assert srv.marker("t1.closed").exists() and not srv.marker("t1.read").exists()
        # The application closed its file long ago: nginx sends from its own descriptor.
        resp, data = srv.get("/file?file=payload&token=t2&offset=5&length=1000")
        assert data == content[5:1005]


# --- HTTP/2 ---

def test_http2_get_and_post():
    mounts = [Mount("/who", "serving.py", "whoami"), Mount("/echo", "battery.py", "echo"),
              Mount("/cookies", "battery.py", "cookies"), Mount("/big", "serving.py", "big")]
    with make(mounts, http2=True) as srv:
        headers, data = h2_request(srv.h2_port, "GET", "/who/x")
        assert headers[":status"] == "200"
        who = json.loads(data)
        assert who["protocol"] == "HTTP/2.0" and who["path_info"] == "/x"
        payload = os.urandom(1 << 20)
        headers, data = h2_request(srv.h2_port, "POST", "/echo?how=read", body=payload)
        out = json.loads(data)
        assert headers[":status"] == "200"
        assert out["length"] == len(payload) and out["sha256"] == hashlib.sha256(payload).hexdigest()
        headers, data = h2_request(srv.h2_port, "GET", "/cookies?n=3")
        assert headers[":status"] == "200"
        # Larger than every HTTP/2 window: sending waits for the client's window updates.
        headers, data = h2_request(srv.h2_port, "GET", "/big?mib=8")
        assert headers[":status"] == "200" and data == b"x" * (8 << 20)


def test_http2_battery_behaviours():
    mounts = [Mount(f"/{name}", "battery.py", name)
              for name in ("hello", "cookies", "raise_before", "raise_midway", "filewrapper", "empty")]
    with make(mounts, http2=True) as srv:
        headers, data = h2_request(srv.h2_port, "GET", "/hello")
        assert (headers[":status"], data) == ("200", b"Hello, world!")
        headers, data = h2_request(srv.h2_port, "HEAD", "/hello")
        assert (headers[":status"], headers["content-length"], data) == ("200", "13", b"")
        headers, data = h2_request(srv.h2_port, "GET", "/empty")
        assert (headers[":status"], data) == ("204", b"")
        headers, data = h2_request(srv.h2_port, "GET", "/raise_before")
        assert headers[":status"] == "500" and b"evil" not in data
        # A response that breaks after its headers is reset, never completed.
        with pytest.raises(AssertionError, match="stream reset"):
            h2_request(srv.h2_port, "GET", "/raise_midway")
        content = os.urandom(1 << 20)
        srv.marker("h2file").write_bytes(content)
        srv.marker("h2file").chmod(0o644)
        headers, data = h2_request(srv.h2_port, "GET", "/filewrapper?file=h2file&token=h2")
        assert headers[":status"] == "200" and data == content


# --- Backpressure ---

def test_slow_client_does_not_make_the_worker_grow():
    with make([Mount("/big", "serving.py", "big")], workers=1) as srv:
        (worker,) = srv.children()
        before = rss_kib(worker)
        mib = 200
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(f"GET /big?mib={mib} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            peak = before
            for _ in range(30):  # 3 s without reading
                time.sleep(0.1)
                peak = max(peak, rss_kib(worker))
            total = 0
            while chunk := s.recv(1 << 20):
                total += len(chunk)
                peak = max(peak, rss_kib(worker)) if total % (16 << 20) < (1 << 20) else peak
        assert total > mib << 20, total
        grown = (peak - before) / 1024
        assert grown < 64, f"the worker grew by {grown:.0f} MiB while the client did not read"


def test_client_leaving_while_the_app_waits_for_room_ends_the_app():
    with make([Mount("/big", "serving.py", "big")], workers=1) as srv:
        token = f"big-{time.monotonic_ns()}"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(f"GET /big?mib=200&token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(1)  # the application is now blocked: the queue towards nginx is full
            assert not srv.marker(token).exists()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not srv.marker(token).exists():
            time.sleep(0.05)
        assert srv.marker(token).exists(), "close() was not called after the client left"
        # It stopped early: most blocks were never produced.
        assert int(srv.marker(token).read_text()) > 1000
        assert srv.get("/big?mib=1")[1] == b"x" * (1 << 20)


# --- Reload and quit ---

def test_reload_under_load_drops_nothing_and_leaks_no_thread():
    with make([Mount("/hello", "battery.py", "hello"), Mount("/slow", "battery.py", "slow")], threads=4) as srv:
        def workers_settled():
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                kids = srv.children()
                if len(kids) == srv.workers and all(threads_of(k) == 1 + 4 for k in kids):
                    return kids
                time.sleep(0.1)
            raise AssertionError(f"workers did not settle: {[(k, threads_of(k)) for k in srv.children()]}")

        first = workers_settled()
        threads_before = sum(threads_of(k) for k in first)
        stop = threading.Event()
        failures, done = [], [0]

        def client(path):
            while not stop.is_set():
                try:
                    resp, data = srv.request("GET", path, headers={"Connection": "close"}, timeout=20)
                    if resp.status != 200:
                        failures.append((path, resp.status))
                    done[0] += 1
                except Exception as e:  # noqa: BLE001 - any failure counts
                    failures.append((path, repr(e)))

        workers = [threading.Thread(target=client, args=("/hello",)) for _ in range(4)]
        workers.append(threading.Thread(target=client, args=("/slow?s=0.5",)))
        for t in workers:
            t.start()
        try:
            for _ in range(3):
                time.sleep(0.8)
                srv.reload()
            time.sleep(0.8)
        finally:
            stop.set()
            for t in workers:
                t.join(30)
        assert failures == [], failures[:5]
        assert done[0] > 20
        last = workers_settled()
        assert not set(first) & set(last), "the workers were not replaced"
        assert sum(threads_of(k) for k in last) == threads_before


@pytest.mark.parametrize("blocks", [48, 52, 56, 64, 800])
def test_client_that_stops_reading_times_out_and_does_not_hold_up_quit(blocks):
    """Responses a little larger than the socket buffers end while the loop waits
    for the client; large ones are cut short: either way the worker forgets them
    when the client times out (a quitting worker waits for running requests)."""
    srv = make([Mount("/big", "serving.py", "big")], workers=1, http_extra="send_timeout 1s;")
    srv.start()
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", srv.port))
            s.sendall(f"GET /big?blocks={blocks} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            try:
                srv.wait_for_log("timed out", timeout=5)
            except AssertionError:
                pytest.skip("the socket buffers took the whole response: nothing to time out")
            master = srv.pid()
            start = time.monotonic()
            srv.send_signal(signal.SIGQUIT)
            while time.monotonic() - start < 15 and os.path.exists(f"/proc/{master}"):
                time.sleep(0.05)
            assert time.monotonic() - start < 5, "quit waited for a request that had already ended"
    finally:
        srv.stop()


def test_quit_lets_a_running_request_finish():
    srv = make([Mount("/slow", "battery.py", "slow")])
    srv.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            s.sendall(b"GET /slow?s=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            time.sleep(0.3)
            master = srv.pid()
            srv.send_signal(signal.SIGQUIT)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"slept"), reply
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{master}"):
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{master}"), "nginx did not exit after the request finished"
        assert not re.search(r"open socket .* left in connection", srv.log_text()), srv.log_text()[-2000:]
    finally:
        srv.stop()


# --- Installation ---

def test_install_to_another_layout_serves_requests(tmp_path):
    """NGINX_MODDIR/NGINX_CONFDIR relocate the install; the snippet it writes loads the module."""
    layout = [f"NGINX_MODDIR={tmp_path}/modules", f"NGINX_CONFDIR={tmp_path}/available",
              f"NGINX_ENABLEDDIR={tmp_path}/enabled"]
    r = run_make("install-nginx", *layout)
    assert r.returncode == 0, r.stdout + r.stderr
    snippet = tmp_path / "available" / "mod-http-gateway.conf"
    assert f"load_module {tmp_path}/modules/ngx_http_gateway_module.so;" in snippet.read_text()
    srv = Nginx([Mount("/app", "hello.py")], Settings())
    conf = srv.write_config()
    text = conf.read_text().replace(f"load_module {MODULES}/ngx_http_gateway_module.so;", f"include {snippet};")
    conf.write_text(text)
    srv.write_config = lambda: conf
    with srv:
        assert srv.get("/app")[1] == b"Hello, world!"
    r = run_make("uninstall-nginx", *layout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not snippet.exists() and not (tmp_path / "modules" / "ngx_http_gateway_module.so").exists()
