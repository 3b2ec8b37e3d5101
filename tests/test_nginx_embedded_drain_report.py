"""A graceful reload reports, per old nginx worker, how many requests it let finish
and how long that took; the requests it held end normally."""

import re
import threading
import time

from harness import Mount, Settings, VENV, get_json, make_server, skip_unless_built


def test_a_reload_reports_the_requests_each_old_worker_drained():
    skip_unless_built("nginx", daemon=False)
    srv = make_server("nginx", [Mount("/slow", "daemon_apps.py", "slow")], Settings(python_home=VENV))
    with srv:
        get_json(srv, "/slow?s=0")
        results = []
        slow = threading.Thread(target=lambda: results.append(get_json(srv, "/slow?s=2", timeout=30)))
        slow.start()
        time.sleep(0.5)
        srv.graceful()
        slow.join(30)
        assert len(results) == 1, "the request held by the old worker ended normally"
        text = srv.wait_for_log("drained 1 request(s) in", timeout=15)
        seconds = float(re.search(r"worker \d+ drained 1 request\(s\) in (\d+\.\d\d)s", text).group(1))
        assert 0.5 < seconds < 3, text
        assert "none was running when it was told to quit" in text, "the idle old worker says so too"
