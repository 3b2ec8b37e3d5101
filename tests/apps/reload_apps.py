"""An application for the reload-on-change tests: answers its pid and the value of a
module it imports from its own directory."""

import json
import os

import reload_helper


def application(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "value": reload_helper.VALUE}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
