"""Sleeps 50 ms per request: measures how many requests a server keeps in flight."""

import time


def application(environ, start_response):
    time.sleep(0.05)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"slept"]
