"""`slow-request=SECONDS` (PHP-FPM's slowlog): the Python stack of a request still
running after S seconds goes to the error log once, with its method and URI, and the
request goes on to its normal answer. Requests quicker than S log nothing."""

import re
import time

from harness import daemon_app, get_json


def slow_lines(srv):
    return [line for line in srv.log_text().splitlines() if "slow-request=1s" in line]


def test_a_slow_request_logs_its_stack_once_and_goes_on(make_daemon_server):
    srv = make_daemon_server([daemon_app("/slow", "slow")], {"g": "processes=1 threads=2 slow-request=1"})
    with srv:
        get_json(srv, "/slow?s=0.1")
        time.sleep(1.3)
        assert slow_lines(srv) == [], "a quick request is not slow"
        started = time.monotonic()
        pid = get_json(srv, "/slow?s=2.5")["pid"]
        assert time.monotonic() - started >= 2.4, "the request ran to its end"
        lines = slow_lines(srv)
        assert len(lines) == 1, srv.log_text()
        assert re.search(rf"gateway: GET /slow\?s=2\.5: daemon process {pid} of group 'g': the request has run for "
                         r"more than slow-request=1s; its thread's Python stack follows \(the request goes on\)",
                         lines[0]), lines
        # The stack names the application's function and the line it waits in, under the request.
        stack = srv.wait_for_log("time.sleep(float(q.get(", timeout=5)
        assert re.search(r"gateway: GET /slow\?s=2\.5: Stack of the slow request's thread", stack), stack
        assert re.search(r"gateway: GET /slow\?s=2\.5: .*daemon_apps\.py\", line \d+, in slow", stack), stack
        assert "TimeoutError" not in srv.log_text()
