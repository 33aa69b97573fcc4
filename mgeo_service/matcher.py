"""The address matcher: a BERT cross-encoder that scores pairs of addresses.

It knows nothing of HTTP. ``Matcher.predict`` takes address pairs and gives,
per pair, the argmax label, the probability of each label, and

    similarity = P(exact_match) + 0.5 * P(partial_match)

a graded score in [0, 1] for ranking candidates: 1 for a sure exact match,
0.5 for a sure partial match, 0 for a sure mismatch.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tokenizers import Tokenizer

from .checkpoint import LABELS, CheckpointError, canonical_order, load_checkpoint
from .engines import Encoded, load_engine, resolve_backend

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "models", "default")
DEFAULT_MAX_LENGTH = 128


@dataclass(frozen=True)
class Prediction:
    label: str
    similarity: float
    scores: dict[str, float]

    def as_dict(self) -> dict:
        return {"label": self.label, "similarity": self.similarity, "scores": self.scores}


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available; ``cuda``/``cuda:N`` must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"device {device!r} asked for, but CUDA is not available", "cuda_unavailable")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise CheckpointError(f"device {device!r} does not exist", "cuda_unavailable")
    return resolved


def length_sorted_chunks(encoded: Sequence[Encoded], size: int,
                         max_tokens: int | None = None) -> list[list[int]]:
    """Indices of ``encoded`` in chunks of at most ``size`` pairs and ``max_tokens`` tokens (a pair longer
    than that goes alone), shortest first: attention groups of even length, forwards of bounded work."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    chunks, chunk, tokens = [], [], 0
    for i in order:
        length = len(encoded[i][0])
        if chunk and (len(chunk) == size or (max_tokens and tokens + length > max_tokens)):
            chunks.append(chunk)
            chunk, tokens = [], 0
        chunk.append(i)
        tokens += length
    return chunks + [chunk] if chunk else chunks


def forward_in_chunks(forward: Callable[[list], torch.Tensor], encoded: Sequence[Encoded],
                      size: int, on_forward: Callable[[int, float], None] | None = None,
                      max_tokens: int | None = None) -> torch.Tensor:
    """Probabilities for every encoded pair, in input order, from length-sorted forwards of at most ``size``
    pairs and ``max_tokens`` tokens.

    ``on_forward(pairs, seconds)`` hears about each forward (the service's metrics).
    """
    rows = None
    for chunk in length_sorted_chunks(encoded, size, max_tokens):
        started = time.perf_counter()
        probabilities = forward([encoded[i] for i in chunk])
        if on_forward:
            on_forward(len(chunk), time.perf_counter() - started)
        if rows is None:
            rows = probabilities.new_empty((len(encoded), probabilities.shape[1]))
        rows[chunk] = probabilities  # one indexed copy: row by row, each was a torch call that passed the GIL on
    return rows


def pair_tokenizer(tokenizer, max_length: int):
    """The Rust tokenizer under a fast ``tokenizer``, set to truncate pairs as ``Matcher.encode`` asks (None for a
    tokenizer without one). Called directly it gives the same ids in 58 µs a pair where the wrapper took 101 (its
    per-call set-up): the service tokenises every request holding the GIL."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    backend = Tokenizer.from_str(backend.to_str())  # a copy: the wrapper resets its own on every call
    backend.enable_truncation(max_length, strategy="longest_first")
    backend.no_padding()
    return backend


class Matcher:
    """Loads a model directory once and scores batches of address pairs with an engine (``engines/``)."""

    def __init__(self, model_dir: str | None = None, device: str = "auto", backend: str = "auto",
                 max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 64, batch_tokens: int | None = None,
                 threads: int | None = None, fp16: bool = False, int8: bool = False, onnx_cache_dir: str = ""):
        started = time.perf_counter()
        self.model_dir = model_dir or DEFAULT_MODEL_DIR
        if threads:
            torch.set_num_threads(threads)
        # ONNX Runtime runs on the CPU: asked for by name, "auto" means the CPU.
        self.device = resolve_device("cpu" if backend == "onnxruntime" and device == "auto" else device)
        self.backend = resolve_backend(backend, self.device)
        if self.backend == "onnxruntime" and self.device.type != "cpu":
            raise CheckpointError(f"MGEO_BACKEND=onnxruntime runs on the CPU, not {self.device}")
        checkpoint = load_checkpoint(self.model_dir)
        self.tokenizer = checkpoint.tokenizer
        self.labels = checkpoint.labels
        self.layout = checkpoint.layout
        self.name = checkpoint.name
        self.version = checkpoint.version
        self.pair_order = checkpoint.pair_order
        self.max_length = max_length
        self._pair_tokenizer = pair_tokenizer(self.tokenizer, max_length)
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.engine = load_engine(checkpoint, self.backend, self.device, threads=threads, fp16=fp16, int8=int8,
                                  onnx_cache_dir=onnx_cache_dir)
        self.precision, self.note = self.engine.precision, self.engine.note
        self.load_seconds = time.perf_counter() - started
        log.info("model %s@%s (%s layout) loaded on %s, %s in %s in %.2fs%s",
                 self.name, self.version, self.layout, self.device, self.backend, self.precision, self.load_seconds,
                 f" ({self.note})" if self.note else "")

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        """Token ids per pair as [CLS] a [SEP] b [SEP]; long pairs are truncated to max_length. A model
        that scores pairs in canonical order (``Checkpoint.pair_order``) gets the smaller address first."""
        if self.pair_order == "canonical":
            pairs = [canonical_order(a, b) for a, b in pairs]
        if self._pair_tokenizer is not None:
            # Pair by pair: encode_batch hands the pairs to a thread pool, which cost more CPU than it saved.
            encodings = [self._pair_tokenizer.encode(a, b) for a, b in pairs]
            return [(e.ids, e.type_ids) for e in encodings]
        encoded = self.tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first",
                                 max_length=self.max_length, return_token_type_ids=True,
                                 return_attention_mask=False)
        return list(zip(encoded["input_ids"], encoded["token_type_ids"]))

    def predict(self, pairs: Sequence[tuple[str, str]],
                on_forward: Callable[[int, float], None] | None = None) -> list[Prediction]:
        """One prediction per pair, in input order; ``on_forward`` as ``forward_in_chunks`` takes it."""
        if not pairs:
            return []
        probabilities = forward_in_chunks(self.forward, self.encode(pairs), self.batch_size, on_forward,
                                          max_tokens=self.batch_tokens)
        return [self.prediction(row) for row in probabilities.tolist()]

    def forward(self, encoded: Sequence[Encoded]) -> torch.Tensor:
        """Probabilities [n, labels] for already-encoded pairs: one forward of the engine."""
        return self.engine.probabilities(encoded)

    def prediction(self, row: Sequence[float]) -> Prediction:
        """The label, scores and similarity of one row of ``forward``'s probabilities, as floats (``tolist()``:
        a tensor's elements, read one by one, cost microseconds each)."""
        scores = {label: round(p, 6) for label, p in zip(self.labels, row)}
        label = self.labels[row.index(max(row))]  # the first of equal maxima, as torch.argmax
        similarity = scores.get("exact_match", 0.0) + 0.5 * scores.get("partial_match", 0.0)
        return Prediction(label=label, similarity=round(min(max(similarity, 0.0), 1.0), 6),
                          scores={name: scores[name] for name in LABELS if name in scores})
