"""A checkpoint's ONNX files, exported once: what the ONNX Runtime engine (``ort.py``) loads.

``onnx_files`` finds, or makes, two files for a checkpoint: ``model.onnx`` (float32) and
``model_int8.onnx`` (dynamic int8), both computing ``softmax(logits)`` from padded
``input_ids``, ``attention_mask`` and ``token_type_ids``. Each file records the digest of the
checkpoint it was exported from (``Checkpoint.digest``: config.json and the weights), and is
used only for that checkpoint. They are looked for in two places:

1. ``<model dir>/onnx/``: written by ``mgeo-service export`` (a Docker image's build step), and
   shipped with the default model, so ``make run`` exports nothing;
2. ``<cache dir>/<digest>/``: ``MGEO_ONNX_CACHE_DIR``. Where neither holds them, the first
   worker to load the checkpoint exports into the cache under a file lock while the others wait
   for the lock, then read what it wrote; a file appears whole (written aside, then renamed) or
   not at all. A read-only model directory is never written to.

The export: transformers' own forward (eager attention) traced by ``torch.onnx.export``, then
ONNX Runtime's BERT optimiser fuses embeddings, attention, GELU and layer norms into single
operators (unfused, ONNX Runtime would dispatch them as torch does, op by op). int8 is
ONNX Runtime's dynamic quantisation of that graph (``INT8_OPTIONS``, chosen by measurement in
docs/configuration.md). Weights that are exactly float16 values (the default model's) are
stored as float16 and cast back at load, which halves the file and changes no result.
"""
from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
import warnings
from contextlib import contextmanager

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..checkpoint import Checkpoint, CheckpointError, build_model

log = logging.getLogger(__name__)

FLOAT_FILE, INT8_FILE = "model.onnx", "model_int8.onnx"
SHIPPED_FOLDER = "onnx"
# Part of every file's key: bumped whenever the exported graph's inputs, outputs or steps change.
EXPORT_FORMAT = "1"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
# Dynamic quantisation, chosen on the CCKS validation split (bench/int8_options.py; docs/configuration.md):
# per-channel weight scales, 7-bit weights (reduce_range: the int16 sums of CPUs without VNNI cannot
# saturate) and uint8 weights kept the most (macro-F1 0.6398 against float32's 0.6437; the other seven
# 0.5565-0.6364). On an AVX2 CPU all eight ran at float32's speed (55-59 pairs/s against 57).
INT8_OPTIONS = {"per_channel": True, "reduce_range": True, "weight_type": "QUInt8"}


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mgeo-service", "onnx")


def onnx_files(checkpoint: Checkpoint, cache_dir: str) -> tuple[str, str]:
    """(float32 file, int8 file) for the checkpoint: shipped beside it, cached, or exported now."""
    key = file_key(checkpoint)
    shipped = os.path.join(checkpoint.directory, SHIPPED_FOLDER)
    if exported_for(shipped, key):
        return os.path.join(shipped, FLOAT_FILE), os.path.join(shipped, INT8_FILE)
    cached = os.path.join(cache_dir or default_cache_dir(), key)
    if not exported_for(cached, key):
        try:
            os.makedirs(cached, exist_ok=True)
            with _locked(cached + ".lock"):
                if not exported_for(cached, key):  # another worker may have exported while this one waited
                    export(checkpoint, cached)
        except OSError as exc:
            raise CheckpointError(f"cannot write the ONNX export to {cached!r} ({exc}): set MGEO_ONNX_CACHE_DIR "
                                  "to a writable directory, or run `mgeo-service export` where the model "
                                  "directory is writable") from exc
    return os.path.join(cached, FLOAT_FILE), os.path.join(cached, INT8_FILE)


def file_key(checkpoint: Checkpoint) -> str:
    return f"{checkpoint.digest[:32]}-v{EXPORT_FORMAT}"


def exported_for(folder: str, key: str) -> bool:
    """Whether ``folder`` holds both files, exported from the checkpoint with this key."""
    paths = [os.path.join(folder, name) for name in (FLOAT_FILE, INT8_FILE)]
    if not all(os.path.exists(p) for p in paths):
        return False
    return all(_metadata(p).get("mgeo_export_key") == key for p in paths)


def _metadata(path: str) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_model(path, load_external_data=False).metadata_props}


@contextmanager
def _locked(path: str):
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def export(checkpoint: Checkpoint, folder: str) -> None:
    """Write both files for the checkpoint into ``folder`` (made if missing)."""
    started = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    key = file_key(checkpoint)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        fused = fused_graph(checkpoint, work)
        int8_path = os.path.join(work, INT8_FILE)
        quantise(fused, int8_path, **INT8_OPTIONS)
        for model, name in ((_float16_storage(onnx.load_model(fused)), FLOAT_FILE),
                            (onnx.load_model(int8_path), INT8_FILE)):
            _mark(model, key)
            onnx.save_model(model, os.path.join(work, name))
            os.replace(os.path.join(work, name), os.path.join(folder, name))
    log.info("exported the checkpoint to ONNX (float32 and int8) in %s in %.1fs",
             folder, time.perf_counter() - started)


def fused_graph(checkpoint: Checkpoint, work: str) -> str:
    """The checkpoint traced, then fused by ONNX Runtime's BERT optimiser: a float32 file in ``work``."""
    from onnxruntime.transformers.optimizer import optimize_model
    traced, fused = os.path.join(work, "traced.onnx"), os.path.join(work, "fused.onnx")
    _trace(build_model(checkpoint, attention="eager"), traced)
    config = checkpoint.config
    optimize_model(traced, model_type="bert", num_heads=config.num_attention_heads,
                   hidden_size=config.hidden_size).save_model_to_file(fused)
    return fused


def quantise(fused: str, path: str, per_channel: bool, reduce_range: bool, weight_type: str) -> None:
    """ONNX Runtime's dynamic quantisation of ``fused_graph``'s file into ``path``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quiet = _QuantiserChatter()
    logging.getLogger().addFilter(quiet)
    try:
        # The fused operators are ONNX Runtime's own, which shape inference cannot type: their outputs are float.
        quantize_dynamic(fused, path, per_channel=per_channel, reduce_range=reduce_range,
                         weight_type=getattr(QuantType, weight_type),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        logging.getLogger().removeFilter(quiet)


class _QuantiserChatter(logging.Filter):
    """The quantiser logs a line per tensor at INFO on the root logger; its warnings still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "onnxruntime" not in record.pathname


class _Probabilities(torch.nn.Module):
    """What the ONNX graph computes: the label probabilities of each padded pair."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
        return torch.softmax(logits, dim=-1)


def _trace(model, path: str) -> None:
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # the ids' values do not matter, only shapes
    example = (mask, mask, torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0]]))
    axes = {name: {0: "pairs", 1: "tokens"} for name in INPUTS}
    with warnings.catch_warnings(), torch.inference_mode():
        # The TorchScript exporter (dynamo=False): its graph is the one ONNX Runtime's BERT optimiser
        # fuses whole, and it traces in seconds; it warns that it is deprecated.
        warnings.simplefilter("ignore")
        torch.onnx.export(_Probabilities(model), example, path, input_names=list(INPUTS),
                          output_names=["probabilities"], dynamic_axes={**axes, "probabilities": {0: "pairs"}},
                          opset_version=OPSET, dynamo=False)


def _float16_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each float32 weight that is exactly a float16 value stored as float16 and cast back
    to float32 in the graph (ONNX Runtime folds the cast when it loads): half the file, the same results."""
    graph = model.graph
    casts = []
    for initializer in graph.initializer:
        if initializer.data_type != onnx.TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(initializer)
        halved = values.astype(np.float16)
        if values.size < 1024 or not np.array_equal(halved.astype(np.float32), values):
            continue
        name = initializer.name
        initializer.CopyFrom(numpy_helper.from_array(halved, f"{name}_float16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}_float16"], [name], to=onnx.TensorProto.FLOAT))
    nodes = casts + list(graph.node)  # still in topological order: a cast needs only its initializer
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _mark(model: onnx.ModelProto, key: str) -> None:
    import onnxruntime
    import transformers
    for name, value in (("mgeo_export_key", key), ("torch", torch.__version__),
                        ("transformers", transformers.__version__), ("onnxruntime", onnxruntime.__version__)):
        model.metadata_props.add(key=name, value=value)
