"""Gateway's demo application: says where it runs and echoes what it is sent."""

import os
import sys


def application(environ, start_response):
    body = environ["wsgi.input"].read()
    lines = [
        "Hello from Gateway!",
        f"server:        {environ['gateway.server']}",
        f"mode:          {environ['gateway.mode']}",
        f"process group: {environ['gateway.process_group'] or '-'}",
        f"pid:           {os.getpid()}",
        f"python:        {sys.version.split()[0]} ({sys.prefix})",
        f"request:       {environ['REQUEST_METHOD']} {environ['SCRIPT_NAME']}{environ['PATH_INFO']}",
        f"body bytes:    {len(body)}",
    ]
    out = ("\n".join(lines) + "\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(out)))])
    return [out]
