"""The Gunicorn worker's main thread: how it reads a request's head, and the answers it writes itself."""
import json
import socket
import sys
import threading

import pytest

from conftest import ROOT, http
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


# Live, through Gunicorn: what the main thread's reading is for. Each fails with Gunicorn's own gthread worker.

def slow_connection(port: int, body_bytes: int) -> socket.socket:
    """A connection that sends a /predict head and ``body_bytes`` of its body, then nothing."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY[:body_bytes])
    return connection


def test_more_slow_clients_than_threads_hold_nothing_and_each_gets_its_408(service_factory):
    service = service_factory(MGEO_WORKERS="1", MGEO_THREADS="8", MGEO_READ_TIMEOUT_MS="1500").wait_ready()
    slow = [slow_connection(service.port, n % len(BODY)) for n in range(24)]  # 3x the threads
    try:
        for _ in range(10):  # a normal client meanwhile is answered each time
            status, _, answer = http("POST", service.url + "/predict", json.loads(BODY), timeout=10)
            assert status == 200 and answer["label"]
        for connection in slow:
            answer = b""
            while chunk := connection.recv(4096):  # the 408, then the close
                answer += chunk
            status, headers, body = parse_response(answer)
            assert status == 408 and headers["connection"] == "close"
            assert json.loads(body)["error"]["code"] == "request_timeout"
    finally:
        for connection in slow:
            connection.close()
    timeouts = [line for line in service.access_lines() if line["status"] == 408]
    assert len(timeouts) == len(slow) and all(line["answered_by"] == "main_thread" for line in timeouts)
    assert service.metric("mgeo_worker_starts_total") == 1


def test_clients_that_hang_up_while_queued_are_never_computed(service_factory):
    service = service_factory(MGEO_WORKERS="1", MGEO_BATCH_THREADS="1", MGEO_CACHE_SIZE="0",
                              MGEO_REQUEST_TIMEOUT_MS="60000").wait_ready()
    url = service.url + "/predict"
    long_pair = {"address1": "浙江省杭州市西湖区文三路" * 6 + "90号", "address2": "杭州西湖文三路" * 10 + "90号"}  # 128 tokens
    blockers = [threading.Thread(target=http, args=("POST", url, {"pairs": [long_pair] * 64}), kwargs={"timeout": 120})
                for _ in range(3)]
    pairs = service.metric("mgeo_inference_batch_size_sum")
    for blocker in blockers:  # 192 long pairs: the only batching thread is busy for seconds
        blocker.start()
    in_progress = ("mgeo_requests_inprogress", (("endpoint", "/predict"), ("method", "POST")))
    service.wait_until(lambda: service.scrape().get(in_progress) == 3, what="the blockers in progress")
    leaving = []
    for n in range(12):
        connection = socket.create_connection(("127.0.0.1", service.port), timeout=30)
        body = json.dumps({"address1": f"上海市徐汇区漕溪北路{n}号", "address2": f"上海徐汇漕溪北路{n}号"},
                          ensure_ascii=False).encode()
        connection.sendall(request(b"POST /predict HTTP/1.1", b"Content-Length: %d" % len(body), body=body))
        leaving.append(connection)
    service.wait_until(lambda: service.scrape().get(in_progress) == 3 + 12, what="the 12 requests in progress")
    for connection in leaving:
        connection.close()  # the clients give up while their requests wait
    gone = ("mgeo_rejected_requests_total", (("reason", "client_gone"),))
    service.wait_until(lambda: service.scrape()[gone] == 12, what="12 client_gone")
    for blocker in blockers:
        blocker.join(120)
    assert service.metric("mgeo_queue_pairs") == 0
    assert service.metric("mgeo_inference_batch_size_sum") - pairs == 3 * 64  # only the blockers' pairs computed
