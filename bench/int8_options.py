"""Which of ONNX Runtime's dynamic-quantisation options MGEO_INT8 uses (onnx_export.INT8_OPTIONS): each of
per-channel x reduce_range x weight type, on the CCKS validation split (never the held-out one), against float32:
macro-F1, labels kept, and pairs/s (one thread, length-sorted batches of 32, tokenising excluded).

    .venv/bin/python bench/int8_options.py [--data ../shared/data] [--split validation]

``--chosen`` measures only the options MGEO_INT8 uses (``INT8_OPTIONS``), adding how much a pair's answer
depends on its batch (each pair alone against in the length-sorted batches of 32): the model card's figures,
on ``--split test``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mgeo_service.checkpoint import load_checkpoint  # noqa: E402
from mgeo_service.dataset import read_pairs  # noqa: E402
from mgeo_service.engines.onnx_export import INT8_OPTIONS, fused_graph, quantise  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--split", default="validation")
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR)
    parser.add_argument("--chosen", action="store_true", help="only INT8_OPTIONS, with its batch dependence")
    args = parser.parse_args()
    pairs = split_pairs(read_pairs(os.path.join(args.data, CCKS_FILE)))[args.split]
    matcher = Matcher(args.model, device="cpu", threads=1)
    encoded = matcher.encode([(p.address1, p.address2) for p in pairs])
    truth = [p.label for p in pairs]
    chunks = length_sorted_chunks(encoded, 32)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        fused = fused_graph(load_checkpoint(args.model), work)
        reference, rate = scored(session(fused, 1), encoded, chunks)
        results["float32"] = {"macro_f1": classification_report(truth, reference.argmax(1).tolist())["macro_f1"],
                              "pairs_per_second": round(rate, 1)}
        print(json.dumps(results["float32"]), flush=True)
        variants = [tuple(INT8_OPTIONS.values())] if args.chosen else \
            itertools.product((False, True), (False, True), ("QInt8", "QUInt8"))
        for per_channel, reduce_range, weight_type in variants:
            path = os.path.join(work, "int8.onnx")
            quantise(fused, path, per_channel, reduce_range, weight_type)
            graph = session(path, 1)
            rows, rate = scored(graph, encoded, chunks)
            name = f"per_channel={per_channel} reduce_range={reduce_range} {weight_type}"
            change = np.abs(rows - reference).max(1)
            results[name] = {"macro_f1": classification_report(truth, rows.argmax(1).tolist())["macro_f1"],
                             "labels_kept": round(float((rows.argmax(1) == reference.argmax(1)).mean()), 4),
                             "largest_change_median": round(float(np.median(change)), 4),
                             "largest_change_p99": round(float(np.percentile(change, 99)), 4),
                             "pairs_per_second": round(rate, 1)}
            if args.chosen:
                alone, _ = scored(graph, encoded, [[i] for i in range(len(encoded))])
                moved = np.abs(alone - rows).max(1)
                results[name]["batch_vs_alone"] = {
                    "largest_change_median": round(float(np.median(moved)), 4),
                    "largest_change_max": round(float(moved.max()), 4),
                    "labels_kept": round(float((alone.argmax(1) == rows.argmax(1)).mean()), 4),
                    "macro_f1_alone": classification_report(truth, alone.argmax(1).tolist())["macro_f1"]}
            print(name, json.dumps(results[name]), flush=True)
    print(json.dumps({"split": args.split, "pairs": len(pairs), "results": results}, indent=1))


if __name__ == "__main__":
    main()
