"""Reads the request body in 64 KiB pieces and answers with the number of bytes read."""


def application(environ, start_response):
    remaining = int(environ.get("CONTENT_LENGTH") or 0)
    stream = environ["wsgi.input"]
    total = 0
    while remaining > 0:
        piece = stream.read(min(65536, remaining))
        if not piece:
            break
        total += len(piece)
        remaining -= len(piece)
    body = str(total).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
