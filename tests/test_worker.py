"""The Gunicorn worker's main thread: how it reads a request's head, and the answers it writes itself."""
import json
import sys

import pytest

from conftest import ROOT
from mgeo_service.errors import ApiError
from mgeo_service.worker import parse_head, response_bytes

sys.path.insert(0, ROOT)
from bench.openloop import parse_response  # noqa: E402

BODY = json.dumps({"address1": "北京市海淀区中关村大街1号", "address2": "北京海淀中关村大街1号"},
                  ensure_ascii=False).encode()


def request(head: bytes = b"POST /predict HTTP/1.1", *headers: bytes, body: bytes = BODY) -> bytes:
    lines = [head, b"Host: 127.0.0.1", b"Content-Type: application/json", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def head_of(raw: bytes):
    return parse_head(raw.partition(b"\r\n\r\n")[0])


@pytest.mark.parametrize("route", ["/predict", "/rank"])
def test_a_head_gives_its_route_headers_and_body_length(route):
    head = head_of(request(b"POST %s?x=1 HTTP/1.1" % route.encode(), b"Content-Length: %d" % len(BODY),
                           b"X-Request-ID: abc-1"))
    assert (head.method, head.route, head.version) == (b"POST", route, b"HTTP/1.1")
    assert head.content_length == len(BODY) and not head.chunked and head.headers[b"x-request-id"] == b"abc-1"


def test_a_head_without_a_body_and_a_chunked_one():
    assert head_of(b"GET /health/live HTTP/1.0\r\n\r\n").content_length == 0
    assert head_of(request(b"POST /predict HTTP/1.1", b"Transfer-Encoding: chunked")).chunked


@pytest.mark.parametrize("raw", [
    request(b"POST /predict HTTP/1.1", b"Content-Length: %d" % len(BODY), b"Content-Length: %d" % len(BODY)),
    request(b"POST /predict HTTP/1.1", b"Content-Length: +%d" % len(BODY)),
    request(b"POST /predict HTTP/1.1", b"Content-Length : %d" % len(BODY)),  # whitespace before the colon
    request(b"POST /predict HTTP/1.1", b"Content-Length: %d" % len(BODY), b" folded"),
    request(b"POST  /predict HTTP/1.1", b"Content-Length: %d" % len(BODY)),
])
def test_a_malformed_head_is_left_to_gunicorns_parser(raw):
    assert head_of(raw) is None


@pytest.mark.parametrize("keep_alive", [True, False])
def test_an_answer_from_the_main_thread_is_a_complete_http_answer(keep_alive):
    error = ApiError(429, "overloaded", "this worker cannot answer in time now", {"Retry-After": "3"})
    status, headers, body = parse_response(response_bytes(error, "req-7", keep_alive))
    assert status == 429
    assert headers["retry-after"] == "3" and headers["x-request-id"] == "req-7"
    assert headers["connection"] == ("keep-alive" if keep_alive else "close")
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body) and "date" in headers
