"""`processes=MIN-MAX` (uWSGI's cheaper, PHP-FPM's `pm = dynamic`): a group starts MIN
processes, grows by one while all threads of a process stay busy, up to MAX, and stops
processes that served nothing for `idle-timeout` down to MIN, each step logged with its
reason. No request fails on the way."""

import re
import threading
import time

from harness import daemon_app, get_json


def test_the_pool_grows_under_load_and_shrinks_when_idle(make_daemon_server):
    srv = make_daemon_server([daemon_app("/slow", "slow")],
                             {"g": "processes=1-3 threads=2 idle-timeout=2"})
    with srv:
        first = get_json(srv, "/slow?s=0")["pid"]
        pids, errors = [], []

        def client():
            try:
                for _ in range(4):
                    pids.append(get_json(srv, "/slow?s=0.5", timeout=30)["pid"])
            except AssertionError as e:  # a failed request
                errors.append(str(e))

        clients = [threading.Thread(target=client) for _ in range(6)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(60)
        assert not errors, errors[0]
        assert len(pids) == 24
        grew = re.findall(r"daemon process group 'g' grows to (\d) process\(es\) \(at most 3\): all threads of a "
                          r"process have been busy for 500ms", srv.log_text())
        assert grew and grew[0] == "2", srv.log_text()[-3000:]
        assert len(set(pids)) >= 2, f"only {set(pids)} served: the pool did not grow"
        # Idle now: back to one process, the others stopped with their reason.
        line = srv.wait_for_log("shrinks to 1 process(es) (at least 1)", timeout=15)
        assert re.search(r"daemon process group 'g' shrinks to \d process\(es\) \(at least 1\): process \d+ served "
                         r"nothing for idle-timeout=2s", line), line
        assert get_json(srv, "/slow?s=0")["pid"] in set(pids) | {first}
        assert "grows to 4" not in srv.log_text()


def test_a_fixed_pool_neither_grows_nor_shrinks(make_daemon_server):
    srv = make_daemon_server([daemon_app("/slow", "slow")], {"g": "processes=1 threads=1 idle-timeout=1"})
    with srv:
        results = []
        clients = [threading.Thread(target=lambda: results.append(get_json(srv, "/slow?s=0.6")["pid"]))
                   for _ in range(3)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(30)
        time.sleep(1.5)
        assert len(results) == 3 and len(set(results)) == 1, results
        assert "grows to" not in srv.log_text() and "shrinks to" not in srv.log_text()


def test_a_range_upside_down_fails_the_configuration_test(make_daemon_server):
    srv = make_daemon_server([daemon_app("/slow", "slow")], {"g": "processes=3-1"})
    srv.write_config()
    out = srv.configtest()
    assert out.returncode != 0
    assert "daemon option 'processes' needs a number of at least 1 or a range MIN-MAX" in out.stdout + out.stderr
