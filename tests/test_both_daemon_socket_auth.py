"""Who may use a daemon group's socket. Any process of the server's worker user
can connect to it (a PHP or CGI script as much as the server's own workers), so
the daemons serve only peers that prove the secret of the server's
configuration, run only the applications mounted on their group, and do not
let a peer that stalls in its first frame hold their threads. Every test runs
on Apache and nginx, attacking as www-data; the frames are built here the way
src/daemon/protocol.rs builds them."""

import re
import secrets
import struct
import subprocess
import time

from harness import WWW_DATA, daemon_app, get_json, python_as, timed_get

VERSION = 4
HELLO, REQUEST, START, UNAVAILABLE, AUTH = 1, 2, 5, 11, 12


def frame(kind, payload, version=VERSION):
    return struct.pack(">BBHI", version, kind, 0, len(payload)) + payload


def field(b):
    return struct.pack(">I", len(b)) + b


def request_head(uri):
    """A request head as put_request encodes it after its application field."""
    return b"".join([
        struct.pack(">QB", time.monotonic_ns() // 1000, 0),
        field(b"GET"), field(b""), field(uri), field(b""), field(uri), field(b"HTTP/1.1"),
        field(b"localhost"), struct.pack(">H", 80), field(b"127.0.0.1"), field(b"127.0.0.1"),
        struct.pack(">H", 40000), b"\0", b"\0", b"\0",
        struct.pack(">I", 0), struct.pack(">I", 0),
    ])


def old_request(script, callable_="application"):
    """A request frame of protocol version 2, which named the script to import."""
    return frame(REQUEST, field(str(script).encode()) + field(callable_.encode()) + request_head(b"/x"), version=2)


def request(index):
    return frame(REQUEST, struct.pack(">I", index) + request_head(b"/x"))


def frame_kinds(data):
    kinds = []
    while len(data) >= 8:
        _, kind, _, length = struct.unpack(">BBHI", data[:8])
        kinds.append(kind)
        data = data[8 + length:]
    return kinds


# Runs as www-data: sends bytes on a group's socket and prints what came back,
# or opens connections that each send a few bytes and keeps them open.
ATTACKER = r"""
import os, socket, sys
path, mode, data = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
print(os.getpid(), flush=True)
if mode == "stall":
    conns = []
    for _ in range(int(sys.argv[4])):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(data)
        conns.append(s)
    print("ready", flush=True)
    sys.stdin.read()
else:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(3)
    s.connect(path)
    s.sendall(data)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except OSError:
        pass
    print(got.hex(), flush=True)
"""


def as_www_data(*args, **kw):
    return subprocess.Popen(python_as(WWW_DATA, ATTACKER, *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, **kw)


def send_as_www_data(sock, data):
    """Sends `data` on `sock` as www-data: its pid and the frame kinds it got back."""
    proc = as_www_data(sock, "send", data.hex())
    out, _ = proc.communicate(timeout=20)
    pid, got = out.split("\n")[:2]
    return int(pid), frame_kinds(bytes.fromhex(got))


def group_socket(srv, group="g"):
    (sock,) = srv.runtime_dir.glob(f"gateway-*/{group}.sock")
    return sock


def test_a_socket_peer_cannot_make_a_daemon_run_its_own_script(make_daemon_server):
    """A www-data process that names its own script in a request frame does not
    get it run by a group of another user, with the protocol of the attack
    (version 2) or with this one without the secret; each attempt is refused
    with a warning naming the peer, and the server's requests go on."""
    srv = make_daemon_server([daemon_app("/who", "whoami")], {"g": "processes=1 threads=2 user=nobody group=nogroup"})
    marker = srv.marker("evil-ran")
    evil = srv.dir / "evil.py"
    evil.write_text(f"import os\nopen({str(marker)!r}, 'w').write(str(os.getuid()))\n"
                    "def application(environ, start_response):\n"
                    "    start_response('200 OK', [])\n    return [b'pwned']\n")
    evil.chmod(0o644)
    attacks = {
        "old protocol naming the script": old_request(evil),
        "request without authenticating": request(0),
        "wrong secret": frame(AUTH, secrets.token_bytes(32)) + request(0),
    }
    with srv:
        assert get_json(srv, "/who")["group"] == "g"
        sock = group_socket(srv)
        for name, data in attacks.items():
            pid, kinds = send_as_www_data(sock, data)
            assert not marker.exists(), f"the daemon ran the attacker's script ({name})"
            assert START not in kinds, (name, kinds)
            assert kinds == [HELLO, UNAVAILABLE], (name, kinds)
            log = srv.wait_for_log(f"refused a connection from pid {pid}, uid {WWW_DATA.pw_uid}")
            assert re.search(rf"(\[gateway:warn\]|\[warn\]).* daemon process \d+ of group 'g' refused a connection "
                             rf"from pid {pid}, uid {WWW_DATA.pw_uid}: ", log), name
        assert get_json(srv, "/who")["group"] == "g"


def test_stalled_first_frames_do_not_make_a_group_unavailable(make_daemon_server):
    """More connections than the group has threads, each sending one byte of a
    frame header and nothing more, delay a normal request by no more than a
    moment, and are closed with a warning once the greeting timeout passed."""
    srv = make_daemon_server([daemon_app("/who", "whoami")], {"g": "processes=1 threads=2"})
    with srv:
        get_json(srv, "/who")
        proc = as_www_data(group_socket(srv), "stall", bytes([VERSION]).hex(), 6)
        try:
            pid = int(proc.stdout.readline())
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.3)
            for _ in range(3):
                status, seconds = timed_get(srv, "/who", timeout=10)
                assert (status, seconds < 2) == (200, True), seconds
            # Each of the six is closed once the greeting timeout passed.
            stalled = f"from pid {pid}, uid {WWW_DATA.pw_uid}: it did not authenticate within 5.0s"
            deadline = time.monotonic() + 15
            while srv.log_text().count(stalled) < 6 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert srv.log_text().count(stalled) == 6, srv.log_text()[-3000:]
            assert get_json(srv, "/who")["group"] == "g"
        finally:
            proc.kill()
            proc.wait()
