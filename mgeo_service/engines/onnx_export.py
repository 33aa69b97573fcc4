"""A checkpoint's ONNX files, exported once: what the ONNX Runtime engine (``ort.py``) loads.

``onnx_files`` finds, or makes, two files for a checkpoint: ``model.onnx`` (float32) and
``model_int8.onnx`` (int8), both computing ``softmax(logits)`` from padded ``input_ids``,
``attention_mask`` and ``token_type_ids``. ``export.json`` beside them records the digest of the
checkpoint they were exported from (``Checkpoint.digest``: config.json and the weights); they are
used only for that checkpoint. They are looked for in two places:

1. ``<model dir>/onnx/``: written by ``mgeo-service export`` (a Docker image's build step), and
   shipped with the default model, so ``make run`` exports nothing;
2. ``<cache dir>/<digest>/``: ``MGEO_ONNX_CACHE_DIR``. Where neither holds them, the first
   worker to load the checkpoint exports into the cache under a file lock while the others wait
   for the lock, then read what it wrote; ``export.json`` is written last, so a folder without it
   is an unfinished export. A read-only model directory is never written to.

The export: transformers' own forward (eager attention) traced by ``torch.onnx.export``. The float32
file is that graph fused by ONNX Runtime's BERT optimiser (embeddings, attention, GELU and layer
norms as single operators; unfused, ONNX Runtime would dispatch them as torch does, op by op).
The int8 file is the unfused graph with each multiply by a weight matrix in integers
(``int8_graph``): fused attention has no fast integer kernel, while ``MatMulInteger`` runs on the
int8 dot-product instructions of CPUs that have them. Weights that are exactly float16 values (the
default model's) are stored as float16 and cast back at load, which halves the file and changes no
result.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
import warnings
from contextlib import contextmanager

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..checkpoint import Checkpoint, CheckpointError, build_model
from ..progress import progress_bar

log = logging.getLogger(__name__)

FLOAT_FILE, INT8_FILE, RECORD_FILE = "model.onnx", "model_int8.onnx", "export.json"
SHIPPED_FOLDER = "onnx"
# Part of every export's key: bumped whenever the exported graphs' inputs, outputs or steps change.
EXPORT_FORMAT = "2"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
# int8 weights use 7 bits (-63..63), so that a CPU without VNNI, whose uint8 x int8 kernel adds pairs of
# products in int16, never saturates: every CPU computes the same answers. Measured on the CCKS validation
# split (bench/int8_options.py, docs/configuration.md): 8-bit weights kept 97.7% of float32's labels on an
# AVX2 CPU, 7-bit 99.3%.
INT8_WEIGHT_BITS = 7


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
    """Whether ``folder`` holds both files, exported from the checkpoint with this key (read from the
    small record beside them: the files themselves are tens of megabytes of weights)."""
    try:
        with open(os.path.join(folder, RECORD_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return record.get("key") == key and all(os.path.exists(os.path.join(folder, name))
                                            for name in (FLOAT_FILE, INT8_FILE))


@contextmanager
def _locked(path: str):
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def export(checkpoint: Checkpoint, folder: str) -> None:
    """Write both files for the checkpoint into ``folder`` (made if missing), then the record that names them."""
    started = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as work, \
            progress_bar(total=3, desc="export", unit="graph") as bar:
        traced = traced_graph(checkpoint, work)
        bar.update()
        graphs = {FLOAT_FILE: lambda: fused_graph(traced, checkpoint, work),
                  INT8_FILE: lambda: int8_graph(onnx.load_model(traced))}
        for name, make in graphs.items():
            onnx.save_model(_float16_storage(make()), os.path.join(work, name))
            os.replace(os.path.join(work, name), os.path.join(folder, name))
            bar.update()
        _write_record(os.path.join(folder, RECORD_FILE), file_key(checkpoint), work)
    log.info("exported the checkpoint to ONNX (float32 and int8) in %s in %.1fs",
             folder, time.perf_counter() - started)


def traced_graph(checkpoint: Checkpoint, work: str) -> str:
    """The checkpoint's forward traced into a float32 file in ``work``, unfused."""
    path = os.path.join(work, "traced.onnx")
    _trace(build_model(checkpoint, attention="eager"), path)
    return path


def fused_graph(traced: str, checkpoint: Checkpoint, work: str) -> onnx.ModelProto:
    """The traced graph fused by ONNX Runtime's BERT optimiser."""
    from onnxruntime.transformers.optimizer import optimize_model
    config = checkpoint.config
    fused = os.path.join(work, "fused.onnx")
    optimize_model(traced, model_type="bert", num_heads=config.num_attention_heads,
                   hidden_size=config.hidden_size).save_model_to_file(fused)
    return onnx.load_model(fused)


def int8_graph(model: onnx.ModelProto, weight_bits: int = INT8_WEIGHT_BITS) -> onnx.ModelProto:
    """``model`` (the unfused traced graph) with each ``MatMul`` by a weight matrix run as ``MatMulInteger``.

    Weights: int8 of ``weight_bits`` bits, one scale per output column. Inputs: each token's row scaled
    by its own largest absolute value to -127..127 and offset to uint8 (zero point 128). A row's scale
    depends on nothing but that row, so a pair gets the same answer alone or in any batch (ONNX Runtime's
    dynamic quantisation scales a whole batch by its largest value: a pair's answer moved with its company),
    and no calibration data is needed: any checkpoint is quantised at its export. Attention's own products
    (queries by keys, weights by values) and the classifier head stay float32.
    """
    graph = model.graph
    weights = {initializer.name: initializer for initializer in graph.initializer}
    largest = 2 ** (weight_bits - 1) - 1
    added = [numpy_helper.from_array(value, name) for name, value in (
        ("int8/step", np.array(1 / 127, np.float32)), ("int8/floor", np.array(1e-12, np.float32)),
        ("int8/offset", np.array(128, np.float32)), ("int8/zero_point", np.array(128, np.uint8)))]
    nodes, quantised = [], {}  # input tensor -> its (uint8 rows, row scales), made once for all its users

    def node(op: str, inputs: list[str], output: str, **attributes) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    for original in graph.node:
        if original.op_type != "MatMul" or original.input[1] not in weights:
            nodes.append(original)
            continue
        rows, weight = original.input
        if rows not in quantised:
            largest_value = node("ReduceMax", [node("Abs", [rows], f"{rows}/int8/abs")], f"{rows}/int8/largest",
                                 axes=[-1], keepdims=1)
            scale = node("Mul", [node("Max", [largest_value, "int8/floor"], f"{rows}/int8/largest_or_floor"),
                                 "int8/step"], f"{rows}/int8/scale")
            rounded = node("Round", [node("Div", [rows, scale], f"{rows}/int8/scaled")], f"{rows}/int8/rounded")
            offset = node("Add", [rounded, "int8/offset"], f"{rows}/int8/offset")
            quantised[rows] = (node("Cast", [offset], f"{rows}/int8/uint8", to=TensorProto.UINT8), scale)
        uint8_rows, row_scale = quantised[rows]
        values = numpy_helper.to_array(weights[weight]).astype(np.float32)
        column_scale = np.maximum(np.abs(values).max(0), 1e-12) / largest
        prefix = original.name
        added += [numpy_helper.from_array(np.clip(np.round(values / column_scale), -largest, largest).astype(np.int8),
                                          f"{prefix}/int8/weight"),
                  numpy_helper.from_array(column_scale.astype(np.float32), f"{prefix}/int8/column_scale"),
                  numpy_helper.from_array(np.array(0, np.int8), f"{prefix}/int8/weight_zero_point")]
        sums = node("MatMulInteger", [uint8_rows, f"{prefix}/int8/weight", "int8/zero_point",
                                      f"{prefix}/int8/weight_zero_point"], f"{prefix}/int8/sums")
        scaled = node("Mul", [node("Cast", [sums], f"{prefix}/int8/float_sums", to=TensorProto.FLOAT), row_scale],
                      f"{prefix}/int8/row_scaled")
        nodes.append(helper.make_node("Mul", [scaled, f"{prefix}/int8/column_scale"], list(original.output),
                                      name=f"{prefix}/int8"))
    used = {name for n in nodes for name in n.input}
    kept = [initializer for initializer in graph.initializer if initializer.name in used]
    del graph.initializer[:], graph.node[:]
    graph.initializer.extend(kept + added)
    graph.node.extend(nodes)
    return model


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


def _write_record(path: str, key: str, work: str) -> None:
    """The export's record, written aside then renamed: it names the checkpoint and the versions that made it."""
    import onnxruntime
    import transformers
    record = {"key": key, "float32": FLOAT_FILE, "int8": INT8_FILE, "int8_weight_bits": INT8_WEIGHT_BITS,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "onnxruntime": onnxruntime.__version__}
    aside = os.path.join(work, RECORD_FILE)
    with open(aside, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(aside, path)
