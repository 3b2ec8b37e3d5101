"""Housekeeping (issue 18, item 11): what test runs leave behind, the ports they
use, the tests' virtualenv, the supervisor's log lines under nginx, repeated
configuration and time units in daemon options."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import ROOT, VENV, WWW_DATA, Apache, Mount, Nginx, Settings, built, pids_by_title, port_range

needs_apache = pytest.mark.skipif(not built("apache", daemon=False), reason="mod_gateway.so is not built")
needs_nginx = pytest.mark.skipif(not built("nginx", daemon=False), reason="ngx_http_gateway_module.so is not built")
needs_nginx_daemon = pytest.mark.skipif(not built("nginx"), reason="nginx daemon mode is not built")


@pytest.fixture
def private_tmp():
    """A directory for TMPDIR that only this test uses, traversable by the servers' user."""
    d = Path(tempfile.mkdtemp(prefix="housekeeping-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- The servers' private directories ---

INNER_TESTS = """
from harness import Apache, Mount


def test_passes():
    with Apache([Mount("/", "hello.py")]) as srv:
        assert srv.get("/")[0].status == 200


def test_fails():
    with Apache([Mount("/", "hello.py")]) as srv:
        assert srv.get("/")[0].status == 404, "planted failure"
"""


def run_inner_tests(tmp: Path, **env) -> subprocess.CompletedProcess:
    """Runs a passing and a failing test that each start a server, with the suite's
    hooks (tests/conftest.py), in a pytest of its own whose TMPDIR is `tmp`."""
    (tmp / "test_inner.py").write_text(INNER_TESTS)
    run_env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_KEEP_TMP", "PYTEST_ADDOPTS")}
    run_env.update(TMPDIR=str(tmp), PYTHONPATH=str(ROOT / "tests"), GATEWAY_TEST_VENV=VENV, **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "conftest", "-q",
                           "test_inner.py"], cwd=tmp, env=run_env, capture_output=True, text=True, timeout=300)


@needs_apache
def test_a_test_run_leaves_only_the_directories_of_failed_tests(private_tmp):
    r = run_inner_tests(private_tmp)
    assert "1 failed, 1 passed" in r.stdout, r.stdout + r.stderr
    left = sorted(private_tmp.glob("gateway-*"))
    assert len(left) == 1, f"the passing test's server directory was left behind: {left}\n{r.stdout}"
    # The failure output says where the failed test's server kept its logs.
    report = r.stdout.split("planted failure", 1)[1]
    assert "server directories kept for this failure" in report and str(left[0]) in report, r.stdout
    assert (left[0] / "error.log").exists()


@needs_apache
def test_gateway_keep_tmp_keeps_every_directory(private_tmp):
    r = run_inner_tests(private_tmp, GATEWAY_KEEP_TMP="1")
    assert "1 failed, 1 passed" in r.stdout, r.stdout + r.stderr
    assert len(list(private_tmp.glob("gateway-*"))) == 2, r.stdout


# --- Ports from the environment ---

@needs_apache
def test_servers_listen_in_the_port_range_given(monkeypatch):
    monkeypatch.setenv("GATEWAY_TEST_PORTS", "20000-20999")
    srv = Apache([Mount("/", "hello.py")])
    with srv:
        assert 20000 <= srv.port <= 20999, srv.port
        assert srv.get("/")[1] == b"Hello, world!"


@pytest.mark.parametrize("value", ["20000-19999", "high-low", "0-10", "70000"])
def test_a_port_range_that_is_none_says_how_to_write_one(monkeypatch, value):
    monkeypatch.setenv("GATEWAY_TEST_PORTS", value)
    with pytest.raises(ValueError, match="expected a port range FIRST-LAST, e.g. 20000-20999"):
        port_range("GATEWAY_TEST_PORTS")


# --- The tests' virtualenv ---

@pytest.mark.skipif(os.geteuid() != 0, reason="plants a directory for another user")
def test_the_default_virtualenv_is_the_users_own_and_never_one_planted_by_another_user(private_tmp):
    """Another user (here root) made www-data's default virtualenv first, with a
    python that would run as www-data: tests/run must refuse it, not run it."""
    uid = WWW_DATA.pw_uid
    planted = Path(f"/var/tmp/gateway-test-venv-{uid}")
    if planted.exists() or planted.is_symlink():
        pytest.skip(f"{planted} exists already")
    marker = private_tmp / "ran"
    private_tmp.chmod(0o777)
    (planted / "bin").mkdir(parents=True)
    try:
        python = planted / "bin" / "python"
        python.write_text(f"#!/bin/sh\ntouch {marker}\n")
        python.chmod(0o755)
        planted.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k != "GATEWAY_TEST_VENV"}
        env["HOME"] = str(private_tmp)
        r = subprocess.run(["runuser", "-u", "www-data", "--", str(ROOT / "tests" / "run")], env=env,
                           capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(planted)
    assert not marker.exists(), "tests/run ran the python another user planted"
    assert r.returncode != 0
    assert f"{planted} is not a directory of yours" in r.stderr, r.stdout + r.stderr


# --- The supervisor's lines under nginx ---

NGINX_LINE = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(emerg|alert|crit|error|warn|notice|info|debug)\] "
                        r"\d+#\d+: ")


def nginx_daemon(tag: str, log_level: str) -> Nginx:
    srv = Nginx([Mount("/d", "hello.py", mode="daemon", group="g")], log_level=log_level)
    srv.settings.daemons = {"g": f"processes=1 threads=1 display-name=gateway-hk-{tag}-{srv.port}"}
    return srv


@needs_nginx_daemon
def test_supervisor_and_daemon_lines_use_nginx_format():
    srv = nginx_daemon("format", "info")
    with srv:
        assert srv.get("/d")[1] == b"Hello, world!"
        srv.wait_for_log("daemon supervisor for nginx started")
        srv.wait_for_log("gateway: daemon process")
    lines = [line for line in srv.log_text().splitlines() if "gateway:" in line]
    assert any("daemon supervisor for nginx started" in line for line in lines)
    wrong = [line for line in lines if not NGINX_LINE.match(line)]
    assert not wrong, "lines not in nginx's format:\n" + "\n".join(wrong)


@needs_nginx_daemon
def test_supervisor_honours_the_error_log_level():
    srv = nginx_daemon("warn", "warn")
    title = srv.settings.daemons["g"].split("display-name=")[1]
    with srv:
        assert srv.get("/d")[1] == b"Hello, world!"
        (pid,) = pids_by_title(title)
        os.kill(pid, signal.SIGKILL)
        srv.wait_for_log("SIGKILL")
        deadline = time.monotonic() + 10
        while pids_by_title(title) in (set(), {pid}) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.get("/d")[1] == b"Hello, world!"
    text = srv.log_text()
    # The error is there, in nginx's format; the supervisor's and daemons' info lines are not.
    info = [line for line in text.splitlines() if "[info]" in line or ":info]" in line]
    assert not info, "info lines with error_log at warn:\n" + "\n".join(info)
    (killed,) = [line for line in text.splitlines() if f"daemon process {pid} of group 'g'" in line
                 and "SIGKILL" in line]
    assert NGINX_LINE.match(killed) and "[error]" in killed, killed


# --- Repeated settings and time units, on both servers ---

def apache_configtest(settings: Settings) -> subprocess.CompletedProcess:
    srv = Apache([Mount("/d", "hello.py", mode="daemon", group="g")], settings)
    r = srv.configtest()
    r.server = srv
    return r


def nginx_configtest(settings: Settings, http_extra="") -> subprocess.CompletedProcess:
    srv = Nginx([Mount("/d", "hello.py", mode="daemon", group="g")], settings, http_extra=http_extra)
    r = srv.configtest()
    r.server = srv
    return r


@needs_apache
def test_apache_refuses_a_daemon_option_given_twice():
    r = apache_configtest(Settings(daemons={"g": "processes=3 threads=1 processes=2"}))
    srv = r.server
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert f"line {srv.line_of('GatewayDaemon g')} of {srv.conf}" in out, out
    assert ("GatewayDaemon: daemon option 'processes' is given twice ('processes=3' and 'processes=2'): "
            "give it once") in out, out


@needs_nginx
def test_nginx_refuses_a_daemon_option_given_twice():
    r = nginx_configtest(Settings(daemons={"g": "processes=3 threads=1 processes=2"}))
    srv = r.server
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert ("\"gateway_daemon\" directive daemon option 'processes' is given twice ('processes=3' and "
            f"'processes=2'): give it once in {srv.conf}:{srv.line_of('gateway_daemon g')}") in out, out


@needs_apache
def test_apache_refuses_gateway_python_home_given_twice():
    r = apache_configtest(Settings(python_home=VENV, extra=f"GatewayPythonHome {sys.base_prefix}",
                                   daemons={"g": "processes=1 threads=1"}))
    srv = r.server
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert f"line {srv.line_of(f'GatewayPythonHome {sys.base_prefix}')} of {srv.conf}" in out, out
    assert f"GatewayPythonHome: is given twice ('{VENV}', then '{sys.base_prefix}'): give it once" in out, out


@needs_nginx
def test_nginx_refuses_gateway_python_home_given_twice():
    r = nginx_configtest(Settings(python_home=VENV, daemons={"g": "processes=1 threads=1"}),
                         http_extra=f"gateway_python_home {sys.base_prefix};")
    srv = r.server
    assert r.returncode != 0
    out = r.stdout + r.stderr
    line = srv.line_of(f"gateway_python_home {sys.base_prefix}")
    assert f'"gateway_python_home" directive is duplicate in {srv.conf}:{line}' in out, out


TIMES = "processes=1 threads=1 request-timeout=5s graceful-timeout=2m socket-timeout=1h queue-timeout=2000ms"


@needs_apache
def test_apache_takes_time_units_and_refuses_unknown_ones():
    r = apache_configtest(Settings(daemons={"g": TIMES}))
    assert r.returncode == 0, r.stdout + r.stderr
    r = apache_configtest(Settings(daemons={"g": "processes=1 request-timeout=5d"}))
    assert r.returncode != 0
    assert ("daemon option 'request-timeout' needs a time such as 30, 30s, 5m or 1h, got '5d' "
            "(known units: s, m, h, ms)") in r.stdout + r.stderr, r.stdout + r.stderr


@needs_nginx
def test_nginx_takes_time_units_and_refuses_unknown_ones():
    r = nginx_configtest(Settings(daemons={"g": TIMES}))
    assert r.returncode == 0, r.stdout + r.stderr
    r = nginx_configtest(Settings(daemons={"g": "processes=1 socket-timeout=1500ms"}))
    assert r.returncode != 0
    assert ("daemon option 'socket-timeout' counts whole seconds: '1500ms' is not a whole number of seconds"
            in r.stdout + r.stderr), r.stdout + r.stderr

