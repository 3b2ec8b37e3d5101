"""`preload=on`: a daemon process imports its group's applications when it starts, so
the first request does not pay for the import; an import that fails is logged at
start-up with its traceback, and the application answers 503 until it imports."""

import time

from harness import Mount, get_json


def preload_app():
    return Mount("/app", "preload_apps.py", mode="daemon", group="g")


def test_preload_imports_at_start_and_off_imports_at_the_first_request(make_daemon_server):
    for preload, imported_early in (("on", True), ("off", False)):
        srv = make_daemon_server([preload_app()], {"g": f"processes=1 threads=2 preload={preload}"})
        with srv:
            time.sleep(1.5)
            seen = get_json(srv, "/app")
            waited = seen["now"] - seen["imported_at"]
            assert (waited > 1.0) == imported_early, (preload, waited)
            if imported_early:
                assert f"daemon process {seen['pid']} of group 'g' preloaded 1 of 1 application(s) in" \
                    in srv.log_text()


def test_an_app_that_fails_to_preload_answers_503_until_it_imports(make_daemon_server):
    srv = make_daemon_server([preload_app()], {"g": "processes=1 threads=2 preload=on"})
    broken = srv.apps / "preload-broken"
    broken.write_text("")
    broken.chmod(0o644)
    with srv:
        text = srv.wait_for_log("preloading")
        assert "of group 'g': preloading" in text and "failed; its requests get a 503 until it imports" in text
        assert "RuntimeError: preload test: broken on purpose" in text
        resp, _ = srv.request("GET", "/app")
        assert resp.status == 503
        assert "does not import (preload=on); answering 503" in srv.log_text()
        broken.unlink()
        assert get_json(srv, "/app")["pid"] > 0
