"""How much padding a run of ONNX Runtime should take, per precision (``ort.RUN_PADDING``):
`python bench/run_padding.py [--pairs N]`.

One thread, the bench's real pairs (`bench.run.pairs`) in arrival-order batches of 16 and 32, each batch one
`OnnxRuntimeEngine.probabilities` call (tokenising excluded), the best of three passes; pairs/s per
`RUN_PADDING`, float32 and int8 (where the CPU has no fast int8 kernel the engine serves float32, and the output
says so instead of int8 rows), with the CPU's int8 instructions named.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import cpu  # noqa: E402
from bench.run import pairs  # noqa: E402
from mgeo_service.engines import ort  # noqa: E402
from mgeo_service.matcher import Matcher  # noqa: E402

PADDINGS = (1.0, 1.05, 1.1, 1.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=1600)
    args = parser.parse_args()
    results = {"machine": cpu(), "pairs_per_second": {}}
    for int8 in (False, True):
        matcher = Matcher(device="cpu", backend="onnxruntime", threads=1, int8=int8)
        if int8 and matcher.precision != "int8":
            results["int8"] = matcher.note  # no fast int8 kernel here: float32 is served, measured above
            continue
        encoded = matcher.encode(pairs(args.pairs))
        for size in (16, 32):
            batches = [encoded[i:i + size] for i in range(0, len(encoded), size)]
            for padding in PADDINGS:
                ort.RUN_PADDING[matcher.precision] = padding
                best = float("inf")
                for _ in range(3):
                    started = time.perf_counter()
                    for batch in batches:
                        matcher.engine.probabilities(batch)
                    best = min(best, time.perf_counter() - started)
                results["pairs_per_second"][f"{matcher.precision} batch {size} padding {padding}"] = \
                    round(len(encoded) / best, 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
