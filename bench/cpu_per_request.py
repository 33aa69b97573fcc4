"""CPU time per request, by process and thread, under the single-pair load:
`python bench/cpu_per_request.py [--seconds N] [--connections N]` with MGEO_* settings from the environment.

Starts `mgeo-service serve` (127.0.0.1), warms it up, then reads every thread's user + system time and
voluntary context switches from /proc around one wrk run. A worker's busiest threads are its batching
threads (the forwards and the Python around them); the rest is the main thread and the request threads
(HTTP, Flask, tokenising, JSON). Where the sum over the worker's threads times requests/s stays under the
cores, the worker is not CPU-bound: the GIL or the closed loop's latency is the limit (BENCHMARKS.md, issue 38).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import cpu  # noqa: E402
from bench.profile_worker import worker_pids  # noqa: E402
from bench.run import serve, wrk, wrk_result  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def thread_files(pid: int, name: str) -> dict[int, str]:
    """Each live thread's /proc/PID/task/TID/``name``, by thread id."""
    texts = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}", encoding="utf-8") as f:
                texts[int(tid)] = f.read()
        except OSError:  # the thread ended
            continue
    return texts


def thread_seconds(pid: int) -> dict[int, float]:
    """Each thread's user + system CPU seconds so far."""
    seconds = {}
    for tid, stat in thread_files(pid, "stat").items():
        fields = stat.rpartition(")")[2].split()
        seconds[tid] = (int(fields[11]) + int(fields[12])) / TICKS
    return seconds


def context_switches(pid: int) -> int:
    """The voluntary context switches of every thread so far: each is a thread that blocked, on I/O or on the GIL."""
    return sum(int(line.split()[1]) for status in thread_files(pid, "status").values()
               for line in status.splitlines() if line.startswith("voluntary_ctxt_switches"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    process, url, _, _, _ = serve()
    try:
        wrk(url + "/predict", 3, args.connections).communicate(timeout=60)  # warm-up
        workers = worker_pids(process.process.pid)
        before = {pid: thread_seconds(pid) for pid in workers}
        switches = {pid: context_switches(pid) for pid in workers}
        result = wrk_result(wrk(url + "/predict", args.seconds, args.connections))
        after = {pid: thread_seconds(pid) for pid in workers}
        switches = {pid: context_switches(pid) - switches[pid] for pid in workers}
    finally:
        process.stop()
    requests = result["requests"]
    report = {"machine": cpu(), "pairs_per_second": result["pairs_per_second"], "workers": {}}
    for pid in workers:
        spent = sorted((after[pid][tid] - before[pid].get(tid, 0.0) for tid in after[pid]), reverse=True)
        report["workers"][pid] = {
            "cpu_ms_per_request": round(1000 * sum(spent) / requests, 2),
            "busiest_threads_ms_per_request": [round(1000 * s / requests, 2) for s in spent[:4]],
            "voluntary_context_switches_per_request": round(switches[pid] / requests, 1),
            "threads": len(spent)}
    report["cores_busy"] = round(sum(w["cpu_ms_per_request"] for w in report["workers"].values())
                                 * result["requests_per_second"] / 1000, 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
