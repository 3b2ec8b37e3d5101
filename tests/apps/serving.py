"""Applications for the server-specific tests: where requests run, and large
streamed responses."""

import json
import os
import threading
from urllib.parse import parse_qs


def whoami(environ, start_response):
    """The process and native thread that ran the application."""
    body = json.dumps({
        "pid": os.getpid(),
        "tid": threading.get_native_id(),
        "thread": threading.current_thread().name,
        "script_name": environ["SCRIPT_NAME"],
        "path_info": environ["PATH_INFO"],
        "protocol": environ["SERVER_PROTOCOL"],
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class _Blocks:
    """N blocks of 64 KiB; close() leaves a marker named by the request's token."""

    def __init__(self, count, token):
        self.left = count
        self.token = token

    def __iter__(self):
        return self

    def __next__(self):
        if self.left == 0:
            raise StopIteration
        self.left -= 1
        return BLOCK

    def close(self):
        if self.token:
            with open(os.path.join(MARKERS, os.path.basename(self.token)), "w") as f:
                f.write(str(self.left))


BLOCK = b"x" * 65536
MARKERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "markers")


def big(environ, start_response):
    """?mib=N MiB (or ?blocks=N) of data, 64 KiB at a time; ?token=T: close() writes marker T."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    blocks = int(query.get("mib", ["200"])[0]) * 16 if "blocks" not in query else int(query["blocks"][0])
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(blocks << 16))])
    return _Blocks(blocks, query.get("token", [""])[0])
