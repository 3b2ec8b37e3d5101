"""The panic guard, shown with the test-only fault-injection build (`make faults`): a
fault point that panics costs its request a 500 (or a response cut short once its head
went out) and one `gateway:` line naming the method and URI; the server process, the
worker and the very thread that panicked go on serving. GATEWAY_FAULT=POINT:FILE arms
POINT while FILE exists."""

import http.client
import re

import pytest

from harness import ROOT, VENV, Apache, Mount, Nginx, battery_settings, get_json

FAULTS = ROOT / "target" / "modules-faults"
MODULE = {"apache": "mod_gateway.so", "nginx": "ngx_http_gateway_module.so"}

# (server, mode, fault point): each kind of entry the guard stands at.
CASES = [
    ("apache", "embedded", "apache-handler"),
    ("apache", "daemon", "apache-handler"),
    ("apache", "daemon", "daemon-job"),
    ("nginx", "embedded", "nginx-handler"),
    ("nginx", "daemon", "nginx-handler"),
    ("nginx", "embedded", "nginx-job"),
    ("nginx", "daemon", "nginx-job"),
    ("nginx", "daemon", "daemon-job"),
]

# Points past the response head: the client sees the response cut short, not a 500.
AFTER_HEAD = [("nginx", "embedded", "nginx-event"), ("nginx", "daemon", "nginx-event")]


def faulty_server(kind, mode, point):
    if not (FAULTS / MODULE[kind]).exists() or not (FAULTS / "gateway-daemon").exists():
        pytest.skip("needs the fault-injection build: make faults")
    settings = battery_settings()
    settings.modules = FAULTS
    if mode == "daemon":
        mounts = [Mount("/who", "daemon_apps.py", "whoami", mode="daemon", group="g")]
        # One process with one thread: the one that panicked must serve the next request.
        settings.daemons = {"g": f"python-home={VENV} processes=1 threads=1"}
    else:
        mounts = [Mount("/who", "daemon_apps.py", "whoami")]
    if kind == "apache":
        srv = Apache(mounts, settings, mpm="prefork")
    else:
        # One worker with one module thread: the thread that panicked serves the next request.
        srv = Nginx(mounts, settings, workers=1, threads=1)
    srv.armed = srv.marker("fault-armed")
    settings.env = {"GATEWAY_FAULT": f"{point}:{srv.armed}"}
    return srv


def fault_lines(srv, point):
    return re.findall(rf"gateway: GET /who\?n=\d+: .*fault injected at '{re.escape(point)}'.*",
                      srv.log_text())


def serves(srv, n):
    return get_json(srv, f"/who?n={n}")["pid"]


@pytest.mark.parametrize("kind,mode,point", CASES, ids=["-".join(c) for c in CASES])
def test_a_panic_costs_its_request_a_500_and_nothing_else(kind, mode, point):
    with faulty_server(kind, mode, point) as srv:
        pid = serves(srv, 0)
        srv.armed.touch()
        for n in (1, 2):
            r, body = srv.request("GET", f"/who?n={n}")
            assert r.status == 500, body
        srv.armed.unlink()
        # The process that panicked (the daemon, or nginx's only worker) serves on.
        assert serves(srv, 3) == pid or kind == "apache"
        assert serves(srv, 4) == pid or kind == "apache"
        lines = fault_lines(srv, point)
        assert len(lines) == 2, srv.log_text()
        assert all("internal error (panic at src/" in line for line in lines), lines
        log = srv.log_text()
        assert "exit signal" not in log and "exited on signal" not in log, log


@pytest.mark.parametrize("kind,mode,point", AFTER_HEAD, ids=["-".join(c) for c in AFTER_HEAD])
def test_a_panic_after_the_head_cuts_the_response_short(kind, mode, point):
    with faulty_server(kind, mode, point) as srv:
        pid = serves(srv, 0)
        srv.armed.touch()
        conn = srv.connect()
        conn.request("GET", "/who?n=1")
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            r = conn.getresponse()
            body = r.read()
            # A response that arrived whole would mean the fault never fired.
            pytest.fail(f"got a whole response {r.status} {body!r}")
        conn.close()
        srv.armed.unlink()
        assert serves(srv, 2) == pid
        assert len(fault_lines(srv, point)) == 1, srv.log_text()
        assert "exited on signal" not in srv.log_text()
