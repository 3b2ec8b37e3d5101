"""`max-memory=MIB` (uWSGI's reload-on-rss): a daemon process whose resident memory
passes it finishes its requests and is replaced, with the RSS it had in the log; no
request fails. The drain says how many requests it let finish and how long it took."""

import re
import time

from harness import daemon_app, get_json


def log_line(srv, needle, timeout=10.0):
    """The first line of the error log that holds `needle`, once it is there."""
    text = srv.wait_for_log(needle, timeout=timeout)
    return next(line for line in text.splitlines() if needle in line)


def test_a_process_past_max_memory_is_replaced_without_a_failed_request(make_daemon_server):
    srv = make_daemon_server([daemon_app("/grow", "grow", script="memory_apps.py")],
                             {"g": "processes=1 threads=2 max-memory=120"})
    with srv:
        first = get_json(srv, "/grow")
        assert first["rss"] < 120, first
        grown = get_json(srv, "/grow?mib=150")
        assert grown["pid"] == first["pid"] and grown["rss"] > 120, grown
        deadline = time.monotonic() + 15
        seen = []
        while time.monotonic() < deadline:
            # get_json asserts a 200: every request during the replacement is served.
            now = get_json(srv, "/grow")
            seen.append(now["pid"])
            if now["pid"] != first["pid"]:
                break
            time.sleep(0.05)
        assert seen[-1] != first["pid"], f"the process was not replaced: {seen}"
        assert now["rss"] < 120, now
        line = log_line(srv, "passed max-memory=120 MiB")
        assert re.search(rf"daemon process {first['pid']} of group 'g' draining: its resident memory of "
                         r"(\d+) MiB passed max-memory=120 MiB", line), line
        rss = int(re.search(r"memory of (\d+) MiB", line).group(1))
        assert rss > 120, line
        drained = log_line(srv, f"daemon process {first['pid']} of group 'g' drained")
        assert re.search(rf"daemon process {first['pid']} of group 'g' drained \d+ request\(s\) in \d+\.\d\ds",
                         drained), drained


def test_the_drain_of_a_reload_reports_its_requests_and_time(make_daemon_server):
    srv = make_daemon_server([daemon_app("/grow", "grow", script="memory_apps.py")], {"g": "processes=1 threads=2"})
    with srv:
        pid = get_json(srv, "/grow")["pid"]
        srv.graceful()
        line = log_line(srv, f"daemon process {pid} of group 'g' drained", timeout=20)
        assert re.search(rf"daemon process {pid} of group 'g' drained \d+ request\(s\) in \d+\.\d\ds", line), line
