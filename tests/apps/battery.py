"""WSGI applications for the test battery, one callable per behaviour.

Well-behaved applications are wrapped in wsgiref.validate.validator: any PEP 3333
violation by the server (environ, input, start_response, write) raises inside the
application and turns the response into a 500, which the tests notice.
Deliberately broken applications are not wrapped.
"""

import hashlib
import json
import os
import sys
import threading
import time
from urllib.parse import parse_qs
from wsgiref.validate import validator

MARKERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "markers")


def query(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def touch(name, text=""):
    with open(os.path.join(MARKERS, os.path.basename(name)), "w") as f:
        f.write(text)


def wait_for(name, timeout=10.0):
    path = os.path.join(MARKERS, os.path.basename(name))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.01)
    return False


def plain(start_response, body, status="200 OK", extra=()):
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))] + list(extra))
    return [body]


@validator
def hello(environ, start_response):
    return plain(start_response, b"Hello, world!")


@validator
def environ(environ, start_response):
    """The environ as JSON: str values as they are, other values by type."""
    out = {}
    for key, value in environ.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, (bool, int)) or (isinstance(value, tuple) and all(isinstance(v, int) for v in value)):
            out[key] = value
        else:
            out[key] = f"<{type(value).__name__}>"
    out["_input_type"] = type(environ["wsgi.input"]).__name__
    body = json.dumps(out).encode()
    return plain(start_response, body, extra=[("Content-Type-Check", "json")])


def echo(environ, start_response):
    """Reads the body the way ?how= says and reports its length and digest.
    (Not validated: the validator forbids read() without a size, which
    wsgi.input_terminated allows; echo_validated covers the other ways.)"""
    how = query(environ).get("how", "read")
    stream = environ["wsgi.input"]
    h = hashlib.sha256()
    total = 0
    if how == "read":
        data = stream.read()
        chunks = [data]
    elif how == "readn":
        chunks = []
        while True:
            data = stream.read(65536)
            if not data:
                break
            chunks.append(data)
    elif how == "readline":
        chunks = []
        while True:
            line = stream.readline()
            if not line:
                break
            chunks.append(line)
    elif how == "readline_n":
        chunks = []
        while True:
            line = stream.readline(7)
            if not line:
                break
            assert len(line) <= 7, len(line)
            chunks.append(line)
    elif how == "readlines":
        chunks = stream.readlines()
    elif how == "iter":
        chunks = list(stream)
    else:
        raise ValueError(how)
    for c in chunks:
        h.update(c)
        total += len(c)
    body = json.dumps({"length": total, "sha256": h.hexdigest(), "pieces": len(chunks),
                       "content_length": environ.get("CONTENT_LENGTH"),
                       "input_terminated": environ.get("wsgi.input_terminated")}).encode()
    return plain(start_response, body)


echo_validated = validator(echo)


@validator
def stream(environ, start_response):
    """Yields a chunk, then waits until the client says it received it."""
    token = query(environ)["token"]
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        yield b"first;"
        yield b"acked;" if wait_for(token) else b"timeout;"
        yield b"done"

    return body()


@validator
def writer(environ, start_response):
    """The write() callable, then an empty iterable."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written ")
    write(b"by write()")
    return []


class Tracked:
    """An iterable whose close() leaves a marker."""

    def __init__(self, name, chunks, delay=0.0):
        self.name, self.chunks, self.delay = name, chunks, delay

    def __iter__(self):
        for i in range(self.chunks):
            if i and self.delay:
                time.sleep(self.delay)
            yield b"x" * 65536

    def close(self):
        touch(self.name, "closed")


@validator
def closing(environ, start_response):
    """close() must be called; ?chunks=N&delay=S make it long for client-abort tests."""
    q = query(environ)
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return Tracked(q["token"], int(q.get("chunks", "1")), float(q.get("delay", "0")))


class CountingFile:
    """A file whose read() leaves a marker: the server's file path never calls it."""

    def __init__(self, path, token):
        self.f = open(path, "rb")
        self.token = token

    def read(self, n=-1):
        touch(self.token + ".read")
        return self.f.read(n)

    def fileno(self):
        return self.f.fileno()

    def tell(self):
        return self.f.tell()

    def close(self):
        touch(self.token + ".closed")
        self.f.close()


def filewrapper(environ, start_response):
    """Returns wsgi.file_wrapper unchanged, so the server may send the file itself.
    (The validator would hide the wrapper: filewrapper_validated covers iteration.)"""
    q = query(environ)
    path = os.path.join(MARKERS, q["file"])
    f = CountingFile(path, q["token"])
    if "offset" in q:
        f.f.seek(int(q["offset"]))
    headers = [("Content-Type", "application/octet-stream")]
    if "length" in q:
        headers.append(("Content-Length", q["length"]))
    start_response("200 OK", headers)
    return environ["wsgi.file_wrapper"](f, 65536)


filewrapper_validated = validator(filewrapper)


@validator
def cookies(environ, start_response):
    n = int(query(environ).get("n", "20"))
    return plain(start_response, b"cookies", extra=[("Set-Cookie", f"c{i}={i}; Path=/") for i in range(n)])


@validator
def status(environ, start_response):
    code = query(environ).get("code", "404 Not Here")
    return plain(start_response, code.encode(), status=code)


@validator
def exc_info_before(environ, start_response):
    """Replaces its response with exc_info before anything was sent."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    try:
        raise RuntimeError("handled failure")
    except RuntimeError:
        start_response("500 Handled Error", [("Content-Type", "text/plain")], sys.exc_info())
    return [b"handled: custom error page"]


def exc_info_after(environ, start_response):
    """exc_info after the headers went out: start_response must re-raise."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"partial ")
    try:
        raise RuntimeError("late failure after headers")
    except RuntimeError:
        start_response("500 Error", [("Content-Type", "text/plain")], sys.exc_info())
    return [b"never sent"]


@validator
def threadlocal(environ, start_response):
    """Counts requests per thread with threading.local: it only grows when the
    thread keeps its Python thread state between requests."""
    state = _local.__dict__
    state["count"] = state.get("count", 0) + 1
    body = json.dumps({"count": state["count"], "thread": threading.get_ident(), "pid": os.getpid()}).encode()
    return plain(start_response, body)


_local = threading.local()


@validator
def slow(environ, start_response):
    seconds = float(query(environ).get("s", "2"))
    time.sleep(seconds)
    return plain(start_response, b"slept")


@validator
def extensions(environ, start_response):
    import _decimal
    import _sqlite3
    import _ssl
    info = {"ssl": _ssl.OPENSSL_VERSION, "sqlite": _sqlite3.sqlite_version, "decimal": _decimal.__version__,
            "prefix": sys.prefix, "base_prefix": sys.base_prefix, "executable": sys.executable}
    try:
        import numpy
        info["numpy"] = numpy.__version__
        info["numpy_sum"] = int(numpy.arange(10).sum())
    except ImportError:
        info["numpy"] = None
    try:
        import helper_module
        info["helper"] = helper_module.VALUE
    except ImportError:
        info["helper"] = None
    info["signal_handlers"] = {
        name: str(__import__("signal").getsignal(getattr(__import__("signal"), name)))
        for name in ("SIGINT", "SIGTERM")
    }
    return plain(start_response, json.dumps(info).encode())


@validator
def empty(environ, start_response):
    start_response("204 No Content", [])
    return []


# --- Broken applications (not wrapped in the validator) ---

def raise_before(environ, start_response):
    raise ValueError("boom before start_response")


def raise_after(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    raise ValueError("boom after start_response")


def bad_status(environ, start_response):
    start_response(200, [("Content-Type", "text/plain")])
    return [b"never"]


def crlf_header(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Injected", "a\r\nSet-Cookie: evil=1")])
    return [b"never"]


def str_body(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return ["a str, not bytes"]


def raise_midway(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        yield b"first part;"
        raise ValueError("boom halfway through the body")

    return body()


def no_start_response(environ, start_response):
    return [b"who needs headers"]


def returns_none(environ, start_response):
    start_response("200 OK", [])
    return None


def close_raises(environ, start_response):
    class Body:
        def __iter__(self):
            yield b"body"

        def close(self):
            raise RuntimeError("close() failed")

    start_response("200 OK", [("Content-Type", "text/plain")])
    return Body()


def single(environ, start_response):
    """One-item list, no Content-Length from the application. (Not validated:
    the validator would hide the list behind its own iterator.)"""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"one piece"]


@validator
def prints(environ, start_response):
    """print() and sys.stderr end up in the error log as gateway: lines."""
    tag = query(environ)["tag"]
    print(f"stdout says {tag}")
    sys.stderr.write(f"stderr says {tag}\n")
    # Bytes, as Mercurial writes them, with a character split across two writes.
    euro = "\u20ac".encode()
    sys.stdout.buffer.write(f"stdout.buffer says {tag} ".encode() + euro[:1])
    sys.stdout.buffer.write(euro[1:] + b"\n")
    sys.stderr.buffer.write(f"stderr.buffer says {tag}\n".encode())
    sys.stderr.buffer.flush()
    environ["wsgi.errors"].write(f"wsgi.errors says {tag}\n")
    environ["wsgi.errors"].flush()
    return plain(start_response, b"printed")


@validator
def typed(environ, start_response):
    """A page of 4 KiB with the Content-Type given in ?type=."""
    body = b"<p>" + b"gateway " * 512 + b"</p>"
    start_response("200 OK", [("Content-Type", query(environ)["type"])])
    return [body]


SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"


def framing(environ, start_response):
    """Responses whose head and body disagree, or that no client may receive (not
    validated: they break PEP 3333 on purpose). ?case= picks one."""
    case = query(environ).get("case", "")
    if case == "long":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"Hello", SMUGGLED]
    if case == "long_text":
        # The common real trigger: len() of a str counts characters, not bytes.
        text = "caf\u00e9 cr\u00e8me"
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(text)))])
        return [text.encode()]
    if case == "short":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
        return [b"abc"]
    if case.isdigit():
        start_response(f"{case} Whatever", [("Content-Type", "text/plain"), ("Content-Length", str(len(SMUGGLED)))])
        return [SMUGGLED]
    if case == "bad_length":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12abc")])
        return [b"hello"]
    if case == "huge_head":
        start_response("200 OK", [(f"X-H{i}", "v" * 100) for i in range(10_000)])
        return [b"too big"]
    if case in ("vt", "ff", "del"):
        ctl = {"vt": "\x0b", "ff": "\x0c", "del": "\x7f"}[case]
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Ctl", f"a{ctl}b")])
        return [b"control"]
    if case == "log":
        environ["wsgi.errors"].write("errors: \x1b[31mred\rforged line\n")
        print("stdout: \x1b]0;title\x07 done", flush=True)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
        return [b"logged"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"unknown case"]
