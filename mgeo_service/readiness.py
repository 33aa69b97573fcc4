"""Readiness: can this worker answer /predict now? Cached, one check at a time."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from . import metrics
from .loader import READY, ModelLoader

log = logging.getLogger(__name__)

PROBE_PAIR = ("北京", "北京市")
# Every reason a readiness check can give; docs/api.md "Health" and the MGeoReadinessFailing alert know them.
REASONS = ("model_loading", "model_load_failed", "tokenizer_failed", "model_forward_failed", "cuda_unavailable",
           "insufficient_gpu_memory")
# The ones mgeo_readiness_failures_total counts: a model still loading has not failed.
FAILURE_REASONS = tuple(reason for reason in REASONS if reason != "model_loading")


@dataclass(frozen=True)
class ReadinessResult:
    ready: bool
    reason: str | None
    checks: dict = field(default_factory=dict)


class Readiness:
    """Checks the model, tokenizer, one tiny forward and (on CUDA) free GPU memory.

    A result is reused for ``cache_seconds`` while the model's load state stays
    the same; probes that arrive while a check runs wait for it and share its
    result instead of starting their own.
    """

    def __init__(self, loader: ModelLoader, min_gpu_free_mb: int, cache_seconds: float):
        self._loader = loader
        self._min_gpu_free_mb = min_gpu_free_mb
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._result: ReadinessResult | None = None
        self._checked_at = 0.0
        self._checked_state = ""

    def current(self) -> ReadinessResult:
        with self._lock:  # held while checking: concurrent probes share the one check
            now, state = time.monotonic(), self._loader.state
            # A finished (or failed) load is news at once, whatever the cache says.
            if self._result is None or now - self._checked_at >= self._cache_seconds or state != self._checked_state:
                result = self._check()
                self._record(result)
                self._result, self._checked_at, self._checked_state = result, now, state
            return self._result

    def _record(self, result: ReadinessResult) -> None:
        previous = self._result
        if previous is None or previous.ready != result.ready or previous.reason != result.reason:
            if result.ready:
                log.info("worker is ready")
            else:
                log.warning("worker is not ready: %s", result.reason)
        metrics.MODEL_READY.set(1 if result.ready else 0)
        for reason in REASONS:  # this worker's one current reason is 1, the others 0
            metrics.WORKERS_NOT_READY.labels(reason).set(1 if result.reason == reason else 0)
        if result.reason in FAILURE_REASONS:
            metrics.READINESS_FAILURES.labels(result.reason).inc()

    def _check(self) -> ReadinessResult:
        loader = self._loader
        checks: dict = {"model": loader.state}
        if loader.state != READY:
            if loader.error:
                checks["error"] = loader.error
            return ReadinessResult(False, loader.reason, checks)
        matcher = loader.matcher
        checks["backend"], checks["precision"] = matcher.backend, matcher.precision
        try:
            encoded = matcher.encode([PROBE_PAIR])
            unknown = matcher.tokenizer.unk_token_id
            checks["tokenizer"] = bool(encoded[0][0]) and any(
                token not in (unknown, *matcher.tokenizer.all_special_ids) for token in encoded[0][0])
        except Exception as exc:
            checks["tokenizer"] = False
            log.error("readiness: tokenizer failed: %s", exc)
        if not checks["tokenizer"]:
            return ReadinessResult(False, "tokenizer_failed", checks)
        try:
            probabilities = matcher.forward(encoded)
            checks["forward"] = bool(torch.isfinite(probabilities).all())
        except Exception as exc:
            checks["forward"] = False
            log.error("readiness: model forward failed: %s", exc)
        if not checks["forward"]:
            return ReadinessResult(False, "model_forward_failed", checks)
        checks["device"] = str(matcher.device)
        if matcher.device.type == "cuda":
            if not torch.cuda.is_available():
                return ReadinessResult(False, "cuda_unavailable", checks)
            free_bytes, _total = torch.cuda.mem_get_info(matcher.device)
            checks["gpu_free_mb"] = free_bytes // (1 << 20)
            if checks["gpu_free_mb"] < self._min_gpu_free_mb:
                return ReadinessResult(False, "insufficient_gpu_memory", checks)
        return ReadinessResult(True, None, checks)
