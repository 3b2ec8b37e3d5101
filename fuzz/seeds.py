#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz corpus: well-formed exchanges in the wire
format of src/daemon/protocol.rs, from which the fuzzer mutates. Run it again
when the format changes (VERSION below follows protocol::VERSION)."""

import hashlib
import re
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = int(re.search(r"pub const VERSION: u8 = (\d+);",
                        (HERE.parent / "src/daemon/protocol.rs").read_text()).group(1))
HELLO, REQUEST, BODY, PULL, START, DATA, ABORT, END, LOG, TIMEOUT, UNAVAILABLE, AUTH = range(1, 13)


def frame(kind, payload=b"", flags=0):
    return struct.pack(">BBHI", VERSION, kind, flags, len(payload)) + payload


def s(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack(">I", len(b)) + b


def start(status, line, headers):
    out = struct.pack(">H", status) + s(line) + struct.pack(">I", len(headers))
    for name, value in headers:
        out += s(name) + s(value)
    return frame(START, out)


def end(outcome=0):
    return frame(END, bytes([outcome]))


def server_side():
    """Daemon replies, each after a method byte (1: HEAD)."""
    ok = start(200, "200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    yield b"\0" + ok + frame(DATA, b"hello") + end()
    yield b"\1" + ok + end()
    yield b"\0" + ok + frame(DATA, b"hello, too long") + end()
    yield b"\0" + ok + frame(DATA, b"he") + end()
    yield b"\0" + frame(PULL, struct.pack(">I", 16)) + start(200, "200 OK", []) + frame(DATA, b"x", 1) + end()
    yield b"\0" + start(204, "204 No Content", []) + frame(DATA, b"body") + end()
    yield b"\0" + start(103, "103 Early Hints", [("Link", "</a>")]) + end()
    yield b"\0" + frame(LOG, bytes([1]) + s("gateway: a line")) + frame(TIMEOUT, s("request-timeout"))
    yield b"\0" + frame(UNAVAILABLE, s("busy")) + frame(ABORT)
    yield b"\0" + frame(DATA, b"early") + ok


def daemon_side():
    """What a server sends on a daemon connection."""
    yield frame(AUTH, b"\7" * 32) + frame(REQUEST, b"\0" * 64) + frame(BODY, b"abc") + frame(BODY)
    yield frame(HELLO, struct.pack(">I", 1) + s("g"))


def write(target, inputs):
    d = HERE / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    for data in inputs:
        (d / hashlib.sha1(data).hexdigest()).write_bytes(data)


if __name__ == "__main__":
    write("server_side", server_side())
    write("daemon_side", daemon_side())
