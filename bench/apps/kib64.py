"""A 64 KiB response in one piece."""

BODY = b"x" * 65536


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(BODY)))])
    return [BODY]
