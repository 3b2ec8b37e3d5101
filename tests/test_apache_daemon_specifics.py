"""Daemon mode under Apache: the monitor hook that replaces a dead supervisor,
virtual hosts, and configuration errors. What Apache and nginx do alike is in
test_both_daemon_common.py."""

import os
import signal

import pytest

from harness import Mount, built, daemon_app, daemon_server, get_json, parent_of, token, wait_for_pids

pytestmark = pytest.mark.skipif(not built("apache"), reason="needs mod_gateway.so and gateway-daemon (make apache)")


# --- Supervision ---

def test_a_dead_supervisor_is_replaced():
    title = f"gw-super-{token()}"
    srv = daemon_server("apache", [daemon_app("/who", "whoami")], {"g": f"processes=2 threads=1 display-name={title}"})
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
              daemon_app("/who", "whoami", vhost="daemon.test")]
    srv = daemon_server("apache", mounts, {"g": "processes=1 threads=2"})
    with srv:
        emb = get_json(srv, "/who", host="embedded.test")
        dmn = get_json(srv, "/who", host="daemon.test")
        assert (emb["mode"], emb["group"]) == ("embedded", "")
        assert (dmn["mode"], dmn["group"]) == ("daemon", "g")
        assert emb["pid"] in srv.children() and dmn["pid"] not in srv.children()


# --- Configuration errors ---

def test_configtest_names_an_undefined_group_with_file_and_line():
    srv = daemon_server("apache", [daemon_app("/who", "whoami", group="nope")], {})
    r = srv.configtest()
    assert r.returncode != 0
    where = f"{srv.conf}:{srv.line_of('GatewayMode daemon nope')}"
    assert f"GatewayMode at {where}: daemon process group 'nope' is not defined" in r.stdout + r.stderr


def test_configtest_rejects_an_unknown_daemon_option():
    srv = daemon_server("apache", [daemon_app("/who", "whoami")], {"g": "processes=1 colour=red"})
    r = srv.configtest()
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"line {srv.line_of('colour=red')} of {srv.conf}" in out
    assert "GatewayDaemon: unknown daemon option 'colour'" in out


def test_configtest_rejects_an_unknown_user():
    srv = daemon_server("apache", [daemon_app("/who", "whoami")], {"g": "user=no-such-user-here"})
    r = srv.configtest()
    assert r.returncode != 0
    assert "user 'no-such-user-here' does not exist" in r.stdout + r.stderr
