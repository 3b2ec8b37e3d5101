"""Fixtures: the servers under test, each serving the whole battery of test apps.
Hooks: the servers' private directories are removed after each test that passed."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import harness  # noqa: E402
from harness import MODULES, Apache, Mount, Nginx, Settings  # noqa: E402

# The virtualenv the tests run from doubles as the applications' virtualenv
# (Flask and numpy live only there).
VENV = os.environ.get("GATEWAY_TEST_VENV", sys.prefix)

BATTERY = [
    "hello", "environ", "echo", "echo_validated", "stream", "writer", "closing", "filewrapper",
    "filewrapper_validated", "cookies", "status", "exc_info_before", "exc_info_after", "threadlocal",
    "slow", "extensions", "empty", "raise_before", "raise_after", "bad_status", "crlf_header",
    "str_body", "raise_midway", "no_start_response", "returns_none", "close_raises", "single", "prints",
    "framing",
]


def battery_mounts(mode="embedded", group=None):
    mounts = [Mount(f"/{name}", "battery.py", name, mode=mode, group=group) for name in BATTERY]
    mounts.append(Mount("/flask", "flask_app.py", "app", mode=mode, group=group))
    mounts.append(Mount("/django", "django_site/site_wsgi.py", mode=mode, group=group))
    return mounts


# The daemon group that serves the battery in the "-daemon" server kinds.
BATTERY_GROUP = "battery"


def is_daemon_kind(kind):
    return kind.endswith("-daemon")


def daemon_options(srv, processes=2, threads=4, extra=""):
    """Options of a daemon group with the battery's virtualenv and python path."""
    return f"processes={processes} threads={threads} python-home={VENV} python-path={srv.apps / 'lib'} {extra}".strip()


def battery_settings():
    """The battery's servers mount several scripts (its callables, Django, Flask) in
    one interpreter on purpose."""
    return Settings(python_home=VENV, python_path=[str(Path(__file__).parent / "apps" / "lib")],
                    shared_interpreter=True)


def make_server(kind, mounts, settings=None):
    """A server of the given kind: 'apache-event', 'apache-prefork', 'apache-event-daemon'
    (the event MPM forwarding every mount to a daemon group), 'nginx' or 'nginx-daemon'."""
    if kind.startswith("apache-"):
        return Apache(mounts, settings, mpm=kind.split("-")[1], name=kind)
    if kind in ("nginx", "nginx-daemon"):
        return Nginx(mounts, settings, name=kind)
    raise ValueError(kind)


def available_servers():
    kinds = []
    if (MODULES / "mod_gateway.so").exists():
        kinds += ["apache-event", "apache-prefork"]
        if (MODULES / "gateway-daemon").exists():
            kinds += ["apache-event-daemon", "apache-prefork-daemon"]
    if (MODULES / "ngx_http_gateway_module.so").exists():
        kinds.append("nginx")
        if (MODULES / "gateway-daemon").exists():
            kinds.append("nginx-daemon")
    return kinds


SERVERS = available_servers()


@pytest.fixture(scope="module", params=SERVERS)
def server(request):
    """A server of each kind with every battery app mounted, shared by a test module."""
    kind = request.param
    if is_daemon_kind(kind):
        srv = make_server(kind, battery_mounts("daemon", BATTERY_GROUP), battery_settings())
        srv.settings.daemons = {BATTERY_GROUP: daemon_options(srv)}
    else:
        srv = make_server(kind, battery_mounts(), battery_settings())
    # The python path entry must be readable by the server's user: point it at the copy.
    srv.settings.python_path = [str(srv.apps / "lib")]
    with srv:
        yield srv


def pytest_runtest_setup(item):
    """What earlier tests released is removed first; a failure keeps what this
    test made (from here on) or uses."""
    harness.remove_released_dirs()
    item.gateway_servers_made = harness.servers_made()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test keeps the directories of the servers it may have used (its own
    and the module's), and says where they are; after a test, the directories of
    servers that are gone are removed."""
    report = (yield).get_result()
    if report.failed:
        kept = harness.keep_dirs(getattr(item, "gateway_servers_made", 0))
        if kept:
            report.sections.append(("gateway: server directories kept for this failure",
                                    "\n".join(str(d) for d in kept)))
    elif call.when == "teardown":
        harness.remove_released_dirs()


def pytest_sessionfinish(session):
    harness.remove_released_dirs()
