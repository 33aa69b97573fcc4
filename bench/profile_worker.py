"""Where a worker's time goes under the single-pair load: `python bench/profile_worker.py [--seconds N]`.

Starts `mgeo-service serve` (127.0.0.1, MGEO_* settings from the environment), drives it with
wrk (single pairs, 32 connections) and samples every worker with `py-spy record --gil`: the
thread holding the GIL, that is the Python work every other thread of the worker queues for
(torch releases the GIL while it computes). Prints each step's share of the samples and the
top functions by own samples as Markdown tables, the form BENCHMARKS.md lists them in, and
writes the collapsed stacks beside them.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.run import serve, wrk, wrk_result  # noqa: E402


RATE = 500  # samples per second and worker
# py-spy comes with the bench extra, beside this Python.
PY_SPY = os.path.join(os.path.dirname(sys.executable), "py-spy")


# The steps of a request, by the function that does each (inclusive samples).
STEPS = {
    "Gunicorn: accept, read, write, keep-alive": "gthread.py:ThreadWorker.handle",
    "Flask: dispatch and hooks (whole request)": "app.py:Flask.wsgi_app",
    "read the JSON body": "app.py:read_json_body",
    "validate": "app.py:parse_predict_body",
    "tokenise": "matcher.py:Matcher.encode",
    "result cache": "cache.py:ResultCache.lookup",
    "wait for the batcher": "batcher.py:MicroBatcher.submit",
    "labels and JSON response": "app.py:json_response",
    "request metrics and access log": "app.py:create_app.<locals>.finish_request",
    "model forward (batcher thread)": "matcher.py:Matcher.forward",
}


def worker_pids(master: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, children):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"mgeo_service.sidecar" not in f.read():
                pids.append(pid)
    return pids


def frame_name(frame: str) -> str:
    """`function (path/to/file.py:line)` -> `file.py:function`: stable across lines and checkouts."""
    function, _, where = frame.partition(" (")
    return f"{os.path.basename(where.rsplit(':', 1)[0])}:{function}" if where else function


def top_frames(stacks: list[str], count: int) -> tuple[int, list, list]:
    """Total samples, the samples of each of STEPS, and the functions with the most own samples."""
    inclusive, own, total = collections.Counter(), collections.Counter(), 0
    for line in stacks:
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():  # a continuation of a frame name with a newline in it
            continue
        n = int(samples)
        total += n
        frames = [frame_name(f) for f in stack.split(";")]
        for name in set(frames[1:]):  # the first frame is the thread
            inclusive[name] += n
        own[frames[-1]] += n
    return total, [(step, inclusive[name]) for step, name in STEPS.items()], own.most_common(count)


def table(title: str, rows: list, total: int) -> str:
    lines = [f"| {title} | share of GIL-held samples |", "|---|---|"]
    lines += [f"| `{name}` | {100 * n / total:.1f}% |" for name, n in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15, help="length of the sampled load")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "mgeo-profile"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    process, url, _, _, _ = serve()
    try:
        wrk(url + "/predict", 3, 32).communicate(timeout=60)  # warm-up
        load = wrk(url + "/predict", args.seconds + 4, 32)
        recorders = [subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(args.seconds),
                                       "--rate", str(RATE), "--format", "raw", "--gil", "--nonblocking",
                                       "--output", os.path.join(args.out, f"worker-{pid}.txt")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for pid in worker_pids(process.process.pid)]
        for recorder in recorders:
            recorder.wait(timeout=args.seconds + 60)
        result = wrk_result(load)
    finally:
        process.stop()
    stacks = []
    for name in os.listdir(args.out):
        with open(os.path.join(args.out, name), encoding="utf-8") as f:
            stacks += f.read().splitlines()
    total, steps, own = top_frames(stacks, args.top)
    held = total / (RATE * args.seconds * len(recorders))
    print(f"single pairs, 32 connections: {result['pairs_per_second']} pairs/s; {total} samples from "
          f"{len(recorders)} workers (the GIL held {100 * held:.0f}% of the time), stacks in {args.out}\n")
    print(table("step (inclusive)", steps, total) + "\n")
    print(table("function (own)", own, total))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
