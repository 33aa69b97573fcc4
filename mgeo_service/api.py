"""The HTTP API: ``POST /predict``, ``POST /rank``, ``GET /openapi.json`` and ``GET /``, a pointer to them.

A request flows: authenticate -> read and validate the JSON -> its deadline -> result cache ->
(the pairs it lacks) micro-batcher: admission, tokenising, deadlines -> matcher forward -> JSON.
``/rank`` is ``/predict`` for one query against many candidates: the same path (``score``), its
results sorted by similarity.
Every step that can go wrong answers with an ``ApiError``: 429 when the worker cannot answer
in time, 503 while the model is not ready, 504 when the deadline passed first.
"""
from __future__ import annotations

import hmac
import json
import os
import re
import time

from flask import Blueprint, current_app, g, request
from opentelemetry import trace
from werkzeug.exceptions import RequestEntityTooLarge

from . import metrics
from .batcher import InferenceError, Rejected
from .cache import pair_key
from .connection import CLIENT_WATCH
from .dataset import is_blank
from .errors import ApiError, json_response
from .loader import READY

ADDRESS_FIELDS = ("address1", "address2")
RANK_FIELDS, CANDIDATE_FIELDS = {"query", "candidates", "top_n"}, {"address", "id"}
TIMEOUT_HEADER = "X-Request-Timeout-Ms"  # a client's own deadline, in milliseconds; it may only shorten the default
# ASCII digits, >= 1, any length (it is capped), spaces or tabs around: openapi.json gives the same pattern.
TIMEOUT_PATTERN = re.compile(r"[ \t]*0*[1-9][0-9]*[ \t]*")
with open(os.path.join(os.path.dirname(__file__), "openapi.json"), encoding="utf-8") as _spec:
    OPENAPI = json.load(_spec)  # the API's description, served at /openapi.json and kept true by tests
# Without MGEO_API_TOKEN no route asks for one: the description served then names no token (no lock icon).
OPENAPI_WITHOUT_TOKEN = {
    **OPENAPI, "components": {k: v for k, v in OPENAPI["components"].items() if k != "securitySchemes"},
    "paths": {path: {method: {k: v for k, v in operation.items() if k != "security"}
                     for method, operation in methods.items()} for path, methods in OPENAPI["paths"].items()}}

api = Blueprint("api", __name__)


def rejection(exc: Rejected) -> ApiError:
    """The answer to a request the batcher refused."""
    if exc.reason == "overloaded":
        return ApiError(429, "overloaded", "this worker cannot answer in time now; retry after Retry-After seconds",
                        {"Retry-After": str(exc.retry_after)})
    if exc.reason == "deadline_exceeded":
        return ApiError(504, "deadline_exceeded", "the request's deadline passed before its pairs were scored")
    # Nobody reads this answer; the status tells the access log and the request counter what happened.
    return ApiError(499, "client_gone", "the client closed the connection before its pairs were scored")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_json_body(max_bytes: int):
    """The request's JSON document; 415, 413 or 400 when it is not one."""
    mimetype = request.mimetype
    if mimetype != "application/json" and not (mimetype.startswith("application/") and mimetype.endswith("+json")):
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        raise ApiError(415, "unsupported_media_type",
                       "Content-Encoding is not supported: send the body uncompressed (it is at most "
                       f"{max_bytes} bytes)")
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
    return decode_json(body)


def decode_json(body: bytes):
    """The JSON document a body holds; 400 when it is not valid UTF-8 JSON."""
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
    if is_blank(value):
        raise ApiError(400, "invalid_address", f"{where}{name} must have a visible character")
    if len(value) > max_chars:
        raise ApiError(400, "address_too_long", f"{where}{name} is longer than {max_chars} characters")
    return value


def _only_fields(item: dict, allowed, where: str) -> None:
    unknown = sorted(set(item) - set(allowed))
    if unknown:
        raise ApiError(400, "invalid_request", f"unknown field(s) in {where}: {', '.join(unknown)[:200]}")


def _items(data: dict, name: str, max_pairs: int) -> list:
    """``data[name]``: a list of 1 to ``max_pairs`` items."""
    items = data[name]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "invalid_request", f"'{name}' must be a non-empty array")
    if len(items) > max_pairs:
        raise ApiError(400, "too_many_pairs", f"at most {max_pairs} {name} per request, got {len(items)}")
    return items


def _pair(item, where: str, max_chars: int) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise ApiError(400, "invalid_request", f"{where or 'body'} must be a JSON object")
    _only_fields(item, ADDRESS_FIELDS, where or "body")
    return tuple(_address(item, name, where and where + ".", max_chars) for name in ADDRESS_FIELDS)


def parse_predict_body(data, max_pairs: int, max_chars: int) -> tuple[list[tuple[str, str]], bool]:
    """The pairs asked for, and whether the body was the batch form."""
    if isinstance(data, dict) and "pairs" in data:
        if set(data) != {"pairs"}:
            raise ApiError(400, "invalid_request", "a batch body has only the field 'pairs'")
        pairs = _items(data, "pairs", max_pairs)
        return [_pair(item, f"pairs[{i}]", max_chars) for i, item in enumerate(pairs)], True
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object with address1 and address2, or pairs")
    return [_pair(data, "", max_chars)], False


def parse_rank_body(data, max_pairs: int, max_chars: int) -> tuple[list[tuple[str, str]],
                                                                  tuple[list[dict], int | None]]:
    """The pairs (query, candidate) asked for, and (per candidate ``{"id": ...}`` when it gave one, else ``{}``;
    top_n)."""
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object with query and candidates")
    _only_fields(data, RANK_FIELDS, "body")
    query = _address(data, "query", "", max_chars)
    if "candidates" not in data:
        raise ApiError(400, "missing_field", "candidates is missing")
    candidates = _items(data, "candidates", max_pairs)
    top_n = data.get("top_n")
    if top_n is not None:
        # JSON has no integer type: 3.0 is the whole number 3 (JSON Schema's "integer" agrees)
        whole = isinstance(top_n, int) or isinstance(top_n, float) and top_n.is_integer()  # 1e400 is inf: not
        if isinstance(top_n, bool) or not whole or top_n < 1:
            raise ApiError(400, "invalid_request", "'top_n' must be a whole number >= 1")
        top_n = int(top_n)
    pairs, ids = [], []
    for i, candidate in enumerate(candidates):
        where = f"candidates[{i}]"
        if isinstance(candidate, dict):
            _only_fields(candidate, CANDIDATE_FIELDS, where)
            if isinstance(candidate.get("id"), (dict, list)):
                raise ApiError(400, "invalid_request", f"{where}.id must be a string, number, boolean or null")
            pairs.append((query, _address(candidate, "address", where + ".", max_chars)))
            ids.append({"id": candidate["id"]} if "id" in candidate else {})
        else:
            pairs.append((query, _address({where: candidate}, where, "", max_chars)))  # named as it was sent
            ids.append({})
    return pairs, (ids, top_n)


def request_deadline(started: float, default_ms: int) -> float:
    """The ``time.perf_counter()`` by which this request must be answered."""
    header = request.headers.get(TIMEOUT_HEADER)
    if header is None:
        return started + default_ms / 1000
    if not TIMEOUT_PATTERN.fullmatch(header):
        raise ApiError(400, "invalid_header", f"{TIMEOUT_HEADER} must be a whole number of milliseconds >= 1")
    return started + min(int(header), default_ms) / 1000


def authenticate(api_token: str) -> None:
    if not api_token:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "a bearer token is required",
                       {"WWW-Authenticate": 'Bearer realm="mgeo"'})
    if not hmac.compare_digest(token.strip().encode(), api_token.encode()):
        raise ApiError(401, "unauthorized", "the bearer token is not valid",
                       {"WWW-Authenticate": 'Bearer realm="mgeo", error="invalid_token"'})


def score(route: str):
    """The path every scoring route shares, up to its answer: the pairs' results (``Prediction.as_dict``) in
    order, the model id, and what the route's body parser (``BODY_PARSERS``) gave besides the pairs."""
    state = current_app.extensions["mgeo"]
    settings, tracer = state.settings, state.tracer
    request_span = trace.get_current_span()  # the request's own (observability.py), or a no-op one
    with tracer.start_as_current_span("validate", record_exception=False):
        authenticate(settings.api_token)
        data = read_json_body(settings.max_body_bytes)
        pairs, extra = BODY_PARSERS[route](data, settings.max_pairs, settings.max_address_chars)
        deadline = request_deadline(g.started, settings.request_timeout_ms)
    request_span.set_attribute("mgeo.pairs", len(pairs))
    # A worker that has just started (first start, reload, restart) answers once its model is in. That wait
    # is the deployment's, not the request's: its deadline moves by as much (a client that gives up meanwhile
    # is seen by its close, and never computed for).
    waiting_since = time.perf_counter()
    state.loader.wait(settings.load_wait_seconds)
    if state.loader.state != READY:
        raise ApiError(503, "not_ready", f"the model is not ready ({state.loader.reason or 'model_loading'})",
                       {"Retry-After": "1"})
    deadline += time.perf_counter() - waiting_since
    matcher = state.loader.matcher
    with tracer.start_as_current_span("cache lookup"):
        keys = [pair_key(matcher.model_id, a, b) for a, b in pairs]
        probabilities = state.cache.lookup(keys)
        missing = [i for i, row in enumerate(probabilities) if row is None]
    request_span.set_attribute("mgeo.cache_hits", len(pairs) - len(missing))

    def tokenize():
        with tracer.start_as_current_span("tokenize") as tokenizing:
            encoded = matcher.encode([pairs[i] for i in missing])
            tokenizing.set_attribute("mgeo.tokens", sum(len(ids) for ids, _ in encoded))
            return encoded

    if missing:
        try:
            scored = state.batcher(matcher).submit(len(missing), tokenize, deadline, request.environ.get(CLIENT_WATCH))
        except Rejected as exc:
            raise rejection(exc) from None
        except InferenceError as exc:
            raise ApiError(503, "inference_failed", f"{exc} ({exc.reason})", {"Retry-After": "1"}) from None
        state.cache.store([keys[i] for i in missing], scored)
        for i, row in zip(missing, scored):
            probabilities[i] = row
    results = [matcher.prediction(row).as_dict() for row in probabilities]
    if settings.metrics:
        for result in results:
            metrics.PAIRS.labels(result["label"]).inc()
    return results, matcher.model_id, extra


# route -> (JSON document, max pairs, max address chars) -> (pairs, what else the route answers with)
BODY_PARSERS = {"/predict": parse_predict_body, "/rank": parse_rank_body}


@api.post("/predict")
def predict():
    results, model_id, is_batch = score("/predict")
    if is_batch:
        return json_response({"results": results, "model": model_id})
    return json_response({**results[0], "model": model_id})


@api.post("/rank")
def rank():
    results, model_id, (ids, top_n) = score("/rank")
    ranked = sorted(({"index": i, **ids[i], **result} for i, result in enumerate(results)),
                    key=lambda result: (-result["similarity"], result["index"]))
    return json_response({"results": ranked[:top_n], "model": model_id})


@api.get("/openapi.json")
def openapi():
    return json_response(OPENAPI if current_app.extensions["mgeo"].settings.api_token else OPENAPI_WITHOUT_TOKEN)


@api.get("/")
def index():
    """Where a person who opens the service's address in a browser goes next."""
    return json_response({"service": "mgeo-service", "docs": "/docs/", "openapi": "/openapi.json",
                          "scoring": ["POST /predict", "POST /rank"],
                          "health": {"live": "/health/live", "ready": "/health/ready"}})
