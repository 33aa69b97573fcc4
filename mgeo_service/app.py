"""``create_app`` builds one Flask app per Gunicorn worker: the API and health blueprints, the
request hooks that watch them, and the state the worker's requests share (``WorkerState``).

The app knows nothing of checkpoints: the model comes from a ``ModelLoader``.
"""
from __future__ import annotations

import gc
import threading
import time

from flask import Flask
from flask_cors import CORS
from flask_cors.core import get_cors_headers, get_cors_options
from werkzeug.datastructures import Headers
from flask_swagger_ui import get_swaggerui_blueprint

from . import logs, metrics, tracing
from .api import BODY_PARSERS, api, decode_json, rejection
from .batcher import FAILURE_REASONS, REJECTION_REASONS, MicroBatcher, Rejected
from .cache import ResultCache, pair_key
from .config import Settings, load_settings
from .errors import ApiError, register_error_handlers
from .health import health
from .loader import READY, ModelLoader
from .matcher import Matcher
from .observability import register_request_hooks
from .readiness import FAILURE_REASONS as READINESS_FAILURE_REASONS, Readiness


class WorkerState:
    """What one worker's requests share (``app.extensions["mgeo"]``): settings, the model loader and
    readiness, the result cache, the tracer, and the micro-batcher, made on first use of the loaded model."""

    def __init__(self, settings: Settings, loader: ModelLoader):
        self.settings, self.loader = settings, loader
        self.readiness = Readiness(loader, settings.ready_min_gpu_free_mb, settings.ready_cache_seconds)
        self.cache = ResultCache(settings.cache_size, settings.metrics)
        self.tracer = tracing.make_tracer(settings.tracing)
        self.started = time.time()
        self.cors = None  # flask-cors' options for the scoring routes, where CORS is on
        self._batcher: MicroBatcher | None = None
        self._batcher_lock = threading.Lock()

    def batcher(self, matcher: Matcher) -> MicroBatcher:
        with self._batcher_lock:
            if self._batcher is None:
                settings = self.settings
                threads = settings.worker_batch_threads(on_gpu=matcher.device.type == "cuda")
                # A request refused needs a thread too: a quarter of them stay free to refuse (and for probes),
                # or new requests would wait for a thread, unseen by admission, until their clients give up.
                self._batcher = MicroBatcher(matcher.forward, settings.batch_max_pairs, settings.batch_wait_ms / 1000,
                                             settings.metrics, threads, settings.threads - settings.threads // 4,
                                             self.tracer, settings.batch_max_tokens)
            return self._batcher

    def overload(self) -> Rejected | None:
        """The refusal any request this worker cannot answer from its cache gets now; None when one would
        be admitted (or no request has reached the batcher yet)."""
        batcher = self._batcher
        return batcher and batcher.full(self.settings.request_timeout_ms / 1000)

    def refuse_early(self, overload: Rejected, route: str, body: bytes, origin: str) -> ApiError | None:
        """The answer, given ``overload()``, to a whole body of a scoring route (``BODY_PARSERS``) no thread has
        taken yet (``worker.py``): 429, counted, with the CORS headers Flask's answer to ``origin`` would
        carry, unless the body's pairs are all in the cache; None: it is served as usual."""
        if len(self.cache) and self._all_cached(route, body):
            return None
        self._batcher.count_rejected(overload.reason)
        refusal = rejection(overload)
        if self.cors and origin:
            refusal.headers.update(get_cors_headers(self.cors, Headers({"Origin": origin}), "POST"))
        return refusal

    def _all_cached(self, route: str, body: bytes) -> bool:
        try:  # a body that is not valid is left to the usual path, which says what is wrong
            pairs, _ = BODY_PARSERS[route](decode_json(body), self.settings.max_pairs,
                                           self.settings.max_address_chars)
        except ApiError:
            return False
        model_id = self.loader.matcher.model_id
        return self.cache.holds_all([pair_key(model_id, a, b) for a, b in pairs])

def default_loader(settings: Settings) -> ModelLoader:
    def load():
        return Matcher(settings.model_dir or None, device=settings.device, backend=settings.backend,
                       onnx_cache_dir=settings.onnx_cache_dir, max_length=settings.max_length,
                       batch_size=settings.batch_max_pairs, batch_tokens=settings.batch_max_tokens,
                       threads=settings.worker_torch_threads,
                       fp16=settings.fp16, int8=settings.int8)
    return ModelLoader(load)


def create_app(settings: Settings | None = None, loader: ModelLoader | None = None) -> Flask:
    settings = settings or load_settings()
    logs.configure(settings.log_level)
    state = WorkerState(settings, loader or default_loader(settings))

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["mgeo"] = state
    register_request_hooks(app, settings.metrics, state.tracer if settings.tracing else None)
    register_error_handlers(app)
    app.register_blueprint(api)
    app.register_blueprint(health)
    # An interactive page for /openapi.json, from the pinned flask-swagger-ui package's own files: no
    # request leaves the host (its validator badge would call validator.swagger.io; it is off).
    # Every operation open ("full"): a first visit shows each route with its real example, ready to send.
    app.register_blueprint(get_swaggerui_blueprint("/docs", "/openapi.json", {
        "app_name": "mgeo-service API", "validatorUrl": None, "tryItOutEnabled": True, "docExpansion": "full"}))
    if settings.cors_origins:  # opt-in: browser pages of these origins may call the scoring routes
        cors = {"origins": list(settings.cors_origins), "methods": ["POST"], "max_age": 600,
                "allow_headers": ["Content-Type", "Authorization", "X-Request-Timeout-Ms", "X-Request-ID",
                                  "traceparent", "tracestate"],
                "expose_headers": ["Retry-After", "X-Request-ID"]}
        CORS(app, resources={route: cors for route in BODY_PARSERS})
        state.cors = get_cors_options(app, cors)  # the same options, for the worker's own refusals

    metrics.WORKER_STARTS.inc()
    # Every reason of every counter of refusals and failures exported from the start, so rates and panels read 0
    # (a counter that appears only at its first failure has no rate then, and alerts on it wait a scrape longer).
    for reason in REJECTION_REASONS:
        metrics.REJECTED_REQUESTS.labels(reason)
    for reason in FAILURE_REASONS:
        metrics.INFERENCE_ERRORS.labels(reason)
    for reason in READINESS_FAILURE_REASONS:
        metrics.READINESS_FAILURES.labels(reason)

    def on_loaded():
        state.loader.wait()
        if state.loader.state == READY:
            matcher = state.loader.matcher
            metrics.MODEL_INFO.labels(matcher.name, matcher.version, str(matcher.device), matcher.backend,
                                      matcher.precision, matcher.note).set(1)
        state.readiness.current()  # publish mgeo_model_ready without waiting for a probe
        # What is loaded by now (libraries, model, tokenizer) lives as long as the worker: frozen, the
        # collector never walks it again. Unfrozen, a full collection walked it for 0.2-0.5 s holding the GIL,
        # the whole worker stalled, at a few seconds into every burst of requests.
        gc.freeze()

    state.loader.start()
    threading.Thread(target=on_loaded, name="model-ready", daemon=True).start()
    return app
