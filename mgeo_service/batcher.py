"""Micro-batching: concurrent requests in a worker share one model forward.

Request threads hand their encoded pairs to ``MicroBatcher.submit`` and block
(asleep: a waiting request costs no CPU and does not hold the GIL). Each of
``threads`` batching threads takes the first waiting request, lets others join
for up to ``wait_seconds`` or until ``max_pairs`` pairs are waiting, runs the
forwards (length-sorted chunks of at most ``max_pairs``) and hands each request
its own rows back, in order. Several batching threads share one queue, so their
forwards run side by side on separate cores while every request still goes to
whichever forward starts next.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import metrics
from .matcher import forward_in_chunks

log = logging.getLogger(__name__)

Encoded = tuple[list[int], list[int]]


class InferenceError(Exception):
    """The model forward failed for this request; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out_of_memory"
    return "runtime_error" if isinstance(exc, RuntimeError) else "internal_error"


@dataclass
class _Job:
    encoded: Sequence[Encoded]
    enqueued_at: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    probabilities: torch.Tensor | None = None
    error: InferenceError | None = None


class MicroBatcher:
    def __init__(self, forward: Callable[[Sequence[Encoded]], torch.Tensor], max_pairs: int,
                 wait_seconds: float, instrument: bool = True, threads: int = 1):
        self._forward = forward
        self._max_pairs = max_pairs
        self._wait_seconds = wait_seconds
        self._instrument = instrument
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        for number in range(threads):
            threading.Thread(target=self._run, name=f"micro-batcher-{number}", daemon=True).start()

    def submit(self, encoded: Sequence[Encoded]) -> torch.Tensor:
        """Probabilities for ``encoded``, one row per pair, once its forward ran."""
        job = _Job(encoded)
        self._queue.put(job)
        job.done.wait()
        if job.error:
            raise job.error
        return job.probabilities

    def _run(self) -> None:
        while True:
            jobs = [self._queue.get()]
            waiting = len(jobs[0].encoded)
            deadline = time.perf_counter() + self._wait_seconds
            while waiting < self._max_pairs:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                jobs.append(job)
                waiting += len(job.encoded)
            try:
                self._execute(jobs)
            except Exception as exc:  # this thread must live on, or every later request would hang
                for job in jobs:
                    if not job.done.is_set():
                        self._fail(job, exc)

    def _execute(self, jobs: list[_Job]) -> None:
        try:
            results = self._forward_all([pair for job in jobs for pair in job.encoded], jobs)
        except Exception as exc:
            if len(jobs) > 1:  # find the request that broke the batch; the others still get answers
                for job in jobs:
                    self._execute([job])
                return
            self._fail(jobs[0], exc)
            return
        start = 0
        for job in jobs:
            job.probabilities = results[start:start + len(job.encoded)]
            start += len(job.encoded)
            job.done.set()

    def _forward_all(self, encoded: list[Encoded], jobs: list[_Job]) -> torch.Tensor:
        if self._instrument:
            started = time.perf_counter()
            for job in jobs:
                waited = started - job.enqueued_at
                for _ in job.encoded:
                    metrics.QUEUE_DURATION.observe(waited)
        return forward_in_chunks(self._forward, encoded, self._max_pairs,
                                 self._observe_forward if self._instrument else None)

    @staticmethod
    def _observe_forward(pairs: int, seconds: float) -> None:
        metrics.INFERENCE_DURATION.observe(seconds)
        metrics.INFERENCE_BATCH_SIZE.observe(pairs)

    def _fail(self, job: _Job, exc: Exception) -> None:
        reason = failure_reason(exc)
        log.error("inference failed (%s): %s", reason, exc)
        metrics.INFERENCE_ERRORS.labels(reason).inc()
        job.error = InferenceError(reason, "the model could not score this request; retry later")
        job.done.set()
