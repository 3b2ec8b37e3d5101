"""A virtualenv the server's workers (or a daemon group's user) cannot read: the
configuration test, which runs as root and could read it, fails and says which
user is denied and on which path, instead of "is not a directory" or Python's
"failed to get the Python codec of the filesystem encoding" at the first request."""

import grp
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness import DAEMON_KINDS, EACH_SERVER_AND_MODE, SERVERS, Mount, Settings, make_server

GROUP = "locked"


@pytest.fixture(scope="module")
def venvs():
    """A virtualenv in a root-owned directory of mode 0700 (`locked/venv`), and one
    that is itself of mode 0700 in an open directory (`open/venv`); www-data can
    enter neither, root both."""
    base = Path(tempfile.mkdtemp(prefix="gateway-venvperm-"))
    base.chmod(0o755)
    for parent, mode in [("locked", 0o700), ("open", 0o755)]:
        (base / parent).mkdir(mode=mode)
        (base / parent).chmod(mode)
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(base / parent / "venv")], check=True)
    (base / "open" / "venv").chmod(0o700)
    yield base
    shutil.rmtree(base)


def server_with_home(kind, home):
    """The hello app with `home` as its Python home: GatewayPythonHome or
    gateway_python_home embedded, python-home= of a daemon group of the server's user."""
    if kind.endswith("-daemon"):
        srv = make_server(kind, [Mount("/hello", "battery.py", "hello", mode="daemon", group=GROUP)], Settings())
        srv.settings.daemons = {GROUP: f"processes=1 threads=1 python-home={home}"}
    else:
        srv = make_server(kind, [Mount("/hello", "battery.py", "hello")], Settings(python_home=str(home)))
    return srv


@pytest.mark.parametrize("kind", EACH_SERVER_AND_MODE)
@pytest.mark.parametrize("locked,denied", [("locked", "locked"), ("open", "open/venv")])
def test_configtest_says_which_user_is_denied_where(kind, locked, denied, venvs):
    """configtest fails, naming www-data and the first path it cannot enter: the
    0700 directory holding the virtualenv, or the 0700 virtualenv itself."""
    srv = server_with_home(kind, venvs / locked / "venv")
    r = srv.configtest()
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "permission denied for user www-data" in out, out
    assert f"on {venvs / denied} " in out, out
    assert "not a directory" not in out and "codec" not in out, out


@pytest.mark.parametrize("kind", EACH_SERVER_AND_MODE)
def test_configtest_passes_with_a_readable_virtualenv(kind, venvs):
    """The same virtualenv made readable passes: the check is made for www-data,
    not against anything a 0700 directory of root's happens to look like."""
    (venvs / "locked").chmod(0o711)
    try:
        r = server_with_home(kind, venvs / "locked" / "venv").configtest()
    finally:
        (venvs / "locked").chmod(0o700)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("kind", DAEMON_KINDS)
def test_a_daemon_groups_own_user_is_the_one_checked(kind, venvs):
    """A virtualenv that only the group www-data may enter serves a daemon group of
    the server's user, but not one of user=nobody: the message names nobody."""
    www_data = grp.getgrnam("www-data").gr_gid
    os.chown(venvs / "locked", 0, www_data)
    (venvs / "locked").chmod(0o750)
    try:
        ok = server_with_home(kind, venvs / "locked" / "venv").configtest()
        srv = server_with_home(kind, venvs / "locked" / "venv")
        srv.settings.daemons[GROUP] += " user=nobody"
        denied = srv.configtest()
    finally:
        os.chown(venvs / "locked", 0, 0)
        (venvs / "locked").chmod(0o700)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out = denied.stdout + denied.stderr
    assert denied.returncode != 0, out
    assert f"permission denied for user nobody on {venvs / 'locked'} (mode 0750, owner root)" in out, out


@pytest.mark.skipif("apache-event" not in SERVERS, reason="needs Apache")
def test_a_worker_that_cannot_read_its_home_says_so_at_start(venvs):
    """When the configuration cannot tell (here a second `User`, read after
    GatewayPythonHome was checked for www-data, makes the children run as nobody),
    the worker that cannot read the virtualenv says so in the error log when it
    starts Python, rather than "is not a directory"."""
    www_data = grp.getgrnam("www-data").gr_gid
    os.chown(venvs / "locked", 0, www_data)
    (venvs / "locked").chmod(0o750)
    srv = server_with_home("apache-event", venvs / "locked" / "venv")
    srv.settings.extra = "User nobody\nGroup nogroup"
    try:
        with srv:
            resp, _ = srv.get("/hello")
            log = srv.wait_for_log("permission denied for user nobody")
    finally:
        os.chown(venvs / "locked", 0, 0)
        (venvs / "locked").chmod(0o700)
    assert resp.status == 500
    assert f"permission denied for user nobody on {venvs / 'locked'} (mode 0750, owner root)" in log, log
    assert "not a directory" not in log and "codec" not in log, log
