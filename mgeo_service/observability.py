"""Request hooks that watch every request: its id, metrics, JSON access log and trace span.

The access log holds no address: method, route template, status, duration, request id and
trace id.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from urllib.parse import urlsplit

from flask import Flask, Response, g, request
from opentelemetry.trace import Tracer
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.routing import RequestRedirect

from . import logs, metrics, tracing
from .connection import FIRST_BYTE_AT

access_log = logging.getLogger(logs.ACCESS_LOGGER)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def route_template(app: Flask) -> str:
    """The matched route; a wrong method still names its route, and a redirect (``/docs`` to ``/docs/``)
    the route it leads to; unknown paths are all 'unmatched'."""
    if request.url_rule is not None:
        return request.url_rule.rule
    exc = request.routing_exception
    if isinstance(exc, MethodNotAllowed):
        path, method = None, exc.valid_methods[0]
    elif isinstance(exc, RequestRedirect):
        path, method = urlsplit(exc.new_url).path, request.method
    else:
        return "unmatched"
    rule, _ = app.url_map.bind_to_environ(request.environ).match(path, method=method, return_rule=True)
    return rule.rule


def request_id_from(incoming: str) -> str:
    """The request's id: the caller's X-Request-ID where it is a plain token, else a new one."""
    return incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex


def record_request(instrument: bool, method: str, route: str, status: int, seconds: float, request_id: str,
                   trace_id: str | None = None, answered_by: str | None = None) -> None:
    """A finished request: its metrics (``instrument``) and its access log line (``answered_by``: which
    thread answered, where not a request thread)."""
    if instrument:
        metrics.REQUESTS.labels(method, route, str(status)).inc()
        metrics.REQUEST_DURATION.labels(method, route).observe(seconds)
    line = {"ts": round(time.time(), 3), "pid": os.getpid(), "method": method, "route": route, "status": status,
            "duration_ms": round(seconds * 1000, 2), "request_id": request_id}
    if trace_id:
        line["trace_id"] = trace_id
    if answered_by:
        line["answered_by"] = answered_by
    access_log.info(json.dumps(line))


def register_request_hooks(app: Flask, instrument: bool, tracer: Tracer | None) -> None:
    """``instrument``: the request metrics; ``tracer``: trace ``tracing.TRACED_ROUTES`` (None: no traces)."""

    @app.before_request
    def start_request():
        # The deadline starts at the request's first byte, where the worker read it (worker.py).
        g.started = request.environ.get(FIRST_BYTE_AT) or time.perf_counter()
        g.request_id = request_id_from(request.headers.get("X-Request-ID", ""))
        g.endpoint = route_template(app)
        if instrument:
            metrics.REQUESTS_IN_PROGRESS.labels(request.method, g.endpoint).inc()
            g.counted_in_progress = True
        if tracer is not None and g.endpoint in tracing.TRACED_ROUTES:
            g.span, g.span_token = tracing.start_request_span(
                tracer, request.method, g.endpoint, request.headers, {"mgeo.request_id": g.request_id})

    @app.after_request
    def finish_request(response: Response) -> Response:
        duration = time.perf_counter() - g.get("started", time.perf_counter())
        response.headers["X-Request-ID"] = g.get("request_id") or uuid.uuid4().hex
        span, trace_id = g.get("span"), None
        if span is not None:
            g.status = response.status_code  # the span ends at teardown, the request's very end
            trace_id = tracing.trace_id(span)
        record_request(instrument, request.method, g.get("endpoint", "unmatched"), response.status_code, duration,
                       response.headers["X-Request-ID"], trace_id)
        return response

    @app.teardown_request
    def end_request(_exc):
        if g.pop("counted_in_progress", False):
            metrics.REQUESTS_IN_PROGRESS.labels(request.method, g.endpoint).dec()
        span = g.pop("span", None)
        if span is not None:
            tracing.end_request_span(span, g.pop("span_token"), g.get("status", 500), g.get("error_code"))
