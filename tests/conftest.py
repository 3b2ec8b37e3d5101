"""Fixtures: the servers under test, each serving the whole battery of test apps,
and daemon servers of each built server. Hooks: the servers' private directories
are removed after each test that passed. Helpers live in harness.py.

Test files are named test_<server>_<mode>_<topic>.py: <server> is apache, nginx or
both, <mode> embedded, daemon or both, for what the file's tests run. Files about
the repository rather than a server (its docs, packaging, housekeeping) are named
test_repo_<topic>.py."""

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import harness  # noqa: E402
from harness import (  # noqa: E402
    BATTERY_GROUP, MODULE, SERVERS, battery_mounts, battery_settings, daemon_options, daemon_server,
    is_daemon_kind, make_server, skip_unless_built,
)


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


@pytest.fixture(params=sorted(MODULE))
def make_daemon_server(request):
    """harness.daemon_server for each server that is built."""
    skip_unless_built(request.param)
    return functools.partial(daemon_server, request.param)


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
