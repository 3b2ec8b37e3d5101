"""Embedded applications of one server share a Python interpreter per process:
their modules and settings too (two Django projects cannot). Gateway refuses a
second script there unless the operator says they may share, and points to
daemon groups, where each group has interpreters of its own."""

import json

import pytest

from harness import MODULE, SERVER_CLASS, VENV, Mount, Settings, skip_unless_built

SHARE = {"apache": "GatewaySharedInterpreter On", "nginx": "gateway_shared_interpreter on;"}


@pytest.fixture(params=sorted(MODULE))
def kind(request):
    skip_unless_built(request.param)
    return request.param


def server(kind, mounts, shared=False, daemons=None, **kw):
    settings = Settings(python_home=VENV, shared_interpreter=shared, daemons=daemons or {})
    return SERVER_CLASS[kind](mounts, settings, **kw)


def two_djangos(mode="embedded"):
    groups = {"embedded": (None, None), "daemon": ("one", "two")}[mode]
    return [Mount("/one", "django_site/site_wsgi.py", mode=mode, group=groups[0]),
            Mount("/two", "django_other/site_wsgi.py", mode=mode, group=groups[1])]


def test_two_embedded_projects_fail_the_configuration_test(kind):
    srv = server(kind, two_djangos())
    result = srv.configtest()
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "django_other/site_wsgi.py" in out and "django_site/site_wsgi.py" in out, out
    assert "would share the embedded Python interpreter" in out, out
    # It says where each is mounted, and both ways out.
    assert f"{srv.conf}:" in out, out
    assert "daemon group" in out and SHARE[kind].rstrip(";") in out, out


def test_two_projects_in_their_own_daemon_groups_keep_their_settings(kind):
    with server(kind, two_djangos("daemon"), daemons={"one": f"python-home={VENV}",
                                                     "two": f"python-home={VENV}"}) as srv:
        one = json.loads(srv.get("/one/")[1])
        two = json.loads(srv.get("/two/")[1])
        assert one["framework"] == "django" and "project" not in one
        assert two == {"project": "other", "path": "/two/"}


def test_sharing_is_allowed_when_said(kind):
    mounts = [Mount("/hello", "hello.py"), Mount("/battery", "battery.py", "hello")]
    srv = server(kind, mounts, shared=True)
    assert srv.configtest().returncode == 0
    with srv:
        assert srv.get("/hello")[1] == srv.get("/battery")[1] == b"Hello, world!"


def test_callables_of_one_script_share_without_saying(kind):
    mounts = [Mount("/a", "battery.py", "hello"), Mount("/b", "battery.py", "environ")]
    with server(kind, mounts) as srv:
        assert srv.get("/a")[1] == b"Hello, world!"
        assert srv.get("/b")[0].status == 200


def test_apache_refuses_a_second_script_at_its_first_request_when_sections_decide_modes():
    """A <Location> naming a daemon group may take any mount of its server out of
    embedded mode, which only a request tells: the interpreter refuses the second
    script itself, with a 500 and the same explanation."""
    skip_unless_built("apache", daemon=False)
    mounts = [Mount("/a", "hello.py"), Mount("/b", "battery.py", "hello"),
              Mount("/c", "daemon_apps.py", "whoami", mode="daemon", group="g")]
    # One child process, so that /a and /b meet in one interpreter.
    srv = server("apache", mounts, daemons={"g": f"python-home={VENV}"}, mpm="event1")
    assert srv.configtest().returncode == 0
    with srv:
        assert srv.get("/a")[1] == b"Hello, world!"
        assert srv.get("/c")[0].status == 200
        resp, _ = srv.get("/b")
        assert resp.status == 500
        log = srv.wait_for_log("would share the embedded Python interpreter")
        assert "gateway: GET /b: loading the WSGI application" in log
        assert "'GatewaySharedInterpreter On'" in log
