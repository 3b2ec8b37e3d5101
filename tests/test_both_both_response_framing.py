"""Responses that could split or mis-frame a keep-alive connection, on every server
kind: each test pipelines an ordinary request behind a malformed response and checks
that the client reads the real second response, never one smuggled by the first."""

import re

import pytest

from harness import pipelined

HELLO = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def get(path, method="GET"):
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def assert_hello(response, server):
    assert not isinstance(response, Exception), server.log_text()[-3000:]
    status, _headers, body = response
    assert (status, body) == (200, b"Hello, world!"), server.log_text()[-3000:]


def test_a_body_longer_than_its_content_length_is_cut(server):
    responses, rest = pipelined(server.port, get("/framing?case=long") + HELLO, ["GET", "GET"])
    assert responses[0][2] == b"Hello"
    assert_hello(responses[1], server)
    assert b"SMUGGLED" not in rest
    server.wait_for_log("more than its Content-Length of 5 bytes; the excess was dropped")


def test_content_length_of_characters_not_bytes_is_cut(server):
    """len() of non-ASCII text declares too few bytes: what was declared is sent."""
    responses, _ = pipelined(server.port, get("/framing?case=long_text") + HELLO, ["GET", "GET"])
    assert responses[0][2] == "café crème".encode()[:10]
    assert_hello(responses[1], server)


def test_a_body_shorter_than_its_content_length_closes_the_connection(server):
    responses, rest = pipelined(server.port, get("/framing?case=short") + HELLO, ["GET", "GET"])
    # The client sees the response cut short, and nothing after it on the connection.
    assert isinstance(responses[0], Exception), responses
    assert rest in (b"", b"<reset>")
    server.wait_for_log("ended after 3 of the 10 bytes its Content-Length declared")


@pytest.mark.parametrize("code", ["100", "101", "103"])
def test_an_interim_status_is_refused_with_a_500(server, code):
    responses, rest = pipelined(server.port, get(f"/framing?case={code}") + HELLO, ["GET", "GET"])
    assert responses[0][0] == 500, responses
    assert b"SMUGGLED" not in responses[0][2] + rest
    # Both servers close the connection after a 500; if not, the next answer is the real one.
    if len(responses) > 1 and not isinstance(responses[1], Exception):
        assert_hello(responses[1], server)
    server.wait_for_log(f"status {code} is an interim (1xx) status")


@pytest.mark.parametrize("code", ["204", "304"])
def test_no_body_follows_204_and_304(server, code):
    responses, rest = pipelined(server.port, get(f"/framing?case={code}") + HELLO, ["GET", "GET"])
    assert responses[0][0] == int(code), responses
    assert responses[0][2] == b""
    assert_hello(responses[1], server)
    assert b"SMUGGLED" not in rest


def test_no_body_follows_a_head_response(server):
    responses, rest = pipelined(server.port, get("/framing?case=long", "HEAD") + HELLO, ["HEAD", "GET"])
    assert responses[0][0] == 200 and responses[0][2] == b""
    assert_hello(responses[1], server)


def test_an_invalid_content_length_is_a_500_that_says_so(server):
    resp, body = server.get("/framing?case=bad_length")
    assert resp.status == 500
    server.wait_for_log("invalid Content-Length \"12abc\"")


def test_an_oversized_response_head_is_a_500_that_says_so(server):
    resp, _ = server.get("/framing?case=huge_head")
    assert resp.status == 500
    server.wait_for_log("more than the limit of 262144")


@pytest.mark.parametrize("case", ["vt", "ff", "del"])
def test_control_bytes_in_a_header_value_are_refused(server, case):
    resp, body = server.get(f"/framing?case={case}")
    assert resp.status == 500 and resp.getheader("X-Ctl") is None
    server.wait_for_log("response header X-Ctl contains CR, LF, NUL or another control character")


def test_control_characters_from_the_app_are_escaped_in_the_log(server):
    resp, body = server.get("/framing?case=log")
    assert (resp.status, body) == (200, b"logged")
    text = server.wait_for_log("stdout: ")
    server.wait_for_log("forged line")
    raw = server.error_log.read_bytes()
    assert b"\x1b" not in raw and b"\x07" not in raw and b"\rforged" not in raw
    # Escaped as \xHH (httpd may escape the backslash once more): one line, not two.
    assert re.search(r"\\+x1b\[31mred\\+x0dforged line", server.log_text())
