"""Which int8 graph MGEO_INT8 serves (``onnx_export.int8_graph``), on the CCKS validation split (never the
held-out one), against float32: macro-F1, labels kept, how far a pair's probabilities move between scored alone
and in its batch, and pairs/s (one thread, length-sorted batches of 32, tokenising excluded), with the CPU's
int8 instructions named.

    .venv/bin/python bench/int8_options.py [--data ../shared/data] [--split validation]

The graphs: ONNX Runtime's dynamic quantisation of the fused graph (what MGEO_INT8 served until
2026-12-06: per-channel, 7-bit uint8 weights, one activation scale per batch), and the unfused graph's
per-token int8 with 8-bit and with 7-bit weights (``INT8_WEIGHT_BITS``). ``--split test`` gives the model
card's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import cpu  # noqa: E402
from mgeo_service.checkpoint import load_checkpoint  # noqa: E402
from mgeo_service.dataset import read_pairs  # noqa: E402
from mgeo_service.engines.onnx_export import fused_graph, int8_graph, traced_graph  # noqa: E402
from mgeo_service.engines.ort import padded, session  # noqa: E402
from mgeo_service.evaluation import classification_report  # noqa: E402
from mgeo_service.matcher import DEFAULT_MODEL_DIR, Matcher, length_sorted_chunks  # noqa: E402
from mgeo_service.train.data import CCKS_FILE, split_pairs  # noqa: E402


def scored(graph, encoded, chunks) -> tuple[np.ndarray, float]:
    rows = np.zeros((len(encoded), 3), dtype=np.float32)
    started = time.perf_counter()
    for chunk in chunks:
        rows[chunk] = graph.run(None, padded([encoded[i] for i in chunk]))[0]
    return rows, len(encoded) / (time.perf_counter() - started)


def dynamic_int8(fused: str, path: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(fused, path, per_channel=True, reduce_range=True, weight_type=QuantType.QUInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--split", default="validation")
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    pairs = split_pairs(read_pairs(os.path.join(args.data, CCKS_FILE)))[args.split]
    matcher = Matcher(args.model, device="cpu", threads=1)
    encoded = matcher.encode([(p.address1, p.address2) for p in pairs])
    truth = [p.label for p in pairs]
    chunks = length_sorted_chunks(encoded, 32)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        checkpoint = load_checkpoint(args.model)
        traced = traced_graph(checkpoint, work)
        fused = os.path.join(work, "fused.onnx")
        onnx.save_model(fused_graph(traced, checkpoint, work), fused)
        reference, rate = scored(session(fused, 1), encoded, chunks)
        results["float32"] = {"macro_f1": classification_report(truth, reference.argmax(1).tolist())["macro_f1"],
                              "pairs_per_second": round(rate, 1)}
        print("float32", json.dumps(results["float32"]), flush=True)
        graphs = {"dynamic int8, fused graph (before 2026-12-06)": lambda path: dynamic_int8(fused, path),
                  "per-token int8, 8-bit weights": lambda path: onnx.save_model(
                      int8_graph(onnx.load_model(traced), weight_bits=8), path),
                  "per-token int8, 7-bit weights (served)": lambda path: onnx.save_model(
                      int8_graph(onnx.load_model(traced)), path)}
        for name, make in graphs.items():
            path = os.path.join(work, "int8.onnx")
            make(path)
            graph = session(path, 1)
            rows, rate = scored(graph, encoded, chunks)
            alone, _ = scored(graph, encoded, [[i] for i in range(len(encoded))])
            change = np.abs(rows - reference).max(1)
            results[name] = {"macro_f1": classification_report(truth, rows.argmax(1).tolist())["macro_f1"],
                             "labels_kept": round(float((rows.argmax(1) == reference.argmax(1)).mean()), 4),
                             "largest_change_median": round(float(np.median(change)), 5),
                             "largest_change_p99": round(float(np.percentile(change, 99)), 4),
                             "alone_vs_batch_largest_change": round(float(np.abs(alone - rows).max()), 6),
                             "pairs_per_second": round(rate, 1)}
            print(name, json.dumps(results[name]), flush=True)
    print(json.dumps({"split": args.split, "pairs": len(pairs), "cpu": cpu(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
