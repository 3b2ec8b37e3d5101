"""A graceful reload reports, per old Apache child or nginx worker, how many requests
it let finish after it was told to stop and how long that took; the requests it held
end normally."""

import re
import threading
import time

import pytest

from harness import Mount, Settings, VENV, get_json, make_server, skip_unless_built

WHO = {"apache-event": "child", "nginx": "worker"}


@pytest.mark.parametrize("kind", sorted(WHO))
def test_a_reload_reports_the_requests_each_old_process_drained(kind):
    skip_unless_built(kind.split("-")[0], daemon=False)
    srv = make_server(kind, [Mount("/slow", "daemon_apps.py", "slow")], Settings(python_home=VENV))
    with srv:
        get_json(srv, "/slow?s=0")
        results = []
        slow = threading.Thread(target=lambda: results.append(get_json(srv, "/slow?s=2", timeout=30)))
        slow.start()
        time.sleep(0.5)
        srv.graceful()
        slow.join(30)
        assert len(results) == 1, "the request held by the old process ended normally"
        text = srv.wait_for_log("drained 1 request(s) in", timeout=15)
        found = re.search(rf"{WHO[kind]} \d+ drained 1 request\(s\) in (\d+\.\d\d)s", text)
        assert found, text
        assert 0.5 < float(found.group(1)) < 3, text
        if kind == "nginx":
            assert "none was running when it was told to quit" in text, "the idle old worker says so too"
