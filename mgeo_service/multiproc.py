"""The multiprocess metrics directory (``PROMETHEUS_MULTIPROC_DIR``).

prometheus_client keeps one file per process and metric type, and keeps a dead
worker's counter and histogram files for ever, so that its counts are not lost.
Under worker churn (``max_requests``) the directory grows without bound and
every scrape reads all of it (prometheus/client_python issues 204, 367, 443).
Here the Gunicorn master, the one process that knows for sure a worker is dead,
folds that worker's files into one ``<type>_aggregate.db`` per type, so that
directory size and scrape time stay flat while every total stays exact.

A scrape reads under a shared lock and a fold writes under an exclusive one, so
a scrape never sees a dead worker's counts twice or not at all. The fold
replaces the aggregate atomically before removing the worker's file; the files
are gone before the master forks a replacement, which may reuse the pid.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager

from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict

LOCK_FILE = ".lock"
# Types whose values add up across processes; live gauges are removed by mark_process_dead instead.
SUMMED_TYPES = ("counter", "histogram", "summary", "gauge_sum")


def prepare(path: str) -> None:
    """Empty the directory (stale files would resurrect old counts) and prove it is writable."""
    try:
        if os.path.isdir(path):
            for entry in os.listdir(path):
                target = os.path.join(path, entry)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        else:
            os.makedirs(path)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise SystemExit(f"mgeo-service: PROMETHEUS_MULTIPROC_DIR={path} is not a writable directory: {exc}")


@contextmanager
def locked(path: str, exclusive: bool):
    with open(os.path.join(path, LOCK_FILE), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fold_dead_process(path: str, pid: int) -> None:
    """Forget a dead process's live gauges and add its other values into the aggregates."""
    multiprocess.mark_process_dead(pid, path)
    with locked(path, exclusive=True):
        for kind in SUMMED_TYPES:
            source = os.path.join(path, f"{kind}_{pid}.db")
            if not os.path.exists(source):
                continue
            target = os.path.join(path, f"{kind}_aggregate.db")
            totals: dict[str, float] = {}
            for file in (target, source):
                if os.path.exists(file):
                    for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(file):
                        totals[key] = totals.get(key, 0.0) + value
            staging = target + ".new"  # not *.db: a scrape never reads it
            aggregate = MmapedDict(staging)
            for key, value in totals.items():
                aggregate.write_value(key, value, 0.0)
            aggregate.close()
            os.replace(staging, target)
            os.remove(source)
