"""The control API's HTTP reader: valid requests whole and byte by byte, and garbage, oversize
and truncated input that may only ever end in HttpError (never another exception)."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freecall.control.http import (
    MAX_BODY,
    MAX_HEAD,
    HttpError,
    HttpRequest,
    RequestParser,
    render_response,
)

GET = b"GET /api/calls/abc?token=x%20y&since=4 HTTP/1.1\r\nHost: 127.0.0.1:5099\r\n" \
      b"Authorization: Bearer  tok \r\n\r\n"
POST = b'POST /api/calls/abc/confirm-sas HTTP/1.1\r\nHost: h\r\nContent-Length: 17\r\n' \
       b'Content-Type: application/json\r\n\r\n{"verified":true}'


def parse_all(data: bytes, *, chunk: int | None = None) -> list[HttpRequest]:
    parser = RequestParser()
    out = []
    pieces = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        parser.feed(piece)
        while (request := parser.next_request()) is not None:
            out.append(request)
    return out


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_requests_whole_and_in_pieces(chunk: int | None) -> None:
    first, second = parse_all(GET + POST, chunk=chunk)
    assert first.method == "GET" and first.path == "/api/calls/abc"
    assert first.query == {"token": "x y", "since": "4"}
    assert first.header("authorization") == "Bearer  tok"
    assert first.keep_alive and first.body == b""
    assert second.method == "POST" and second.body == b'{"verified":true}'


def test_trailing_bytes_stay_for_the_next_request() -> None:
    parser = RequestParser()
    parser.feed(GET + b"GET / HT")
    assert parser.next_request() is not None
    assert parser.next_request() is None
    assert parser.buffered == len(b"GET / HT")


def test_bare_lf_and_http10() -> None:
    [request] = parse_all(b"GET / HTTP/1.0\nConnection: keep-alive\n\n")
    assert request.version == (1, 0) and request.keep_alive
    [request] = parse_all(b"GET / HTTP/1.0\r\n\r\n")
    assert not request.keep_alive


@pytest.mark.parametrize(("data", "status"), [
    (b"GET /\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET http://x/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"G\x00T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\x01\r\n\r\n", 400),
    (b"GET /%ff HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET /%00 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: b\r\n" * 70 + b"\r\n", 431),
])
def test_refusals_carry_their_status(data: bytes, status: int) -> None:
    with pytest.raises(HttpError) as info:
        parse_all(data)
    assert info.value.status == status


def test_an_endless_head_is_refused_before_it_grows_past_the_cap() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\n")
    with pytest.raises(HttpError) as info:
        for _ in range(MAX_HEAD):
            parser.feed(b"X-Slow: " + b"a" * 100 + b"\r\n")
            assert parser.next_request() is None
    assert info.value.status == 431
    assert parser.buffered < MAX_HEAD + 200


def test_one_endless_line_is_refused_too() -> None:
    parser = RequestParser()
    with pytest.raises(HttpError) as info:
        for _ in range(100):
            parser.feed(b"A" * 1000)
            parser.next_request()
    assert info.value.status == 431


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_yields_requests_or_http_errors_only(data: bytes) -> None:
    try:
        parse_all(data, chunk=13)
    except HttpError as error:
        assert 400 <= error.status < 600


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(GET + POST) - 1), st.integers(0, 255), st.integers(0, 2**32))
def test_mutated_requests_never_raise_anything_else(pos: int, byte: int, seed: int) -> None:
    data = bytearray(GET + POST)
    data[pos] = byte
    rng = random.Random(seed)
    del data[rng.randrange(len(data)):][: rng.randrange(3)]
    with contextlib.suppress(HttpError):
        parse_all(bytes(data), chunk=rng.randrange(1, 40))


def test_render_response() -> None:
    data = render_response(200, b"{}", content_type="application/json",
                           headers=(("X-A", "b"),), keep_alive=False)
    assert data == (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                    b"X-A: b\r\nConnection: close\r\n\r\n{}")
