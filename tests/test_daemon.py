"""Daemon mode: supervision, restarts, timeouts, permissions, isolation between
groups, and configuration errors, against the real Apache."""

import json
import os
import pwd
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import VENV, battery_settings
from harness import MODULES, Apache, Mount

pytestmark = pytest.mark.skipif(
    not (MODULES / "mod_gateway.so").exists() or not (MODULES / "gateway-daemon").exists(),
    reason="needs mod_gateway.so and gateway-daemon (make apache)",
)

WWW_DATA = pwd.getpwnam("www-data")
NOBODY = pwd.getpwnam("nobody")


def token():
    return uuid.uuid4().hex[:12]


def daemon_server(mounts, daemons, **kw):
    """An event-MPM Apache whose `daemons` ({name: options}) get the test virtualenv."""
    srv = Apache(mounts, battery_settings(), **kw)
    srv.settings.daemons = {
        name: f"python-home={VENV} {options}".strip() for name, options in daemons.items()
    }
    return srv


def app(prefix, name, group="g", script="daemon_apps.py", vhost=None):
    return Mount(prefix, script, name, mode="daemon", group=group, vhost=vhost)


def pids_by_title(title):
    """Pids of the processes whose command line is `title` (a daemon's display-name)."""
    out = subprocess.run(["pgrep", "-fx", title], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def wait_for_pids(title, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = pids_by_title(title)
        if len(pids) == count:
            return pids
        time.sleep(0.02)
    raise AssertionError(f"expected {count} processes titled {title!r}, found {pids_by_title(title)}")


def parent_of(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^PPid:\s+(\d+)$", status, re.M).group(1))


def get_json(srv, path, **kw):
    resp, data = srv.get(path, **kw)
    assert resp.status == 200, (resp.status, data[:500], srv.log_text()[-3000:])
    return json.loads(data)


def load(srv, path, clients, seconds, during=None):
    """`clients` threads request `path` in a loop for `seconds`; `during` runs in
    the middle. Returns the list of (status or exception name) of every request."""
    results, lock = [], threading.Lock()
    stop = time.monotonic() + seconds

    def client():
        while time.monotonic() < stop:
            try:
                resp, _ = srv.get(path, timeout=20)
                outcome = resp.status
            except Exception as e:  # a broken connection is a failure to count
                outcome = type(e).__name__
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    if during:
        time.sleep(seconds / 3)
        during()
    for t in threads:
        t.join(timeout=seconds + 30)
    return results


# --- Supervision ---

def test_kill_9_fails_only_the_requests_in_flight_and_is_replaced_fast():
    title = f"gw-kill-{token()}"
    srv = daemon_server([app("/slow", "slow"), app("/who", "whoami")],
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

        results = load(srv, "/slow?s=0.2", clients=8, seconds=4.5, during=kill)
        replaced = wait_for_pids(title, 2, timeout=5)
        assert victim not in replaced
        assert killed_at[1] - killed_at[0] < 1.0, killed_at[1] - killed_at[0]
        failures = [r for r in results if r != 200]
        # Only the requests that victim was running (3 threads) or had queued can fail.
        assert len(results) > 60, len(results)
        assert 1 <= len(failures) <= 6, (failures, len(results))
        assert set(failures) == {502}, failures
        log = srv.log_text()
        died = [line for line in log.splitlines()
                if f"daemon process {victim} of group 'g' was killed by signal 9 (SIGKILL) while serving this request" in line]
        assert len(died) == len(failures), log[-3000:]
        assert all("gateway: GET /slow?s=0.2: " in line for line in died)
        # Replaced within a second (the supervisor logs the replacement at once).
        assert f"daemon process {victim} of group 'g' was killed by signal 9 (SIGKILL); starting a replacement" in log
        assert get_json(srv, "/who")["pid"] in replaced


def test_max_requests_recycles_without_failing_a_request():
    srv = daemon_server([app("/slow", "slow")], {"g": "processes=1 threads=2 max-requests=15"})
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
    srv = daemon_server([app("/stuck", "stuck"), app("/slow", "slow")],
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
    srv = daemon_server([app("/sleeper", "sleeper"), app("/slow", "slow")],
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


def test_socket_timeout_answers_504_when_the_daemon_says_nothing():
    srv = daemon_server([app("/slow", "slow")], {"g": "processes=1 threads=2 socket-timeout=1"})
    with srv:
        start = time.monotonic()
        resp, _ = srv.get("/slow?s=3", timeout=30)
        assert resp.status == 504
        assert time.monotonic() - start < 2.5
        log = srv.wait_for_log("sent nothing for socket-timeout=1s")
        assert re.search(r"gateway: GET /slow\?s=3: daemon process \d+ of group 'g' sent nothing for socket-timeout=1s; answering 504", log)
        assert get_json(srv, "/slow?s=0")["pid"]


def test_graceful_restart_under_load_fails_nothing():
    title = f"gw-graceful-{token()}"
    srv = daemon_server([app("/slow", "slow")], {"g": f"processes=2 threads=4 display-name={title}"})
    with srv:
        before = wait_for_pids(title, 2)

        def graceful():
            subprocess.run(["apache2", "-f", str(srv.dir / "httpd.conf"), "-k", "graceful"], check=True)

        results = load(srv, "/slow?s=0.3", clients=8, seconds=6, during=graceful)
        assert len(results) > 50
        assert [r for r in results if r != 200] == []
        # A new generation of daemons serves; the old one drained and exited.
        deadline = time.monotonic() + 15
        while pids_by_title(title) & before and time.monotonic() < deadline:
            time.sleep(0.1)
        after = pids_by_title(title)
        assert len(after) == 2 and not after & before, (before, after)
        assert get_json(srv, "/slow?s=0")["pid"] in after


def test_503_at_once_when_the_group_cannot_start():
    srv = daemon_server([app("/who", "whoami", group="broken"), app("/ok", "whoami")],
                        {"g": "processes=1 threads=1", "broken": "processes=1 threads=1"})
    empty_home = srv.dir / "not-a-python"
    empty_home.mkdir()
    srv.settings.daemons["broken"] = f"processes=1 threads=1 python-home={empty_home}"
    with srv:
        srv.wait_for_log("before it was ready")
        start = time.monotonic()
        resp, _ = srv.get("/who", timeout=10)
        assert resp.status == 503
        assert time.monotonic() - start < 1
        log = srv.wait_for_log("gateway: GET /who: daemon process group 'broken' is down")
        assert re.search(r"daemon process \d+ of group 'broken' exited with status \d+ before it was ready", log)
        # The other group is unaffected.
        assert get_json(srv, "/ok")["group"] == "g"


def test_no_orphans_after_kill_9_of_the_apache_parent():
    title = f"gw-orphan-{token()}"
    srv = daemon_server([app("/who", "whoami")], {"g": f"processes=2 threads=1 display-name={title}"})
    srv.start()
    children = []
    try:
        daemons = wait_for_pids(title, 2)
        supervisors = {parent_of(pid) for pid in daemons}
        assert len(supervisors) == 1
        children = srv.children()
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


def test_daemons_stop_with_the_server():
    title = f"gw-stop-{token()}"
    srv = daemon_server([app("/who", "whoami")], {"g": f"processes=2 threads=1 display-name={title}"})
    with srv:
        daemons = wait_for_pids(title, 2)
        supervisor = parent_of(min(daemons))
        run_dir = next((srv.dir / "run").glob("gateway-*"))
    deadline = time.monotonic() + 5
    while (pids_by_title(title) or Path(f"/proc/{supervisor}").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_by_title(title) == set()
    assert not Path(f"/proc/{supervisor}").exists()
    assert not run_dir.exists(), list(run_dir.iterdir())


def test_a_dead_supervisor_is_replaced():
    title = f"gw-super-{token()}"
    srv = daemon_server([app("/who", "whoami")], {"g": f"processes=2 threads=1 display-name={title}"})
    with srv:
        before = wait_for_pids(title, 2)
        os.kill(parent_of(min(before)), signal.SIGKILL)
        # Its daemons die with it; Apache's parent starts a new supervisor within seconds.
        srv.wait_for_log("the daemon supervisor is gone (its lifeline broke); starting a new one", timeout=15)
        after = wait_for_pids(title, 2, timeout=10)
        assert not after & before
        assert get_json(srv, "/who")["pid"] in after


# --- Security ---

def _connect_as(user, path):
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); print('connected')\nexcept OSError as e:\n print(type(e).__name__)")
    out = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                          "/usr/bin/python3", "-c", code, path], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def test_socket_reachable_only_by_the_server_user():
    srv = daemon_server([app("/who", "whoami")], {"g": "processes=1 threads=1"})
    with srv:
        sockets = list((srv.dir / "run").glob("gateway-*/g.sock"))
        assert len(sockets) == 1
        sock = sockets[0]
        st, dst = sock.stat(), sock.parent.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (WWW_DATA.pw_uid, 0o600)
        assert (dst.st_uid, dst.st_mode & 0o777) == (WWW_DATA.pw_uid, 0o700)
        assert _connect_as(NOBODY, str(sock)) == "PermissionError"
        assert _connect_as(WWW_DATA, str(sock)) == "connected"


def test_daemons_drop_privileges_and_show_their_display_name():
    title = f"gw-who-{token()}"
    srv = daemon_server([app("/nobody", "whoami", group="as_nobody"), app("/default", "whoami")],
                        {"as_nobody": f"processes=1 threads=1 user=nobody group=nogroup display-name={title}",
                         "g": "processes=1 threads=1"})
    with srv:
        me = get_json(srv, "/nobody")
        assert (me["uid"], me["euid"], me["gid"]) == (NOBODY.pw_uid, NOBODY.pw_uid, 65534)
        assert (me["mode"], me["group"]) == ("daemon", "as_nobody")
        assert get_json(srv, "/default")["uid"] == WWW_DATA.pw_uid  # the server's user by default
        assert pids_by_title(title) == {me["pid"]}
        ps = subprocess.run(["ps", "-o", "args=", "-p", str(me["pid"])], capture_output=True, text=True).stdout
        assert ps.strip() == title
        status = Path(f"/proc/{me['pid']}/status").read_text()
        assert re.search(rf"^Uid:\s+{NOBODY.pw_uid}\s+{NOBODY.pw_uid}\s+{NOBODY.pw_uid}\s+{NOBODY.pw_uid}$", status, re.M)
        groups = re.search(r"^Groups:(.*)$", status, re.M).group(1).split()
        assert "0" not in groups


# --- Isolation and coexistence ---

def test_two_groups_with_two_virtualenvs(tmp_path_factory):
    srv = daemon_server([app("/a", "whoami", group="a"), app("/b", "whoami", group="b")], {})
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


def test_embedded_and_daemon_virtual_hosts_side_by_side():
    mounts = [Mount("/who", "daemon_apps.py", "whoami", vhost="embedded.test"),
              app("/who", "whoami", vhost="daemon.test")]
    srv = daemon_server(mounts, {"g": "processes=1 threads=2"})
    with srv:
        emb = get_json(srv, "/who", host="embedded.test")
        dmn = get_json(srv, "/who", host="daemon.test")
        assert (emb["mode"], emb["group"]) == ("embedded", "")
        assert (dmn["mode"], dmn["group"]) == ("daemon", "g")
        assert emb["pid"] in srv.children() and dmn["pid"] not in srv.children()


# --- Streaming ---

def test_large_upload_and_download_stream_through_a_daemon():
    srv = daemon_server([app("/up", "upload"), app("/down", "download")], {"g": "processes=1 threads=2"})
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

def _line_of(conf: Path, needle: str) -> int:
    return next(i for i, line in enumerate(conf.read_text().splitlines(), 1) if needle in line)


def test_configtest_names_an_undefined_group_with_file_and_line():
    srv = daemon_server([app("/who", "whoami", group="nope")], {})
    r = srv.configtest()
    assert r.returncode != 0
    conf = srv.dir / "httpd.conf"
    line = _line_of(conf, "GatewayMode daemon nope")
    assert f"GatewayMode at {conf}:{line}: daemon process group 'nope' is not defined" in r.stdout + r.stderr


def test_configtest_rejects_an_unknown_daemon_option():
    srv = daemon_server([app("/who", "whoami")], {"g": "processes=1 colour=red"})
    r = srv.configtest()
    out = r.stdout + r.stderr
    conf = srv.dir / "httpd.conf"
    assert r.returncode != 0
    assert f"line {_line_of(conf, 'colour=red')} of {conf}" in out
    assert "GatewayDaemon: unknown daemon option 'colour'" in out


def test_configtest_rejects_an_unknown_user():
    srv = daemon_server([app("/who", "whoami")], {"g": "user=no-such-user-here"})
    r = srv.configtest()
    assert r.returncode != 0
    assert "user 'no-such-user-here' does not exist" in r.stdout + r.stderr
