"""Daemon mode when every thread of a group is busy: requests wait in the group's
queue, `listen-backlog` bounds it and `queue-timeout` bounds the wait, each with a
503 and a log line that says why. The same on Apache and nginx."""

import time

import pytest

from harness import daemon_app, daemon_server, in_background, skip_unless_built, token

# One server process: its pool of connections to the daemons is the only one.
SINGLE_PROCESS = {"apache": {"mpm": "event1"}, "nginx": {"workers": 1}}


@pytest.fixture(params=sorted(SINGLE_PROCESS))
def make_server(request):
    kind = request.param
    skip_unless_built(kind)

    def build(options):
        return daemon_server(kind, [daemon_app("/slow", "slow"), daemon_app("/who", "whoami")], {"g": options},
                             **SINGLE_PROCESS[kind])

    return build


def start_slow(srv, seconds):
    """Starts a request that holds a daemon thread for `seconds`; returns once it runs."""
    t = token()
    thread, result = in_background(srv, f"/slow?s={seconds}&token={t}")
    deadline = time.monotonic() + 10
    while not srv.marker(t).exists():
        assert time.monotonic() < deadline, srv.log_text()[-3000:]
        time.sleep(0.01)
    return thread, result


def test_a_full_queue_refuses_only_the_excess_at_once(make_server):
    srv = make_server("processes=1 threads=1 listen-backlog=1")
    with srv:
        slow, slow_result = start_slow(srv, 3)
        # The only thread is busy: two connections fit the queue, the others are refused.
        waiting = [in_background(srv, "/who") for _ in range(5)]
        for thread, _ in waiting:
            thread.join(timeout=30)
        slow.join(timeout=30)
        outcomes = [result[0] for _, result in waiting]
        refused = [seconds for status, seconds in outcomes if status == 503]
        served = [seconds for status, seconds in outcomes if status == 200]
        assert len(refused) + len(served) == 5, outcomes
        assert refused and served, outcomes
        # Refused while the slow request still ran; the queued ones were served after it.
        assert max(refused) < min(served), outcomes
        assert slow_result[0][0] == 200
        log = srv.log_text()
        line = ("gateway: GET /who: daemon process group 'g' is overloaded: all its threads are busy "
                "and its queue of waiting connections is full; answering 503")
        assert log.count(line) == len(refused), log[-3000:]


def test_queue_timeout_answers_503_when_no_thread_takes_the_request(make_server):
    srv = make_server("processes=1 threads=1 queue-timeout=1")
    with srv:
        slow, slow_result = start_slow(srv, 4)
        waiter, result = in_background(srv, "/who")
        waiter.join(timeout=30)
        status, seconds = result[0]
        assert status == 503
        # After queue-timeout, while the slow request still runs.
        assert not slow_result and seconds >= 0.9, (seconds, slow_result)
        srv.wait_for_log("gateway: GET /who: no daemon process of group 'g' took the request within "
                         "queue-timeout=1s: all its threads are busy; answering 503")
        slow.join(timeout=30)
        assert slow_result[0][0] == 200
        resp, _ = srv.get("/who")
        assert resp.status == 200


def test_a_request_that_waited_past_queue_timeout_is_not_run(make_server):
    srv = make_server("processes=1 threads=1 queue-timeout=1")
    with srv:
        # Two requests at once leave two open connections in the server's pool.
        warm = [in_background(srv, "/slow?s=0.3") for _ in range(2)]
        for thread, result in warm:
            thread.join(timeout=30)
            assert result[0][0] == 200
        slow, slow_result = start_slow(srv, 3)
        # This one goes out on the other open connection and waits there for the thread.
        waiter, result = in_background(srv, "/who")
        waiter.join(timeout=30)
        slow.join(timeout=30)
        assert slow_result[0][0] == 200
        status, seconds = result[0]
        assert status == 503 and seconds >= 2, result
        log = srv.wait_for_log("longer than queue-timeout=1s; answering 503")
        assert "gateway: GET /who: the request waited " in log
        assert "for a thread of daemon process group 'g', longer than queue-timeout=1s" in log
        resp, _ = srv.get("/who")
        assert resp.status == 200
