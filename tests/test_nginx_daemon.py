"""Daemon mode under nginx: the master starts the supervisor, reloads replace the
daemons without failing a request, nothing outlives the master, and the same
security and isolation as under Apache (see test_daemon.py)."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import VENV, battery_settings
from harness import MODULES, Mount, Nginx
from test_daemon import NOBODY, WWW_DATA, _connect_as, app, get_json, load, parent_of, pids_by_title, token, wait_for_pids

pytestmark = pytest.mark.skipif(
    not (MODULES / "ngx_http_gateway_module.so").exists() or not (MODULES / "gateway-daemon").exists(),
    reason="needs ngx_http_gateway_module.so and gateway-daemon (make nginx)",
)


def daemon_server(mounts, daemons, **kw):
    """nginx whose `daemons` ({name: options}) get the test virtualenv."""
    srv = Nginx(mounts, battery_settings(), name="nginx-daemon", **kw)
    srv.settings.daemons = {
        name: f"python-home={VENV} {options}".strip() for name, options in daemons.items()
    }
    return srv


def line_of(srv, needle: str) -> int:
    lines = srv.conf.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


# --- Supervision ---

def test_kill_9_fails_only_the_requests_in_flight_and_is_replaced_fast():
    title = f"gw-nkill-{token()}"
    srv = daemon_server([app("/slow", "slow"), app("/who", "whoami")],
                        {"g": f"processes=2 threads=3 display-name={title}"})
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

        results = load(srv, "/slow?s=0.2", clients=8, seconds=4.5, during=kill)
        replaced = wait_for_pids(title, 2, timeout=5)
        assert victim not in replaced
        assert killed_at[1] - killed_at[0] < 1.0, killed_at[1] - killed_at[0]
        failures = [r for r in results if r != 200]
        assert len(results) > 60, len(results)
        # Only the requests victim was running (3 threads) or had accepted can fail.
        assert 1 <= len(failures) <= 6, (failures, len(results))
        assert set(failures) == {502}, failures
        log = srv.log_text()
        died = [line for line in log.splitlines()
                if f"daemon process {victim} of group 'g' was killed by signal 9 (SIGKILL) while serving this request" in line]
        assert len(died) == len(failures), log[-3000:]
        assert all("gateway: GET /slow?s=0.2: " in line for line in died)
        assert f"daemon process {victim} of group 'g' was killed by signal 9 (SIGKILL); starting a replacement" in log
        assert get_json(srv, "/who")["pid"] in replaced


def test_reloads_under_load_fail_nothing_and_replace_the_daemons():
    title = f"gw-nreload-{token()}"
    srv = daemon_server([app("/slow", "slow")], {"g": f"processes=2 threads=4 display-name={title}"})
    with srv:
        before = wait_for_pids(title, 2)

        def reload():
            # Twice: the second generation shares the first one's run directory.
            for _ in range(2):
                r = srv.nginx("-s", "reload")
                assert r.returncode == 0, r.stderr
                time.sleep(1.5)

        results = load(srv, "/slow?s=0.3", clients=8, seconds=7, during=reload)
        assert len(results) > 50
        assert [r for r in results if r != 200] == []
        # A new generation of daemons serves; the old one drained and exited.
        deadline = time.monotonic() + 15
        while pids_by_title(title) & before and time.monotonic() < deadline:
            time.sleep(0.1)
        after = pids_by_title(title)
        assert len(after) == 2 and not after & before, (before, after)
        assert get_json(srv, "/slow?s=0")["pid"] in after


def test_a_reload_with_a_broken_group_keeps_the_running_configuration():
    title = f"gw-nbroken-{token()}"
    srv = daemon_server([app("/who", "whoami")], {"g": f"processes=1 threads=1 display-name={title}"})
    with srv:
        (pid,) = wait_for_pids(title, 1)
        srv.settings.daemons["g"] += " user=no-such-user-here"
        srv.write_config()
        srv.reload()  # SIGHUP straight to the master, as `systemctl reload` does
        log = srv.wait_for_log("user 'no-such-user-here' does not exist")
        assert f"in {srv.conf}:{line_of(srv, 'no-such-user-here')}" in log
        time.sleep(0.5)
        os.kill(srv.pid(), 0)  # the master lives on
        assert get_json(srv, "/who")["pid"] == pid
        assert pids_by_title(title) == {pid}


def test_no_orphans_after_kill_9_of_the_nginx_master():
    title = f"gw-norphan-{token()}"
    srv = daemon_server([app("/who", "whoami")], {"g": f"processes=2 threads=1 display-name={title}"})
    srv.start()
    workers = []
    try:
        daemons = wait_for_pids(title, 2)
        supervisors = {parent_of(pid) for pid in daemons}
        assert len(supervisors) == 1
        workers = srv.children()
        assert supervisors.isdisjoint(workers)
        os.kill(srv.pid(), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pids_by_title(title) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids_by_title(title) == set(), "daemon processes outlived the nginx master"
        while any(Path(f"/proc/{p}").exists() for p in supervisors) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{p}").exists() for p in supervisors), "the supervisor outlived the master"
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_daemons_stop_with_nginx():
    title = f"gw-nstop-{token()}"
    srv = daemon_server([app("/who", "whoami")], {"g": f"processes=2 threads=1 display-name={title}"})
    with srv:
        daemons = wait_for_pids(title, 2)
        supervisor = parent_of(min(daemons))
        run_dir = next(srv.dir.glob("gateway-*"))
        assert get_json(srv, "/who")["pid"] in daemons
    deadline = time.monotonic() + 5
    while (pids_by_title(title) or Path(f"/proc/{supervisor}").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_by_title(title) == set()
    assert not Path(f"/proc/{supervisor}").exists()
    assert not run_dir.exists(), list(run_dir.iterdir())


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
        assert get_json(srv, "/ok")["group"] == "g"


def test_a_dead_supervisor_gives_503_with_the_reason_until_reload():
    # nginx's master has no periodic hook to start a new supervisor: its groups
    # answer 503 with a clear reason, and a reload brings them back.
    title = f"gw-nsuper-{token()}"
    srv = daemon_server([app("/who", "whoami")], {"g": f"processes=1 threads=1 display-name={title}"})
    with srv:
        (pid,) = wait_for_pids(title, 1)
        os.kill(parent_of(pid), signal.SIGKILL)
        wait_for_pids(title, 0)
        start = time.monotonic()
        resp, _ = srv.get("/who", timeout=10)
        assert resp.status == 503
        assert time.monotonic() - start < 1
        log = srv.log_text()
        assert re.search(r"gateway: GET /who: daemon process group 'g' is not running \(no one listens on .*/g\.sock\); answering 503", log), log[-2000:]
        r = srv.nginx("-s", "reload")
        assert r.returncode == 0, r.stderr
        (after,) = wait_for_pids(title, 1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            resp, data = srv.get("/who")
            if resp.status == 200:
                break
            time.sleep(0.1)
        assert get_json(srv, "/who")["pid"] == after


def test_socket_timeout_answers_504():
    srv = daemon_server([app("/slow", "slow")], {"g": "processes=1 threads=2 socket-timeout=1"})
    with srv:
        start = time.monotonic()
        resp, _ = srv.get("/slow?s=3", timeout=30)
        assert resp.status == 504
        assert time.monotonic() - start < 2.5
        log = srv.wait_for_log("sent nothing for socket-timeout=1s")
        assert re.search(r"gateway: GET /slow\?s=3: daemon process \d+ of group 'g' sent nothing for socket-timeout=1s; answering 504", log)


# --- Security ---

def test_socket_reachable_only_by_the_worker_user():
    srv = daemon_server([app("/who", "whoami")], {"g": "processes=1 threads=1"})
    with srv:
        sockets = list(srv.dir.glob("gateway-*/g.sock"))
        assert len(sockets) == 1
        sock = sockets[0]
        st, dst = sock.stat(), sock.parent.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (WWW_DATA.pw_uid, 0o600)
        assert (dst.st_uid, dst.st_mode & 0o777) == (WWW_DATA.pw_uid, 0o700)
        assert _connect_as(NOBODY, str(sock)) == "PermissionError"
        assert _connect_as(WWW_DATA, str(sock)) == "connected"


def test_daemons_drop_privileges_and_show_their_display_name():
    title = f"gw-nwho-{token()}"
    srv = daemon_server([app("/nobody", "whoami", group="as_nobody"), app("/default", "whoami")],
                        {"as_nobody": f"processes=1 threads=1 user=nobody group=nogroup display-name={title}",
                         "g": "processes=1 threads=1"})
    with srv:
        me = get_json(srv, "/nobody")
        assert (me["uid"], me["euid"], me["gid"]) == (NOBODY.pw_uid, NOBODY.pw_uid, 65534)
        assert (me["mode"], me["group"]) == ("daemon", "as_nobody")
        assert get_json(srv, "/default")["uid"] == WWW_DATA.pw_uid  # the worker user by default
        assert pids_by_title(title) == {me["pid"]}
        status = Path(f"/proc/{me['pid']}/status").read_text()
        assert re.search(rf"^Uid:\s+{NOBODY.pw_uid}\s+{NOBODY.pw_uid}\s+{NOBODY.pw_uid}\s+{NOBODY.pw_uid}$", status, re.M)
        assert "0" not in re.search(r"^Groups:(.*)$", status, re.M).group(1).split()


# --- Isolation and coexistence ---

def test_two_groups_with_two_virtualenvs():
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


def test_embedded_and_daemon_locations_side_by_side_in_one_server():
    mounts = [Mount("/emb", "daemon_apps.py", "whoami"), app("/dmn", "whoami")]
    srv = daemon_server(mounts, {"g": "processes=1 threads=2"})
    with srv:
        emb, dmn = get_json(srv, "/emb"), get_json(srv, "/dmn")
        assert (emb["mode"], emb["group"]) == ("embedded", "")
        assert (dmn["mode"], dmn["group"]) == ("daemon", "g")
        workers = srv.children()
        assert emb["pid"] in workers and dmn["pid"] not in workers
        assert len(srv.workers_started()) == 2 and all("started Python" in line for line in srv.workers_started())


def test_workers_of_a_daemon_only_server_do_not_start_python():
    srv = daemon_server([app("/who", "whoami")], {"g": "processes=1 threads=2"})
    with srv:
        assert get_json(srv, "/who")["mode"] == "daemon"
        started = srv.workers_started()
        assert len(started) == 2 and all("(no Python here)" in line for line in started), started
        assert "started Python" not in srv.log_text()


# --- Configuration errors ---

def test_configtest_names_an_undefined_group_with_file_and_line():
    srv = daemon_server([app("/who", "whoami", group="nope")], {})
    r = srv.configtest()
    assert r.returncode != 0
    where = f"{srv.conf}:{line_of(srv, 'gateway_mode daemon nope')}"
    assert f"gateway_mode: daemon process group 'nope' is not defined (define it in the http block with 'gateway_daemon nope ...') in {where}" in r.stderr, r.stderr


def test_configtest_accepts_a_group_defined_after_its_use():
    srv = daemon_server([app("/who", "whoami")], {"g": "processes=1"})
    lines = srv.write_config().read_text().splitlines()
    define = next(line for line in lines if "gateway_daemon g" in line)
    lines.remove(define)
    lines.insert(len(lines) - 1, define)  # last in the http block, after the servers
    srv.conf.write_text("\n".join(lines) + "\n")
    assert line_of(srv, "gateway_daemon g") > line_of(srv, "gateway_mode daemon g")
    r = srv.nginx("-t")
    assert r.returncode == 0, r.stderr


def test_configtest_rejects_an_unknown_daemon_option_with_file_and_line():
    srv = daemon_server([app("/who", "whoami")], {"g": "processes=1 colour=red"})
    r = srv.configtest()
    assert r.returncode != 0
    assert f"unknown daemon option 'colour'" in r.stderr
    assert f"in {srv.conf}:{line_of(srv, 'colour=red')}" in r.stderr, r.stderr


def test_configtest_rejects_an_unknown_user_with_file_and_line():
    srv = daemon_server([app("/who", "whoami")], {"g": "user=no-such-user-here"})
    r = srv.configtest()
    assert r.returncode != 0
    assert "user 'no-such-user-here' does not exist" in r.stderr, r.stderr
    assert f"in {srv.conf}:{line_of(srv, 'no-such-user-here')}" in r.stderr, r.stderr
    # A configuration test starts nothing.
    assert not list(srv.dir.glob("gateway-*"))
