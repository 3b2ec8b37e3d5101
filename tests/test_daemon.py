"""Daemon mode under Apache: recycling, timeouts, the monitor hook that replaces a
dead supervisor, virtual hosts, streaming, and configuration errors. What Apache
and nginx do alike is in test_daemon_common.py."""

import json
import os
import signal
import threading
import time

import pytest

from harness import Mount
from test_daemon_common import app, built, daemon_server, get_json, parent_of, pids_by_title, token, wait_for_pids

pytestmark = pytest.mark.skipif(not built("apache"), reason="needs mod_gateway.so and gateway-daemon (make apache)")


# --- Supervision ---

def test_max_requests_recycles_without_failing_a_request():
    srv = daemon_server("apache", [app("/slow", "slow")], {"g": "processes=1 threads=2 max-requests=15"})
    with srv:
        results, pids, lock = [], set(), threading.Lock()

        def client():
            for _ in range(20):
                resp, data = srv.get("/slow?s=0.01")
                with lock:
                    results.append(resp.status)
                    if resp.status == 200:
                        pids.add(json.loads(data)["pid"])

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == [200] * 80, [r for r in results if r != 200]
        assert len(pids) >= 5, pids  # 80 requests, 15 per process
        assert "max-requests=15 reached" in srv.log_text()


def test_request_timeout_answers_504_logs_the_stack_and_spares_other_requests():
    srv = daemon_server("apache", [app("/stuck", "stuck"), app("/slow", "slow")],
                        {"g": "processes=1 threads=4 request-timeout=2"})
    with srv:
        pid = get_json(srv, "/slow?s=0")["pid"]
        t = token()
        outcome = {}

        def stuck():
            start = time.monotonic()
            resp, data = srv.get(f"/stuck?token={t}", timeout=30)
            outcome["stuck"] = (resp.status, time.monotonic() - start)

        def other():
            resp, data = srv.get("/slow?s=1.5", timeout=30)
            outcome["other"] = (resp.status, json.loads(data)["pid"] if resp.status == 200 else None)

        threads = [threading.Thread(target=stuck), threading.Thread(target=other)]
        for th in threads:
            th.start()
            time.sleep(0.2)
        for th in threads:
            th.join(timeout=30)
        status, elapsed = outcome["stuck"]
        assert status == 504
        assert 1.9 < elapsed < 4, elapsed
        # The other request of the same process finished normally.
        assert outcome["other"] == (200, pid)
        log = srv.wait_for_log("Stack of the stuck thread")
        assert f"gateway: GET /stuck?token={t}: daemon process {pid} of group 'g': the request exceeded request-timeout=2s" in log
        assert "in stuck" in log and "daemon_apps.py" in log
        # Python raised TimeoutError in the stuck thread: it unwound, the process lives on.
        deadline = time.monotonic() + 5
        while not srv.marker(t).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.marker(t).read_text() == "TimeoutError"
        assert get_json(srv, "/slow?s=0")["pid"] == pid


def test_a_request_stuck_outside_python_recycles_the_process_gently():
    title = f"gw-stuckc-{token()}"
    srv = daemon_server("apache", [app("/sleeper", "sleeper"), app("/slow", "slow")],
                        {"g": f"processes=1 threads=4 request-timeout=1 graceful-timeout=2 display-name={title}"})
    with srv:
        (pid,) = wait_for_pids(title, 1)
        outcome = {}

        def stuck():
            start = time.monotonic()
            resp, _ = srv.get("/sleeper?s=60", timeout=30)
            outcome["stuck"] = (resp.status, time.monotonic() - start)

        helper = threading.Thread(target=stuck)
        helper.start()
        # In flight when the process starts draining (at twice request-timeout).
        time.sleep(1.7)
        outcome["other"] = get_json(srv, "/slow?s=0.8", timeout=30)["pid"]
        helper.join(timeout=30)
        status, elapsed = outcome["stuck"]
        assert status == 504 and elapsed < 3
        # The process's other request was not cut; the stuck one made it recycle.
        assert outcome["other"] == pid
        log = srv.wait_for_log("is still stuck (outside Python code)")
        assert f"daemon process {pid} of group 'g' draining: a request is stuck outside Python code" in log
        deadline = time.monotonic() + 10
        while pid in pids_by_title(title) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid not in pids_by_title(title)
        assert get_json(srv, "/slow?s=0")["pid"] != pid


def test_a_dead_supervisor_is_replaced():
    title = f"gw-super-{token()}"
    srv = daemon_server("apache", [app("/who", "whoami")], {"g": f"processes=2 threads=1 display-name={title}"})
    with srv:
        before = wait_for_pids(title, 2)
        os.kill(parent_of(min(before)), signal.SIGKILL)
        # Its daemons die with it; Apache's parent starts a new supervisor within seconds.
        srv.wait_for_log("the daemon supervisor is gone (its lifeline broke); starting a new one", timeout=15)
        after = wait_for_pids(title, 2, timeout=10)
        assert not after & before
        assert get_json(srv, "/who")["pid"] in after


# --- Virtual hosts ---

def test_embedded_and_daemon_virtual_hosts_side_by_side():
    mounts = [Mount("/who", "daemon_apps.py", "whoami", vhost="embedded.test"),
              app("/who", "whoami", vhost="daemon.test")]
    srv = daemon_server("apache", mounts, {"g": "processes=1 threads=2"})
    with srv:
        emb = get_json(srv, "/who", host="embedded.test")
        dmn = get_json(srv, "/who", host="daemon.test")
        assert (emb["mode"], emb["group"]) == ("embedded", "")
        assert (dmn["mode"], dmn["group"]) == ("daemon", "g")
        assert emb["pid"] in srv.children() and dmn["pid"] not in srv.children()


# --- Streaming ---

def test_large_upload_and_download_stream_through_a_daemon():
    srv = daemon_server("apache", [app("/up", "upload"), app("/down", "download")], {"g": "processes=1 threads=2"})
    with srv:
        size = 256 << 20
        block = os.urandom(1 << 20)

        def body():
            for _ in range(size >> 20):
                yield block

        conn = srv.connect(timeout=120)
        conn.request("POST", "/up", body=body(), headers={"Content-Length": str(size)})
        resp = conn.getresponse()
        out = json.loads(resp.read())
        conn.close()
        assert out["length"] == size
        # The daemon held the body a block at a time, not whole.
        assert out["peak_kib"] < 120 * 1024, out
        conn = srv.connect(timeout=120)
        conn.request("GET", "/down?mb=256")
        resp = conn.getresponse()
        got = 0
        while chunk := resp.read(1 << 20):
            got += len(chunk)
        conn.close()
        assert got == 256 << 20


# --- Configuration errors ---

def test_configtest_names_an_undefined_group_with_file_and_line():
    srv = daemon_server("apache", [app("/who", "whoami", group="nope")], {})
    r = srv.configtest()
    assert r.returncode != 0
    where = f"{srv.conf}:{srv.line_of('GatewayMode daemon nope')}"
    assert f"GatewayMode at {where}: daemon process group 'nope' is not defined" in r.stdout + r.stderr


def test_configtest_rejects_an_unknown_daemon_option():
    srv = daemon_server("apache", [app("/who", "whoami")], {"g": "processes=1 colour=red"})
    r = srv.configtest()
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"line {srv.line_of('colour=red')} of {srv.conf}" in out
    assert "GatewayDaemon: unknown daemon option 'colour'" in out


def test_configtest_rejects_an_unknown_user():
    srv = daemon_server("apache", [app("/who", "whoami")], {"g": "user=no-such-user-here"})
    r = srv.configtest()
    assert r.returncode != 0
    assert "user 'no-such-user-here' does not exist" in r.stdout + r.stderr
