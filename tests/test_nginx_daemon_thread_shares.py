"""nginx: the module threads that wait for daemon groups (`gateway_threads`) are
shared fairly. Each daemon group (and the embedded applications) holds at most
its share of them, so slow requests to one group wait in that group's queue
instead of making requests to a healthy group wait behind them."""

import time

import pytest

from harness import Mount, built, daemon_app, daemon_server, get_json, in_background, timed_get, token

pytestmark = pytest.mark.skipif(
    not built("nginx"), reason="needs ngx_http_gateway_module.so and gateway-daemon (make nginx)",
)

SLOW = 4  # seconds each slow request holds a daemon thread of group a


def saturate(srv, prefix, count, results):
    """`count` slow requests to `prefix`; returns their threads once the first run."""
    tokens = [token() for _ in range(count)]
    threads = [in_background(srv, f"{prefix}?s={SLOW}&token={t}", timeout=60, results=results)[0] for t in tokens]
    deadline = time.monotonic() + 10
    while sum(srv.marker(t).exists() for t in tokens) < min(count, 2):
        assert time.monotonic() < deadline, srv.log_text()[-3000:]
        time.sleep(0.01)
    time.sleep(0.5)  # the rest are queued by now
    return threads


def assert_fast_while_saturated(srv, slow_prefix, fast_path, slow_count):
    slow_results = []
    slow = saturate(srv, slow_prefix, slow_count, slow_results)
    status, seconds = timed_get(srv, fast_path, timeout=60)
    for t in slow:
        t.join(timeout=60)
    # Before: every thread waited for group a, and this request waited behind them.
    assert (status, round(seconds)) == (200, 0) and seconds < 2, (status, seconds)
    assert [s for s, _ in slow_results] == [200] * slow_count, slow_results


def test_a_saturated_group_does_not_hold_up_another_group():
    srv = daemon_server("nginx", [daemon_app("/a", "slow", group="a"), daemon_app("/b", "whoami", group="b")],
                        {"a": "processes=1 threads=2", "b": "processes=1 threads=2"},
                        workers=1, threads=4)
    with srv:
        assert get_json(srv, "/b")["group"] == "b"
        # More slow requests to group a than the worker has threads.
        assert_fast_while_saturated(srv, "/a", "/b", slow_count=6)


def test_a_saturated_group_does_not_hold_up_embedded_applications():
    mounts = [daemon_app("/a", "slow", group="a"), Mount("/emb", "daemon_apps.py", "whoami")]
    srv = daemon_server("nginx", mounts, {"a": "processes=1 threads=2"}, workers=1, threads=4)
    with srv:
        assert get_json(srv, "/emb")["mode"] == "embedded"
        assert_fast_while_saturated(srv, "/a", "/emb", slow_count=6)


def test_a_wait_for_the_groups_share_counts_against_its_queue_timeout():
    """A request queued in the worker because its group holds its whole share gets
    the group's queue-timeout 503 in time, not when a thread frees up."""
    srv = daemon_server("nginx", [daemon_app("/a", "slow", group="a"), daemon_app("/who", "whoami", group="a"),
                                  daemon_app("/b", "whoami", group="b")],
                        {"a": "processes=1 threads=1 queue-timeout=1", "b": "processes=1 threads=1"},
                        workers=1, threads=2)
    with srv:
        slow_results = []
        slow = saturate(srv, "/a", 1, slow_results)
        status, seconds = timed_get(srv, "/who", timeout=60)
        slow[0].join(timeout=60)
        assert status == 503 and 1 <= seconds < 2.5, (status, seconds)
        assert slow_results[0][0] == 200
        srv.wait_for_log("gateway: GET /who: no daemon process of group 'a' took the request "
                         "within queue-timeout=1s: all its threads are busy; answering 503")
