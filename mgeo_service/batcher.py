"""Micro-batching with admission and deadlines: concurrent requests in a worker share model forwards.

Request threads hand their pairs to ``MicroBatcher.submit`` and block (asleep: a waiting
request costs no CPU and does not hold the GIL). Each of ``threads`` batching threads takes
the first waiting request, lets others join for up to ``wait_seconds`` or until ``max_pairs``
pairs or ``max_tokens`` tokens are waiting, runs the forwards (length-sorted chunks of at most
``max_pairs`` pairs and ``max_tokens`` tokens) and hands each request its own rows back, in
order. The token bound keeps a forward of long pairs from growing its latency and memory
with their length, and lets a batch of short ones fill up to ``max_pairs``. Several batching
threads share one queue, so their forwards run side by side on separate cores while every
request still goes to whichever forward starts next.

Work nobody will wait for is never computed:

- **admission**: a request is refused (``overloaded``) before it is even tokenised when the
  pairs already waiting, at the forward rate this worker measures, would keep it from being
  answered by its deadline. The bound is in seconds of this worker's own work, so it fits
  any model and device without a setting, and is measured afresh after each idle spell. ``full``
  says whether any new request would be refused now: the worker then refuses before a thread
  takes the request (``worker.py``);
- **deadlines**: a request whose deadline passes before its forward starts gets
  ``deadline_exceeded`` at its deadline, and its pairs are skipped;
- **a client gone**: a request whose client closes the connection while it waits leaves the
  queue at once (``client_gone``): its place in admission's count is free and its pairs are
  never computed. The worker's main thread sees the close (``connection.ClientWatch``).

Traced, each request gets a "queue wait" span, and each forward a "forward" span under the
request that opened the batch, linked to every request it served.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import torch
from opentelemetry.trace import NoOpTracer, Tracer

from . import metrics, tracing
from .connection import ClientWatch
from .matcher import forward_in_chunks

log = logging.getLogger(__name__)

Encoded = tuple[list[int], list[int]]
QUEUED, RUNNING, DROPPED = "queued", "running", "dropped"
REJECTION_REASONS = ("overloaded", "deadline_exceeded", "client_gone")
FAILURE_REASONS = ("out_of_memory", "runtime_error", "internal_error")  # failure_reason's answers


class InferenceError(Exception):
    """The model forward failed for this request; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Rejected(Exception):
    """The request was refused before its forward: ``reason`` is overloaded, deadline_exceeded or
    client_gone; ``retry_after`` (seconds) is when this worker expects to have room again."""

    def __init__(self, reason: str, retry_after: int = 1):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def failure_reason(exc: BaseException) -> str:
    """One of ``FAILURE_REASONS``."""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out_of_memory"
    return "runtime_error" if isinstance(exc, RuntimeError) else "internal_error"


class ForwardRate:
    """What this worker's forwards cost, measured: exponentially weighted means of one forward's
    pairs per second and of its duration. Unknown (None) until the first forward, and again from
    when the worker goes idle (``forget``): forwards slowed by a flood (its own clients share the
    CPU) would otherwise refuse the next burst until a few forwards at normal speed, and the first
    forward after idle measures afresh."""

    WEIGHT = 0.2  # the last few forwards count most: the rate follows a change of traffic within a second

    def __init__(self):
        self.pairs_per_second: float | None = None
        self.forward_seconds: float | None = None

    def forget(self) -> None:
        self.pairs_per_second = self.forward_seconds = None

    def observe(self, pairs: int, seconds: float) -> None:
        seconds = max(seconds, 1e-6)
        if self.pairs_per_second is None:
            self.pairs_per_second, self.forward_seconds = pairs / seconds, seconds
            return
        self.pairs_per_second += self.WEIGHT * (pairs / seconds - self.pairs_per_second)
        self.forward_seconds += self.WEIGHT * (seconds - self.forward_seconds)

    def seconds_until_done(self, pairs_ahead: int, pairs: int, threads: int) -> float:
        """When ``pairs`` admitted now would be answered: the pairs ahead and its own, shared out over
        ``threads`` forwards side by side, plus one forward (the one it waits to join, or its own)."""
        return (pairs_ahead + pairs) / (self.pairs_per_second * threads) + self.forward_seconds


@dataclass
class _Job:
    encoded: Sequence[Encoded]
    deadline: float
    client: ClientWatch | None
    trace_context: object = field(default_factory=tracing.current_context)  # the request thread's
    enqueued_at: float = field(default_factory=time.perf_counter)
    enqueued_ns: int = field(default_factory=time.time_ns)  # the same moment, as spans keep time
    state: str = QUEUED
    done: threading.Event = field(default_factory=threading.Event)
    probabilities: list[list[float]] | None = None
    error: Exception | None = None

    @cached_property  # read when the batch is collected and again at its forward
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.encoded)


class MicroBatcher:
    def __init__(self, forward: Callable[[Sequence[Encoded]], torch.Tensor], max_pairs: int,
                 wait_seconds: float, instrument: bool = True, threads: int = 1, max_requests: int = 1_000_000,
                 tracer: Tracer | None = None, max_tokens: int | None = None):
        self._forward = forward
        self._max_tokens = max_tokens
        self._tracer = tracer or NoOpTracer()
        self._max_requests = max_requests
        self._max_pairs = max_pairs
        self._wait_seconds = wait_seconds
        self._instrument = instrument
        self._threads = threads
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the counts below and every job's state
        self._queued_pairs = 0   # admitted, forward not started
        self._running_pairs = 0  # in a forward now
        self._requests = 0       # admitted, not yet answered
        self.rate = ForwardRate()
        for number in range(threads):
            threading.Thread(target=self._run, name=f"micro-batcher-{number}", daemon=True).start()

    def submit(self, pairs: int, encode: Callable[[], Sequence[Encoded]], deadline: float,
               client: ClientWatch | None = None) -> list[list[float]]:
        """Probabilities, one row of floats per pair, once their forward ran; ``encode()`` (the tokenising) runs
        only once the request is admitted. ``deadline`` is a ``time.perf_counter()`` value.

        Raises ``Rejected`` (overloaded, deadline_exceeded, client_gone) or ``InferenceError``."""
        self._admit(pairs, deadline)
        try:
            try:
                job = _Job(encode(), deadline, client)
            except BaseException:
                with self._lock:
                    self._queued_pairs -= pairs
                    self._publish_queue()
                raise
            self._queue.put(job)
            if client:
                client.on_gone(lambda: self._leave(job, "client_gone"))
            if not job.done.wait(max(0.0, deadline - time.perf_counter())):
                self._leave(job, "deadline_exceeded")
                job.done.wait()  # set already if dropped; else its forward is running and will end
        finally:
            with self._lock:
                self._requests -= 1
        if job.error:
            raise job.error
        return job.probabilities

    def full(self, seconds: float) -> Rejected | None:
        """The refusal any new request would get now (the least work, one pair, with the longest
        deadline, ``seconds`` from now), None when one would be admitted. Not counted: the caller
        counts it (``count_rejected``) once it does refuse."""
        with self._lock:
            return self._refusal(1, time.perf_counter() + seconds)

    def count_rejected(self, reason: str) -> None:
        if self._instrument:
            metrics.REJECTED_REQUESTS.labels(reason).inc()

    def _refusal(self, pairs: int, deadline: float) -> Rejected | None:
        """Holding the lock: the refusal a request of ``pairs`` pairs due by ``deadline`` gets now, or None."""
        busy = self._queued_pairs + self._running_pairs
        measured = self.rate.pairs_per_second is not None
        # An idle worker always tries: there is nothing to wait for, and the rate stays measured.
        late = busy and measured and (
            time.perf_counter() + self.rate.seconds_until_done(self._queued_pairs, pairs, self._threads) > deadline)
        if not late and self._requests < self._max_requests:
            return None
        drain = busy / (self.rate.pairs_per_second * self._threads) if measured else 1
        return Rejected("overloaded", max(1, math.ceil(drain)))

    def _admit(self, pairs: int, deadline: float) -> None:
        with self._lock:
            refused = self._refusal(pairs, deadline)
            if refused:
                self.count_rejected("overloaded")
                raise refused
            self._queued_pairs += pairs
            self._requests += 1
            self._publish_queue()

    def _leave(self, job: _Job, reason: str) -> None:
        """``job`` leaves the queue with ``Rejected(reason)`` unless its forward has started (it then ends)."""
        with self._lock:
            if job.state == QUEUED:
                self._drop(job, reason)

    def _drop(self, job: _Job, reason: str) -> None:
        """Holding the lock: ``job`` leaves the queue unanswered, with ``Rejected(reason)``."""
        job.state = DROPPED
        self._queued_pairs -= len(job.encoded)
        self._publish_queue()
        self.count_rejected(reason)
        job.error = Rejected(reason)
        job.done.set()

    def _publish_queue(self) -> None:
        if self._instrument:
            metrics.QUEUE_PAIRS.set(self._queued_pairs)

    def _start(self, jobs: list[_Job]) -> list[_Job]:
        """The jobs whose forward starts now; the others are dropped (deadline passed, client gone)."""
        now = time.perf_counter()
        starting = []
        with self._lock:
            for job in jobs:
                if job.state != QUEUED:
                    continue
                if now >= job.deadline:
                    self._drop(job, "deadline_exceeded")
                elif job.client and job.client.gone:
                    self._drop(job, "client_gone")
                else:
                    job.state = RUNNING
                    self._queued_pairs -= len(job.encoded)
                    self._running_pairs += len(job.encoded)
                    starting.append(job)
            self._publish_queue()
        return starting

    def _run(self) -> None:
        while True:
            jobs = [self._queue.get()]
            waiting, tokens = len(jobs[0].encoded), jobs[0].tokens
            collect_until = time.perf_counter() + self._wait_seconds
            while waiting < self._max_pairs and not (self._max_tokens and tokens >= self._max_tokens):
                try:
                    job = self._queue.get(timeout=max(0.0, collect_until - time.perf_counter()))
                except queue.Empty:
                    break
                jobs.append(job)
                waiting, tokens = waiting + len(job.encoded), tokens + job.tokens
            jobs = self._start(jobs)
            if not jobs:
                continue
            try:
                self._execute(jobs)
            except Exception as exc:  # this thread must live on, or every later request would hang
                for job in jobs:
                    if not job.done.is_set():
                        self._fail(job, exc)
            finally:
                with self._lock:
                    self._running_pairs -= sum(len(job.encoded) for job in jobs)
                    if not self._running_pairs and not self._queued_pairs:
                        self.rate.forget()  # idle: until the next forward, admission has only max_requests

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
        rows, start = results.tolist(), 0  # plain floats from here on: one conversion, not a torch call per row
        for job in jobs:
            job.probabilities = rows[start:start + len(job.encoded)]
            start += len(job.encoded)
            job.done.set()

    def _forward_all(self, encoded: list[Encoded], jobs: list[_Job]) -> torch.Tensor:
        if self._instrument:
            started = time.perf_counter()
            for job in jobs:
                waited = started - job.enqueued_at
                for _ in job.encoded:
                    metrics.QUEUE_DURATION.observe(waited)
        started_ns = time.time_ns()
        for job in jobs:
            waiting = self._tracer.start_span("queue wait", context=job.trace_context, start_time=job.enqueued_ns)
            waiting.end(started_ns)
        attributes = {"mgeo.batch.pairs": len(encoded), "mgeo.batch.requests": len(jobs),
                      "mgeo.batch.tokens": sum(job.tokens for job in jobs)}
        with self._tracer.start_as_current_span("forward", context=jobs[0].trace_context, start_time=started_ns,
                                                links=tracing.links_to(job.trace_context for job in jobs),
                                                attributes=attributes, record_exception=False):
            return forward_in_chunks(self._forward, encoded, self._max_pairs, self._observe_forward, self._max_tokens)

    def _observe_forward(self, pairs: int, seconds: float) -> None:
        with self._lock:
            self.rate.observe(pairs, seconds)
        if self._instrument:
            metrics.INFERENCE_DURATION.observe(seconds)
            metrics.INFERENCE_BATCH_SIZE.observe(pairs)

    def _fail(self, job: _Job, exc: Exception) -> None:
        reason = failure_reason(exc)
        log.error("inference failed (%s): %s", reason, exc)
        metrics.INFERENCE_ERRORS.labels(reason).inc()
        job.error = InferenceError(reason, "the model could not score this request; retry later")
        job.done.set()
