"""The Gunicorn worker's early refusal: which requests its main thread may answer, and the answer."""
import json
import sys

import pytest

from conftest import ROOT
from mgeo_service.errors import ApiError
from mgeo_service.api import BODY_PARSERS
from mgeo_service.worker import response_bytes, whole_scoring_request

sys.path.insert(0, ROOT)
from bench.openloop import parse_response  # noqa: E402

BODY = json.dumps({"address1": "北京市海淀区中关村大街1号", "address2": "北京海淀中关村大街1号"},
                  ensure_ascii=False).encode()


def request(head: bytes = b"POST /predict HTTP/1.1", *headers: bytes, body: bytes = BODY) -> bytes:
    lines = [head, b"Host: 127.0.0.1", b"Content-Type: application/json", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.mark.parametrize("route", ["/predict", "/rank"])
def test_a_whole_scoring_request_gives_its_route_headers_and_body(route):
    route_, headers, body = whole_scoring_request(request(b"POST %s?x=1 HTTP/1.1" % route.encode(),
                                                          b"Content-Length: %d" % len(BODY), b"X-Request-ID: abc-1"),
                                                  BODY_PARSERS)
    assert route_ == route and body == BODY
    assert headers[b"content-length"] == b"%d" % len(BODY) and headers[b"x-request-id"] == b"abc-1"


@pytest.mark.parametrize("raw", [
    request(b"POST /predict HTTP/1.1", b"Content-Length: %d" % (len(BODY) + 1)),  # the body is still arriving
    request(b"POST /predict HTTP/1.1", b"Content-Length: %d" % (len(BODY) - 1)),  # more than one request
    request(b"POST /predict HTTP/1.1"),  # no Content-Length
    request(b"POST /predict HTTP/1.1", b"Transfer-Encoding: chunked", body=b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"),
    request(b"POST /predict HTTP/1.1", b"Content-Length: %d" % len(BODY), b"Content-Length: %d" % len(BODY)),
    request(b"POST /predict HTTP/1.1", b"Content-Length: +%d" % len(BODY)),
    request(b"POST /predict HTTP/1.1", b"Content-Length : %d" % len(BODY)),  # whitespace before the colon
    request(b"POST /predict HTTP/1.1", b"Content-Length: %d" % len(BODY), b" folded"),
    request(b"GET /predict HTTP/1.1", b"Content-Length: %d" % len(BODY)),
    request(b"POST /health/live HTTP/1.1", b"Content-Length: %d" % len(BODY)),
    request(b"POST /predictx HTTP/1.1", b"Content-Length: %d" % len(BODY)),
    request(b"POST /openapi.json HTTP/1.1", b"Content-Length: %d" % len(BODY)),
    request(b"POST /predict HTTP/2.0", b"Content-Length: %d" % len(BODY)),
    request(b"POST  /predict HTTP/1.1", b"Content-Length: %d" % len(BODY)),
    b"POST /predict HTTP/1.1\r\nContent-Length: 2\r\n",  # the head has not ended
])
def test_anything_but_one_whole_plain_scoring_request_is_left_to_a_thread(raw):
    assert whole_scoring_request(raw, BODY_PARSERS) is None


def test_the_refusal_is_a_complete_http_answer_that_closes_the_connection():
    error = ApiError(429, "overloaded", "this worker cannot answer in time now", {"Retry-After": "3"})
    status, headers, body = parse_response(response_bytes(error, "req-7"))
    assert status == 429
    assert headers["retry-after"] == "3" and headers["x-request-id"] == "req-7"
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body) and "date" in headers
    assert json.loads(body) == {"error": {"code": "overloaded", "message": "this worker cannot answer in time now"}}
