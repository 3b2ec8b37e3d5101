"""A child process an embedded application starts (subprocess with close_fds=False,
os.fork) must not hold the server's descriptors: the client of the request that
started it sees its connection end as soon as the response is complete, and the
server's port is closed once the server stops, whatever the child does."""

import os
import re
import signal
import socket
import time

import pytest

from harness import MODULE, Apache, Mount, Nginx, battery_settings, skip_unless_built


@pytest.fixture(params=sorted(MODULE))
def make_server(request):
    kind = request.param
    skip_unless_built(kind, daemon=False)

    def build(app):
        mounts = [Mount("/child", "nginx_sec_apps.py", app)]
        if kind == "apache":
            return Apache(mounts, battery_settings(), mpm="event")
        return Nginx(mounts, battery_settings(), workers=1)

    return build


def request_until_eof(port, timeout=15.0):
    """An HTTP/1.0 request (the server closes after the response); returns the
    bytes received and how long the connection took to reach end of file."""
    start = time.monotonic()
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET /child HTTP/1.0\r\nHost: x\r\n\r\n")
        try:
            while chunk := s.recv(65536):
                data += chunk
        except socket.timeout:
            pass
    return data, time.monotonic() - start


def child_of(data):
    match = re.search(rb"child (\d+)$", data)
    assert match, data
    return int(match.group(1))


def kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("app", ["spawn", "fork"])
def test_the_client_sees_the_end_of_the_response_while_the_child_runs(make_server, app):
    srv = make_server(app)
    with srv:
        data, seconds = request_until_eof(srv.port)
        child = child_of(data)
        try:
            assert data.startswith(b"HTTP/1.1 200"), data
            assert os.path.exists(f"/proc/{child}"), "the child should still be sleeping"
            # Before: the connection stayed open for the child's 30 s.
            assert seconds < 5, f"the connection stayed open {seconds:.1f}s while the app's child ran"
        finally:
            kill(child)


@pytest.mark.parametrize("app", ["spawn", "fork"])
def test_a_stopped_server_leaves_no_listening_socket_to_the_child(make_server, app):
    srv = make_server(app)
    with srv:
        data, _ = request_until_eof(srv.port)
        child = child_of(data)
    try:
        assert os.path.exists(f"/proc/{child}"), "the child should still be sleeping"
        # Before: the child held the listening socket, so clients connected to a
        # stopped server and waited for an answer that never came.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
    finally:
        kill(child)
