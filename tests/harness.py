"""The tests' one support module: starts Debian's real servers on loopback with
generated configurations and the modules just built, and talks HTTP to them;
the server kinds and the battery of test apps they serve; the helpers test
files share (requests, daemon processes, users). conftest.py holds only
fixtures and hooks; demo/run uses this module too, so it does not import pytest.

A server is described by a list of Mount objects; every server class (Apache
with a given MPM, nginx) turns the same mounts into its own configuration, so one
set of tests runs against all of them.
"""

import atexit
import gc
import http.client
import io
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ROOT / "target" / "modules"
APPS = ROOT / "tests" / "apps"
APACHE_MODULES = Path("/usr/lib/apache2/modules")
RUN_USER = "www-data"
WWW_DATA = pwd.getpwnam(RUN_USER)
NOBODY = pwd.getpwnam("nobody")

# The virtualenv the tests run from doubles as the applications' virtualenv
# (Flask and numpy live only there).
VENV = os.environ.get("GATEWAY_TEST_VENV", sys.prefix)


class SharedReader(io.BufferedReader):
    """One buffered reader of a socket that http.client may "close" after each of
    several responses read from it (pipelined requests)."""

    def close(self):
        pass

    def flush(self):
        # Nothing to flush in a reader; a response dropped after the socket closed
        # flushes it from its finalizer, whose errors Python 3.13 reports.
        pass

    def makefile(self, *args, **kwargs):
        return self


def pipelined(port: int, raw: bytes, methods: list[str], timeout: float = 15.0):
    """Sends raw requests back to back in one packet and reads one response per
    method: (status, headers, body) each, or the exception reading it raised, then
    what followed on the connection until it closed."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        reader = SharedReader(socket.SocketIO(s, "rb"))
        for method in methods:
            resp = http.client.HTTPResponse(reader, method=method)
            try:
                resp.begin()
                out.append((resp.status, resp.headers, resp.read()))
            except (http.client.HTTPException, OSError) as e:
                out.append(e)
                break
        try:
            rest = reader.read()
        except OSError:
            rest = b"<reset>"
    return out, rest


@dataclass
class Mount:
    """A WSGI or ASGI application at a URL prefix."""

    prefix: str
    script: str  # file name under tests/apps (copied into the server's directory)
    callable: str = "application"
    mode: str = "embedded"  # or "daemon": runs in the daemon process group `group`
    vhost: str | None = None  # name-based virtual host (Host header); None = default server
    group: str | None = None  # the daemon process group, for mode="daemon"
    interface: str | None = None  # "wsgi" or "asgi" (interface=); None = detected

    def target(self, script_path: str) -> str:
        """FILE[:CALLABLE] [interface=...], as both servers' mount directives take it."""
        target = script_path if self.callable == "application" else f"{script_path}:{self.callable}"
        return f"{target} interface={self.interface}" if self.interface else target


@dataclass
class Settings:
    """Process-wide settings of a server under test."""

    python_home: str | None = None
    python_path: list[str] = field(default_factory=list)
    extra: str = ""  # raw configuration appended at server level
    daemons: dict[str, str] = field(default_factory=dict)  # daemon group -> "key=value ..." options
    shared_interpreter: bool = False  # embedded apps of different scripts may share the interpreter
    modules: Path = MODULES  # where the modules and gateway-daemon come from
    env: dict[str, str] = field(default_factory=dict)  # added to the server's environment


def port_range(variable: str) -> range | None:
    """The ports an environment variable allows: `FIRST-LAST` or one port; None when unset."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return None
    first, dash, last = text.partition("-")
    try:
        ports = range(int(first), int(last if dash else first) + 1)
    except ValueError:
        ports = range(0)
    if not ports or ports.start < 1 or ports.stop > 65536:
        raise ValueError(f"{variable}={text!r}: expected a port range FIRST-LAST, e.g. 20000-20999")
    return ports


def is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# Ports of a range handed out by this process: tried last, as their servers may not listen yet.
_handed_out: set[int] = set()


def free_port_in(ports: range, ordered: bool = False) -> int:
    """A free port of `ports`: the first free one when `ordered`, else from a random
    start, so that runs sharing a range seldom pick the same port."""
    start = 0 if ordered else random.randrange(len(ports))
    candidates = [ports[(start + i) % len(ports)] for i in range(len(ports))]
    candidates.sort(key=lambda p: p in _handed_out)
    for port in candidates:
        if is_free(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port left in {ports.start}-{ports.stop - 1}")


def free_port() -> int:
    """A free loopback port: one of GATEWAY_TEST_PORTS=FIRST-LAST when set, else any."""
    ports = port_range("GATEWAY_TEST_PORTS")
    if ports is not None:
        return free_port_in(ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout}s")


# The private directories of the servers made so far, each with a weak reference to
# its server and its number in the order made. A directory is removed once its
# server object is gone (see remove_released_dirs), unless kept for a failed test
# (keep_dirs) or GATEWAY_KEEP_TMP=1.
_dirs: dict[Path, tuple[weakref.ref, int]] = {}
_made = 0


def keep_tmp() -> bool:
    return os.environ.get("GATEWAY_KEEP_TMP", "") not in ("", "0")


def servers_made() -> int:
    """How many servers were made so far: see keep_dirs."""
    return _made


def remove_released_dirs():
    """Removes the directories of servers that no longer exist."""
    if any((srv := server()) is not None and not srv.running() for server, _ in _dirs.values()):
        gc.collect()  # a stopped server may be held only by a reference cycle
    for d, (server, _) in list(_dirs.items()):
        if server() is None:
            remove_dir(d)


def keep_dirs(since: int) -> list[Path]:
    """Keeps the directories of the servers made since the `since`-th and of those
    running now (a test failed, and may have used them): they are not removed
    later, and the caller says where they are."""
    kept = sorted(d for d, (server, number) in _dirs.items()
                  if number >= since or ((srv := server()) is not None and srv.running()))
    for d in kept:
        del _dirs[d]
    return kept


def remove_dir(d: Path):
    _dirs.pop(d, None)
    if not keep_tmp():
        shutil.rmtree(d, ignore_errors=True)


@atexit.register
def _remove_all_dirs():
    """At exit, what is left: servers a script made and stopped (demo/run)."""
    for d, (server, _) in list(_dirs.items()):
        srv = server()
        if srv is None or not srv.running():
            remove_dir(d)


class Server:
    """Common life cycle: a private directory, a port, an error log."""

    name = "server"

    def __init__(self, mounts: list[Mount], settings: Settings | None = None, apps: Path = APPS,
                 port: int | None = None):
        self.mounts = mounts
        self.settings = settings or Settings()
        self.dir = Path(tempfile.mkdtemp(prefix=f"gateway-{self.name}-"))
        global _made
        _dirs[self.dir] = (weakref.ref(self), _made)
        _made += 1
        self.apps = self.dir / "apps"
        self.markers = self.dir / "markers"
        self.port = port or free_port()
        shutil.copytree(apps, self.apps)
        self.markers.mkdir()
        # The server's children run as www-data: they read the apps and write markers.
        for p in [self.dir, *self.dir.rglob("*")]:
            p.chmod(0o777 if p == self.markers else (0o755 if p.is_dir() else 0o644))
        self.error_log = self.dir / "error.log"
        # Where the module makes the run directory (gateway-<pid>) of the daemons' sockets.
        self.runtime_dir = self.dir

    # -- to implement per server
    def write_config(self) -> Path:
        raise NotImplementedError

    def start(self):
        raise NotImplementedError

    def pid(self) -> int | None:
        raise NotImplementedError

    def configtest(self) -> subprocess.CompletedProcess:
        raise NotImplementedError

    def graceful(self):
        """Reloads gracefully through the server's own command line, which reads the
        configuration before it signals the running server."""
        raise NotImplementedError

    # -- shared helpers
    def script_path(self, script: str) -> str:
        return str(self.apps / script)

    def save_config(self, lines: list[str]) -> Path:
        """Writes the configuration, readable by the server's user."""
        self.conf.write_text("\n".join(lines) + "\n")
        self.conf.chmod(0o644)
        return self.conf

    def line_of(self, needle: str) -> int:
        """The number of the first line of the written configuration that holds `needle`."""
        lines = self.conf.read_text().splitlines()
        return next(i for i, line in enumerate(lines, 1) if needle in line)

    def log_text(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} did not appear in the error log:\n{self.log_text()[-4000:]}")

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """Signals the server's main process and waits for it to exit (SIGKILL after timeout)."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def remove_dir(self):
        """Removes the server's directory (a stopped server's), unless GATEWAY_KEEP_TMP=1."""
        remove_dir(self.dir)

    def running(self) -> bool:
        """Whether the server's main process exists."""
        pid = self.pid()
        return pid is not None and os.path.exists(f"/proc/{pid}")

    def children(self) -> list[int]:
        """Pids of the main process's children (the workers)."""
        out = subprocess.run(["pgrep", "-P", str(self.pid())], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def wait_for_no_connections(self, timeout: float = 10.0, settle: float = 0.2):
        """Waits until the server's port has no connection other than its listener and
        TIME_WAIT leftovers, then `settle` seconds more for its threads to finish with
        them. Apache's event MPM stopped with SIGTERM while a worker still tears down a
        connection can crash the child (its ungraceful stop closes the worker's socket as
        the worker frees it), and a crashed child runs no exit handlers."""
        port = f"{self.port:04X}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            open_ones = [
                line for table in ("/proc/net/tcp", "/proc/net/tcp6")
                for line in Path(table).read_text().splitlines()[1:]
                if line.split()[1].endswith(f":{port}") and line.split()[3] not in ("0A", "06")
            ]
            if not open_ones:
                time.sleep(settle)
                return
            time.sleep(0.05)
        raise AssertionError(f"connections to port {self.port} still open after {timeout}s")

    def marker(self, name: str) -> Path:
        return self.markers / name

    def connect(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, host=None, timeout=30.0):
        """One request on a fresh connection; returns (response, body bytes)."""
        conn = self.connect(timeout)
        try:
            hdrs = dict(headers or {})
            if host:
                hdrs["Host"] = host
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp, data
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


APACHE_MPM = {
    "event": """
LoadModule mpm_event_module {mods}/mod_mpm_event.so
StartServers 2
ServerLimit 2
ThreadsPerChild 8
MaxRequestWorkers 16
MinSpareThreads 1
MaxSpareThreads 16
""",
    # One child: every request shares one interpreter, so a held GIL would show.
    "event1": """
LoadModule mpm_event_module {mods}/mod_mpm_event.so
StartServers 1
ServerLimit 1
ThreadsPerChild 8
MaxRequestWorkers 8
MinSpareThreads 1
MaxSpareThreads 8
""",
    "prefork": """
LoadModule mpm_prefork_module {mods}/mod_mpm_prefork.so
StartServers 3
MinSpareServers 1
MaxSpareServers 6
ServerLimit 6
MaxRequestWorkers 6
""",
}


class Apache(Server):
    """Debian's apache2 with mod_gateway.so and the chosen MPM; with `http2`, also
    mod_http2 speaking cleartext HTTP/2 (h2c, with prior knowledge) on the same port."""

    def __init__(self, mounts, settings=None, mpm="event", name=None, http2=False, **kw):
        self.name = name or f"apache-{mpm}"
        self.mpm = mpm
        super().__init__(mounts, settings, **kw)
        self.conf = self.dir / "httpd.conf"
        self.runtime_dir = self.dir / "run"
        self.h2_port = self.port if http2 else None

    def write_config(self) -> Path:
        s = self.settings
        self.runtime_dir.mkdir(exist_ok=True)
        lines = [
            f"ServerRoot {self.dir}",
            f"PidFile {self.dir}/httpd.pid",
            f"Listen 127.0.0.1:{self.port}",
            "ServerName localhost",
            f"User {RUN_USER}",
            f"Group {RUN_USER}",
            APACHE_MPM[self.mpm].format(mods=APACHE_MODULES),
            f"LoadModule authz_core_module {APACHE_MODULES}/mod_authz_core.so",
            f"LoadModule alias_module {APACHE_MODULES}/mod_alias.so",
            f"LoadModule gateway_module {s.modules}/mod_gateway.so",
            f"LoadModule http2_module {APACHE_MODULES}/mod_http2.so\nProtocols h2c http/1.1" if self.h2_port else "",
            f"ErrorLog {self.error_log}",
            f"DefaultRuntimeDir {self.runtime_dir}",
            "LogLevel info",
            "KeepAliveTimeout 5",
            "Timeout 30",
            f"<Directory {self.apps}>\n  Require all granted\n</Directory>",
        ]
        if s.python_home:
            lines.append(f"GatewayPythonHome {s.python_home}")
        if s.shared_interpreter:
            lines.append("GatewaySharedInterpreter On")
        if s.python_path:
            lines.append(f"GatewayPythonPath {':'.join(s.python_path)}")
        for group, options in s.daemons.items():
            lines.append(f"GatewayDaemon {group} {options}".rstrip())
        lines.append(s.extra)
        vhosts: dict[str, list[Mount]] = {}
        for m in self.mounts:
            if m.vhost:
                vhosts.setdefault(m.vhost, []).append(m)
            else:
                lines.append(self.mount_directive(m))
        if vhosts:
            # The first virtual host is the default for unknown Host headers; main-server
            # mounts are inherited by every virtual host.
            lines.append(f"<VirtualHost 127.0.0.1:{self.port}>\n  ServerName default.test\n</VirtualHost>")
            for host, ms in vhosts.items():
                body = "\n".join("  " + self.mount_directive(m) for m in ms)
                lines.append(f"<VirtualHost 127.0.0.1:{self.port}>\n  ServerName {host}\n{body}\n</VirtualHost>")
        return self.save_config(lines)

    def mount_directive(self, m: Mount) -> str:
        directive = f"GatewayScriptAlias {m.prefix} {m.target(self.script_path(m.script))}"
        if m.mode == "daemon":
            directive += f"\n<Location {m.prefix}>\n  GatewayMode daemon {m.group}\n</Location>"
        return directive

    def apache2(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["apache2", "-f", str(self.conf), *args], capture_output=True, text=True, timeout=30,
                              env={**os.environ, **self.settings.env})

    def configtest(self) -> subprocess.CompletedProcess:
        self.write_config()
        return self.apache2("-t")

    def graceful(self):
        r = self.apache2("-k", "graceful")
        if r.returncode != 0:
            raise RuntimeError(f"apache2 -k graceful failed:\n{r.stdout}{r.stderr}")

    def start(self):
        self.write_config()
        r = self.apache2("-k", "start")
        if r.returncode != 0:
            raise RuntimeError(f"apache2 failed to start:\n{r.stdout}{r.stderr}\n{self.log_text()}")
        # httpd detaches (and listens) before post_config, so neither its exit code nor
        # the port says it started: its "resuming normal operations" line does.
        deadline = time.monotonic() + 20
        while "resuming normal operations" not in (log := self.log_text()):
            if "Configuration Failed" in log or time.monotonic() > deadline:
                raise RuntimeError(f"apache2 failed to start:\n{log}")
            time.sleep(0.02)
        wait_for_port(self.port)

    def pid(self) -> int | None:
        try:
            return int((self.dir / "httpd.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None


class Nginx(Server):
    """Debian's nginx with ngx_http_gateway_module.so. Each Mount becomes a
    `location PREFIX { gateway_app ...; }`; mounts with a vhost go to a `server`
    block of that name (nginx server blocks do not inherit locations)."""

    name = "nginx"

    def __init__(self, mounts, settings=None, workers=2, threads=None, http2=False, http_extra="", sendfile=True,
                 name=None, log_level="info", **kw):
        self.name = name or "nginx"
        self.log_level = log_level
        self.workers = workers
        self.sendfile = sendfile
        self.threads = threads
        self.http_extra = http_extra
        super().__init__(mounts, settings, **kw)
        self.h2_port = free_port() if http2 else None
        self.conf = self.dir / "nginx.conf"

    def write_config(self) -> Path:
        s = self.settings
        d = self.dir
        http = [
            "access_log off;",
            "client_max_body_size 0;",
            "keepalive_timeout 5;",
            f"sendfile {'on' if self.sendfile else 'off'};",
            f"client_body_temp_path {d}/tmp-body;",
            f"proxy_temp_path {d}/tmp-proxy;",
            f"fastcgi_temp_path {d}/tmp-fastcgi;",
            f"uwsgi_temp_path {d}/tmp-uwsgi;",
            f"scgi_temp_path {d}/tmp-scgi;",
        ]
        if s.python_home:
            http.append(f"gateway_python_home {s.python_home};")
        if s.shared_interpreter:
            http.append("gateway_shared_interpreter on;")
        if s.python_path:
            http.append(f"gateway_python_path {':'.join(s.python_path)};")
        if self.threads:
            http.append(f"gateway_threads {self.threads};")
        for group, options in s.daemons.items():
            http.append(f"gateway_daemon {group} {options};".replace(" ;", ";"))
        http += [self.http_extra, s.extra]
        servers: dict[str | None, list[Mount]] = {None: []}
        for m in self.mounts:
            servers.setdefault(m.vhost, []).append(m)
        for host, ms in servers.items():
            listen = [f"listen 127.0.0.1:{self.port}{' default_server' if host is None else ''};"]
            if self.h2_port:
                listen.append(f"listen 127.0.0.1:{self.h2_port}{' default_server' if host is None else ''} http2;")
            body = listen + [f"server_name {host or 'default.test'};"] + [self.location(m) for m in ms]
            http.append("server {\n    " + "\n    ".join(body) + "\n}")
        lines = [
            f"load_module {s.modules}/ngx_http_gateway_module.so;",
            *(f"env {name};" for name in s.env),
            f"user {RUN_USER};" if os.geteuid() == 0 else "",
            f"worker_processes {self.workers};",
            f"pid {d}/nginx.pid;",
            f"error_log {self.error_log} {self.log_level};",
            "events {\n    worker_connections 1024;\n}",
            "http {\n" + "\n".join("  " + line for line in "\n".join(http).splitlines()) + "\n}",
        ]
        return self.save_config(lines)

    def location(self, m: Mount) -> str:
        mode = f" gateway_mode daemon {m.group};" if m.mode == "daemon" else ""
        return f"location {m.prefix} {{ gateway_app {m.target(self.script_path(m.script))};{mode} }}"

    def nginx(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["nginx", "-p", str(self.dir), "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=30, env={**os.environ, **self.settings.env})

    def configtest(self) -> subprocess.CompletedProcess:
        self.write_config()
        return self.nginx("-t")

    def graceful(self):
        r = self.nginx("-s", "reload")
        if r.returncode != 0:
            raise RuntimeError(f"nginx -s reload failed:\n{r.stdout}{r.stderr}")

    def start(self):
        self.write_config()
        r = self.nginx()
        if r.returncode != 0:
            raise RuntimeError(f"nginx failed to start:\n{r.stdout}{r.stderr}\n{self.log_text()}")
        wait_for_port(self.port)
        # Workers start Python after the master listens: wait until each has (they say so at info).
        deadline = time.monotonic() + 15
        logged = self.log_level in ("info", "debug")
        while time.monotonic() < deadline and len(self.workers_started()) < self.workers and self.mounts and logged:
            time.sleep(0.05)

    def workers_started(self) -> list[str]:
        """The log lines of workers that started their threads (and Python, when embedded)."""
        return [line for line in self.log_text().splitlines()
                if "started Python with" in line or "forwards to daemon groups with" in line]

    def pid(self) -> int | None:
        try:
            return int((self.dir / "nginx.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def send_signal(self, sig):
        pid = self.pid()
        if pid is not None:
            os.kill(pid, sig)

    def reload(self):
        self.send_signal(signal.SIGHUP)


# --- Server kinds and the battery ---

SERVER_CLASS = {"apache": Apache, "nginx": Nginx}

# The module each server loads; daemon mode also needs gateway-daemon.
MODULE = {"apache": "mod_gateway.so", "nginx": "ngx_http_gateway_module.so"}


def built(kind: str, daemon: bool = True) -> bool:
    """Whether the module of `kind` ('apache' or 'nginx') is built, and gateway-daemon
    too unless `daemon` is False."""
    return (MODULES / MODULE[kind]).exists() and (not daemon or (MODULES / "gateway-daemon").exists())


def skip_unless_built(kind: str, daemon: bool = True):
    # Imported here: demo/run imports this module where pytest may not be installed.
    import pytest

    if not built(kind, daemon):
        pytest.skip(f"needs {MODULE[kind]} and gateway-daemon" if daemon else f"needs {MODULE[kind]}")


BATTERY = [
    "hello", "environ", "echo", "echo_validated", "stream", "writer", "closing", "filewrapper",
    "filewrapper_validated", "cookies", "status", "exc_info_before", "exc_info_after", "threadlocal",
    "slow", "extensions", "empty", "raise_before", "raise_after", "bad_status", "crlf_header",
    "str_body", "raise_midway", "no_start_response", "returns_none", "close_raises", "single", "prints",
    "framing",
]


def battery_mounts(mode="embedded", group=None):
    mounts = [Mount(f"/{name}", "battery.py", name, mode=mode, group=group) for name in BATTERY]
    mounts.append(Mount("/flask", "flask_app.py", "app", mode=mode, group=group))
    mounts.append(Mount("/django", "django_site/site_wsgi.py", mode=mode, group=group))
    return mounts


# The daemon group that serves the battery in the "-daemon" server kinds.
BATTERY_GROUP = "battery"


def is_daemon_kind(kind):
    return kind.endswith("-daemon")


def daemon_options(srv, processes=2, threads=4, extra=""):
    """Options of a daemon group with the battery's virtualenv and python path."""
    return f"processes={processes} threads={threads} python-home={VENV} python-path={srv.apps / 'lib'} {extra}".strip()


def battery_settings():
    """The battery's servers mount several scripts (its callables, Django, Flask) in
    one interpreter on purpose."""
    return Settings(python_home=VENV, python_path=[str(APPS / "lib")], shared_interpreter=True)


def make_server(kind, mounts, settings=None, http2=False):
    """A server of the given kind: 'apache-event', 'apache-prefork', 'apache-event-daemon'
    (the event MPM forwarding every mount to a daemon group), 'nginx' or 'nginx-daemon';
    with `http2`, it also speaks cleartext HTTP/2 on its `h2_port`."""
    if kind.startswith("apache-"):
        return Apache(mounts, settings, mpm=kind.split("-")[1], name=kind, http2=http2)
    if kind in ("nginx", "nginx-daemon"):
        return Nginx(mounts, settings, name=kind, http2=http2)
    raise ValueError(kind)


def available_servers():
    kinds = []
    if built("apache", daemon=False):
        kinds += ["apache-event", "apache-prefork"]
        if built("apache"):
            kinds += ["apache-event-daemon", "apache-prefork-daemon"]
    if built("nginx", daemon=False):
        kinds.append("nginx")
        if built("nginx"):
            kinds.append("nginx-daemon")
    return kinds


SERVERS = available_servers()
# One kind of each server in each mode, for tests too slow to run on every kind.
EACH_SERVER_AND_MODE = [k for k in ("apache-event", "apache-event-daemon", "nginx", "nginx-daemon") if k in SERVERS]
DAEMON_KINDS = [k for k in EACH_SERVER_AND_MODE if is_daemon_kind(k)]


def real_app_server(kind, prefix, script, group, extra=""):
    """A server of `kind` with `script` (under tests/apps/real_apps) at `prefix`; in
    the "-daemon" kinds in daemon group `group` (with `extra` options)."""
    if is_daemon_kind(kind):
        srv = make_server(kind, [Mount(prefix, f"real_apps/{script}", mode="daemon", group=group)], Settings())
        srv.settings.daemons = {group: daemon_options(srv, processes=1, threads=4, extra=extra)}
    else:
        srv = make_server(kind, [Mount(prefix, f"real_apps/{script}")], Settings(python_home=VENV))
    return srv


# --- Daemon groups ---

def daemon_app(prefix, name, group="g", script="daemon_apps.py", vhost=None, interface=None):
    return Mount(prefix, script, name, mode="daemon", group=group, vhost=vhost, interface=interface)


def daemon_server(kind, mounts, daemons, **kw):
    """An event-MPM Apache or an nginx whose `daemons` ({name: options}) get the
    test virtualenv."""
    if kind == "apache":
        srv = Apache(mounts, battery_settings(), **kw)
    else:
        srv = Nginx(mounts, battery_settings(), name="nginx-daemon", **kw)
    srv.settings.daemons = {
        name: f"python-home={VENV} {options}".strip() for name, options in daemons.items()
    }
    return srv


def pgrep(*args) -> set[int]:
    out = subprocess.run(["pgrep", *args], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def pids_by_title(title):
    """Pids of the processes whose command line is `title` (a daemon's display-name)."""
    return pgrep("-fx", title)


def wait_for_pids(title, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = pids_by_title(title)
        if len(pids) == count:
            return pids
        time.sleep(0.02)
    raise AssertionError(f"expected {count} processes titled {title!r}, found {pids_by_title(title)}")


def parent_of(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^PPid:\s+(\d+)$", status, re.M).group(1))


def python_as(user: pwd.struct_passwd, code: str, *args) -> list[str]:
    """The command that runs Python `code` with `args` as `user`, without root's groups."""
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
            "/usr/bin/python3", "-c", code, *map(str, args)]


# --- Requests ---

def token():
    """A fresh name for a marker file or a log probe."""
    return uuid.uuid4().hex[:12]


def get_json(srv, path, **kw):
    """The JSON body of a 200 answer to a GET (or `method=`) request."""
    resp, data = srv.request(kw.pop("method", "GET"), path, **kw)
    assert resp.status == 200, (resp.status, data[:2000], srv.log_text()[-3000:])
    return json.loads(data)


def timed_get(srv, path, timeout):
    """Requests `path`; returns the status and how many seconds the answer took."""
    start = time.monotonic()
    resp, _ = srv.get(path, timeout=timeout)
    return resp.status, time.monotonic() - start


def in_background(srv, path, timeout=30.0, results=None):
    """Requests `path` on a thread; returns the thread and the list (`results`, or a
    new one) it appends (status, seconds) to once answered."""
    results = [] if results is None else results

    def run():
        results.append(timed_get(srv, path, timeout=timeout))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, results


def h2_request(port, method, path, body=b"", timeout=15.0, on_data=None):
    """One request over cleartext HTTP/2 with prior knowledge: (headers, body);
    an AssertionError when the server resets the stream. `on_data` is called with
    the body received so far after each DATA frame."""
    # Imported here: demo/run imports this module where h2 may not be installed.
    import h2.config
    import h2.connection
    import h2.events

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    headers = [(":method", method), (":path", path), (":scheme", "http"), (":authority", f"127.0.0.1:{port}")]
    if body:
        headers.append(("content-length", str(len(body))))
    conn.send_headers(sid, headers, end_stream=not body)
    sock.sendall(conn.data_to_send())
    pending = memoryview(body)
    resp_headers, data, done = {}, bytearray(), False
    try:
        while not done:
            while pending and conn.local_flow_control_window(sid) > 0:
                n = min(len(pending), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                conn.send_data(sid, pending[:n].tobytes(), end_stream=n == len(pending))
                pending = pending[n:]
            sock.sendall(conn.data_to_send())
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    resp_headers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                    if on_data:
                        on_data(bytes(data))
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream reset: {event.error_code}")
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return resp_headers, bytes(data)


def under_load(srv, path, clients, seconds, during=None):
    """`clients` threads request `path` in a loop for `seconds`; `during` runs in
    the middle. Returns the list of (status or exception name) of every request."""
    results, lock = [], threading.Lock()
    stop = time.monotonic() + seconds

    def client():
        while time.monotonic() < stop:
            try:
                resp, _ = srv.get(path, timeout=20)
                outcome = resp.status
            except Exception as e:  # a broken connection is a failure to count
                outcome = type(e).__name__
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    if during:
        time.sleep(seconds / 3)
        during()
    for t in threads:
        t.join(timeout=seconds + 30)
    return results


# --- The repository ---

def run_make(*args, **env) -> subprocess.CompletedProcess:
    """Runs a target of the repository's Makefile with `env` added to the environment."""
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env})
