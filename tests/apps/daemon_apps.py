"""Applications for the daemon-mode tests: who and where a daemon process is,
slow and stuck requests, big streamed bodies."""

import json
import os
import re
import sys
import time
from urllib.parse import parse_qs

MARKERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "markers")


def query(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def reply(start_response, obj, status="200 OK"):
    body = json.dumps(obj).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def whoami(environ, start_response):
    """The process serving the request: identity, interpreter, mode."""
    return reply(start_response, {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "prefix": sys.prefix,
        "mode": environ.get("gateway.mode"),
        "group": environ.get("gateway.process_group"),
    })


def slow(environ, start_response):
    """Sleeps ?s= seconds, then says which process served it. With ?token=, first
    leaves that marker, so a test knows the request is running."""
    q = query(environ)
    if "token" in q:
        with open(os.path.join(MARKERS, os.path.basename(q["token"])), "w") as f:
            f.write("started")
    time.sleep(float(q.get("s", "1")))
    return reply(start_response, {"pid": os.getpid()})


def stuck(environ, start_response):
    """Never finishes on its own (in short sleeps, so Python can interrupt it);
    records the exception that ended it."""
    token = query(environ).get("token", "stuck")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.05)
    except BaseException as e:
        with open(os.path.join(MARKERS, os.path.basename(token)), "w") as f:
            f.write(type(e).__name__)
        raise
    return reply(start_response, {"finished": True})


def download(environ, start_response):
    """Streams ?mb= MiB of a repeating pattern without holding it in memory."""
    mb = int(query(environ).get("mb", "1"))
    block = bytes(range(256)) * 4096  # 1 MiB
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(mb * len(block)))])
    return (block for _ in range(mb))


def upload(environ, start_response):
    """Reads the body in blocks and reports its length and the process's peak memory."""
    stream = environ["wsgi.input"]
    total = 0
    while True:
        data = stream.read(1 << 20)
        if not data:
            break
        total += len(data)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return reply(start_response, {"length": total, "peak_kib": hwm, "pid": os.getpid()})


def sleeper(environ, start_response):
    """Sleeps ?s= seconds in one call: C code that an exception raised from
    another thread cannot interrupt."""
    time.sleep(float(query(environ).get("s", "30")))
    return reply(start_response, {"pid": os.getpid()})


def redos(environ, start_response):
    """A catastrophic regex: ?n= characters keep the GIL inside C code for
    seconds (each one more doubles it), then the response is written."""
    n = int(query(environ).get("n", "28"))
    matched = re.match(r"(a+)+$", "a" * n + "b")
    return reply(start_response, {"matched": bool(matched), "pid": os.getpid()})
