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


def big(environ, start_response):
    """?mib=N MiB of data from a generator, 64 KiB at a time."""
    mib = int(parse_qs(environ.get("QUERY_STRING", "")).get("mib", ["200"])[0])
    block = b"x" * 65536
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(mib << 20))])

    def chunks():
        for _ in range(mib * 16):
            yield block

    return chunks()
