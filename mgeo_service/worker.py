"""The Gunicorn worker: gthread, plus a refusal that costs almost nothing.

Under overload a refusal must cost far less than an answer, or refusing alone fills the
machine: through a thread, Gunicorn's parser and Flask, a 429 costs about 1 ms of a core under
the one GIL the forwards' Python shares, and it waits for a free thread behind the requests
that wait for forwards. So while a worker is full (``WorkerState.overload``: it would refuse
any request it cannot answer from its cache), its main thread answers a new
connection's ``POST /predict`` or ``/rank`` itself, as soon as it is accepted: the request read as bytes,
``WorkerState.refuse_early`` asked (the cache still answers its pairs), the 429 written and
the connection closed. Nothing is parsed beyond the request line and headers (and the body's
JSON, where the cache holds anything), nothing waits for a thread, and no trace span is made;
the request is counted and logged as any other.

Only the plain case takes this path: a new connection whose whole request has arrived, with a
Content-Length body. Anything else (a kept-alive connection, a chunked body, a body still
arriving, another route, a worker not full) goes to a thread as usual, where the same
admission decides.
"""
from __future__ import annotations

import socket
import time
from http import HTTPStatus

from gunicorn.util import http_date
from gunicorn.workers.gthread import ThreadWorker

from .errors import ApiError, error_body

HEAD_BYTES = 16384  # the most request line and headers read here; a larger head goes to a thread


def whole_scoring_request(data: bytes, routes) -> tuple[str, dict[bytes, bytes], bytes] | None:
    """The route, headers (lower-case names) and body of ``data`` when it is exactly one whole
    ``POST`` HTTP/1.x request to one of ``routes`` with a Content-Length body; None for anything else."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        return None
    request_line, *lines = head.split(b"\r\n")
    parts = request_line.split(b" ")
    route = parts[1].partition(b"?")[0].decode("latin-1") if len(parts) == 3 else ""
    if len(parts) != 3 or parts[0] != b"POST" or route not in routes or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
        return None
    headers = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        name = name.lower()
        if not colon or not name or name != name.strip() or name in headers:
            return None  # malformed, folded or repeated: Gunicorn's parser says what is wrong
        headers[name] = value.strip()
    length = headers.get(b"content-length", b"")
    if b"transfer-encoding" in headers or not length.isdigit() or int(length) != len(body):
        return None
    return route, headers, body


def response_bytes(error: ApiError, request_id: str) -> bytes:
    body = error_body(error.code, error.message).encode()
    lines = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}", f"Date: {http_date()}",
             "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close",
             f"X-Request-ID: {request_id}", *(f"{name}: {value}" for name, value in error.headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class SheddingWorker(ThreadWorker):
    def init_process(self):
        # Accept a connection once its first bytes are in: the request is there to be refused here.
        for listener in self.sockets:
            if listener.FAMILY in (socket.AF_INET, socket.AF_INET6):
                listener.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        super().init_process()

    def enqueue_req(self, conn):
        if not conn.initialized and self._refused_early(conn):
            self.nr_conns -= 1
            return
        super().enqueue_req(conn)

    def _refused_early(self, conn) -> bool:
        """Whether this new connection's request was answered here, in the main thread."""
        state = getattr(self.wsgi, "extensions", {}).get("mgeo")
        overload = state and state.overload()
        if not overload:
            return False
        started = time.perf_counter()
        limit = HEAD_BYTES + state.settings.max_body_bytes
        try:
            data = conn.sock.recv(limit, socket.MSG_PEEK)  # non-blocking: what has arrived
        except OSError:  # nothing yet, or the client already left: a thread deals with it
            return False
        # Gunicorn loads this class in the master, where no metric may be made: they are the workers'.
        from .api import BODY_PARSERS
        from .observability import record_request, request_id_from
        request = whole_scoring_request(data, BODY_PARSERS) if len(data) < limit else None
        if request is None:
            return False
        route, headers, body = request
        refusal = state.refuse_early(overload, route, body)
        if refusal is None:
            return False
        request_id = request_id_from(headers.get(b"x-request-id", b"").decode("latin-1"))
        try:
            conn.sock.recv(len(data))  # the request is read: closing now sends no reset
            conn.sock.send(response_bytes(refusal, request_id))  # a few hundred bytes: the send buffer takes them
        except OSError:
            pass  # the client left; it was refused all the same
        conn.close()
        record_request(state.settings.metrics, "POST", route, refusal.status, time.perf_counter() - started,
                       request_id)
        return True
