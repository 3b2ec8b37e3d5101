"""Answers with the process environment (os.environ) as JSON."""

import json
import os


def application(environ, start_response):
    body = json.dumps(dict(os.environ)).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
