"""`GatewayPreload On` / `gateway_preload on;`: each Apache child or nginx worker
imports its embedded applications when it starts, so no request waits for the import;
one that fails to import is logged at start-up and imported again at its first
request (a 500 while it still fails, as without preload)."""

import time

import pytest

from harness import Mount, Settings, VENV, get_json, make_server, skip_unless_built

KINDS = ["apache-event", "nginx"]
DIRECTIVE = {"apache-event": "GatewayPreload {}", "nginx": "gateway_preload {};"}


def preload_server(kind, preload):
    skip_unless_built(kind.split("-")[0], daemon=False)
    settings = Settings(python_home=VENV, extra=DIRECTIVE[kind].format(preload))
    return make_server(kind, [Mount("/app", "preload_apps.py")], settings)


@pytest.mark.parametrize("kind", KINDS)
def test_preload_imports_when_the_process_starts(kind):
    for preload, imported_early in (("on", True), ("off", False)):
        with preload_server(kind, preload) as srv:
            time.sleep(1.5)
            seen = get_json(srv, "/app")
            waited = seen["now"] - seen["imported_at"]
            assert (waited > 1.0) == imported_early, (kind, preload, waited)
            if imported_early:
                assert "preloaded 1 of 1 application(s) in" in srv.log_text()


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_preload_is_logged_and_retried_at_the_first_request(kind):
    srv = preload_server(kind, "on")
    broken = srv.apps / "preload-broken"
    broken.write_text("")
    broken.chmod(0o644)
    with srv:
        text = srv.wait_for_log("failed; it is imported again at its first request")
        assert "RuntimeError: preload test: broken on purpose" in text
        resp, _ = srv.request("GET", "/app")
        assert resp.status == 500
        broken.unlink()
        assert get_json(srv, "/app")["pid"] > 0


def test_preload_is_refused_outside_the_server_level():
    skip_unless_built("apache", daemon=False)
    srv = make_server("apache-event", [Mount("/app", "preload_apps.py")],
                      Settings(python_home=VENV, extra="<Location /x>\nGatewayPreload On\n</Location>"))
    out = srv.configtest()
    assert out.returncode != 0 and "GatewayPreload" in out.stdout + out.stderr
