"""A small client for mgeo-service's API, standard library only.

    from mgeo_service.client import Client
    client = Client("http://127.0.0.1:5000", token=None, timeout_ms=500)
    client.predict([("北京市海淀区中关村大街1号", "北京海淀中关村大街1号"), ...])   # any number, in order
    client.rank("北京市海淀区中关村大街1号", ["中关村大街1号", {"address": "...", "id": 7}], top_n=3)

What every caller would otherwise write: lists longer than the server's limit sent in chunks of
``max_pairs`` (the server's ``MGEO_MAX_PAIRS``, 64 unless its operator changed it) with the answers
in input order; a deadline per call sent as ``X-Request-Timeout-Ms``; a refusal the server means to
be retried (429 ``overloaded``, 503 ``not_ready``/``inference_failed``, 504 ``deadline_exceeded``:
none of them scored anything) retried after its ``Retry-After``, until ``max_wait`` seconds have
passed since the call began; every other error raised at once as ``ApiError`` with the server's code
and message. One connection per thread, kept alive; a client may be shared by threads.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from typing import Any, Iterable, Sequence

RETRIED = {429, 503, 504}
PAUSE = 0.05  # before retrying a 504, or a refusal without Retry-After


class ApiError(Exception):
    """The server's answer was an error: ``status``, and the API's ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Client:
    def __init__(self, url: str = "http://127.0.0.1:5000", token: str | None = None, timeout_ms: int | None = None,
                 max_wait: float = 30.0, max_pairs: int = 64):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port], got {url!r}")
        self._https, self._host, self._port = parts.scheme == "https", parts.hostname, parts.port
        self._base = parts.path.rstrip("/")
        self.token, self.timeout_ms, self.max_wait, self.max_pairs = token, timeout_ms, max_wait, max_pairs
        self.retries = 0  # refusals retried so far, by every call: how often the server shed this client's load
        self._local = threading.local()

    def predict(self, pairs: Iterable[tuple[str, str]], timeout_ms: int | None = None) -> list[dict]:
        """One result per pair (``label``, ``similarity``, ``scores``), in input order."""
        pairs = list(pairs)
        results: list[dict] = []
        for start in range(0, len(pairs), self.max_pairs):
            body = {"pairs": [{"address1": a, "address2": b} for a, b in pairs[start:start + self.max_pairs]]}
            results += self._post("/predict", body, timeout_ms)["results"]
        return results

    def rank(self, query: str, candidates: Sequence[str | dict], top_n: int | None = None,
             timeout_ms: int | None = None) -> list[dict]:
        """The candidates best first (``index``, ``id`` when given, ``label``, ``similarity``, ``scores``)."""
        body: dict[str, Any] = {"query": query, "candidates": list(candidates)}
        if top_n is not None:
            body["top_n"] = top_n
        return self._post("/rank", body, timeout_ms)["results"]

    def _post(self, path: str, body: dict, timeout_ms: int | None) -> dict:
        payload = json.dumps(body, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        timeout_ms = timeout_ms or self.timeout_ms
        if timeout_ms:
            headers["X-Request-Timeout-Ms"] = str(timeout_ms)
        give_up = time.monotonic() + self.max_wait
        while True:
            status, retry_after, answer = self._send(path, payload, headers)
            if status == 200:
                return answer
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            failure = ApiError(status, error.get("code", "unknown"), error.get("message", str(answer)[:200]))
            pause = retry_after if retry_after is not None else PAUSE
            if status not in RETRIED or time.monotonic() + pause > give_up:
                raise failure
            self.retries += 1
            time.sleep(pause)

    def _send(self, path: str, payload: bytes, headers: dict) -> tuple[int, float | None, Any]:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = self._local.connection = kind(self._host, self._port, timeout=self.max_wait)
        for attempt in range(2):
            try:
                connection.request("POST", self._base + path, payload, headers)
                response = connection.getresponse()
                raw = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A kept-alive connection the server closed (its idle timeout, a refusal that closes) before
                # this request reached it: sent again once, on a new connection (scoring is idempotent).
                connection.close()
                if attempt:
                    raise
        retry_after = response.getheader("Retry-After")
        try:
            answer = json.loads(raw.decode("utf-8"))
        except ValueError:
            answer = raw.decode("utf-8", "replace")
        return response.status, float(retry_after) if retry_after and retry_after.isdigit() else None, answer
