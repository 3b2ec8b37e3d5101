"""Applications for the max-memory tests: one that holds on to memory it is asked to."""

import json
import os
from urllib.parse import parse_qs

_held = []


def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)


def grow(environ, start_response):
    """Keeps `?mib=N` more MiB (touched, so resident) and answers the pid and RSS."""
    mib = int(parse_qs(environ.get("QUERY_STRING", "")).get("mib", ["0"])[0])
    if mib:
        _held.append(bytearray(b"x" * (mib * 1024 * 1024)))
    body = json.dumps({"pid": os.getpid(), "rss": resident_mib()}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
