"""`reload-on-change=on` (mod_wsgi's script reloading, uWSGI's py-autoreload): a change
to the application's file or a module it imported from its directory recycles the
group's processes gracefully, with the file named in the log; no request fails. Off by
default."""

import re
import threading
import time

from harness import Mount, get_json


def reload_app():
    return Mount("/app", "reload_apps.py", mode="daemon", group="g")


def test_a_changed_module_recycles_the_processes_without_a_failed_request(make_daemon_server):
    srv = make_daemon_server([reload_app()], {"g": "processes=2 threads=2 reload-on-change=on"})
    with srv:
        first = get_json(srv, "/app")
        assert first["value"] == 1
        srv.wait_for_log("file(s) for reload-on-change")
        time.sleep(2.5)  # the modules the application imported are watched too
        failures, stop = [], threading.Event()

        def load():
            while not stop.is_set():
                resp, data = srv.request("GET", "/app")
                if resp.status != 200:
                    failures.append((resp.status, data[:200]))

        clients = [threading.Thread(target=load) for _ in range(3)]
        for c in clients:
            c.start()
        (srv.apps / "reload_helper.py").write_text("VALUE = 2\n")
        deadline = time.monotonic() + 15
        now = first
        while time.monotonic() < deadline and now["value"] != 2:
            time.sleep(0.1)
            now = get_json(srv, "/app")
        stop.set()
        for c in clients:
            c.join(30)
        assert now["value"] == 2, "the change did not reach the application"
        assert not failures, failures[:3]
        assert re.search(r"draining: reload-on-change: \S*reload_helper\.py changed", srv.log_text()), \
            srv.log_text()[-3000:]


def test_without_the_option_a_change_does_nothing(make_daemon_server):
    srv = make_daemon_server([reload_app()], {"g": "processes=1 threads=2"})
    with srv:
        first = get_json(srv, "/app")
        (srv.apps / "reload_helper.py").write_text("VALUE = 2\n")
        time.sleep(2)
        assert get_json(srv, "/app") == first
        assert "reload-on-change" not in srv.log_text()
