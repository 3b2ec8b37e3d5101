"""Applications for the nginx hardening tests (issue 10, item 9): apps that start
a child process which outlives the request, the way a background job would."""

import os
import subprocess
import time


def reply(start_response, child):
    body = f"child {child}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def spawn(environ, start_response):
    """Starts `sleep 30` that inherits every descriptor the server left inheritable."""
    child = subprocess.Popen(["sleep", "30"], close_fds=False)
    return reply(start_response, child.pid)


def fork(environ, start_response):
    """Forks a copy of the server process that sleeps 30 s, as os.fork() background
    jobs (and multiprocessing's fork start method) do."""
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(30)
        finally:
            os._exit(0)
    return reply(start_response, pid)
