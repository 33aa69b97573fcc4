"""Engines run a model's forward: one small interface, one module each.

- ``ort.py``, ONNX Runtime: every CPU forward (``MGEO_BACKEND=auto``), float32 or dynamic int8, on
  the checkpoint's ONNX export (``onnx_export.py``), made once and reused;
- ``packed.py``, torch: the padding-free TorchScript forward, for CUDA (float32 or float16), and a
  CPU only when asked (``MGEO_BACKEND=torch``).

An engine has ``backend``, ``precision`` (what it computes in), ``note`` (why that is not what was
asked; empty when it is) and ``probabilities(encoded)``: [pairs, labels] float32 on the CPU, in order.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..checkpoint import Checkpoint

Encoded = tuple[list[int], list[int]]  # one pair's token ids and token types


class Engine(Protocol):
    backend: str
    precision: str
    note: str

    def probabilities(self, encoded: Sequence[Encoded]) -> torch.Tensor: ...


def length_groups(lengths: Sequence[int], padding: float) -> list[list[int]]:
    """Indices of ``lengths`` in runs of similar length, shortest first, each padded to its longest at most
    ``padding`` times its real tokens."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= padding * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: ONNX Runtime on a CPU, torch on CUDA (ONNX Runtime here has the CPU provider only)."""
    if backend == "auto":
        return "torch" if device.type == "cuda" else "onnxruntime"
    return backend


def load_engine(checkpoint: Checkpoint, backend: str, device: torch.device, *, threads: int | None,
                fp16: bool, int8: bool, onnx_cache_dir: str) -> Engine:
    """The engine for a resolved ``backend`` on ``device``; fp16 applies on CUDA only, int8 on ONNX Runtime only,
    so one configuration serves a mixed fleet."""
    if backend == "onnxruntime":
        from .ort import OnnxRuntimeEngine
        return OnnxRuntimeEngine(checkpoint, int8=int8, threads=threads, cache_dir=onnx_cache_dir)
    from .packed import TorchEngine
    return TorchEngine(checkpoint, device, fp16=fp16 and device.type == "cuda")
