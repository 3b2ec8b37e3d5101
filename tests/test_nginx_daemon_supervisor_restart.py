"""nginx: a daemon supervisor that dies (kill -9, a crash) is replaced by its
keeper without a reload, and the keeper goes away with its generation (a stop,
a reload, the master's kill -9). Apache's parent does the same from its monitor
hook (test_apache_daemon_specifics.py)."""

import os
import signal
import time
from pathlib import Path

import pytest

from harness import built, daemon_app, daemon_server, get_json, parent_of, token, wait_for_pids

pytestmark = pytest.mark.skipif(
    not built("nginx"), reason="needs ngx_http_gateway_module.so and gateway-daemon (make nginx)",
)


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


def wait_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def serve_again(srv, path, timeout):
    """Seconds until `path` answers 200 again."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        resp, _ = srv.get(path, timeout=5)
        if resp.status == 200:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{path} did not answer 200 within {timeout}s:\n{srv.log_text()[-3000:]}")


def test_a_killed_supervisor_is_replaced_without_a_reload():
    title = f"gw-keep-{token()}"
    srv = daemon_server("nginx", [daemon_app("/who", "whoami")], {"g": f"processes=2 threads=1 display-name={title}"})
    with srv:
        before = wait_for_pids(title, 2)
        supervisor = parent_of(min(before))
        keeper = parent_of(supervisor)
        workers = srv.children()
        os.kill(supervisor, signal.SIGKILL)
        # Before: the groups answered 503 until someone reloaded nginx.
        assert serve_again(srv, "/who", timeout=10) < 10
        after = wait_for_pids(title, 2, timeout=10)
        assert not after & before
        assert get_json(srv, "/who")["pid"] in after
        replacement = parent_of(min(after))
        assert replacement != supervisor and parent_of(replacement) == keeper
        assert srv.children() == workers, "nginx was not reloaded"
        srv.wait_for_log(f"the daemon supervisor {supervisor} was killed by signal 9 (SIGKILL); starting a new one")
    # Stopping nginx ends the keeper, the new supervisor and its daemons.
    assert wait_gone([keeper, replacement, *after]) == []


def test_the_keeper_ends_with_its_generation_on_reload_and_on_kill_9_of_the_master():
    title = f"gw-keep-gen-{token()}"
    srv = daemon_server("nginx", [daemon_app("/who", "whoami")], {"g": f"processes=1 threads=1 display-name={title}"})
    with srv:
        (first,) = wait_for_pids(title, 1)
        old_supervisor = parent_of(first)
        old_keeper = parent_of(old_supervisor)
        srv.graceful()
        # The old generation drains and goes, keeper included; nothing restarts it.
        assert wait_gone([first, old_supervisor, old_keeper], timeout=15) == []
        (second,) = wait_for_pids(title, 1, timeout=10)
        supervisor = parent_of(second)
        keeper = parent_of(supervisor)
        assert keeper != old_keeper
        assert get_json(srv, "/who")["pid"] == second
        workers = srv.children()
        try:
            os.kill(srv.pid(), signal.SIGKILL)
            assert wait_gone([second, supervisor, keeper], timeout=15) == []
        finally:
            for worker in workers:
                os.kill(worker, signal.SIGKILL)
