"""How the defaults were sized: `python bench/sizing.py [--repeats N]` (127.0.0.1 only, about 10 minutes).

For each layout of workers x batching threads x gthreads x batch wait, on this machine: single
pairs at 32 connections with liveness and readiness probed 10 times a second each, then 32-pair
requests at 4 connections. Prints one Markdown row per run; repeats show the spread.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.run import load, serve, single_pairs_with_probes  # noqa: E402

CORES = str(os.cpu_count())
LAYOUTS = [  # MGEO_* settings; the rest are the defaults
    {"WORKERS": "2", "BATCH_THREADS": "1", "THREADS": "4"},  # the layout before issue 12
    {"WORKERS": "2", "BATCH_THREADS": "1", "THREADS": "64"},
    {"WORKERS": "2", "BATCH_THREADS": "1", "THREADS": "64", "BATCH_WAIT_MS": "10"},
    {"WORKERS": "1", "BATCH_THREADS": CORES, "THREADS": "64"},  # the defaults
    {"WORKERS": "1", "BATCH_THREADS": CORES, "THREADS": "64", "BATCH_WAIT_MS": "10"},
    {"WORKERS": "1", "BATCH_THREADS": "1", "THREADS": "64", "TORCH_THREADS": CORES},
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=12)
    args = parser.parse_args()
    print("| layout | single pairs/s | live p99 ms | ready p99 ms | 32-pair requests: pairs/s |")
    print("|---|---|---|---|---|")
    for _ in range(args.repeats):
        for layout in LAYOUTS:
            process, url, _, _, _ = serve({f"MGEO_{name}": value for name, value in layout.items()})
            try:
                single = single_pairs_with_probes(url, args.seconds, 32)
                batch = load(url + "/predict", args.seconds, 4, batch=32)
            finally:
                process.stop()
            name = " ".join(f"{key}={value}" for key, value in layout.items())
            live, ready = single["probes"]["live"], single["probes"]["ready"]
            print(f"| {name} | {single['pairs_per_second']} | {live['p99_ms']} | {ready['p99_ms']} | "
                  f"{batch['pairs_per_second']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
