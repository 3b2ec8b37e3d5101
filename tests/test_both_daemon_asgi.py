"""ASGI applications in daemon groups, on both servers: request-timeout cancels
the request's task (504, its stack logged), max-requests recycles a process
after its event loop drained (lifespan shutdown included), kill -9 fails only
the requests in flight, graceful reloads under load fail nothing, WSGI and ASGI
share one daemon process, and the event loop is uvloop where the group's
virtualenv has it, asyncio otherwise. What every mode shares (the scope, bodies,
disconnect, errors) is in test_both_both_asgi.py, which runs in daemon kinds too."""

import json
import os
import signal
import threading
import time

from harness import (VENV, daemon_app, get_json, pids_by_title, timed_get, token, under_load, wait_for_pids)

ASGI = "asgi_apps.py"


def asgi_app(prefix, name, group="g"):
    return daemon_app(prefix, name, group=group, script=ASGI, interface="asgi")


def lifespan_events(srv) -> list[str]:
    path = srv.marker("lifespan.log")
    return path.read_text().splitlines() if path.exists() else []


def wait_for_shutdowns(srv, pids, timeout=15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = lifespan_events(srv)
        if all(f"shutdown {pid}" in events for pid in pids):
            return events
        time.sleep(0.05)
    raise AssertionError(f"no lifespan shutdown for some of {pids}: {lifespan_events(srv)}\n{srv.log_text()[-3000:]}")


def test_request_timeout_answers_504_cancels_the_task_and_logs_its_stack(make_daemon_server):
    srv = make_daemon_server([asgi_app("/stuck", "stuck"), asgi_app("/sleep", "sleep")],
                             {"g": "processes=1 threads=4 request-timeout=2"})
    with srv:
        pid = get_json(srv, "/sleep?s=0")["pid"]
        t = token()
        outcome = {}

        def stuck():
            outcome["stuck"] = timed_get(srv, f"/stuck?token={t}", timeout=30)

        def other():
            resp, data = srv.get("/sleep?s=1.5", timeout=30)
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
        # The other request on the same event loop finished normally.
        assert outcome["other"] == (200, pid)
        # The task was cancelled: the application saw CancelledError where it awaited.
        deadline = time.monotonic() + 5
        while not srv.marker(t).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.marker(t).read_text() == "CancelledError"
        lines = [line for line in srv.log_text().splitlines() if f"gateway: GET /stuck?token={t}: " in line]
        assert any("request-timeout=2s" in line for line in lines), lines
        # Its stack names the application's coroutine and the file it awaits in.
        assert any(f"{ASGI}\", line" in line and "in stuck" in line for line in lines), lines
        assert get_json(srv, "/sleep?s=0")["pid"] == pid


def test_max_requests_recycles_after_the_loop_drains_and_shuts_lifespan_down(make_daemon_server):
    srv = make_daemon_server([asgi_app("/lifespan", "lifespan")], {"g": "processes=1 threads=4 max-requests=10"})
    with srv:
        results, pids, lock = [], set(), threading.Lock()

        def client():
            for _ in range(10):
                resp, data = srv.get("/lifespan?s=0.05")
                with lock:
                    results.append(resp.status)
                    if resp.status == 200:
                        pids.add(json.loads(data)["pid"])

        threads = [threading.Thread(target=client) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        # Requests in flight when a process reached max-requests finished there.
        assert results == [200] * 40, [r for r in results if r != 200]
        assert len(pids) >= 3, pids  # 40 requests, 10 per process
        assert "max-requests=10 reached" in srv.log_text()
        current = get_json(srv, "/lifespan")["pid"]
        events = wait_for_shutdowns(srv, pids - {current})
        for pid in pids | {current}:
            assert events.count(f"startup {pid}") == 1, events
        for pid in pids - {current}:
            assert events.count(f"shutdown {pid}") == 1, events
            assert events.index(f"startup {pid}") < events.index(f"shutdown {pid}"), events
        assert f"shutdown {current}" not in events


def test_kill_9_fails_only_the_requests_in_flight(make_daemon_server):
    """A daemon killed under load costs only the requests on its event loop, each
    with a 502 and a log line; a replacement serves within a second."""
    title = f"gw-asgi-kill-{token()}"
    srv = make_daemon_server([asgi_app("/sleep", "sleep")], {"g": f"processes=2 threads=3 display-name={title}"})
    with srv:
        before = wait_for_pids(title, 2)
        victim = min(before)
        killed_at = []

        def kill():
            os.kill(victim, signal.SIGKILL)
            killed_at.append(time.monotonic())
            while len(pids_by_title(title) - before) < 1 and time.monotonic() - killed_at[0] < 5:
                time.sleep(0.01)
            killed_at.append(time.monotonic())

        results = under_load(srv, "/sleep?s=0.2", clients=8, seconds=4.5, during=kill)
        replaced = wait_for_pids(title, 2, timeout=5)
        assert victim not in replaced
        assert killed_at[1] - killed_at[0] < 1.0, killed_at[1] - killed_at[0]
        failures = [r for r in results if r != 200]
        # At most the one request each client had in flight on the victim.
        assert len(results) > 60, len(results)
        assert 1 <= len(failures) <= 8, (failures, len(results))
        assert set(failures) == {502}, failures
        died = [line for line in srv.log_text().splitlines()
                if f"daemon process {victim} of group 'g' was killed by signal 9 (SIGKILL) while serving" in line]
        assert len(died) == len(failures), srv.log_text()[-3000:]
        assert all("gateway: GET /sleep?s=0.2: " in line for line in died)
        assert get_json(srv, "/sleep?s=0")["pid"] in replaced


def test_graceful_reloads_under_load_fail_nothing(make_daemon_server):
    """Two graceful reloads under load fail no request; the retired processes
    drain their event loops and shut their application's lifespan down."""
    title = f"gw-asgi-graceful-{token()}"
    srv = make_daemon_server([asgi_app("/lifespan", "lifespan")],
                             {"g": f"processes=2 threads=4 display-name={title}"})
    with srv:
        before = wait_for_pids(title, 2)

        def graceful():
            for _ in range(2):
                srv.graceful()
                time.sleep(1.5)

        results = under_load(srv, "/lifespan?s=0.3", clients=8, seconds=7, during=graceful)
        assert len(results) > 50
        assert [r for r in results if r != 200] == []
        deadline = time.monotonic() + 15
        while pids_by_title(title) & before and time.monotonic() < deadline:
            time.sleep(0.1)
        after = pids_by_title(title)
        assert len(after) == 2 and not after & before, (before, after)
        started = {int(e.split()[1]) for e in lifespan_events(srv) if e.startswith("startup")}
        wait_for_shutdowns(srv, started - after)
        assert get_json(srv, "/lifespan")["pid"] in after


def test_wsgi_and_asgi_share_one_daemon_process(make_daemon_server):
    srv = make_daemon_server([daemon_app("/who", "whoami"), asgi_app("/lifespan", "lifespan"),
                              daemon_app("/detected", "detected_instance", script=ASGI)],
                             {"g": "processes=1 threads=2"})
    with srv:
        who = get_json(srv, "/who")
        assert (who["mode"], who["group"]) == ("daemon", "g")
        assert get_json(srv, "/lifespan")["pid"] == who["pid"]
        assert get_json(srv, "/detected")["interface"] == "asgi"
        assert get_json(srv, "/who")["pid"] == who["pid"]


def test_uvloop_where_the_virtualenv_has_it_asyncio_otherwise(make_daemon_server):
    """The group with the test virtualenv runs uvloop; the group on the system's
    Python (no uvloop) runs asyncio's own loop; the log says which at start-up."""
    srv = make_daemon_server([asgi_app("/venv", "sleep", group="venv"), asgi_app("/plain", "sleep", group="plain")],
                             {})
    srv.settings.daemons = {"venv": f"processes=1 threads=2 python-home={VENV}", "plain": "processes=1 threads=2"}
    with srv:
        assert get_json(srv, "/venv?s=0")["loop"].startswith("uvloop")
        assert get_json(srv, "/plain?s=0")["loop"].startswith("asyncio")
        lines = [line for line in srv.log_text().splitlines() if "gateway:" in line]
        assert any("uvloop" in line for line in lines), lines[-30:]
        assert any("asyncio" in line for line in lines), lines[-30:]
