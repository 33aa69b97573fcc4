"""The HTTP API: ``create_app`` builds one Flask app per Gunicorn worker.

A request flows: authenticate -> read and validate the JSON -> its deadline -> result
cache -> (the pairs it lacks) micro-batcher: admission, tokenising, deadlines -> matcher
forward -> JSON. Every step that can go wrong answers with ``{"error": {"code", "message"}}``
and a 4xx (429 when the worker cannot answer in time, 503 while the model is not ready, 504
when the deadline passed first); addresses are never logged and never echoed back.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import re
import socket
import threading
import time
import uuid

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from . import logs, metrics
from .batcher import REJECTION_REASONS, InferenceError, MicroBatcher, Rejected
from .cache import ResultCache, pair_key
from .config import Settings, load_settings
from .loader import READY, ModelLoader
from .matcher import Matcher
from .readiness import Readiness

log = logging.getLogger(__name__)
access_log = logging.getLogger(logs.ACCESS_LOGGER)

ADDRESS_FIELDS = ("address1", "address2")
TIMEOUT_HEADER = "X-Request-Timeout-Ms"  # a client's own deadline, in milliseconds; it may only shorten the default
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
with open(os.path.join(os.path.dirname(__file__), "openapi.json"), encoding="utf-8") as _spec:
    OPENAPI = json.load(_spec)  # the API's description, served at /openapi.json and kept true by tests
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def rejection(exc: Rejected) -> ApiError:
    """The answer to a request the batcher refused."""
    if exc.reason == "overloaded":
        return ApiError(429, "overloaded", "this worker cannot answer in time now; retry after Retry-After seconds",
                        {"Retry-After": str(exc.retry_after)})
    if exc.reason == "deadline_exceeded":
        return ApiError(504, "deadline_exceeded", "the request's deadline passed before its pairs were scored")
    # Nobody reads this answer; the status tells the access log and the request counter what happened.
    return ApiError(499, "client_gone", "the client closed the connection before its pairs were scored")


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    body = json.dumps({"error": {"code": code, "message": message}})
    return Response(body, status=status, mimetype="application/json", headers=headers)


def json_response(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status=status, mimetype="application/json")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_json_body(max_bytes: int):
    """The request's JSON document; 415, 413 or 400 when it is not one."""
    mimetype = request.mimetype
    if mimetype != "application/json" and not (mimetype.startswith("application/") and mimetype.endswith("+json")):
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, "payload_too_large", f"body is larger than {max_bytes} bytes")
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise
    except Exception:  # the body reader's own errors: broken chunked framing, the client leaving mid-body
        raise ApiError(400, "malformed_body", "the request body's HTTP framing is broken") from None
    if request.content_length is not None and len(body) < request.content_length:
        raise ApiError(400, "malformed_body", "the body ended before its Content-Length")
    if len(body) > max_bytes:
        raise ApiError(413, "payload_too_large", f"body is larger than {max_bytes} bytes")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "body is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "body is not valid JSON") from None


def _address(item: dict, name: str, where: str, max_chars: int) -> str:
    if name not in item:
        raise ApiError(400, "missing_field", f"{where}{name} is missing")
    value = item[name]
    if not isinstance(value, str):
        raise ApiError(400, "invalid_address", f"{where}{name} must be a string")
    try:
        # JSON's \uXXXX escapes can spell a lone UTF-16 surrogate (\ud800), which no tokenizer takes.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_unicode",
                       f"{where}{name} holds an unpaired UTF-16 surrogate escape; send valid Unicode text") from None
    if not value.strip():
        raise ApiError(400, "invalid_address", f"{where}{name} must not be empty")
    if len(value) > max_chars:
        raise ApiError(400, "address_too_long", f"{where}{name} is longer than {max_chars} characters")
    return value


def _pair(item, where: str, max_chars: int) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise ApiError(400, "invalid_request", f"{where or 'body'} must be a JSON object")
    unknown = sorted(set(item) - set(ADDRESS_FIELDS))
    if unknown:
        raise ApiError(400, "invalid_request", f"unknown field(s) in {where or 'body'}: {', '.join(unknown)[:200]}")
    return tuple(_address(item, name, where and where + ".", max_chars) for name in ADDRESS_FIELDS)


def parse_predict_body(data, max_pairs: int, max_chars: int) -> tuple[list[tuple[str, str]], bool]:
    """The pairs asked for, and whether the body was the batch form."""
    if isinstance(data, dict) and "pairs" in data:
        if set(data) != {"pairs"}:
            raise ApiError(400, "invalid_request", "a batch body has only the field 'pairs'")
        pairs = data["pairs"]
        if not isinstance(pairs, list) or not pairs:
            raise ApiError(400, "invalid_request", "'pairs' must be a non-empty array")
        if len(pairs) > max_pairs:
            raise ApiError(400, "too_many_pairs", f"at most {max_pairs} pairs per request, got {len(pairs)}")
        return [_pair(item, f"pairs[{i}]", max_chars) for i, item in enumerate(pairs)], True
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object with address1 and address2, or pairs")
    return [_pair(data, "", max_chars)], False


def request_deadline(started: float, default_ms: int) -> float:
    """The ``time.perf_counter()`` by which this request must be answered."""
    header = request.headers.get(TIMEOUT_HEADER)
    if header is None:
        return started + default_ms / 1000
    if not header.strip().isdigit() or int(header) < 1:
        raise ApiError(400, "invalid_header", f"{TIMEOUT_HEADER} must be a whole number of milliseconds >= 1")
    return started + min(int(header), default_ms) / 1000


def client_gone_check():
    """A check whether this request's client has closed its connection, where the server can tell
    (Gunicorn gives the socket); None elsewhere."""
    connection = request.environ.get("gunicorn.socket")
    if connection is None:
        return None

    def gone() -> bool:
        try:  # end of stream without consuming anything: the client closed (a pipelined request is data)
            return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except ConnectionError:
            return True
    return gone


def default_loader(settings: Settings) -> ModelLoader:
    def load():
        return Matcher(settings.model_dir or None, device=settings.device, max_length=settings.max_length,
                       batch_size=settings.batch_max_pairs, threads=settings.worker_torch_threads,
                       fp16=settings.fp16, int8=settings.int8)
    return ModelLoader(load)


def create_app(settings: Settings | None = None, loader: ModelLoader | None = None) -> Flask:
    settings = settings or load_settings()
    logs.configure(settings.log_level)
    loader = loader or default_loader(settings)
    readiness = Readiness(loader, settings.ready_min_gpu_free_mb, settings.ready_cache_seconds)
    instrument = settings.metrics
    cache = ResultCache(settings.cache_size, instrument)
    started = time.time()
    batcher_lock = threading.Lock()
    batchers: dict = {}  # the worker's one micro-batcher, made on first use of the loaded model

    def batcher_for(matcher) -> MicroBatcher:
        with batcher_lock:
            if "batcher" not in batchers:
                threads = settings.worker_batch_threads(on_gpu=matcher.device.type == "cuda")
                # A request refused needs a thread too: a quarter of them stay free to refuse (and for probes),
                # or new requests would wait for a thread, unseen by admission, until their clients give up.
                batchers["batcher"] = MicroBatcher(matcher.forward, settings.batch_max_pairs,
                                                   settings.batch_wait_ms / 1000, instrument, threads,
                                                   max_requests=settings.threads - settings.threads // 4)
            return batchers["batcher"]

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    metrics.WORKER_STARTS.inc()
    for reason in REJECTION_REASONS:  # every reason exported from the start, so rates and panels read 0
        metrics.REJECTED_REQUESTS.labels(reason)

    def on_loaded():
        loader.wait()
        if loader.state == READY:
            matcher = loader.matcher
            metrics.MODEL_INFO.labels(matcher.name, matcher.version, str(matcher.device), matcher.precision).set(1)
        readiness.current()  # publish mgeo_model_ready without waiting for a probe

    loader.start()
    threading.Thread(target=on_loaded, name="model-ready", daemon=True).start()
    app.extensions["mgeo"] = {"loader": loader, "readiness": readiness, "settings": settings, "batchers": batchers}

    def route_template() -> str:
        """The matched route; a wrong method still names its route; unknown paths are all 'unmatched'."""
        if request.url_rule is not None:
            return request.url_rule.rule
        if isinstance(request.routing_exception, MethodNotAllowed):
            adapter = app.url_map.bind_to_environ(request.environ)
            rule, _ = adapter.match(method=request.routing_exception.valid_methods[0], return_rule=True)
            return rule.rule
        return "unmatched"

    @app.before_request
    def start_request():
        g.started = time.perf_counter()
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        g.endpoint = route_template()
        if instrument:
            metrics.REQUESTS_IN_PROGRESS.labels(request.method, g.endpoint).inc()
            g.counted_in_progress = True

    @app.after_request
    def finish_request(response: Response) -> Response:
        duration = time.perf_counter() - g.get("started", time.perf_counter())
        endpoint = g.get("endpoint", "unmatched")
        response.headers["X-Request-ID"] = g.get("request_id") or uuid.uuid4().hex
        if instrument:
            metrics.REQUESTS.labels(request.method, endpoint, str(response.status_code)).inc()
            metrics.REQUEST_DURATION.labels(request.method, endpoint).observe(duration)
        access_log.info(json.dumps({
            "ts": round(time.time(), 3), "pid": os.getpid(), "method": request.method, "route": endpoint,
            "status": response.status_code, "duration_ms": round(duration * 1000, 2),
            "request_id": response.headers["X-Request-ID"]}))
        return response

    @app.teardown_request
    def end_request(_exc):
        if g.pop("counted_in_progress", False):
            metrics.REQUESTS_IN_PROGRESS.labels(request.method, g.endpoint).dec()

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = _HTTP_CODES.get(exc.code, "http_error")
        headers = {"Allow": ", ".join(exc.valid_methods)} if getattr(exc, "valid_methods", None) else None
        return error_response(exc.code or 500, code, exc.description or code, headers)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unexpected error answering %s %s", request.method, g.get("endpoint"))
        return error_response(500, "internal_error", "unexpected error; see the service log")

    def authenticate():
        if not settings.api_token:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "a bearer token is required",
                           {"WWW-Authenticate": 'Bearer realm="mgeo"'})
        if not hmac.compare_digest(token.strip().encode(), settings.api_token.encode()):
            raise ApiError(401, "unauthorized", "the bearer token is not valid",
                           {"WWW-Authenticate": 'Bearer realm="mgeo", error="invalid_token"'})

    @app.post("/predict")
    def predict():
        authenticate()
        data = read_json_body(settings.max_body_bytes)
        pairs, is_batch = parse_predict_body(data, settings.max_pairs, settings.max_address_chars)
        deadline = request_deadline(g.started, settings.request_timeout_ms)
        # A worker that has just started (first start, reload, restart) answers once its model is in.
        loader.wait(settings.load_wait_seconds)
        if loader.state != READY:
            raise ApiError(503, "not_ready", f"the model is not ready ({loader.reason or 'model_loading'})",
                           {"Retry-After": "1"})
        matcher = loader.matcher
        keys = [pair_key(matcher.model_id, a, b) for a, b in pairs]
        probabilities = cache.lookup(keys)
        missing = [i for i, row in enumerate(probabilities) if row is None]
        if missing:
            try:
                scored = batcher_for(matcher).submit(
                    len(missing), lambda: matcher.encode([pairs[i] for i in missing]), deadline, client_gone_check())
            except Rejected as exc:
                raise rejection(exc) from None
            except InferenceError as exc:
                raise ApiError(503, "inference_failed", f"{exc} ({exc.reason})", {"Retry-After": "1"}) from None
            cache.store([keys[i] for i in missing], scored)
            for i, row in zip(missing, scored):
                probabilities[i] = row
        results = [matcher.prediction(row).as_dict() for row in probabilities]
        if instrument:
            for result in results:
                metrics.PAIRS.labels(result["label"]).inc()
        if is_batch:
            return json_response({"results": results, "model": matcher.model_id})
        return json_response({**results[0], "model": matcher.model_id})

    @app.get("/openapi.json")
    def openapi():
        return json_response(OPENAPI)

    @app.get("/health/live")
    def live():
        return json_response({"status": "alive", "uptime_seconds": round(time.time() - started, 3),
                              "pid": os.getpid()})

    @app.get("/health/ready")
    def ready():
        result = readiness.current()
        if result.ready:
            return json_response({"status": "ready", "checks": result.checks})
        return json_response({"status": "not_ready", "reason": result.reason, "checks": result.checks}, 503)

    @app.get("/healthz")
    def healthz():
        result = readiness.current()
        if result.ready:
            return json_response({"status": "ok"})
        return json_response({"status": "not ready", "reason": result.reason}, 503)

    return app
