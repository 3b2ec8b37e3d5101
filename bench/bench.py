#!/usr/bin/env python3
"""Measures Gateway against its peers on one machine and prints a Markdown table.

Every configuration is its own server instance (generated configuration in a private
temporary directory, its own loopback port), started and stopped by this script. Each
round starts every configuration in turn (in a rotated order), runs every workload
against it with wrk, and stops it again, so drift on the machine hits all alike. The
table reports the median over rounds.

Run it through `bench/run`, which installs the servers, wrk and a virtualenv with Flask,
gunicorn and the ASGI servers first. Only standard-library Python here: it runs under
/usr/bin/python3.
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "bench" / "apps"
LOOPBACK = "127.0.0.1"
RUN_USER = "www-data"
APACHE_MODULES = Path("/usr/lib/apache2/modules")
UWSGI_PLUGINS = Path("/usr/lib/uwsgi/plugins")
# What the ASGI peers run on, named in the report's versions.
ASGI_PACKAGES = ("uvicorn", "uvicorn-worker", "uvloop", "httptools", "granian", "hypercorn")
MIB = 1024 * 1024
DEFAULT_MODULES = ROOT / "target" / "modules"


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """One kind of request, the same URL on every configuration."""

    name: str
    title: str
    path: str
    check: Callable[[bytes], bool]  # is the response body the expected one?
    method: str = "GET"
    upload_size: int = 0
    static: bytes | None = None  # content of the equivalent static file, for the ceilings
    connections: int | None = None  # wrk connections, if not --connections


HELLO = b"Hello, world!"
WORKLOADS = [
    Workload("hello", "hello world (13 bytes)", "/hello", lambda b: b == HELLO, static=HELLO),
    Workload("64k", "64 KiB response", "/64k", lambda b: len(b) == 65536, static=b"x" * 65536),
    Workload("stream", "10 MiB response streamed in 64 KiB chunks", "/stream",
             lambda b: len(b) == 10 * MIB, static=b"x" * (10 * MIB)),
    Workload("upload", "10 MiB upload read in 64 KiB pieces", "/upload",
             lambda b: b == str(10 * MIB).encode(), method="POST", upload_size=10 * MIB),
    Workload("sleep", "application sleeps 50 ms (concurrency)", "/sleep", lambda b: b == b"slept"),
    Workload("sleep256", "application awaits a 50 ms sleep, 256 connections (ASGI concurrency)", "/sleep",
             lambda b: b == b"slept", connections=256),
    Workload("flask", "small Flask application (JSON)", "/flask/items/42?color=blue",
             lambda b: json.loads(b).get("id") == 42),
]
# URL prefix -> application file under bench/apps, mounted the same way everywhere.
MOUNTS = {
    "/hello": "hello.py",
    "/64k": "kib64.py",
    "/stream": "stream.py",
    "/upload": "upload.py",
    "/sleep": "sleep50.py",
    "/flask": "flask_app.py",
}
# The same for the ASGI configurations: the same responses from ASGI applications.
ASGI_MOUNTS = {
    "/hello": "asgi_hello.py",
    "/sleep": "asgi_sleep50.py",
}
WSGI_WORKLOADS = ["hello", "64k", "stream", "upload", "sleep", "flask"]
ASGI_WORKLOADS = ["hello", "sleep256"]


# --------------------------------------------------------------------------- processes


def read_stat(pid: int):
    """(ppid, pgrp, session, starttime) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def process_table() -> dict:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat:
                table[int(entry)] = stat
    return table


def family(roots: list[int]) -> dict:
    """pid -> starttime of every live process started from `roots`: their sessions
    (each root is started as a session leader) and all their descendants."""
    table = process_table()
    members = {pid for pid, (_, pgrp, sid, _) in table.items() if sid in roots or pgrp in roots}
    members |= {pid for pid in roots if pid in table}
    grown = True
    while grown:
        children = {pid for pid, (ppid, *_rest) in table.items() if ppid in members} - members
        members |= children
        grown = bool(children)
    return {pid: table[pid][3] for pid in members}


def exe_name(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def open_files(pid: int) -> set[str]:
    """What the process's file descriptors point to (paths, "pipe:[N]", "socket:[N]")."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    targets = set()
    for fd in fds:
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return targets


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Service:
    """A server process started in its own session, so that it and everything it
    spawns can be found and stopped."""

    def __init__(self, name: str, argv: list[str], log: Path, stop_signal=signal.SIGTERM, cwd=None):
        self.name = name
        self.argv = argv
        self.log = log
        self.stop_signal = stop_signal
        self.cwd = cwd
        self.proc = None
        self.seen: dict[int, int] = {}  # every pid (-> starttime) observed in its family
        self.adopted: dict[int, int] = {}  # pid -> starttime of processes that left its session

    def start(self):
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True, cwd=self.cwd)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def roots(self) -> list[int]:
        live = [pid for pid, start in self.adopted.items() if (read_stat(pid) or (0, 0, 0, -1))[3] == start]
        return [self.proc.pid, *live]

    def members(self) -> dict:
        """Every live process of the service, adopted ones and their children included."""
        if self.proc is None:
            return {}
        found = family(self.roots())
        self.seen.update(found)
        return found

    def adopt(self, others=frozenset()):
        """Finds processes that left the service's session (a supervisor that daemonised
        with setsid and was re-parented to init) but still share a pipe or socket with it,
        or hold its output file (inherited stdout): they are measured and stopped with it.
        `others` are processes of other services, never adopted."""
        members = self.members()
        shared = {str(self.log)}
        for pid in members:
            shared |= {t for t in open_files(pid) if t.startswith(("pipe:", "socket:"))}
        for pid, stat in process_table().items():
            if pid in members or pid in others or pid == os.getpid():
                continue
            if open_files(pid) & shared:
                self.adopted[pid] = stat[3]

    def stop(self, timeout: float = 15.0) -> list[str]:
        """Stops the service; returns descriptions of processes that outlived it and
        had to be killed."""
        if self.proc is None:
            return []
        self.members()  # before the stop signal, so everything running is known
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(self.stop_signal)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        deadline = time.monotonic() + 5
        leftovers = self.survivors()
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.1)
            leftovers = self.survivors()
        killed = []
        for pid in leftovers:
            killed.append(f"{pid} ({exe_name(pid) or 'unknown'})")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        return killed

    def survivors(self) -> list[int]:
        live = family(self.roots())
        for pid, start in self.seen.items():
            stat = read_stat(pid)
            if stat and stat[3] == start:
                live[pid] = start
        return list(live)


def wait_until(predicate, timeout: float, what: str, services=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for s in services:
            if not s.alive():
                raise RuntimeError(f"{s.name} exited during start-up (see {s.log})")
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def unix_socket_open(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- configurations


@dataclass
class Env:
    """What the configurations are built from."""

    modules: Path
    venv: Path
    processes: int
    threads: int
    workdir: Path  # shared: apps/ and static/, readable by the servers' user

    @property
    def apps(self) -> Path:
        return self.workdir / "apps"

    @property
    def static(self) -> Path:
        return self.workdir / "static"


class Config:
    """One way of serving the workloads. Subclasses write the server configuration(s)
    and say which processes run Python."""

    name = ""
    label = ""
    group = ""  # "ceiling", "peer" or "gateway"
    # "daemon": the application runs in processes of their own, apart from the server's
    # (mod_wsgi and Gateway daemon mode, uWSGI, gunicorn, the ASGI servers); a daemon row
    # is compared with daemon-style peers only, an embedded one with every peer.
    mode = "embedded"
    interface = "wsgi"  # peers of the same interface are compared ("vs best peer")
    mounts = MOUNTS
    workloads = WSGI_WORKLOADS

    def __init__(self, env: Env):
        self.env = env
        self.dir: Path | None = None
        self.port = 0
        self.services: list[Service] = []

    def missing(self) -> str | None:
        """Why this configuration cannot run here ("not built (...)", "not installed (...)"), or None."""
        return None

    def start(self):
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=self.env.workdir))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.launch()
        wait_until(lambda: port_open(self.port), 30, f"{self.label} to listen on port {self.port}", self.services)
        self.adopt()

    def adopt(self):
        for s in self.services:
            others = set()
            for other in self.services:
                if other is not s:
                    others |= set(other.members())
            s.adopt(others)

    def launch(self):
        raise NotImplementedError

    def backends(self):
        """Starts the application servers the front server talks to (before it)."""

    def stop(self) -> list[str]:
        self.adopt()  # while everything still runs
        leftovers = []
        for s in reversed(self.services):
            leftovers += s.stop()
        self.services = []
        return leftovers

    def python_pids(self) -> list[int]:
        """The processes that run the application's Python code."""
        raise NotImplementedError

    def logs(self) -> str:
        text = []
        for path in sorted(self.dir.glob("*.log")) if self.dir else []:
            tail = path.read_text(errors="replace")[-3000:]
            if tail.strip():
                text.append(f"--- {path.name}\n{tail}")
        return "\n".join(text)

    def service(self, name, argv, stop_signal=signal.SIGTERM, cwd=None) -> Service:
        s = Service(name, argv, self.dir / f"{name}.log", stop_signal, cwd)
        self.services.append(s)
        s.start()
        return s

    def app(self, prefix: str) -> Path:
        return self.env.apps / self.mounts[prefix]

    def children_of(self, service: Service, match) -> list[int]:
        return [pid for pid in service.members() if match(pid)]


def require(*paths) -> str | None:
    for p in paths:
        if not Path(p).exists():
            return str(p)
    return None


def interface_option(config: Config) -> str:
    """What follows FILE in a Gateway mount: nothing for WSGI, as before ASGI existed."""
    return " interface=asgi" if config.interface == "asgi" else ""


class AsgiApps:
    """Mixed into a configuration that serves the ASGI applications."""

    interface = "asgi"
    mounts = ASGI_MOUNTS
    workloads = ASGI_WORKLOADS


def as_run_user(argv: list[str]) -> list[str]:
    """The command run as the servers' user, for servers that cannot drop root themselves."""
    user = pwd.getpwnam(RUN_USER)
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *argv]


def run_dir(config: Config) -> Path:
    """A directory the servers' user may create its Unix socket in."""
    path = config.dir / "run"
    path.mkdir()
    user = pwd.getpwnam(RUN_USER)
    os.chown(path, user.pw_uid, user.pw_gid)
    return path


# ---- Apache


class ApacheConfig(Config):
    """Apache httpd with the event MPM: `processes` children x `threads` threads."""

    def directives(self) -> list[str]:
        raise NotImplementedError

    def missing(self):
        absent = require("/usr/sbin/apache2", APACHE_MODULES / "mod_mpm_event.so")
        return f"not installed ({Path(absent).name} missing)" if absent else None

    def launch(self):
        self.backends()
        e = self.env
        conf = self.dir / "httpd.conf"
        lines = [
            f"ServerRoot {self.dir}",
            f"DefaultRuntimeDir {self.dir}",
            f"PidFile {self.dir}/httpd.pid",
            f"Listen {LOOPBACK}:{self.port}",
            "ServerName localhost",
            f"User {RUN_USER}",
            f"Group {RUN_USER}",
            f"LoadModule mpm_event_module {APACHE_MODULES}/mod_mpm_event.so",
            f"StartServers {e.processes}",
            f"ServerLimit {e.processes}",
            f"ThreadLimit {e.threads}",
            f"ThreadsPerChild {e.threads}",
            f"MaxRequestWorkers {e.processes * e.threads}",
            "MinSpareThreads 1",
            f"MaxSpareThreads {e.processes * e.threads}",
            "MaxConnectionsPerChild 0",
            f"LoadModule authz_core_module {APACHE_MODULES}/mod_authz_core.so",
            f"ErrorLog {self.dir}/error.log",
            "LogLevel warn",
            "KeepAlive On",
            "MaxKeepAliveRequests 0",
            "KeepAliveTimeout 5",
            "Timeout 60",
            "EnableSendfile On",
            f"DocumentRoot {e.static}",
            # As Debian's apache2.conf does: no .htaccess search on every request.
            "<Directory />\n    AllowOverride None\n</Directory>",
            f"<Directory {e.workdir}>\n    Require all granted\n</Directory>",
            *self.directives(),
        ]
        conf.write_text("\n".join(lines) + "\n")
        check = subprocess.run(["apache2", "-f", str(conf), "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"apache2 -t failed: {(check.stderr or check.stdout).strip()}")
        self.apache = self.service("apache", ["apache2", "-f", str(conf), "-DFOREGROUND"])

    def workers(self) -> list[int]:
        root = self.apache.proc.pid
        table = process_table()
        return [pid for pid in self.apache.members() if table.get(pid, (0,))[0] == root and exe_name(pid) == "apache2"]


class ApacheStatic(ApacheConfig):
    name = "apache-static"
    label = "Apache static file (ceiling)"
    group = "ceiling"
    workloads = [w.name for w in WORKLOADS if w.static is not None]

    def directives(self):
        return []

    def python_pids(self):
        return []


class ApacheModWsgi(ApacheConfig):
    """Debian's mod_wsgi (libapache2-mod-wsgi-py3)."""

    group = "peer"

    def module(self) -> Path | None:
        """The mod_wsgi.so this configuration loads, or None if it is not installed."""
        path = APACHE_MODULES / "mod_wsgi.so"
        return path if path.exists() else None

    def missing(self):
        if self.module() is None:
            return "not installed (mod_wsgi.so missing)"
        return super().missing()

    def directives(self):
        e = self.env
        lines = [f'LoadModule wsgi_module "{self.module()}"',
                 f"WSGISocketPrefix {self.dir}/wsgi",
                 "WSGIApplicationGroup %{GLOBAL}"]
        if self.mode == "embedded":
            lines.append(f"WSGIPythonHome {e.venv}")
        else:
            # Display names are matched to find the daemons; Apache can only rename a
            # process within the length of its argv[0] ("apache2"), hence 7 characters at most.
            lines += ["WSGIRestrictEmbedded On",
                      f"WSGIDaemonProcess bench processes={e.processes} threads={e.threads} "
                      f"python-home={e.venv} display-name=wsgid",
                      "WSGIProcessGroup bench"]
        lines += [f"WSGIScriptAlias {prefix} {self.app(prefix)}" for prefix in MOUNTS]
        return lines

    def python_pids(self):
        if self.mode == "embedded":
            return self.workers()
        return self.children_of(self.apache, lambda pid: cmdline(pid).startswith("wsgid"))


class ApacheModWsgiEmbedded(ApacheModWsgi):
    name = "apache-modwsgi-embedded"
    label = "Apache + mod_wsgi (Debian) embedded"


class ApacheModWsgiDaemon(ApacheModWsgi):
    name = "apache-modwsgi-daemon"
    label = "Apache + mod_wsgi (Debian) daemon"
    mode = "daemon"


class ApacheModWsgi6(ApacheModWsgi):
    """mod_wsgi from PyPI (bench/requirements-build.txt), built against Debian's Apache with
    apxs into the virtualenv. Each configuration runs its own Apache, so it never meets
    Debian's mod_wsgi in one server."""

    def module(self):
        # What `mod_wsgi-express module-config` puts in its LoadModule line.
        express = self.env.venv / "bin" / "mod_wsgi-express"
        if not express.exists():
            return None
        text = command_output([str(express), "module-location"])
        path = Path(text.splitlines()[-1]) if text else None
        return path if path and path.is_absolute() and path.exists() else None


class ApacheModWsgi6Embedded(ApacheModWsgi6):
    name = "apache-modwsgi6-embedded"
    label = "Apache + mod_wsgi (PyPI) embedded"


class ApacheModWsgi6Daemon(ApacheModWsgi6):
    name = "apache-modwsgi6-daemon"
    label = "Apache + mod_wsgi (PyPI) daemon"
    mode = "daemon"


class ApacheGateway(ApacheConfig):
    group = "gateway"

    def missing(self):
        needed = [self.env.modules / "mod_gateway.so"]
        if self.mode == "daemon":
            needed.append(self.env.modules / "gateway-daemon")
        absent = require(*needed)
        return f"not built ({Path(absent).name} missing)" if absent else super().missing()

    def directives(self):
        e = self.env
        lines = [f"LoadModule gateway_module {e.modules}/mod_gateway.so"]
        if self.mode == "embedded":
            lines += [f"GatewayPythonHome {e.venv}", "GatewaySharedInterpreter On"]
        else:
            lines += [f"GatewayDaemon bench processes={e.processes} threads={e.threads} "
                      f"python-home={e.venv} display-name=gwbench",
                      "GatewayMode daemon bench"]
        lines += [f"GatewayScriptAlias {prefix} {self.app(prefix)}{interface_option(self)}"
                  for prefix in self.mounts]
        return lines

    def python_pids(self):
        if self.mode == "embedded":
            return self.workers()
        return gateway_daemons(self.apache)


def gateway_daemons(service: Service) -> list[int]:
    """Gateway's daemon processes that run Python: the gateway-daemon processes that
    have no gateway-daemon children (a supervisor, if any, is their parent)."""
    table = process_table()
    daemons = [pid for pid in service.members()
               if exe_name(pid) == "gateway-daemon" or cmdline(pid).startswith("gwbench")]
    parents = {table[pid][0] for pid in daemons if pid in table}
    return [pid for pid in daemons if pid not in parents]


class ApacheGatewayEmbedded(ApacheGateway):
    name = "apache-gateway-embedded"
    label = "Apache + Gateway embedded"


class ApacheGatewayDaemon(ApacheGateway):
    name = "apache-gateway-daemon"
    label = "Apache + Gateway daemon"
    mode = "daemon"


# ---- nginx


class NginxConfig(Config):
    """nginx with `processes` worker processes."""

    def missing(self):
        absent = require("/usr/sbin/nginx")
        return f"not installed ({Path(absent).name} missing)" if absent else None

    def main_directives(self) -> list[str]:
        return []

    def http_directives(self) -> list[str]:
        return []

    def locations(self) -> list[str]:
        raise NotImplementedError

    def launch(self):
        self.backends()
        e = self.env
        temp = "\n".join(f"    {kind}_temp_path {self.dir}/tmp/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        locations = "\n".join("        " + line for line in self.locations())
        http_extra = "\n".join("    " + line for line in self.http_directives())
        conf = self.dir / "nginx.conf"
        main = "\n".join(self.main_directives())
        conf.write_text(f"""{main}
daemon off;
master_process on;
worker_processes {e.processes};
user {RUN_USER} {RUN_USER};
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 5;
    keepalive_requests 1000000;
    client_max_body_size 16m;
    default_type application/octet-stream;
{temp}
{http_extra}
    server {{
        listen {LOOPBACK}:{self.port} reuseport;
        server_name localhost;
        root {e.static};
{locations}
    }}
}}
""")
        (self.dir / "tmp").mkdir()
        argv = ["nginx", "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log")]
        check = subprocess.run(argv + ["-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed: {(check.stderr or check.stdout).strip()}")
        self.nginx = self.service("nginx", argv, signal.SIGTERM)

    def workers(self) -> list[int]:
        return self.children_of(self.nginx, lambda pid: cmdline(pid).startswith("nginx: worker"))


class NginxReturn(NginxConfig):
    name = "nginx-return200"
    label = "nginx return 200 / static file (ceiling)"
    group = "ceiling"
    workloads = [w.name for w in WORKLOADS if w.static is not None]

    def locations(self):
        return [f'location = /hello {{ default_type text/plain; return 200 "{HELLO.decode()}"; }}']

    def python_pids(self):
        return []


class NginxUwsgi(NginxConfig):
    """Debian's uWSGI with its python3 plugin."""

    name = "nginx-uwsgi"
    label = "nginx + uWSGI (Debian)"
    group = "peer"
    mode = "daemon"

    def program(self) -> Path:
        return Path("/usr/bin/uwsgi")

    def plugins(self) -> str:
        """The ini line that loads the Python plugin, if the build needs one."""
        return "plugins = python3\n"

    def missing(self):
        absent = require(self.program(), UWSGI_PLUGINS / "python3_plugin.so")
        return f"not installed ({Path(absent).name} missing)" if absent else super().missing()

    def backends(self):
        e = self.env
        self.socket = self.dir / "uwsgi.sock"
        ini = self.dir / "uwsgi.ini"
        mounts = "\n".join(f"mount = {prefix}={self.app(prefix)}" for prefix in MOUNTS)
        # single-interpreter: all mounts share one interpreter, as with mod_wsgi's
        # %{GLOBAL} application group and Gateway (uWSGI would give each its own).
        ini.write_text(f"""[uwsgi]
{self.plugins()}master = true
processes = {e.processes}
threads = {e.threads}
socket = {self.socket}
chown-socket = {RUN_USER}:{RUN_USER}
chmod-socket = 660
uid = {RUN_USER}
gid = {RUN_USER}
virtualenv = {e.venv}
chdir = {e.apps}
{mounts}
manage-script-name = true
single-interpreter = true
need-app = true
die-on-term = true
disable-logging = true
""")
        self.uwsgi = self.service("uwsgi", [str(self.program()), "--ini", str(ini)], signal.SIGINT)
        wait_until(self.socket.exists, 30, "the uWSGI socket", [self.uwsgi])

    def locations(self):
        return ["location / {", "    include /etc/nginx/uwsgi_params;",
                f"    uwsgi_pass unix:{self.socket};", "}"]

    def python_pids(self):
        return list(self.uwsgi.members())


class NginxUwsgiPypi(NginxUwsgi):
    """uWSGI from PyPI (bench/requirements-build.txt): pip builds it with the Python plugin
    built in, into the virtualenv's bin/."""

    name = "nginx-uwsgi-pypi"
    label = "nginx + uWSGI (PyPI)"

    def program(self):
        return self.env.venv / "bin" / "uwsgi"

    def plugins(self):
        return ""

    def missing(self):
        absent = require(self.program())
        return f"not installed (uwsgi missing from {self.env.venv}/bin)" if absent else NginxConfig.missing(self)


class NginxGunicorn(NginxConfig):
    name = "nginx-gunicorn"
    label = "nginx + gunicorn"
    group = "peer"
    mode = "daemon"

    def missing(self):
        absent = require(self.env.venv / "bin" / "gunicorn")
        return f"not installed ({Path(absent).name} missing)" if absent else super().missing()

    def backends(self):
        e = self.env
        self.socket = self.dir / "gunicorn.sock"
        argv = [str(e.venv / "bin" / "gunicorn"), "--workers", str(e.processes),
                "--worker-class", "gthread", "--threads", str(e.threads),
                "--bind", f"unix:{self.socket}", "--user", RUN_USER, "--group", RUN_USER,
                "--chdir", str(e.apps), "--worker-tmp-dir", "/dev/shm", "dispatch:application"]
        # SIGQUIT: gunicorn's quick shutdown (SIGTERM waits for keep-alive connections).
        self.gunicorn = self.service("gunicorn", argv, signal.SIGQUIT)
        wait_until(self.socket.exists, 30, "the gunicorn socket", [self.gunicorn])

    def http_directives(self):
        return [f"upstream gunicorn {{ server unix:{self.socket}; keepalive 32; }}"]

    def locations(self):
        return ["location / {", "    proxy_pass http://gunicorn;", "    proxy_http_version 1.1;",
                '    proxy_set_header Connection "";', "    proxy_set_header Host $host;", "}"]

    def python_pids(self):
        return list(self.gunicorn.members())


class NginxGateway(NginxConfig):
    group = "gateway"

    def missing(self):
        needed = [self.env.modules / "ngx_http_gateway_module.so"]
        if self.mode == "daemon":
            needed.append(self.env.modules / "gateway-daemon")
        absent = require(*needed)
        return f"not built ({Path(absent).name} missing)" if absent else super().missing()

    def main_directives(self):
        return [f"load_module {self.env.modules}/ngx_http_gateway_module.so;"]

    def http_directives(self):
        e = self.env
        if self.mode == "embedded":
            return [f"gateway_python_home {e.venv};", f"gateway_threads {e.threads};",
                    "gateway_shared_interpreter on;"]
        return [f"gateway_daemon bench processes={e.processes} threads={e.threads} "
                f"python-home={e.venv} display-name=gwbench;",
                "gateway_mode daemon bench;"]

    def locations(self):
        return [f"location {prefix} {{ gateway_app {self.app(prefix)}{interface_option(self)}; }}"
                for prefix in self.mounts]

    def python_pids(self):
        if self.mode == "embedded":
            return self.workers()
        return gateway_daemons(self.nginx)


class NginxGatewayEmbedded(NginxGateway):
    name = "nginx-gateway-embedded"
    label = "nginx + Gateway embedded"


class NginxGatewayDaemon(NginxGateway):
    name = "nginx-gateway-daemon"
    label = "nginx + Gateway daemon"
    mode = "daemon"


# ---- Gateway with its status counters off: the other half of the pair that shows what
# counting requests for the status page costs (on is every Gateway row's default).


class ApacheGatewayEmbeddedNoCounters(ApacheGatewayEmbedded):
    name = "apache-gateway-embedded-nocounters"
    label = "Apache + Gateway embedded, status counters off"
    workloads = ["hello"]

    def directives(self):
        return super().directives() + ["GatewayStatusCounters Off"]


class ApacheGatewayDaemonNoCounters(ApacheGatewayDaemon):
    name = "apache-gateway-daemon-nocounters"
    label = "Apache + Gateway daemon, status counters off"
    workloads = ["hello"]

    def directives(self):
        return super().directives() + ["GatewayStatusCounters Off"]


class NginxGatewayEmbeddedNoCounters(NginxGatewayEmbedded):
    name = "nginx-gateway-embedded-nocounters"
    label = "nginx + Gateway embedded, status counters off"
    workloads = ["hello"]

    def http_directives(self):
        return super().http_directives() + ["gateway_status_counters off;"]


class NginxGatewayDaemonNoCounters(NginxGatewayDaemon):
    name = "nginx-gateway-daemon-nocounters"
    label = "nginx + Gateway daemon, status counters off"
    workloads = ["hello"]

    def http_directives(self):
        return super().http_directives() + ["gateway_status_counters off;"]


# ---- ASGI
# Every ASGI server runs `processes` worker processes, each serving its requests on one
# event loop (uvloop wherever the server can use it, as Gateway does when the virtualenv has it).


def venv_missing(config: Config, program: str) -> str | None:
    absent = require(config.env.venv / "bin" / program)
    return f"not installed ({Path(absent).name} missing)" if absent else None


def start_uvicorn(config: Config) -> tuple[Service, Path]:
    """uvicorn with uvloop and httptools on a Unix socket, for a proxy in front."""
    e = config.env
    socket_path = run_dir(config) / "uvicorn.sock"
    argv = [str(e.venv / "bin" / "uvicorn"), "--uds", str(socket_path), "--workers", str(e.processes),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--app-dir", str(e.apps), "asgi_dispatch:application"]
    service = config.service("uvicorn", as_run_user(argv), cwd=e.apps)
    # The socket file appears when it is bound, before a worker listens on it.
    wait_until(lambda: unix_socket_open(socket_path), 30, "the uvicorn socket", [service])
    return service, socket_path


class NginxUvicorn(AsgiApps, NginxConfig):
    name = "nginx-uvicorn"
    label = "nginx + uvicorn"
    group = "peer"
    mode = "daemon"

    def missing(self):
        return venv_missing(self, "uvicorn") or super().missing()

    def backends(self):
        self.uvicorn, self.socket = start_uvicorn(self)

    def http_directives(self):
        # Enough idle upstream connections for every client connection of the largest load.
        keepalive = max(w.connections or 0 for w in WORKLOADS)
        return [f"upstream uvicorn {{ server unix:{self.socket}; keepalive {keepalive}; }}"]

    def locations(self):
        return ["location / {", "    proxy_pass http://uvicorn;", "    proxy_http_version 1.1;",
                '    proxy_set_header Connection "";', "    proxy_set_header Host $host;", "}"]

    def python_pids(self):
        return list(self.uvicorn.members())


class ApacheUvicorn(AsgiApps, ApacheConfig):
    name = "apache-uvicorn"
    label = "Apache + uvicorn"
    group = "peer"
    mode = "daemon"

    def missing(self):
        absent = require(APACHE_MODULES / "mod_proxy.so", APACHE_MODULES / "mod_proxy_http.so")
        if absent:
            return f"not installed ({Path(absent).name} missing)"
        return venv_missing(self, "uvicorn") or super().missing()

    def backends(self):
        self.uvicorn, self.socket = start_uvicorn(self)

    def directives(self):
        # mod_proxy_http speaks HTTP/1.1 to the backend and keeps a pool of connections per child.
        return [f"LoadModule proxy_module {APACHE_MODULES}/mod_proxy.so",
                f"LoadModule proxy_http_module {APACHE_MODULES}/mod_proxy_http.so",
                f'ProxyPass "/" "unix:{self.socket}|http://localhost/" enablereuse=on']

    def python_pids(self):
        return list(self.uvicorn.members())


class AsgiServer(AsgiApps, Config):
    """An ASGI server alone, listening on the benchmark's port itself."""

    group = "peer"
    mode = "daemon"
    program = ""
    stop_signal = signal.SIGTERM

    def missing(self):
        return venv_missing(self, self.program)

    def argv(self) -> list[str]:
        raise NotImplementedError

    def launch(self):
        self.server = self.service(self.program, self.argv(), self.stop_signal, cwd=self.env.apps)

    def python_pids(self):
        return list(self.server.members())


class GunicornUvicorn(AsgiServer):
    name = "gunicorn-uvicorn"
    label = "gunicorn + uvicorn worker"
    program = "gunicorn"
    # Not SIGQUIT as for nginx-gunicorn: uvicorn's worker does not stop on it (gunicorn kills it
    # after its 30 s graceful timeout); on SIGTERM it stops at once when no request is running.
    stop_signal = signal.SIGTERM

    def missing(self):
        if not any(self.env.venv.glob("lib/python3*/site-packages/uvicorn_worker")):
            return "not installed (uvicorn-worker missing)"
        return super().missing()

    def argv(self):
        e = self.env
        # uvicorn's worker picks uvloop and httptools when they are installed.
        return [str(e.venv / "bin" / "gunicorn"), "--workers", str(e.processes),
                "--worker-class", "uvicorn_worker.UvicornWorker", "--bind", f"{LOOPBACK}:{self.port}",
                "--user", RUN_USER, "--group", RUN_USER, "--chdir", str(e.apps),
                "--worker-tmp-dir", "/dev/shm", "asgi_dispatch:application"]


class Granian(AsgiServer):
    name = "granian"
    label = "granian"
    program = "granian"

    def argv(self):
        e = self.env
        return as_run_user([str(e.venv / "bin" / "granian"), "--interface", "asgi",
                            "--workers", str(e.processes), "--loop", "uvloop",
                            "--host", LOOPBACK, "--port", str(self.port),
                            "--working-dir", str(e.apps), "asgi_dispatch:application"])


class Hypercorn(AsgiServer):
    name = "hypercorn"
    label = "hypercorn"
    program = "hypercorn"

    def argv(self):
        e = self.env
        # Its default worker class is plain asyncio; uvloop is what the other servers use.
        return as_run_user([str(e.venv / "bin" / "hypercorn"), "--workers", str(e.processes),
                            "--worker-class", "uvloop", "--bind", f"{LOOPBACK}:{self.port}",
                            "asgi_dispatch:application"])


class ApacheGatewayAsgiEmbedded(AsgiApps, ApacheGateway):
    name = "apache-gateway-asgi-embedded"
    label = "Apache + Gateway ASGI embedded"


class ApacheGatewayAsgiDaemon(AsgiApps, ApacheGateway):
    name = "apache-gateway-asgi-daemon"
    label = "Apache + Gateway ASGI daemon"
    mode = "daemon"


class NginxGatewayAsgiEmbedded(AsgiApps, NginxGateway):
    name = "nginx-gateway-asgi-embedded"
    label = "nginx + Gateway ASGI embedded"


class NginxGatewayAsgiDaemon(AsgiApps, NginxGateway):
    name = "nginx-gateway-asgi-daemon"
    label = "nginx + Gateway ASGI daemon"
    mode = "daemon"


CONFIGS = [NginxReturn, ApacheStatic, ApacheModWsgiEmbedded, ApacheModWsgiDaemon, ApacheModWsgi6Embedded,
           ApacheModWsgi6Daemon, NginxUwsgi, NginxUwsgiPypi, NginxGunicorn, ApacheGatewayEmbedded,
           ApacheGatewayDaemon, NginxGatewayEmbedded, NginxGatewayDaemon,
           ApacheGatewayEmbeddedNoCounters, ApacheGatewayDaemonNoCounters, NginxGatewayEmbeddedNoCounters,
           NginxGatewayDaemonNoCounters,
           NginxUvicorn, ApacheUvicorn, GunicornUvicorn, Granian, Hypercorn,
           ApacheGatewayAsgiEmbedded, ApacheGatewayAsgiDaemon, NginxGatewayAsgiEmbedded,
           NginxGatewayAsgiDaemon]


@dataclass(frozen=True)
class Peers:
    """A goal's peer when several versions of it run: the best of those measured."""

    label: str
    names: tuple[str, ...]


# Stand for the best peer of the Gateway row's interface on the workload in GOALS: for a
# daemon row the best daemon-style peer, for an embedded row the best of all.
BEST_PEER = "best peer"
BEST_ASGI_PEER = "best ASGI peer"
MODWSGI_EMBEDDED = Peers("mod_wsgi embedded (Debian, PyPI)", ("apache-modwsgi-embedded", "apache-modwsgi6-embedded"))
MODWSGI_DAEMON = Peers("mod_wsgi daemon (Debian, PyPI)", ("apache-modwsgi-daemon", "apache-modwsgi6-daemon"))
UWSGI = Peers("nginx + uWSGI (Debian, PyPI)", ("nginx-uwsgi", "nginx-uwsgi-pypi"))


@dataclass(frozen=True)
class Goal:
    """Gateway configuration `ours` >= `ratio` x the peer's req/s on the workload, and,
    when `p99` is set, its p99 at most `p99` x that peer's p99. Goals with `always` are
    reported even when not measured; the others only when their configuration and workload ran."""

    ours: str
    peer: "str | Peers"
    ratio: float
    workload: str
    p99: float | None = None
    always: bool = True


WSGI_GATEWAY = ["apache-gateway-embedded", "apache-gateway-daemon", "nginx-gateway-embedded", "nginx-gateway-daemon"]
# The performance goals of the project.
GOALS = [
    Goal("apache-gateway-embedded", MODWSGI_EMBEDDED, 1.5, "hello"),
    Goal("nginx-gateway-embedded", UWSGI, 1.5, "hello"),
    Goal("apache-gateway-daemon", MODWSGI_DAEMON, 2.0, "hello"),
    Goal("nginx-gateway-daemon", UWSGI, 1.0, "hello"),
    Goal("apache-gateway-asgi-embedded", "apache-uvicorn", 1.5, "hello"),
    Goal("nginx-gateway-asgi-embedded", "nginx-uvicorn", 1.5, "hello"),
    Goal("apache-gateway-asgi-daemon", "apache-uvicorn", 1.0, "hello"),
    Goal("nginx-gateway-asgi-daemon", "nginx-uvicorn", 1.0, "hello"),
    Goal("nginx-gateway-asgi-embedded", BEST_ASGI_PEER, 1.0, "sleep256"),
    Goal("nginx-gateway-asgi-daemon", BEST_ASGI_PEER, 1.0, "sleep256"),
    # Apache's MPM bounds the requests in flight to processes x threads for every handler,
    # a proxy included, so Apache is held to the best peer behind Apache.
    Goal("apache-gateway-asgi-embedded", "apache-uvicorn", 1.0, "sleep256"),
    Goal("apache-gateway-asgi-daemon", "apache-uvicorn", 1.0, "sleep256"),
    # Every WSGI workload: at least the best peer of the same mode, with at most 1.2x its p99.
    *[Goal(ours, BEST_PEER, 1.0, w, p99=1.2, always=False) for w in WSGI_WORKLOADS for ours in WSGI_GATEWAY],
    # Counting requests for the status page costs hello world at most 3%.
    *[Goal(ours, f"{ours}-nocounters", 0.97, "hello", always=False) for ours in WSGI_GATEWAY],
]


# --------------------------------------------------------------------------- measuring


class RssSampler(threading.Thread):
    """Samples the resident memory of the Python-running processes of a configuration."""

    def __init__(self, config: Config, interval: float = 0.2):
        super().__init__(daemon=True)
        self.config = config
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak_total = 0
        self.peak_process = 0
        self.processes = 0

    def sample(self):
        pids = self.config.python_pids()
        sizes = [rss_bytes(pid) for pid in pids]
        self.processes = max(self.processes, len(pids))
        self.peak_total = max(self.peak_total, sum(sizes))
        self.peak_process = max([self.peak_process, *sizes])

    def run(self):
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def finish(self):
        self.stop_event.set()
        self.join()
        self.sample()


UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text: str) -> dict:
    def number(pattern):
        m = re.search(pattern, text)
        return m.groups() if m else None

    rps = number(r"Requests/sec:\s+([\d.]+)")
    total = number(r"(\d+) requests in")
    if not rps or not total:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    latency = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        latency[pct] = float(value) * UNITS[unit]
    non2xx = number(r"Non-2xx or 3xx responses:\s+(\d+)")
    sock = number(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)") or (0, 0, 0, 0)
    kinds = dict(zip(("status", "connect", "read", "write", "timeout"),
                     map(int, [non2xx[0] if non2xx else 0, *sock])))
    return {"rps": float(rps[0]), "requests": int(total[0]), "p50_ms": latency.get("50"),
            "p99_ms": latency.get("99"), "errors": sum(kinds.values()), "error_kinds": kinds}


class Bench:
    def __init__(self, args, env: Env):
        self.args = args
        self.env = env
        self.scripts: dict[str, Path] = {}
        for w in WORKLOADS:
            if w.method != "GET":
                script = env.workdir / f"{w.name}.lua"
                script.write_text(f'wrk.method = "{w.method}"\n'
                                  f'wrk.body = string.rep("x", {w.upload_size})\n'
                                  'wrk.headers["Content-Type"] = "application/octet-stream"\n')
                self.scripts[w.name] = script

    def url(self, config: Config, w: Workload) -> str:
        return f"http://{LOOPBACK}:{config.port}{w.path}"

    def wrk(self, config: Config, w: Workload, seconds: int) -> str:
        url = self.url(config, w)
        if not url.startswith(f"http://{LOOPBACK}:"):
            raise RuntimeError(f"refusing to load a non-loopback address: {url}")
        connections = w.connections or self.args.connections
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
        if w.name in self.scripts:
            argv += ["-s", str(self.scripts[w.name])]
        r = subprocess.run(argv + [url], capture_output=True, text=True, timeout=seconds + 60)
        if r.returncode != 0:
            raise RuntimeError(f"wrk failed: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def check(self, config: Config, w: Workload, timeout: float = 30.0):
        """One request before measuring: the configuration must answer correctly. Retries
        briefly while a backend reports 502/503 (still starting)."""
        body = b"x" * w.upload_size if w.method == "POST" else None
        deadline = time.monotonic() + timeout
        while True:
            conn = http.client.HTTPConnection(LOOPBACK, config.port, timeout=timeout)
            try:
                conn.request(w.method, w.path, body=body)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            if resp.status in (502, 503) and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            if resp.status != 200:
                raise RuntimeError(f"{w.method} {w.path} answered {resp.status} {resp.reason}")
            if not w.check(data):
                raise RuntimeError(f"{w.method} {w.path} answered an unexpected body ({len(data)} bytes)")
            return

    def measure(self, config: Config, w: Workload) -> dict:
        self.check(config, w)
        config.adopt()  # daemons may start with the first request
        if self.args.warmup:
            self.wrk(config, w, self.args.warmup)
        sampler = RssSampler(config)
        sampler.start()
        try:
            result = parse_wrk(self.wrk(config, w, self.args.duration))
        finally:
            sampler.finish()
        result.update(rss_total=sampler.peak_total, rss_process=sampler.peak_process,
                      python_processes=sampler.processes)
        return result


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def stop(config: Config, notes: list[str]):
    leftovers = config.stop()
    if leftovers:
        note = f"{config.label}: processes still running after the server stopped were killed: {', '.join(leftovers)}"
        log(f"  warning: {note}")
        notes.append(note)


def run_rounds(bench: Bench, configs: list[Config], workloads: list[Workload], rounds: int, results: dict,
               notes: list[str]):
    """Fills results[config][workload] = {"rounds": [...], "failure": str|None}, and notes
    with anything the reader should know about (processes left behind)."""
    results.update({c.name: {w.name: {"rounds": [], "failure": None} for w in workloads} for c in configs})
    for r in range(rounds):
        # Rotate the order each round so no configuration always runs first or last.
        order = configs[r % len(configs):] + configs[:r % len(configs)] if configs else []
        for config in order:
            todo = [w for w in workloads if w.name in config.workloads
                    and not results[config.name][w.name]["failure"]]
            if not todo:
                continue
            log(f"[round {r + 1}/{rounds}] {config.label}")
            try:
                config.start()
            except Exception as exc:
                reason = f"failed to start: {first_line(exc)}"
                log(f"  {reason}\n{config.logs()}")
                for w in todo:
                    results[config.name][w.name]["failure"] = reason
                stop(config, notes)
                continue
            try:
                for w in todo:
                    cell = results[config.name][w.name]
                    try:
                        m = bench.measure(config, w)
                    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
                        cell["failure"] = f"failed: {first_line(exc)}"
                        log(f"  {w.name}: {cell['failure']}")
                        continue
                    cell["rounds"].append(m)
                    log(f"  {w.name:7} {m['rps']:10.1f} req/s  p50 {fmt_ms(m['p50_ms'])} ms  "
                        f"p99 {fmt_ms(m['p99_ms'])} ms  errors {m['errors']}  "
                        f"python RSS {m['rss_total'] / MIB:.1f} MiB in {m['python_processes']} processes")
            finally:
                stop(config, notes)


def first_line(exc) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


# --------------------------------------------------------------------------- reporting


def fmt_ms(v) -> str:
    if v is None:
        return "?"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def cell_text(text: str) -> str:
    """A message made fit for a table cell: one short line without the run's temporary paths."""
    text = re.sub(r"/\S*/gateway-bench-[^/\s]+/(?:[^/\s]+/)?", "", text)
    text = text if len(text) <= 100 else text[:97] + "..."
    return text.replace("|", "\\|")


def fmt_errors(s: dict) -> str:
    kinds = [f"{n} {kind}" for kind, n in s["error_kinds"].items() if n]
    return f"{s['errors']} ({', '.join(kinds)})" if kinds else "0"


def summary(cell: dict) -> dict | None:
    rounds = cell["rounds"]
    if not rounds:
        return None

    def med(key):
        values = [x[key] for x in rounds if x[key] is not None]
        return statistics.median(values) if values else None

    return {"rps": med("rps"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
            "errors": sum(x["errors"] for x in rounds),
            "error_kinds": {k: sum(x["error_kinds"][k] for x in rounds) for k in rounds[0]["error_kinds"]},
            "requests": sum(x["requests"] for x in rounds),
            "rss_total": max(x["rss_total"] for x in rounds), "rss_process": max(x["rss_process"] for x in rounds),
            "python_processes": max(x["python_processes"] for x in rounds), "rounds": len(rounds)}


def report(args, env: Env, configs: list[Config], skipped: dict, workloads, results, facts, notes,
           interrupted: str | None = None) -> str:
    out = ["# Gateway benchmark", ""]
    if interrupted:
        out += [f"**Incomplete run ({interrupted}).**", ""]
    if args.quick:
        out += ["**Smoke run (`--quick`): one short round; the numbers are not meaningful.**", ""]
    out += report_header(args, env, configs, workloads, facts)
    all_configs = [(c, None) for c in configs] + [(c, reason) for c, reason in skipped.items()]
    order = {cls.name: i for i, cls in enumerate(CONFIGS)}
    all_configs.sort(key=lambda item: order[item[0].name])
    summaries = {c.name: {name: summary(cell) for name, cell in results.get(c.name, {}).items()}
                 for c in configs}
    for w in workloads:
        out += report_table(args, w, configs, all_configs, summaries, results)
    out += ["## Goals", ""]
    out += report_goals(configs, skipped, workloads, summaries, results)
    out.append("")
    if notes:
        out += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    return "\n".join(out)


def report_header(args, env: Env, configs: list[Config], workloads, facts) -> list[str]:
    servers = (f"- every server: **{env.processes} processes x {env.threads} threads** "
               f"(Apache event MPM: {env.processes} children x ThreadsPerChild {env.threads}; "
               f"nginx: {env.processes} workers; mod_wsgi and Gateway daemons: processes={env.processes} "
               f"threads={env.threads}; Gateway in nginx: gateway_threads {env.threads}; "
               f"uWSGI: processes={env.processes} threads={env.threads}; "
               f"gunicorn: {env.processes} gthread workers x {env.threads} threads); no access logs")
    load = (f"- load: wrk -t1 -c{args.connections}, keep-alive, {args.duration} s per measurement after "
            f"{args.warmup} s warm-up, {args.rounds} interleaved round(s); loopback only")
    extra = [f"{w.name}: wrk -c{w.connections}" for w in workloads if w.connections]
    if extra:
        load += "; " + ", ".join(extra)
    lines = [f"- date: {facts['date']}", f"- machine: {facts['machine']}", f"- versions: {facts['versions']}",
             servers]
    if any(c.interface == "asgi" for c in configs):
        lines.append(f"- ASGI servers: {env.processes} worker processes, each serving its requests on one "
                     f"event loop: uvicorn --workers {env.processes} (uvloop, httptools) behind nginx "
                     f"(upstream keep-alive, HTTP/1.1) and Apache (mod_proxy_http), over a Unix socket; "
                     f"gunicorn --workers {env.processes} with uvicorn-worker's UvicornWorker, granian "
                     f"--interface asgi --workers {env.processes} --loop uvloop and hypercorn --workers "
                     f"{env.processes} --worker-class uvloop alone on the port; Gateway as for WSGI, "
                     f"mounts with interface=asgi")
    lines += [load,
              "- req/s, p50 and p99 are medians over rounds; errors are non-2xx responses plus socket errors "
              "summed over rounds; Python RSS is the peak, during the measurement, of the summed resident "
              "memory of the processes that run the application (total / largest single process, "
              "process count)",
              "- vs best peer: req/s divided by the best peer's on that workload: for a daemon row (the "
              "application in processes of its own) the best of the daemon-style peers, mod_wsgi daemon "
              "(Debian's and PyPI's), uWSGI (Debian's and PyPI's) and gunicorn; for an embedded row the best "
              "of those and mod_wsgi embedded (Debian's and PyPI's); their versions are in the versions line"
              + ("; for ASGI rows, the best of the ASGI peers (uvicorn behind nginx or Apache, gunicorn + "
                 "uvicorn worker, granian, hypercorn)" if any(c.interface == "asgi" for c in configs) else ""),
              ""]
    return lines


def best_peer(configs: list[Config], summaries: dict, workload: str, interface: str, mode: str = "embedded"):
    """(req/s, label, name) of the best peer of that interface on the workload, or None. A
    daemon row's best peer is the best daemon-style peer; any other row's the best of all."""
    peers = [(summaries[c.name][workload]["rps"], c.label, c.name) for c in configs
             if c.group == "peer" and c.interface == interface and summaries[c.name].get(workload)
             and (mode != "daemon" or c.mode == "daemon")]
    return max(peers) if peers else None


def report_table(args, w: Workload, configs, all_configs, summaries, results) -> list[str]:
    out = [f"## {w.title}", "",
           "| configuration | req/s | p50 ms | p99 ms | errors | Python RSS MiB | vs best peer |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c, reason in all_configs:
        if w.name not in c.workloads:
            continue
        if reason:
            out.append(f"| {c.label} | {reason} | | | | | |")
            continue
        s = summaries[c.name].get(w.name)
        if s is None:
            out.append(f"| {c.label} | {cell_text(results[c.name][w.name]['failure'] or 'no result')} | | | | | |")
            continue
        rss = (f"{s['rss_total'] / MIB:.0f} / {s['rss_process'] / MIB:.0f} ({s['python_processes']})"
               if s["python_processes"] else "-")
        best = best_peer(configs, summaries, w.name, c.interface, c.mode)
        ratio = f"{s['rps'] / best[0]:.2f}x" if best else "-"
        failure = results[c.name][w.name]["failure"]
        note = f" ({s['rounds']}/{args.rounds} rounds; then {cell_text(failure)})" if failure else ""
        out.append(f"| {c.label} | {s['rps']:.0f}{note} | {fmt_ms(s['p50_ms'])} | {fmt_ms(s['p99_ms'])} "
                   f"| {fmt_errors(s)} | {rss} | {ratio} |")
    out.append("")
    return out


def report_goals(configs, skipped: dict, workloads, summaries, results) -> list[str]:
    labels = {cls.name: cls.label for cls in CONFIGS}
    modes = {cls.name: cls.mode for cls in CONFIGS}
    interfaces = {cls.name: cls.interface for cls in CONFIGS}
    titles = {w.name: w.title for w in WORKLOADS}
    ran = {w.name for w in workloads}

    def why_missing(name, wname):
        for c, reason in skipped.items():
            if c.name == name:
                return f"{labels[name]} {reason}"
        if name not in summaries:
            return f"{labels[name]} not selected"
        cell = results[name].get(wname)
        if cell and cell["failure"]:
            return f"{labels[name]}: {cell_text(cell['failure'])}"
        return f"{labels[name]}: no result for {wname}"

    def peer_of(goal: Goal):
        """(summary, label of the peer chosen when there was a choice, why not measured)."""
        if goal.peer in (BEST_PEER, BEST_ASGI_PEER):
            best = best_peer(configs, summaries, goal.workload, interfaces[goal.ours], modes[goal.ours])
            if not best:
                return None, None, f"no {peer_text(goal)} measured"
            return summaries[best[2]][goal.workload], best[1], None
        names = goal.peer.names if isinstance(goal.peer, Peers) else (goal.peer,)
        measured = [(summaries[n][goal.workload]["rps"], n) for n in names if summaries.get(n, {}).get(goal.workload)]
        if not measured:
            return None, None, "; ".join(why_missing(n, goal.workload) for n in names)
        name = max(measured)[1]
        return summaries[name][goal.workload], labels[name] if len(names) > 1 else None, None

    def peer_text(goal: Goal) -> str:
        if goal.peer == BEST_PEER:
            return "best daemon-style peer" if modes[goal.ours] == "daemon" else "best peer"
        if isinstance(goal.peer, Peers):
            return f"the best {goal.peer.label}"
        return labels.get(goal.peer, goal.peer)

    out = []
    for goal in GOALS:
        if not goal.always and (goal.ours not in summaries or goal.workload not in ran):
            continue
        wanted = f"{ratio_text(goal.ratio)}x {peer_text(goal)}"
        if goal.p99:
            wanted += f", p99 <= {goal.p99:.1f}x its p99"
        line = f"- goal: {labels[goal.ours]} >= {wanted} ({titles[goal.workload]}): "
        a = summaries.get(goal.ours, {}).get(goal.workload)
        b, peer_label, peer_missing = peer_of(goal)
        if a and b:
            line += goal_verdict(goal, a, b, peer_label)
        else:
            reasons = [why_missing(goal.ours, goal.workload)] if not a else []
            if not b:
                reasons.append(peer_missing)
            line += "not measured (" + "; ".join(reasons) + ")"
        out.append(line)
    out += memory_lines(summaries, labels, titles)
    return out


def ratio_text(ratio: float) -> str:
    """A goal's ratio with one decimal, or two when it needs them (0.97)."""
    return f"{ratio:.1f}" if round(ratio, 1) == ratio else f"{ratio:.2f}"


def goal_verdict(goal: Goal, ours: dict, peer: dict, peer_label: str | None) -> str:
    ratio = ours["rps"] / peer["rps"]
    met = ratio >= goal.ratio
    which = f", {peer_label}" if peer_label else ""
    text = f"measured {ratio:.2f}x ({ours['rps']:.0f} vs {peer['rps']:.0f} req/s{which})"
    if goal.p99:
        if ours["p99_ms"] is None or not peer["p99_ms"]:
            text += ", p99 not measured"
            met = False
        else:
            tail = ours["p99_ms"] / peer["p99_ms"]
            met = met and tail <= goal.p99
            text += f", p99 {tail:.2f}x ({fmt_ms(ours['p99_ms'])} vs {fmt_ms(peer['p99_ms'])} ms)"
    return text + (" — met" if met else " — NOT met")


def memory_lines(summaries, labels, titles) -> list[str]:
    """The peak RSS of one process: Gateway's daemons next to the peers' processes."""
    wsgi_daemons = ["apache-gateway-daemon", "nginx-gateway-daemon", "apache-modwsgi-daemon", "apache-modwsgi6-daemon"]
    groups = [("hello", wsgi_daemons, True),
              ("flask", wsgi_daemons, True),
              ("hello", ["apache-gateway-asgi-daemon", "nginx-gateway-asgi-daemon", "nginx-uvicorn",
                         "gunicorn-uvicorn", "granian", "hypercorn"], False),
              ("sleep256", ["apache-gateway-asgi-daemon", "nginx-gateway-asgi-daemon", "nginx-uvicorn",
                            "gunicorn-uvicorn", "granian", "hypercorn"], False)]
    out = []
    for wname, names, always in groups:
        measured = {n: summaries.get(n, {}).get(wname) for n in names}
        # The WSGI lines are always shown, as before; the ASGI ones when anything of theirs ran.
        if not always and not any(measured.values()):
            continue
        parts = [f"{labels[n]} {s['rss_process'] / MIB:.1f} MiB" if s and s["python_processes"]
                 else f"{labels[n]} not measured" for n, s in measured.items()]
        what = "one daemon process" if always else "one process (daemon, or a server's largest)"
        out.append(f"- memory, peak RSS of {what} ({titles[wname]}): " + "; ".join(parts))
    return out


def command_output(argv) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def gather_facts(env: Env) -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / MIB:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    distro = ""
    try:
        distro = re.search(r'PRETTY_NAME="([^"]*)"', Path("/etc/os-release").read_text()).group(1)
    except (OSError, AttributeError):
        pass

    def first(argv, pattern=None):
        text = command_output(argv)
        if pattern:
            m = re.search(pattern, text)
            return m.group(1) if m else "?"
        return text.splitlines()[0] if text else "?"

    py = str(env.venv / "bin" / "python")
    flask = "import importlib.metadata as m; print(m.version('flask'))"
    pypi_version = ("import importlib.metadata as m\n"
                    "try: print(m.version('{}'))\n"
                    "except m.PackageNotFoundError: print('not installed')")
    asgi = ("import importlib.metadata as m\n"
            f"for name in {ASGI_PACKAGES!r}:\n"
            "    try: print(name, m.version(name), end=', ')\n"
            "    except m.PackageNotFoundError: print(name, 'not installed', end=', ')")
    versions = [
        ("Apache", first(["apache2", "-v"], r"Apache/(\S+)")),
        ("nginx", first(["nginx", "-v"], r"nginx/(\S+)")),
        ("mod_wsgi (Debian)", first(["dpkg-query", "-W", "-f", "${Version}", "libapache2-mod-wsgi-py3"])),
        ("mod_wsgi (PyPI)", first([py, "-c", pypi_version.format("mod_wsgi")])),
        ("uWSGI (Debian)", first(["/usr/bin/uwsgi", "--version"])),
        ("uWSGI (PyPI)", first([py, "-c", pypi_version.format("uwsgi")])),
        ("gunicorn", first([py, "-c", "import gunicorn; print(gunicorn.__version__)"])),
        ("Flask", first([py, "-c", flask])),
        ("Python", first([py, "-c", "import platform; print(platform.python_version())"])),
        ("wrk", first(["wrk", "-v"], r"wrk (\S+)")),
        ("Gateway", first(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
         + ("" if env.modules == DEFAULT_MODULES else " (modules from another directory, --modules)")),
        ("", first([py, "-c", asgi]).rstrip(", ")),
    ]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": ", ".join(x for x in [cpu, f"{os.cpu_count()} CPUs", mem, distro,
                                         f"Linux {platform.release()}"] if x),
        "versions": ", ".join(f"{name} {version}".strip() for name, version in versions),
    }


# --------------------------------------------------------------------------- main


class Interrupted(BaseException):
    """A signal or the time limit: not an error of the configuration being measured."""


def on_signal(signum, frame):
    if signum == signal.SIGALRM:
        raise Interrupted("stopped: the time limit (--time-limit) was reached")
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def prepare_workdir(env: Env):
    shutil.copytree(APPS, env.apps, ignore=shutil.ignore_patterns("__pycache__"))
    env.static.mkdir()
    for w in WORKLOADS:
        if w.static is not None:
            (env.static / w.path.lstrip("/")).write_bytes(w.static)
    for p in [env.workdir, *env.workdir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 1 s per measurement, no warm-up (1-2 minutes)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=int, help="seconds per measurement (default 4)")
    p.add_argument("--warmup", type=int, help="seconds of discarded load before each measurement (default 1)")
    p.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections (default 32)")
    p.add_argument("--processes", type=int, default=2, help="server/daemon processes everywhere (default 2)")
    p.add_argument("--threads", type=int, default=16, help="threads per process everywhere (default 16)")
    p.add_argument("--only", help="comma-separated configuration names (default: all); see --list")
    p.add_argument("--workloads", help="comma-separated workload names (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list configurations and workloads, then exit")
    p.add_argument("--modules", type=Path, default=DEFAULT_MODULES,
                   help="where the Gateway modules are (default: target/modules of this checkout)")
    default_venv = os.environ.get("GATEWAY_BENCH_VENV", "/var/tmp/gateway-bench-venv")
    p.add_argument("--venv", type=Path, default=Path(default_venv),
                   help="virtualenv with bench/requirements.txt, readable by www-data (bench/run makes it)")
    p.add_argument("--output", type=Path, help="also write the Markdown report to this file")
    p.add_argument("--json", type=Path, help="write every raw measurement to this file")
    p.add_argument("--time-limit", type=int, help="hard limit in seconds for the whole run "
                                                  "(default: twice the estimate, at least 10 minutes)")
    args = p.parse_args(argv)
    defaults = (1, 1, 0) if args.quick else (3, 4, 1)
    for name, value in zip(("rounds", "duration", "warmup"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.duration < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--duration and --rounds must be at least 1, --warmup at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for cls in CONFIGS:
            print(f"{cls.name:30} {cls.interface.upper() if cls.group != 'ceiling' else '':5} {cls.label}")
        print()
        for w in WORKLOADS:
            runs = [i.upper() for i, names in (("wsgi", WSGI_WORKLOADS), ("asgi", ASGI_WORKLOADS)) if w.name in names]
            print(f"{w.name:30} {'+'.join(runs):10} {w.title}")
        return 0
    if os.geteuid() != 0:
        log("bench: run as root: the servers start as root and drop to www-data, like Debian's")
        return 2
    workloads = WORKLOADS
    if args.workloads:
        wanted = args.workloads.split(",")
        unknown = set(wanted) - {w.name for w in WORKLOADS}
        if unknown:
            log(f"bench: unknown workload(s): {', '.join(sorted(unknown))} (see --list)")
            return 2
        workloads = [w for w in WORKLOADS if w.name in wanted]
    classes = CONFIGS
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {c.name for c in CONFIGS}
        if unknown:
            log(f"bench: unknown configuration(s): {', '.join(sorted(unknown))} (see --list)")
            return 2
        classes = [c for c in CONFIGS if c.name in wanted]
    if shutil.which("wrk") is None:
        log("bench: wrk not found (apt-get install wrk, or use bench/run)")
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    env = Env(modules=args.modules.resolve(), venv=args.venv, processes=args.processes,
              threads=args.threads, workdir=workdir)
    configs, skipped = [], {}
    for cls in classes:
        c = cls(env)
        reason = c.missing()
        if reason:
            skipped[c] = reason
            log(f"{c.label}: {reason}")
        else:
            configs.append(c)

    runs = sum(len([w for w in workloads if w.name in c.workloads]) for c in configs)
    estimate = int(args.rounds * (runs * (args.duration + args.warmup + 0.3) + len(configs) * 2))
    limit = args.time_limit or max(600, 2 * estimate)
    log(f"bench: {len(configs)} configurations, {len(workloads)} workloads, {args.rounds} round(s): "
        f"about {estimate // 60} min {estimate % 60} s (hard limit {limit} s)")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, on_signal)
    signal.alarm(limit)
    results, notes, interrupted = {}, [], None
    try:
        prepare_workdir(env)
        facts = gather_facts(env)
        bench = Bench(args, env)
        run_rounds(bench, configs, workloads, args.rounds, results, notes)
    except Interrupted as exc:
        interrupted = str(exc)
        log(f"bench: {exc}; cleaning up")
    finally:
        signal.alarm(0)
        # Ignore further signals while the servers stop, so clean-up is not cut short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for c in configs:
            c.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        if not results:
            return 130
        # Report what was measured, marked as incomplete.
        for c in configs:
            results.setdefault(c.name, {w.name: {"rounds": [], "failure": None} for w in workloads})
            for cell in results[c.name].values():
                if not cell["rounds"] and not cell["failure"]:
                    cell["failure"] = "not run (interrupted)"
    text = report(args, env, configs, skipped, workloads, results, facts, notes, interrupted)
    print(text)
    if args.output:
        args.output.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "notes": notes}, indent=1))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
