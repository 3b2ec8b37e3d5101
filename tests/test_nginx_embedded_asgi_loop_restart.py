"""An ASGI event loop that an application's SystemExit ends is started again at the
next request, with the application's lifespan: the process keeps serving."""

import time

from harness import Mount, Nginx, Settings, VENV, skip_unless_built


def test_a_loop_ended_by_system_exit_is_started_again():
    skip_unless_built("nginx", daemon=False)
    # One worker: the request after /exit reaches the process whose loop ended.
    srv = Nginx([Mount("/app", "asgi_exit.py", interface="asgi")], Settings(python_home=VENV), workers=1)
    with srv:
        resp, data = srv.request("GET", "/app/exit")
        assert resp.status == 200, data
        pid = data.split()[0]
        srv.wait_for_log("the ASGI event loop failed", timeout=10)
        time.sleep(0.2)
        resp, data = srv.request("GET", "/app/")
        assert resp.status == 200, srv.log_text()[-2000:]
        assert data.split()[0] == pid, "the worker whose loop ended serves again"
