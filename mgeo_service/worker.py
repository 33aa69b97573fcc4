"""The Gunicorn worker: gthread, where only whole requests reach a thread.

A thread that reads a request waits on its client: 100 clients that send a body slower than
its Content-Length held 100 of a worker's threads and stopped it, and a request that waited for
a thread was invisible to admission. So the worker's main thread, in its event loop, reads every
request of every connection (new or kept alive) without blocking, head and body:

- **bounded**: a head over ``HEAD_BYTES`` is 431, a Content-Length over ``MGEO_MAX_BODY_BYTES``
  413, a chunked body 411 (send a Content-Length; a body is at most 64 KiB of JSON), a request not
  whole within ``MGEO_READ_TIMEOUT_MS`` of its first byte 408; each closes the connection;
- **admitted there**: a whole ``POST /predict`` or ``/rank`` that the worker, while full
  (``WorkerState.overload``), could not answer from its cache gets its 429 from the main thread,
  with the headers Flask's would carry; the connection stays open for the client's next request;
- **then handed over whole**: the bytes go into the connection's parser (Gunicorn's own, so
  every rule of HTTP framing stays Gunicorn's) and a thread answers from them; the request's
  deadline starts at its first byte (``connection.FIRST_BYTE_AT``);
- **watched while it is answered**: a client that closes its connection meanwhile is seen
  at once (``connection.ClientWatch``), and the batcher drops its work.

What this thread answers itself is logged with ``"answered_by": "main_thread"``.
"""
from __future__ import annotations

import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus

from gunicorn.util import http_date
from gunicorn.workers.gthread import ThreadWorker

from .connection import CLIENT_WATCH, FIRST_BYTE_AT, ClientWatch
from .errors import ApiError, error_body

HEAD_BYTES = 16384  # the longest request line and headers taken
RECV_BYTES = 65536


@dataclass
class Head:
    """A request's line and headers, as much as framing and an early answer need."""
    method: bytes
    route: str
    version: bytes
    headers: dict[bytes, bytes]  # lower-case names; the first of a repeated one
    content_length: int | None  # None: no body framing this thread can trust (Gunicorn's parser judges)
    chunked: bool


def parse_head(head: bytes) -> Head | None:
    """The head (without its blank line); None when it is malformed, left to Gunicorn's parser to refuse."""
    request_line, *lines = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        return None
    headers, lengths = {}, []
    for line in lines:
        name, colon, value = line.partition(b":")
        name = name.lower()
        if not colon or not name or name != name.strip():
            return None  # malformed or folded
        value = value.strip()
        if name == b"content-length":
            lengths.append(value)
        headers.setdefault(name, value)
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        return None
    chunked = b"transfer-encoding" in headers
    route = parts[1].partition(b"?")[0].decode("latin-1")
    return Head(parts[0], route, parts[2], headers, int(lengths[0]) if lengths else 0, chunked)


def response_bytes(error: ApiError, request_id: str, keep_alive: bool) -> bytes:
    body = error_body(error.code, error.message).encode()
    lines = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}", f"Date: {http_date()}",
             "Content-Type: application/json", f"Content-Length: {len(body)}",
             f"Connection: {'keep-alive' if keep_alive else 'close'}", f"X-Request-ID: {request_id}",
             *(f"{name}: {value}" for name, value in error.headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class _Reading:
    """A request being read: its bytes so far, and when its first byte came."""
    data: bytearray
    first_byte_at: float = field(default_factory=time.perf_counter)
    timeout_at: float = 0.0  # time.monotonic()
    continued: bool = False  # "100 Continue" sent
    ended: bool = False  # the client closed its side


class WholeRequestWorker(ThreadWorker):
    def init_process(self):
        # Accept a connection once its first bytes are in: most requests are then read in one go.
        for listener in self.sockets:
            if listener.FAMILY in (socket.AF_INET, socket.AF_INET6):
                listener.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        self.reading: dict = {}  # conn -> _Reading, oldest first (one timeout for all)
        self.watched: set = set()  # conns whose request a thread answers, watched for a close
        self.current = threading.local()  # the conn a request thread answers
        super().init_process()

    def init_signals(self):
        super().init_signals()
        # Ctrl-C reaches every process of the terminal's group: a worker drains on it as on SIGTERM (the
        # master stops gracefully too: gunicorn.conf.py), not with Gunicorn's quick exit.
        signal.signal(signal.SIGINT, self.handle_exit)

    def load_wsgi(self):
        super().load_wsgi()
        # Loaded here, after the fork: the master may make no metric.
        from .api import BODY_PARSERS
        from .observability import record_request, request_id_from
        self.scoring_routes, self.record_request, self.request_id_from = BODY_PARSERS, record_request, request_id_from
        self.state = getattr(self.wsgi, "extensions", {}).get("mgeo")
        self.read_timeout = self.state.settings.read_timeout_ms / 1000 if self.state else 5.0
        self.max_body = self.state.settings.max_body_bytes if self.state else 1 << 20
        app, current = self.wsgi, self.current

        def wsgi(environ, start_response):
            conn = current.conn
            environ[FIRST_BYTE_AT], environ[CLIENT_WATCH] = conn.first_byte_at, conn.watch
            return app(environ, start_response)
        self.wsgi = wsgi

    # Reading, in the main thread.

    def enqueue_req(self, conn):
        """Every request starts here: a new connection, a kept-alive one readable, bytes read ahead."""
        read_ahead = conn.parser.unreader.take_buffered() if conn.parser else b""
        conn.sock.setblocking(False)
        self.reading[conn] = _Reading(bytearray(read_ahead), timeout_at=time.monotonic() + self.read_timeout)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        self._on_readable(conn)  # its bytes may be here already

    def _on_readable(self, conn, _sock=None):
        reading = self.reading[conn]
        try:
            while len(reading.data) <= HEAD_BYTES + self.max_body:
                chunk = conn.sock.recv(RECV_BYTES)
                if not chunk:
                    reading.ended = True  # the client sends no more; what it sent may be whole
                    break
                reading.data += chunk
        except BlockingIOError:
            pass
        except OSError:
            reading.ended = True
        self._frame(conn, reading)
        if reading.ended and self.reading.get(conn) is reading:  # not whole, and never will be
            if reading.data:  # a client that only closed its side still reads
                self._answer_and_close(conn, self._head(reading), ApiError(
                    400, "malformed_body", "the connection ended before the request was whole"))
            else:
                self._stop_reading(conn)
                self._close(conn)

    def _frame(self, conn, reading: _Reading):
        data = reading.data
        head_end = data.find(b"\r\n\r\n", 0, HEAD_BYTES + 4)
        if head_end < 0:
            if len(data) > HEAD_BYTES:
                self._answer_and_close(conn, None, ApiError(431, "header_too_large",
                                                            f"the request line and headers exceed {HEAD_BYTES} bytes"))
            return
        head = parse_head(bytes(data[:head_end]))
        if head is None:  # Gunicorn's parser refuses it from the head alone
            self._hand_over(conn, reading)
            return
        if head.chunked:
            self._answer_and_close(conn, head, ApiError(411, "length_required",
                                                        "send the body with a Content-Length, not chunked"))
            return
        if head.content_length > self.max_body:
            self._answer_and_close(conn, head, ApiError(413, "payload_too_large",
                                                        f"the body exceeds {self.max_body} bytes"))
            return
        end = head_end + 4 + head.content_length
        if len(data) < end:
            if (not reading.continued and head.version == b"HTTP/1.1"
                    and head.headers.get(b"expect", b"").lower() == b"100-continue"):
                reading.continued = True  # the client waits for this before it sends the body
                self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        refusal = self._refusal(head, bytes(data[head_end + 4:end]))
        if refusal is None:
            self._hand_over(conn, reading)
            return
        self._stop_reading(conn)
        keep_alive = head.version == b"HTTP/1.1" and head.headers.get(b"connection", b"").lower() != b"close"
        sent = self._answer(conn, head, refusal, reading, keep_alive)
        if not (sent and keep_alive):
            self._close(conn)
        elif len(data) > end:  # the next request, pipelined
            self._start_next(conn, bytes(data[end:]))
        else:
            self._keep_alive(conn)

    def _refusal(self, head: Head, body: bytes) -> ApiError | None:
        """The 429 a whole scoring request gets here while the worker is full, or None."""
        if head.method != b"POST" or head.route not in self.scoring_routes or not self.state:
            return None
        overload = self.state.overload()
        return overload and self.state.refuse_early(overload, head.route, body,
                                                    head.headers.get(b"origin", b"").decode("latin-1"))

    def _start_next(self, conn, data: bytes):
        self.reading[conn] = _Reading(bytearray(data), timeout_at=time.monotonic() + self.read_timeout)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        self._frame(conn, self.reading[conn])

    def _keep_alive(self, conn):
        """Back to Gunicorn's kept-alive connections, as after any answer."""
        conn.set_timeout()
        self.keepalived_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def _hand_over(self, conn, reading: _Reading):
        """The whole request goes to a thread, and its connection is watched for a close meanwhile."""
        self._stop_reading(conn)
        conn.whole, conn.first_byte_at, conn.continued = bytes(reading.data), reading.first_byte_at, reading.continued
        conn.watch = ClientWatch()
        conn.data_ready = True
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_watched_readable, conn))
        self.watched.add(conn)
        super().enqueue_req(conn)

    def _on_watched_readable(self, conn, _sock=None):
        self._unwatch(conn)  # either way: a close needs telling once, a next request waits for the answer
        try:
            gone = conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        if gone:
            conn.watch.set_gone()

    def _unwatch(self, conn):
        if conn in self.watched:
            self.watched.discard(conn)
            self.poller.unregister(conn.sock)

    def finish_request(self, conn, fs):
        self._unwatch(conn)
        super().finish_request(conn, fs)

    def _stop_reading(self, conn):
        del self.reading[conn]
        self.poller.unregister(conn.sock)

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn, reading in list(self.reading.items()):
            if reading.timeout_at > now:
                break
            self._stop_reading(conn)
            if reading.data:
                self._answer(conn, self._head(reading), ApiError(408, "request_timeout", f"the request was not whole within "
                                                  f"{self.read_timeout * 1000:.0f} ms of its first byte"),
                             reading, keep_alive=False)
            self._close(conn)

    @staticmethod
    def _head(reading: _Reading) -> Head | None:
        """The head of a request not read whole, where it has arrived (for its answer's log line)."""
        head_end = reading.data.find(b"\r\n\r\n", 0, HEAD_BYTES + 4)
        return parse_head(bytes(reading.data[:head_end])) if head_end >= 0 else None

    def wait_for_and_dispatch_events(self, timeout):
        if self.reading:  # wake for the oldest read's timeout, not a second later
            timeout = min(timeout, max(0.0, next(iter(self.reading.values())).timeout_at - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)

    # Answers, in the main thread.

    def _answer_and_close(self, conn, head: Head | None, error: ApiError):
        reading = self.reading[conn]
        self._stop_reading(conn)
        self._answer(conn, head, error, reading, keep_alive=False)
        self._close(conn)

    def _answer(self, conn, head: Head | None, error: ApiError, reading: _Reading, keep_alive: bool) -> bool:
        """Writes ``error`` (counted and logged as any answer); whether all of it was sent."""
        headers = head.headers if head else {}
        request_id = self.request_id_from(headers.get(b"x-request-id", b"").decode("latin-1"))
        sent = self._send(conn, response_bytes(error, request_id, keep_alive))
        route = head.route if head and head.route in self.scoring_routes else "unmatched"
        method = head.method.decode("latin-1") if head and head.route in self.scoring_routes else "other"
        self.record_request(self.state.settings.metrics if self.state else False, method, route, error.status,
                            time.perf_counter() - reading.first_byte_at, request_id, answered_by="main_thread")
        return sent

    def _send(self, conn, data: bytes) -> bool:
        try:  # a few hundred bytes: an empty send buffer takes them; one that is full belongs to a client not reading
            return conn.sock.send(data) == len(data)
        except OSError:
            return False

    def _close(self, conn):
        self.nr_conns -= 1
        conn.close()

    # Answering, in a request thread.

    def handle(self, conn):
        whole, conn.whole = conn.whole, b""
        conn.sock.setblocking(True)
        conn.init()
        conn.parser.unreader.unread(whole)  # Gunicorn's parser reads the request from these bytes
        self.current.conn = conn
        return super().handle(conn)

    def handle_request(self, req, conn):
        if conn.continued:  # the main thread sent "100 Continue" already; one is enough
            req._expected_100_continue = False
        return super().handle_request(req, conn)
