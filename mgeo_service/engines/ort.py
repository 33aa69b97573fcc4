"""The ONNX Runtime engine: every CPU forward unless ``MGEO_BACKEND=torch``.

ONNX Runtime runs the checkpoint's exported float32 graph (``onnx_export.py``) with its embeddings,
attention, GELU and layer norms fused into single operators: on a CPU, faster than torch on the
same weights (BENCHMARKS.md). It takes padded batches, so a forward runs its pairs in groups of
similar length (``RUN_PADDING``), one ``run`` each: a batch of requests as they arrived, padded
whole, ran at 0.56 of the rate of the same pairs sorted by length; in such groups, at 0.95.
``run`` releases the GIL, as the torch engine's TorchScript call does, so forwards run side by
side on the cores.

int8 (``onnx_export.int8_graph``: per-token input scales, so a pair's answer does not depend on its
batch) is served only where it pays: at load both graphs are timed on the same batch with the worker's
threads, and where int8 is not at least ``INT8_MIN_SPEEDUP`` times as fast (CPUs without int8
dot-product instructions) the engine serves float32 and says so (``note``, logged and in
``mgeo_model_info``).
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import onnxruntime
import torch

from ..checkpoint import Checkpoint
from . import Encoded, length_groups
from .onnx_export import onnx_files

log = logging.getLogger(__name__)

INT8_NOT_FASTER = "int8_not_faster_here"
# int8 changes answers a little (validation macro-F1 -0.002, 0.7% of labels): served only where it is clearly
# faster. On a 2-core AVX2 CPU it measured 0.9-1.05x float32: a coin toss per start without the margin.
INT8_MIN_SPEEDUP = 1.1
# A run's padded area may pass its real tokens by this factor, per precision served. Measured, one thread,
# arrival-order batches of 32 real pairs (pairs/s; bench/run_padding.py). float32: 1.0: 152.4, 1.05: 164.9,
# 1.1: 166.1, 1.25: 147.8 (an earlier model at 1.0 to 1.25, 1.5 and one padded batch: 54-57, 55-56, 54, 48, 40, 32).
# The int8 graph pays for every padded token and little for a run: 1.0: 405.5, 1.05: 375.5, 1.1: 362.2,
# 1.25: 306.8, so only pairs of one length share a run.
RUN_PADDING = {"float32": 1.1, "int8": 1.0}


def session(path: str, threads: int | None) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, one per physical core
    options.inter_op_num_threads = 1
    # A forward's threads sleep between operators instead of spinning: spinning would take the
    # cores from the forward beside it and from the request threads.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings name nodes, not problems
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def padded(encoded: Sequence[Encoded]) -> dict[str, np.ndarray]:
    """The graph's inputs for encoded pairs: [pairs, longest] token ids, attention mask and token types."""
    ids = np.zeros((len(encoded), max(len(token_ids) for token_ids, _ in encoded)), dtype=np.int64)
    types, mask = np.zeros_like(ids), np.zeros_like(ids)
    for row, (token_ids, type_ids) in enumerate(encoded):
        ids[row, :len(token_ids)], types[row, :len(type_ids)], mask[row, :len(token_ids)] = token_ids, type_ids, 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def int8_speedup(int8: onnxruntime.InferenceSession, float32: onnxruntime.InferenceSession,
                 vocab_size: int) -> float:
    """How many times faster the int8 graph runs than the float32 one on a batch of 8 pairs of 40 tokens (a
    typical forward's size), each timed five times in turn after a warm-up, the best of each kept."""
    ids = np.random.default_rng(0).integers(vocab_size // 2, vocab_size, (8, 40))
    feeds = padded([(list(row), [0] * 20 + [1] * 20) for row in ids])
    best = {float32: float("inf"), int8: float("inf")}
    for graph in best:
        graph.run(None, feeds)
    for _ in range(5):
        for graph in best:
            started = time.perf_counter()
            graph.run(None, feeds)
            best[graph] = min(best[graph], time.perf_counter() - started)
    return best[float32] / best[int8]


class OnnxRuntimeEngine:
    backend = "onnxruntime"

    def __init__(self, checkpoint: Checkpoint, int8: bool, threads: int | None, cache_dir: str):
        float_path, int8_path = onnx_files(checkpoint, cache_dir)
        self._labels = len(checkpoint.labels)
        self._session = session(float_path, threads)
        self.precision, self.note, self.int8_speedup = "float32", "", None
        if int8:
            quantised = session(int8_path, threads)
            self.int8_speedup = int8_speedup(quantised, self._session, checkpoint.config.vocab_size)
            if self.int8_speedup >= INT8_MIN_SPEEDUP:
                self._session, self.precision = quantised, "int8"
            else:
                self.note = INT8_NOT_FASTER
                log.warning("MGEO_INT8: int8 runs at %.2fx the speed of float32 on this CPU, under %.1fx (no fast "
                            "int8 kernel here): serving float32", self.int8_speedup, INT8_MIN_SPEEDUP)

    def probabilities(self, encoded: Sequence[Encoded]) -> torch.Tensor:
        rows = np.empty((len(encoded), self._labels), np.float32)
        for group in length_groups([len(ids) for ids, _ in encoded], RUN_PADDING[self.precision]):
            rows[group] = self._session.run(None, padded([encoded[i] for i in group]))[0]
        return torch.from_numpy(rows)
