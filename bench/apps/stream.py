"""A 10 MiB response streamed in 64 KiB chunks (one yield per chunk)."""

CHUNK = b"x" * 65536
CHUNKS = 160  # 160 x 64 KiB = 10 MiB


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(CHUNK) * CHUNKS))])
    for _ in range(CHUNKS):
        yield CHUNK
