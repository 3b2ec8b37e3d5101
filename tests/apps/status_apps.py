"""Applications for the status page tests: answers with a chosen status, fails,
or runs slowly, and says which process served it."""

import json
import os
import time
from urllib.parse import parse_qs

MARKERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "markers")


def query(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def reply(start_response, obj, status="200 OK"):
    body = json.dumps(obj).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def code(environ, start_response):
    """Answers with status ?code= (200 by default) and its pid."""
    status = int(query(environ).get("code", "200"))
    return reply(start_response, {"pid": os.getpid()}, f"{status} Status {status}")


def boom(environ, start_response):
    """Fails before it answers: the server sends a 500."""
    raise RuntimeError("boom, on purpose")


def slow(environ, start_response):
    """Leaves marker ?token= holding its pid, then sleeps ?s= seconds."""
    q = query(environ)
    with open(os.path.join(MARKERS, os.path.basename(q["token"])), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(float(q.get("s", "1")))
    return reply(start_response, {"pid": os.getpid()})
