"""`make bench`: every figure of BENCHMARKS.md in one run, on the shipped default model, against 127.0.0.1 only.

Writes one JSON document (default bench/results/latest.json) with, per scenario, throughput
(pairs/s), p50/p95/p99 latency and non-2xx counts. Each load lasts --seconds (bounded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mgeo_service.dataset import read_pairs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Real pairs when the shared data is beside the checkout; else the project's own test set.
SHARED_PAIRS = os.path.join(ROOT, "..", "shared", "data", "ccks2021_address_pairs.tsv")
PAIRS_FILE = SHARED_PAIRS if os.path.exists(SHARED_PAIRS) else os.path.join(ROOT, "tests", "data", "address_pairs.tsv")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pairs(count: int = 2000) -> list[tuple[str, str]]:
    """A seeded sample of distinct real pairs, so that batches pad as they would in production."""
    items = [(p.address1, p.address2) for p in read_pairs(PAIRS_FILE)]
    return random.Random(0).sample(items, min(count, len(items)))


def get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return response.status
    except OSError:
        return 0


def wait_for(url: str, timeout: float = 120.0) -> float:
    started = time.monotonic()
    while get(url, 2) != 200:
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{url} not ready after {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - started


class Process:
    def __init__(self, argv, env=None, cwd=ROOT):
        self.log = tempfile.NamedTemporaryFile(prefix="bench-", suffix=".log", delete=False)
        self.process = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=cwd, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def serve(env: dict | None = None, ready_path: str = "/health/ready") -> tuple[Process, str, str, str, float]:
    port, metrics_port = free_port(), free_port()
    multiproc_dir = tempfile.mkdtemp(prefix="bench-multiproc-")
    process = Process([sys.executable, "-m", "mgeo_service", "serve"], {
        "MGEO_BIND": f"127.0.0.1:{port}", "MGEO_METRICS_PORT": str(metrics_port),
        "MGEO_METRICS_BIND": "127.0.0.1", "PROMETHEUS_MULTIPROC_DIR": multiproc_dir,
        # The loads cycle through their pairs: with a cache, the figures would be the cache's.
        "MGEO_CACHE_SIZE": "0", **(env or {})})
    ready = wait_for(f"http://127.0.0.1:{port}{ready_path}")
    return process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", multiproc_dir, ready


def bodies_file(batch: int) -> str:
    items = pairs()
    random.Random(0).shuffle(items)
    f = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8")
    for i in range(len(items) if batch == 1 else 200):
        if batch == 1:
            body = {"address1": items[i][0], "address2": items[i][1]}
        else:
            body = {"pairs": [{"address1": a, "address2": b}
                              for a, b in (items[(i + k) % len(items)] for k in range(batch))]}
        f.write(json.dumps(body, ensure_ascii=False) + "\n")
    f.close()
    return f.name


def wrk(url: str, seconds: int, connections: int, batch: int = 1, threads: int = 2) -> subprocess.Popen:
    script = os.path.join(HERE, "wrk.lua")
    env = {**os.environ, "BENCH_BODIES": bodies_file(batch)}
    return subprocess.Popen(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                             "-s", script, url], stdout=subprocess.PIPE, text=True, env=env)


def wrk_result(process: subprocess.Popen, batch: int = 1) -> dict:
    out, _ = process.communicate(timeout=600)
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    summary["requests_per_second"] = round(summary["requests"] / summary["seconds"], 1)
    summary["pairs_per_second"] = round(summary["requests"] * max(batch, 1) / summary["seconds"], 1)
    return summary


def load(url: str, seconds: int, connections: int, batch: int = 1) -> dict:
    wrk(url, 2, connections, batch).communicate(timeout=60)  # warm-up
    return wrk_result(wrk(url, seconds, connections, batch), batch)


def raw(seconds: float) -> dict:
    """In-process forwards of the matcher: the ceiling, over threads, batch sizes and length sorting."""
    code = r"""
import json, random, sys, time
sys.path.insert(0, sys.argv[1])
from bench.run import pairs
from mgeo_service.matcher import Matcher, length_sorted_chunks
threads, batch, order, seconds = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
m = Matcher(device="cpu", threads=threads, batch_size=batch)
items = pairs()
encoded = m.encode(items)
if order == "sorted":
    chunks = length_sorted_chunks(encoded, batch)
else:
    chunks = [list(range(i, min(i + batch, len(encoded)))) for i in range(0, len(encoded), batch)]
m.forward([encoded[i] for i in chunks[0]])
done, times, started = 0, [], time.perf_counter()
while time.perf_counter() - started < seconds:
    chunk = chunks[len(times) % len(chunks)]
    t = time.perf_counter()
    m.forward([encoded[i] for i in chunk])
    times.append(time.perf_counter() - t)
    done += len(chunk)
times.sort()
print(json.dumps({"pairs_per_second": round(done / (time.perf_counter() - started), 1),
                  "forward_p50_ms": round(1000 * times[len(times) // 2], 2),
                  "forward_p95_ms": round(1000 * times[int(len(times) * 0.95)], 2),
                  "forward_p99_ms": round(1000 * times[int(len(times) * 0.99)], 2)}))
"""
    results = {}
    for threads in (1, 2):
        for batch in (8, 32, 64):
            for order in ("sorted", "unsorted"):
                out = subprocess.run([sys.executable, "-c", code, ROOT, str(threads), str(batch), order,
                                      str(seconds)], capture_output=True, text=True, check=True, cwd=ROOT)
                results[f"threads={threads} batch={batch} {order}"] = json.loads(out.stdout.splitlines()[-1])
    best = max(results, key=lambda k: results[k]["pairs_per_second"])
    return {"configs": results, "best": best, **results[best]}


class Probe(threading.Thread):
    """GETs a URL every `interval` seconds, like a Kubernetes probe, and keeps the latencies."""

    def __init__(self, url: str, seconds: float, interval: float = 0.1):
        super().__init__(daemon=True)
        self.url, self.seconds, self.interval = url, seconds, interval
        self.times: list[float] = []
        self.failures = 0

    def run(self):
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            if get(self.url) != 200:
                self.failures += 1
            self.times.append((time.perf_counter() - started) * 1000)
            time.sleep(max(0.0, self.interval - (time.perf_counter() - started)))

    def result(self) -> dict:
        self.join()
        times = sorted(self.times)
        return {"requests": len(times), "non_2xx": self.failures, "p50_ms": round(times[len(times) // 2], 2),
                "p95_ms": round(times[int(len(times) * 0.95)], 2), "p99_ms": round(times[int(len(times) * 0.99)], 2)}


def scrape_latencies(url: str, count: int = 200) -> dict:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        assert get(url) == 200
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"p50_ms": round(times[len(times) // 2], 2), "p99_ms": round(times[int(len(times) * 0.99) - 1], 2)}


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def churn(restarts: int) -> dict:
    """f: worker churn through max_requests; scrape time and directory size against no churn."""
    # Readiness probes would count towards max_requests too: wait for liveness only.
    process, url, metrics_url, directory, _ = serve({"MGEO_MAX_REQUESTS": "2"}, ready_path="/health/live")
    try:
        started = time.monotonic()
        while True:
            for _ in range(50):
                get(url + "/health/live")
            text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
            starts = float([l for l in text.splitlines() if l.startswith("mgeo_worker_starts_total")][0].split()[1])
            if starts - 2 >= restarts or time.monotonic() - started > 900:
                break
        churned = {"worker_restarts": int(starts - 2), "seconds": round(time.monotonic() - started, 1),
                   "scrape": scrape_latencies(metrics_url), "directory_bytes": directory_bytes(directory),
                   "files": len(os.listdir(directory))}
    finally:
        process.stop()
    process, url, metrics_url, directory, _ = serve()
    try:
        for _ in range(200):
            get(url + "/health/live")
        calm = {"scrape": scrape_latencies(metrics_url), "directory_bytes": directory_bytes(directory),
                "files": len(os.listdir(directory))}
    finally:
        process.stop()
    return {"after_churn": churned, "without_churn": calm,
            "directory_ratio": round(churned["directory_bytes"] / calm["directory_bytes"], 2)}


def peer_litserve(seconds: int, connections: int) -> dict:
    port = free_port()
    process = Process([sys.executable, os.path.join(HERE, "peers", "litserve_app.py"), str(port)])
    try:
        wait_for(f"http://127.0.0.1:{port}/health")
        return load(f"http://127.0.0.1:{port}/predict", seconds, connections)
    finally:
        process.stop()


def peer_flask(seconds: int, connections: int) -> dict:
    port = free_port()
    process = Process([sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}",
                       "bench.peers.flask_exporter_app:app"],
                      {"PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-peer-")})
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                              "-H", "Content-Type: application/json", "-d",
                              '{"address1": "北京", "address2": "北京市"}', f"http://127.0.0.1:{port}/predict"],
                             capture_output=True, text=True).stdout != "200":
            if time.monotonic() > deadline:
                raise RuntimeError("flask peer did not start")
            time.sleep(0.2)
        return load(f"http://127.0.0.1:{port}/predict", seconds, connections)
    finally:
        process.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15, help="length of each load")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--batch-connections", type=int, default=4, help="connections sending 32-pair requests")
    parser.add_argument("--restarts", type=int, default=1000)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    args = parser.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()},
               "command": "make bench", "pairs_file": os.path.relpath(PAIRS_FILE, ROOT), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def step(name, run):
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        result = run()
        results.setdefault(name, result)
        print(f"bench: {name}: {json.dumps(result)}", file=sys.stderr, flush=True)

    step("raw", lambda: raw(args.seconds / 3))
    ready_times = []

    def service_runs():
        process, url, _, _, ready = serve()
        ready_times.append(ready)
        try:
            wrk(url + "/predict", 2, args.connections).communicate(timeout=60)  # warm-up
            live = Probe(url + "/health/live", args.seconds)  # e: probes 10 times a second during b
            live.start()
            single = wrk(url + "/predict", args.seconds, args.connections)
            results["service"] = wrk_result(single)
            results["health_live_under_load"] = live.result()
            results["service_batch"] = load(url + "/predict", args.seconds, args.batch_connections, batch=32)
            return {k: results[k] for k in ("service", "health_live_under_load", "service_batch")}
        finally:
            process.stop()

    step("service", service_runs)

    def metrics_off():
        process, url, _, _, ready = serve({"MGEO_METRICS": "0"})
        ready_times.append(ready)
        try:
            return load(url + "/predict", args.seconds, args.connections)
        finally:
            process.stop()

    step("service_metrics_off", metrics_off)
    step("churn", lambda: churn(args.restarts))
    step("time_to_ready", lambda: {"seconds": [round(t, 2) for t in ready_times],
                                   "median_seconds": round(statistics.median(ready_times), 2)})
    step("peer_litserve", lambda: peer_litserve(args.seconds, args.connections))
    step("peer_flask_exporter", lambda: peer_flask(args.seconds, args.connections))

    ceiling = results["raw"]["pairs_per_second"]
    service_pps = results["service"]["pairs_per_second"]
    results["targets"] = {
        "service_vs_raw": round(service_pps / ceiling, 3),
        "metrics_cost": round(1 - service_pps / results["service_metrics_off"]["pairs_per_second"], 3),
        "health_live_p99_ms": results["health_live_under_load"]["p99_ms"],
        "scrape_p99_ms_after_churn": results["churn"]["after_churn"]["scrape"]["p99_ms"],
        "directory_ratio": results["churn"]["directory_ratio"],
        "time_to_ready_seconds": results["time_to_ready"]["median_seconds"],
        "service_vs_litserve": round(service_pps / results["peer_litserve"]["pairs_per_second"], 2),
        "service_vs_flask_exporter": round(service_pps / results["peer_flask_exporter"]["pairs_per_second"], 2),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    print(json.dumps(results["targets"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
