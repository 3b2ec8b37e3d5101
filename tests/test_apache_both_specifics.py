"""Apache-only behaviour: directives and their errors, virtual hosts, sections;
embedded mostly, and an Alias beside a root mount in both modes."""

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from harness import APACHE_MODULES, VENV, Apache, Mount, Settings, battery_settings

MPMS = ["event", "prefork"]


def configtest(mounts, extra="", settings=None):
    srv = Apache(mounts, settings or Settings(extra=extra))
    result = srv.configtest()
    return srv, result.returncode, result.stdout + result.stderr


def test_configtest_passes_on_a_valid_configuration():
    _, rc, out = configtest([Mount("/", "hello.py")])
    assert rc == 0, out
    assert "Syntax OK" in out


@pytest.mark.parametrize("directive,message", [
    ("GatewayScriptAlias /app /nonexistent/app.py", "GatewayScriptAlias: cannot read the WSGI script '/nonexistent/app.py'"),
    ("GatewayScriptAlias app {apps}/hello.py", "GatewayScriptAlias: the URL path must start with '/'"),
    ("GatewayScriptAlias /app {apps}/hello.py:not-a-name", "not a valid Python name"),
    ("GatewayDaemon g processes=2 colour=blue", "GatewayDaemon: unknown daemon option 'colour'"),
    ("GatewayDaemon g threads=zero", "GatewayDaemon: daemon option 'threads' needs a whole number"),
    ("GatewayMode sometimes", "GatewayMode: expected 'embedded' or 'daemon NAME'"),
    ("GatewayPythonHome /nonexistent/venv", "GatewayPythonHome: '/nonexistent/venv' is not a directory"),
    ("GatewayPythonHome {apps}/venv-py27", "was made by Python 2.7.18, but Gateway embeds Python 3."),
    ("<VirtualHost 127.0.0.1:1>\nGatewayPythonHome /usr\n</VirtualHost>", "GatewayPythonHome"),
])
def test_configtest_fails_with_file_and_line(directive, message):
    srv = Apache([Mount("/", "hello.py")], Settings())
    srv.settings.extra = directive.format(apps=srv.apps)
    conf = srv.write_config()
    lines = conf.read_text().splitlines()
    bad_line = next(i for i, line in enumerate(lines, 1) if line.startswith(directive.split()[0].format(apps=srv.apps)))
    result = subprocess.run(["apache2", "-f", str(conf), "-t"], capture_output=True, text=True)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert message in out, out
    assert f"line {bad_line} of {conf}" in out or f"line {bad_line + 1} of {conf}" in out, out


def test_configtest_refuses_a_daemon_virtualenv_of_another_python():
    srv = Apache([Mount("/", "hello.py")], Settings())
    srv.settings.extra = f"GatewayDaemon g python-home={srv.apps}/venv-py27"
    conf = srv.write_config()
    line = next(i for i, text in enumerate(conf.read_text().splitlines(), 1) if text.startswith("GatewayDaemon"))
    result = srv.configtest()
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert (f"GatewayDaemon at {conf}:{line}: daemon group 'g': python-home: the virtualenv {srv.apps}/venv-py27 "
            "was made by Python 2.7.18, but Gateway embeds Python 3.") in out, out


@pytest.mark.parametrize("mpm", MPMS)
def test_two_virtual_hosts_mount_two_apps(mpm):
    mounts = [Mount("/", "battery.py", "hello", vhost="one.test"),
              Mount("/", "battery.py", "environ", vhost="two.test"),
              Mount("/shared", "battery.py", "cookies")]
    with Apache(mounts, battery_settings(), mpm=mpm) as srv:
        resp, data = srv.get("/", host="one.test")
        assert data == b"Hello, world!"
        resp, data = srv.get("/x", host="two.test")
        env = json.loads(data)
        assert env["SERVER_NAME"] == "two.test"
        assert env["SCRIPT_NAME"] == "" and env["PATH_INFO"] == "/x"
        # Main-server mounts are inherited by every virtual host.
        for host in ("one.test", "two.test"):
            resp, _ = srv.get("/shared?n=2", host=host)
            assert len(resp.headers.get_all("Set-Cookie")) == 2


def test_longest_mount_wins_and_root_mount():
    mounts = [Mount("/", "battery.py", "environ"), Mount("/app", "battery.py", "hello"),
              Mount("/app/deeper", "battery.py", "environ")]
    with Apache(mounts, battery_settings()) as srv:
        env = json.loads(srv.get("/other/path")[1])
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/other/path")
        assert srv.get("/app/x")[1] == b"Hello, world!"
        env = json.loads(srv.get("/app/deeper/y")[1])
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/app/deeper", "/y")
        # A prefix matches whole path segments only.
        env = json.loads(srv.get("/application")[1])
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/application")


@pytest.mark.parametrize("mode", ["embedded", "daemon"])
def test_an_alias_beside_a_root_mount_serves_its_files(mode):
    """Django's documented layout: `Alias /static/ DIR` beside the application at
    `/`. The files come from the Alias, byte for byte; the rest goes to Django."""
    import django
    static = Path(django.__file__).parent / "contrib/admin/static/admin"
    group = "g" if mode == "daemon" else None
    srv = Apache([Mount("/", "django_site/site_wsgi.py", mode=mode, group=group)], battery_settings())
    srv.settings.extra = (f"Alias /static/admin/ {static}/\n"
                          f"<Directory {static}>\n  Require all granted\n</Directory>")
    if group:
        srv.settings.daemons = {"g": f"python-home={VENV}"}
    with srv:
        for name in ("css/base.css", "js/core.js"):
            resp, data = srv.get(f"/static/admin/{name}")
            assert resp.status == 200, (name, resp.status, data[:200])
            assert data == (static / name).read_bytes()
        resp, data = srv.get("/items/7/")
        assert resp.status == 200 and json.loads(data)["framework"] == "django"


def test_mode_embedded_in_location_and_setenv():
    srv = Apache([Mount("/env", "battery.py", "environ")], battery_settings())
    srv.settings.extra = (f"LoadModule env_module {APACHE_MODULES}/mod_env.so\n"
                          "SetEnv DEPLOYMENT staging\n"
                          "GatewayMode embedded\n<Location /env>\n  GatewayMode embedded\n</Location>")
    with srv:
        env = json.loads(srv.get("/env")[1])
        assert env["gateway.mode"] == "embedded"
        assert env["DEPLOYMENT"] == "staging"


def test_access_control_of_the_script_directory_applies():
    srv = Apache([Mount("/app", "hello.py")], Settings())
    srv.settings.extra = f"<Directory {srv.apps}>\n  Require all denied\n</Directory>"
    with srv:
        assert srv.get("/app")[0].status == 403


def test_broken_script_is_retried_after_it_is_fixed():
    srv = Apache([Mount("/app", "hello.py")], Settings())
    script = srv.apps / "hello.py"
    good = script.read_text()
    script.write_text("this is not python(\n")
    with srv:
        resp, _ = srv.get("/app")
        assert resp.status == 500
        srv.wait_for_log("SyntaxError")
        assert "gateway: GET /app: loading the WSGI application" in srv.log_text()
        script.write_text(good)
        for _ in range(20):  # every child must reload it
            assert srv.get("/app")[1] == b"Hello, world!"


def test_refuses_to_share_python_with_mod_wsgi():
    wsgi = APACHE_MODULES / "mod_wsgi.so"
    if not wsgi.exists():
        pytest.skip("Debian's mod_wsgi is not installed")
    srv = Apache([Mount("/app", "hello.py")], Settings())
    srv.settings.extra = f"LoadModule wsgi_module {wsgi}"
    # configtest already fails, saying what to do.
    r = srv.configtest()
    assert r.returncode != 0, r.stdout + r.stderr
    assert "gateway: mod_wsgi is loaded too" in r.stderr and "a2dismod wsgi" in r.stderr, r.stderr
    with pytest.raises(RuntimeError, match="apache2 failed to start") as failed:
        srv.start()
    assert "gateway: mod_wsgi is loaded too" in str(failed.value)


@pytest.fixture(scope="module")
def one_child():
    """Event MPM with a single child process: all requests share one interpreter."""
    with Apache([Mount("/hello", "battery.py", "hello"), Mount("/echo", "battery.py", "echo"),
                 Mount("/closing", "battery.py", "closing")], battery_settings(), mpm="event1") as srv:
        yield srv


def test_gil_released_while_waiting_for_the_body(one_child):
    with socket.create_connection(("127.0.0.1", one_child.port), timeout=15) as s:
        s.sendall(b"POST /echo?how=read HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.3)  # the application is now blocked reading the rest of the body
        for _ in range(5):
            assert one_child.get("/hello", timeout=5)[1] == b"Hello, world!"
        s.sendall(b"x" * 99000)
        reply = b""
        while b'"length": 100000' not in reply:
            chunk = s.recv(65536)
            assert chunk, reply
            reply += chunk


def test_gil_released_while_the_client_is_slow_to_read(one_child):
    token = "slow-reader"
    with socket.create_connection(("127.0.0.1", one_child.port), timeout=15) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # 128 MiB that the client does not read: the thread blocks writing.
        s.sendall(f"GET /closing?token={token}&chunks=2048 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(1024)
        time.sleep(0.3)
        for _ in range(5):
            assert one_child.get("/hello", timeout=5)[1] == b"Hello, world!"
    deadline = time.monotonic() + 20
    while not one_child.marker(token).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert one_child.marker(token).exists(), "close() was not called after the slow client left"


def test_graceful_restart_reloads_the_application():
    srv = Apache([Mount("/app", "battery.py", "threadlocal")], battery_settings())
    with srv:
        pids_before = {json.loads(srv.get("/app")[1])["pid"] for _ in range(10)}
        srv.graceful()
        deadline = time.monotonic() + 20
        while srv.log_text().count("resuming normal operations") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.log_text().count("resuming normal operations") == 2
        new_child = False
        while time.monotonic() < deadline and not new_child:
            resp, data = srv.get("/app")
            assert resp.status == 200
            new_child = json.loads(data)["pid"] not in pids_before
        assert new_child, "no new child served after the graceful restart"
        assert "Traceback" not in srv.log_text()
