"""`GatewaySlowRequest S` / `gateway_slow_request S;`: an embedded request still
running after S seconds has its Python stack logged once, under its method and URI, and
goes on to its normal answer (PHP-FPM's slowlog). For an ASGI application the stack is
its task's, on the event loop."""

import re
import time

import pytest

from harness import Mount, Settings, VENV, get_json, make_server, skip_unless_built

DIRECTIVE = {"apache-event": "GatewaySlowRequest 1", "nginx": "gateway_slow_request 1s;"}


def slow_server(kind, mount):
    skip_unless_built(kind.split("-")[0], daemon=False)
    settings = Settings(python_home=VENV, extra=DIRECTIVE[kind])
    return make_server(kind, [mount], settings)


def slow_lines(srv):
    return [line for line in srv.log_text().splitlines() if "slow-request=1s" in line]


@pytest.mark.parametrize("kind", sorted(DIRECTIVE))
def test_a_slow_wsgi_request_logs_its_thread_stack_once_and_goes_on(kind):
    with slow_server(kind, Mount("/slow", "daemon_apps.py", "slow")) as srv:
        get_json(srv, "/slow?s=0.1")
        time.sleep(1.3)
        assert slow_lines(srv) == [], "a quick request is not slow"
        started = time.monotonic()
        get_json(srv, "/slow?s=2.5")
        assert time.monotonic() - started >= 2.4, "the request ran to its end"
        lines = slow_lines(srv)
        assert len(lines) == 1, srv.log_text()
        assert re.search(r"gateway: GET /slow\?s=2\.5: process \d+: the request has run for more than "
                         r"slow-request=1s; its Python stack follows \(the request goes on\)", lines[0]), lines
        assert re.search(r"gateway: GET /slow\?s=2\.5: .*daemon_apps\.py\", line \d+, in slow", srv.log_text())


@pytest.mark.parametrize("kind", sorted(DIRECTIVE))
def test_a_slow_asgi_request_logs_its_task_stack(kind):
    with slow_server(kind, Mount("/slow", "slow_asgi.py")) as srv:
        get_json(srv, "/slow?s=0")
        get_json(srv, "/slow?s=2")
        text = srv.wait_for_log("in application", timeout=5)
        assert len(slow_lines(srv)) == 1, text
        assert re.search(r"gateway: GET /slow\?s=2: .*slow_asgi\.py\", line \d+, in application", text), text


def test_a_time_that_is_not_one_fails_the_configuration_test():
    skip_unless_built("nginx", daemon=False)
    srv = make_server("nginx", [Mount("/slow", "slow_asgi.py")],
                      Settings(python_home=VENV, extra="gateway_slow_request soon;"))
    out = srv.configtest()
    assert out.returncode != 0
    assert "needs a time such as 30, 30s, 5m or 1h, got 'soon'" in out.stdout + out.stderr
