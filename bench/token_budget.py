"""How MGEO_BATCH_MAX_TOKENS was sized: `python bench/token_budget.py [--model DIR] [--pairs N]`.

In-process, on this machine, the way a saturated worker forwards: the stream of real pairs in
arrival order, taken ``max_pairs`` at a time (what the batcher collects under load), each cut
into length-sorted forwards of at most ``max_pairs`` pairs and ``max_tokens`` tokens, one
single-threaded forward per core side by side. Per setting: pairs/s, and the mean and slowest
forward, which is what a request waits for on top of its queue.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.run import pairs  # noqa: E402
from mgeo_service.matcher import Matcher, length_sorted_chunks  # noqa: E402

SETTINGS = [(32, None), (32, 1024), (32, 2048), (64, None), (64, 2048), (64, 4096), (128, 2048), (128, 4096)]


def sweep(matcher: Matcher, encoded: list, settings=SETTINGS) -> list[dict]:
    cores = os.cpu_count() or 1
    rows = []
    for max_pairs, max_tokens in settings:
        batches = [encoded[i:i + max_pairs] for i in range(0, len(encoded), max_pairs)]
        forwards = [[batch[i] for i in chunk] for batch in batches
                    for chunk in length_sorted_chunks(batch, max_pairs, max_tokens)]
        matcher.forward(forwards[0])  # warm-up
        seconds: list[float] = []

        def run(mine):
            for forward in mine:
                started = time.perf_counter()
                matcher.forward(forward)
                seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        threads = [threading.Thread(target=run, args=(forwards[n::cores],)) for n in range(cores)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        rows.append({"max_pairs": max_pairs, "max_tokens": max_tokens, "forwards": len(forwards),
                     "pairs_per_second": round(len(encoded) / elapsed, 1),
                     "mean_forward_ms": round(1000 * sum(seconds) / len(seconds), 1),
                     "slowest_forward_ms": round(1000 * max(seconds), 1)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model directory; default: the shipped model")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--int8", action="store_true")
    args = parser.parse_args()
    matcher = Matcher(args.model, device="cpu", threads=1, int8=args.int8)
    encoded = matcher.encode(pairs(args.pairs))
    print(f"| max pairs | max tokens | forwards | pairs/s | mean forward ms | slowest forward ms |  ({matcher.model_id}, "
          f"{matcher.precision}, {len(encoded)} pairs, {os.cpu_count()} forwards side by side)")
    print("|---|---|---|---|---|---|")
    for row in sweep(matcher, encoded):
        print(f"| {row['max_pairs']} | {row['max_tokens'] or '-'} | {row['forwards']} | {row['pairs_per_second']} | "
              f"{row['mean_forward_ms']} | {row['slowest_forward_ms']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
