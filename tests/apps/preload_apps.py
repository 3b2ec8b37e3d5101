"""An application for the preload tests: says when it was imported, and fails to
import while a file named `preload-broken` sits next to it."""

import json
import os
import time

IMPORTED_AT = time.time()

if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "preload-broken")):
    raise RuntimeError("preload test: broken on purpose")


def application(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "imported_at": IMPORTED_AT, "now": time.time()}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
