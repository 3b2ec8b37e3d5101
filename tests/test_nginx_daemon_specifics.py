"""Daemon mode under nginx: a reload with a broken group keeps the running
configuration, workers that only forward start no Python, and configuration
errors name file and line (a dead supervisor's keeper:
test_nginx_daemon_supervisor_restart.py). What Apache and nginx do alike is in
test_both_daemon_common.py."""

import os
import time

import pytest

from harness import Mount, built, daemon_app, daemon_server, get_json, pids_by_title, token, wait_for_pids

pytestmark = pytest.mark.skipif(
    not built("nginx"), reason="needs ngx_http_gateway_module.so and gateway-daemon (make nginx)",
)


# --- Supervision ---

def test_a_reload_with_a_broken_group_keeps_the_running_configuration():
    title = f"gw-nbroken-{token()}"
    srv = daemon_server("nginx", [daemon_app("/who", "whoami")], {"g": f"processes=1 threads=1 display-name={title}"})
    with srv:
        (pid,) = wait_for_pids(title, 1)
        srv.settings.daemons["g"] += " user=no-such-user-here"
        srv.write_config()
        srv.reload()  # SIGHUP straight to the master, as `systemctl reload` does
        log = srv.wait_for_log("user 'no-such-user-here' does not exist")
        assert f"in {srv.conf}:{srv.line_of('no-such-user-here')}" in log
        time.sleep(0.5)
        os.kill(srv.pid(), 0)  # the master lives on
        assert get_json(srv, "/who")["pid"] == pid
        assert pids_by_title(title) == {pid}


# --- Embedded and daemon side by side ---

def test_embedded_and_daemon_locations_side_by_side_in_one_server():
    mounts = [Mount("/emb", "daemon_apps.py", "whoami"), daemon_app("/dmn", "whoami")]
    srv = daemon_server("nginx", mounts, {"g": "processes=1 threads=2"})
    with srv:
        emb, dmn = get_json(srv, "/emb"), get_json(srv, "/dmn")
        assert (emb["mode"], emb["group"]) == ("embedded", "")
        assert (dmn["mode"], dmn["group"]) == ("daemon", "g")
        workers = srv.children()
        assert emb["pid"] in workers and dmn["pid"] not in workers
        assert len(srv.workers_started()) == 2 and all("started Python" in line for line in srv.workers_started())


def test_workers_of_a_daemon_only_server_do_not_start_python():
    srv = daemon_server("nginx", [daemon_app("/who", "whoami")], {"g": "processes=1 threads=2"})
    with srv:
        assert get_json(srv, "/who")["mode"] == "daemon"
        started = srv.workers_started()
        assert len(started) == 2 and all("(no Python here)" in line for line in started), started
        assert "started Python" not in srv.log_text()


# --- Configuration errors ---

def test_configtest_names_an_undefined_group_with_file_and_line():
    srv = daemon_server("nginx", [daemon_app("/who", "whoami", group="nope")], {})
    r = srv.configtest()
    assert r.returncode != 0
    where = f"{srv.conf}:{srv.line_of('gateway_mode daemon nope')}"
    assert f"gateway_mode: daemon process group 'nope' is not defined (define it in the http block with 'gateway_daemon nope ...') in {where}" in r.stderr, r.stderr


def test_configtest_accepts_a_group_defined_after_its_use():
    srv = daemon_server("nginx", [daemon_app("/who", "whoami")], {"g": "processes=1"})
    lines = srv.write_config().read_text().splitlines()
    define = next(line for line in lines if "gateway_daemon g" in line)
    lines.remove(define)
    lines.insert(len(lines) - 1, define)  # last in the http block, after the servers
    srv.conf.write_text("\n".join(lines) + "\n")
    assert srv.line_of("gateway_daemon g") > srv.line_of("gateway_mode daemon g")
    r = srv.nginx("-t")
    assert r.returncode == 0, r.stderr


def test_configtest_rejects_an_unknown_daemon_option_with_file_and_line():
    srv = daemon_server("nginx", [daemon_app("/who", "whoami")], {"g": "processes=1 colour=red"})
    r = srv.configtest()
    assert r.returncode != 0
    assert "unknown daemon option 'colour'" in r.stderr
    assert f"in {srv.conf}:{srv.line_of('colour=red')}" in r.stderr, r.stderr


def test_configtest_rejects_an_unknown_user_with_file_and_line():
    srv = daemon_server("nginx", [daemon_app("/who", "whoami")], {"g": "user=no-such-user-here"})
    r = srv.configtest()
    assert r.returncode != 0
    assert "user 'no-such-user-here' does not exist" in r.stderr, r.stderr
    assert f"in {srv.conf}:{srv.line_of('no-such-user-here')}" in r.stderr, r.stderr
    # A configuration test starts nothing.
    assert not list(srv.dir.glob("gateway-*"))
