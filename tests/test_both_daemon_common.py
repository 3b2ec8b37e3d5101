"""Daemon mode where Apache and nginx behave alike: a killed daemon is replaced
fast, graceful reloads fail nothing, max-requests and request-timeout recycle and
time out without hurting other requests, nothing outlives the server, the sockets
are private, daemons drop privileges, groups are isolated, and bodies stream both
ways. Every test runs on both servers; what differs lives in
test_apache_daemon_specifics.py and test_nginx_daemon_specifics.py."""

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from harness import (NOBODY, VENV, WWW_DATA, daemon_app, get_json, parent_of, pids_by_title, python_as, timed_get,
                     token, under_load, wait_for_pids)


def _connect_as(user, path):
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); print('connected')\nexcept OSError as e:\n print(type(e).__name__)")
    out = subprocess.run(python_as(user, code, path), capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


# --- Supervision ---

def test_kill_9_fails_only_the_requests_in_flight_and_is_replaced_fast(make_daemon_server):
    """A daemon killed under load costs only its own requests, each with a 502 and a
    log line, and is replaced within a second."""
    title = f"gw-kill-{token()}"
    srv = make_daemon_server([daemon_app("/slow", "slow"), daemon_app("/who", "whoami")],
                             {"g": f"processes=2 threads=3 display-name={title}"})
    with srv:
        before = wait_for_pids(title, 2)
        victim = min(before)
        killed_at = []

        def kill():
            os.kill(victim, signal.SIGKILL)
            killed_at.append(time.monotonic())
            # The replacement runs (and shows its title) within a second.
            while len(pids_by_title(title) - before) < 1 and time.monotonic() - killed_at[0] < 5:
                time.sleep(0.01)
            killed_at.append(time.monotonic())

        results = under_load(srv, "/slow?s=0.2", clients=8, seconds=4.5, during=kill)
        replaced = wait_for_pids(title, 2, timeout=5)
        assert victim not in replaced
        assert killed_at[1] - killed_at[0] < 1.0, killed_at[1] - killed_at[0]
        failures = [r for r in results if r != 200]
        # Only the requests the victim was running (3 threads) or had waiting on its
        # persistent connections can fail: at most one per client, each logged below.
        assert len(results) > 60, len(results)
        assert 1 <= len(failures) <= 8, (failures, len(results))
        assert set(failures) == {502}, failures
        log = srv.log_text()
        died = [line for line in log.splitlines()
                if f"daemon process {victim} of group 'g' was killed by signal 9 (SIGKILL) while serving this request" in line]
        assert len(died) == len(failures), log[-3000:]
        assert all("gateway: GET /slow?s=0.2: " in line for line in died)
        # Replaced within a second (the supervisor logs the replacement at once).
        assert f"daemon process {victim} of group 'g' was killed by signal 9 (SIGKILL); starting a replacement" in log
        assert get_json(srv, "/who")["pid"] in replaced


def test_graceful_reloads_under_load_fail_nothing_and_replace_the_daemons(make_daemon_server):
    """Two graceful reloads under load fail no request, and a new generation of
    daemons takes over."""
    title = f"gw-graceful-{token()}"
    srv = make_daemon_server([daemon_app("/slow", "slow")], {"g": f"processes=2 threads=4 display-name={title}"})
    with srv:
        before = wait_for_pids(title, 2)

        def graceful():
            # Twice: the second generation shares the first one's run directory.
            for _ in range(2):
                srv.graceful()
                time.sleep(1.5)

        results = under_load(srv, "/slow?s=0.3", clients=8, seconds=7, during=graceful)
        assert len(results) > 50
        assert [r for r in results if r != 200] == []
        # A new generation of daemons serves; the old one drained and exited.
        deadline = time.monotonic() + 15
        while pids_by_title(title) & before and time.monotonic() < deadline:
            time.sleep(0.1)
        after = pids_by_title(title)
        assert len(after) == 2 and not after & before, (before, after)
        assert get_json(srv, "/slow?s=0")["pid"] in after


def test_503_at_once_when_the_group_cannot_start(make_daemon_server):
    """A group whose daemons die at start-up answers 503 at once and says why; the
    other groups serve on."""
    srv = make_daemon_server([daemon_app("/who", "whoami", group="broken"), daemon_app("/ok", "whoami")],
                             {"g": "processes=1 threads=1", "broken": "processes=1 threads=1"})
    empty_home = srv.dir / "not-a-python"
    empty_home.mkdir()
    srv.settings.daemons["broken"] = f"processes=1 threads=1 python-home={empty_home}"
    with srv:
        srv.wait_for_log("before it was ready")
        status, seconds = timed_get(srv, "/who", timeout=10)
        assert status == 503
        assert seconds < 1, seconds
        log = srv.wait_for_log("gateway: GET /who: daemon process group 'broken' is down")
        assert re.search(r"daemon process \d+ of group 'broken' exited with status \d+ before it was ready", log)
        assert get_json(srv, "/ok")["group"] == "g"


def test_socket_timeout_answers_504_when_the_daemon_says_nothing(make_daemon_server):
    srv = make_daemon_server([daemon_app("/slow", "slow")], {"g": "processes=1 threads=2 socket-timeout=1"})
    with srv:
        status, seconds = timed_get(srv, "/slow?s=3", timeout=30)
        assert status == 504
        assert seconds < 2.5, seconds
        log = srv.wait_for_log("sent nothing for socket-timeout=1s")
        assert re.search(r"gateway: GET /slow\?s=3: daemon process \d+ of group 'g' sent nothing for socket-timeout=1s; answering 504", log)
        assert get_json(srv, "/slow?s=0")["pid"]


def test_no_orphans_after_kill_9_of_the_main_process(make_daemon_server):
    """Killing the server's main process with SIGKILL takes the supervisor and
    its daemons down too."""
    title = f"gw-orphan-{token()}"
    srv = make_daemon_server([daemon_app("/who", "whoami")], {"g": f"processes=2 threads=1 display-name={title}"})
    srv.start()
    children = []
    try:
        daemons = wait_for_pids(title, 2)
        supervisors = {parent_of(pid) for pid in daemons}
        assert len(supervisors) == 1
        children = srv.children()
        assert supervisors.isdisjoint(children)
        os.kill(srv.pid(), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pids_by_title(title) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids_by_title(title) == set(), "daemon processes outlived the server"
        for pid in daemons:
            assert not Path(f"/proc/{pid}").exists()
        while any(Path(f"/proc/{p}").exists() for p in supervisors) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{p}").exists() for p in supervisors), "the supervisor outlived the server"
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_daemons_stop_with_the_server(make_daemon_server):
    """Stopping the server stops the supervisor and its daemons and removes the
    run directory."""
    title = f"gw-stop-{token()}"
    srv = make_daemon_server([daemon_app("/who", "whoami")], {"g": f"processes=2 threads=1 display-name={title}"})
    with srv:
        daemons = wait_for_pids(title, 2)
        supervisor = parent_of(min(daemons))
        run_dir = next(srv.runtime_dir.glob("gateway-*"))
        assert get_json(srv, "/who")["pid"] in daemons
    deadline = time.monotonic() + 5
    while (pids_by_title(title) or Path(f"/proc/{supervisor}").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_by_title(title) == set()
    assert not Path(f"/proc/{supervisor}").exists()
    assert not run_dir.exists(), list(run_dir.iterdir())


def test_max_requests_recycles_without_failing_a_request(make_daemon_server):
    srv = make_daemon_server([daemon_app("/slow", "slow")], {"g": "processes=1 threads=2 max-requests=15"})
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


def test_request_timeout_answers_504_logs_the_stack_and_spares_other_requests(make_daemon_server):
    srv = make_daemon_server([daemon_app("/stuck", "stuck"), daemon_app("/slow", "slow")],
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


def test_a_request_stuck_outside_python_recycles_the_process_gently(make_daemon_server):
    title = f"gw-stuckc-{token()}"
    srv = make_daemon_server([daemon_app("/sleeper", "sleeper"), daemon_app("/slow", "slow")],
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


def test_a_request_holding_the_gil_in_c_gets_its_504_and_spares_the_next_requests(make_daemon_server):
    """A catastrophic regex holds the GIL in C code for longer than request-timeout
    and then writes its response: the stuck request gets its 504 at
    request-timeout, the requests after it are answered within request-timeout
    (by this process once it recovers, or by its replacement)."""
    title = f"gw-redos-{token()}"
    srv = make_daemon_server([daemon_app("/redos", "redos"), daemon_app("/slow", "slow")],
                             {"g": f"processes=1 threads=4 request-timeout=2 graceful-timeout=3 display-name={title}"})
    with srv:
        (pid,) = wait_for_pids(title, 1)
        status, elapsed = timed_get(srv, "/redos?n=28", timeout=60)
        assert status == 504 and elapsed < 5, (status, elapsed)
        # Requests that reach the process while the regex holds the GIL get their
        # own 504 at request-timeout; then the process is replaced (or recovers).
        later = []
        deadline = time.monotonic() + 30
        while [s for s, _ in later[-3:]] != [200] * 3 and time.monotonic() < deadline:
            later.append(timed_get(srv, "/slow?s=0", timeout=60))
        assert [s for s, _ in later[-3:]] == [200] * 3, later
        assert all(s in (200, 504) and t < 5 for s, t in later), later
        log = srv.log_text()
        assert f"GET /redos?n=28: daemon process {pid} of group 'g': the request exceeded request-timeout=2s" in log
        assert "GET /redos?n=28: the thread of this request is still stuck (outside Python code)" in log
        assert get_json(srv, "/slow?s=0")["pid"] in pids_by_title(title)


# --- Security ---

def test_socket_reachable_only_by_the_server_user(make_daemon_server):
    """A group's socket belongs to the user of the server's workers, its directory
    to root and their group (issue 10, item 1), and no other user can connect."""
    srv = make_daemon_server([daemon_app("/who", "whoami")], {"g": "processes=1 threads=1"})
    with srv:
        sockets = list(srv.runtime_dir.glob("gateway-*/g.sock"))
        assert len(sockets) == 1
        sock = sockets[0]
        st, dst = sock.stat(), sock.parent.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (WWW_DATA.pw_uid, 0o600)
        assert (dst.st_uid, dst.st_gid, dst.st_mode & 0o777) == (0, WWW_DATA.pw_gid, 0o710)
        assert _connect_as(NOBODY, str(sock)) == "PermissionError"
        assert _connect_as(WWW_DATA, str(sock)) == "connected"


def test_daemons_drop_privileges_and_show_their_display_name(make_daemon_server):
    """user= and group= leave no trace of root in a daemon, and display-name= is
    its command line."""
    title = f"gw-who-{token()}"
    srv = make_daemon_server([daemon_app("/nobody", "whoami", group="as_nobody"), daemon_app("/default", "whoami")],
                             {"as_nobody": f"processes=1 threads=1 user=nobody group=nogroup display-name={title}",
                              "g": "processes=1 threads=1"})
    with srv:
        me = get_json(srv, "/nobody")
        assert (me["uid"], me["euid"], me["gid"]) == (NOBODY.pw_uid, NOBODY.pw_uid, 65534)
        assert (me["mode"], me["group"]) == ("daemon", "as_nobody")
        assert get_json(srv, "/default")["uid"] == WWW_DATA.pw_uid  # the workers' user by default
        assert pids_by_title(title) == {me["pid"]}
        ps = subprocess.run(["ps", "-o", "args=", "-p", str(me["pid"])], capture_output=True, text=True).stdout
        assert ps.strip() == title
        status = Path(f"/proc/{me['pid']}/status").read_text()
        assert re.search(rf"^Uid:\s+{NOBODY.pw_uid}\s+{NOBODY.pw_uid}\s+{NOBODY.pw_uid}\s+{NOBODY.pw_uid}$", status, re.M)
        groups = re.search(r"^Groups:(.*)$", status, re.M).group(1).split()
        assert "0" not in groups


# --- Isolation ---

def test_two_groups_with_two_virtualenvs(make_daemon_server):
    """Each group runs the Python of its own python-home, in its own processes."""
    srv = make_daemon_server([daemon_app("/a", "whoami", group="a"), daemon_app("/b", "whoami", group="b")], {})
    venv2 = srv.dir / "venv2"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv2)], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(venv2)], check=True)
    srv.settings.daemons = {"a": f"processes=1 threads=2 python-home={VENV}",
                            "b": f"processes=1 threads=2 python-home={venv2}"}
    with srv:
        a, b = get_json(srv, "/a"), get_json(srv, "/b")
        assert os.path.realpath(a["prefix"]) == os.path.realpath(VENV)
        assert os.path.realpath(b["prefix"]) == os.path.realpath(venv2)
        assert (a["group"], b["group"]) == ("a", "b")
        assert a["pid"] != b["pid"]


# --- Streaming ---

def test_large_upload_and_download_stream_through_a_daemon(make_daemon_server):
    srv = make_daemon_server([daemon_app("/up", "upload"), daemon_app("/down", "download")],
                             {"g": "processes=1 threads=2"})
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
