"""`make bench`: every figure of BENCHMARKS.md in one run, on the shipped default model, against 127.0.0.1 only.

Writes one JSON document (default bench/results/latest.json) with, per scenario, throughput
(pairs/s), p50/p95/p99 latency and non-2xx counts. Each load lasts --seconds (bounded).
"""
from __future__ import annotations

import argparse
import http.client
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
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.base import SERVICE_ENV as BASE_SERVICE_ENV, build_checkpoints  # noqa: E402
from bench.machine import cpu  # noqa: E402
from bench.openloop import open_loop, summary  # noqa: E402
from bench.otlp import OtlpReceiver  # noqa: E402
from mgeo_service.config import SETTINGS  # noqa: E402
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


def bodies_file(batch: int = 1, repeat_share: float = 0.0, listed: bool = False) -> str:
    """The request stream as JSON bodies, one per line: the 2,000 pairs in a seeded order, one or
    ``batch`` per body; with ``repeat_share``, that share of single-pair bodies is one of 200 popular pairs.
    ``listed`` writes single pairs in the batch form too (``{"pairs": [pair]}``: what BentoML's batchable API takes)."""
    items = pairs()
    rng = random.Random(0)
    rng.shuffle(items)
    if batch > 1 or listed:
        bodies = [{"pairs": [{"address1": a, "address2": b} for a, b in items[i:i + batch]]}
                  for i in range(0, len(items) - batch + 1, batch)]
    elif repeat_share:
        popular, rest = items[:200], iter(items[200:] * 3)
        bodies = [dict(zip(("address1", "address2"), rng.choice(popular) if rng.random() < repeat_share
                           else next(rest))) for _ in range(5000)]
    else:
        bodies = [{"address1": a, "address2": b} for a, b in items]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f:
        f.writelines(json.dumps(body, ensure_ascii=False) + "\n" for body in bodies)
    return f.name


def wrk(url: str, seconds: int, connections: int, batch: int = 1, threads: int = 2,
        repeat_share: float = 0.0, listed: bool = False) -> subprocess.Popen:
    script = os.path.join(HERE, "wrk.lua")
    env = {**os.environ, "BENCH_BODIES": bodies_file(batch, repeat_share, listed)}
    return subprocess.Popen(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                             "-s", script, url], stdout=subprocess.PIPE, text=True, env=env)


def wrk_result(process: subprocess.Popen, batch: int = 1) -> dict:
    out, _ = process.communicate(timeout=600)
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    summary["requests_per_second"] = round(summary["requests"] / summary["seconds"], 1)
    answered = summary["requests"] - summary["non_2xx"]  # a 429 or 504 scored nothing
    summary["pairs_per_second"] = round(answered * max(batch, 1) / summary["seconds"], 1)
    return summary


def load(url: str, seconds: int, connections: int, batch: int = 1, listed: bool = False) -> dict:
    wrk(url, 2, connections, batch, listed=listed).communicate(timeout=60)  # warm-up
    return wrk_result(wrk(url, seconds, connections, batch, listed=listed), batch)


def ceiling(model_dir: str = "", int8: bool = False, count: int = 2000, batches=(8, 16, 32, 64),
            backend: str = "onnxruntime") -> dict:
    """The same ``count`` pairs through the matcher in-process on ``backend``'s engine: tokenised, sorted by
    length across the whole stream, forwards of each batch size, answers built. Two ways to use the cores: one
    forward at a time on all of them, or one single-threaded forward per core side by side (what the service's
    batching threads do). The best of all is the ceiling."""
    code = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
from bench.run import pairs
from mgeo_service.matcher import Matcher, length_sorted_chunks
batch, side_by_side, cores = int(sys.argv[2]), sys.argv[3] == "side_by_side", os.cpu_count()
matcher = Matcher(sys.argv[4] or None, device="cpu", threads=1 if side_by_side else cores, batch_size=batch,
                  int8=sys.argv[5] == "int8", backend=sys.argv[7])
items = pairs(int(sys.argv[6]))
matcher.predict(items[:batch])  # warm-up
started = time.perf_counter()
if side_by_side:
    encoded = matcher.encode(items)
    chunks = length_sorted_chunks(encoded, batch)
    rows = [None] * len(encoded)
    def run(mine):
        for chunk in mine:
            for i, row in zip(chunk, matcher.forward([encoded[i] for i in chunk]).tolist()):
                rows[i] = row
    threads = [threading.Thread(target=run, args=(chunks[n::cores],)) for n in range(cores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [matcher.prediction(row) for row in rows]
else:
    matcher.predict(items)
print(json.dumps({"pairs_per_second": round(len(items) / (time.perf_counter() - started), 1),
                  "precision": matcher.precision}))
"""
    results, precision = {}, None
    for mode in ("one_forward_all_cores", "side_by_side"):
        for batch in batches:
            out = subprocess.run([sys.executable, "-c", code, ROOT, str(batch), mode, model_dir,
                                  "int8" if int8 else "float32", str(count), backend], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            measured = json.loads(out.stdout.splitlines()[-1])
            results[f"{mode} batch={batch}"], precision = measured["pairs_per_second"], measured["precision"]
    best = max(results, key=results.get)
    # precision: what the engine served (int8 asked for, float32 where int8 measured slower at load)
    return {"pairs_per_second": results[best], "best": best, "backend": backend, "precision": precision,
            "configs": results}


def padded_forward(model, encoded) -> torch.Tensor:
    """transformers' own forward of a padded batch (``model``: ``build_model``'s): what the engines replace."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.zeros((len(encoded), width), dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (token_ids, type_ids) in enumerate(encoded):
        ids[row, :len(token_ids)], types[row, :len(type_ids)] = torch.tensor(token_ids), torch.tensor(type_ids)
        mask[row, :len(token_ids)] = 1
    device = model.device
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), token_type_ids=types.to(device),
                       attention_mask=mask.to(device)).logits
    return torch.softmax(logits.float(), -1).cpu()


def forwards() -> dict:
    """Forward alone on all cores, the 2,000 pairs once in batches of 32: ONNX Runtime (float32, and int8 whether
    or not it is faster here), the torch engine's packed forward, and transformers' padded one (plain transformers),
    in arrival order and sorted by length across the whole stream."""
    code = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from bench.run import pairs, padded_forward
from mgeo_service.checkpoint import build_model, load_checkpoint
from mgeo_service.engines.onnx_export import onnx_files
from mgeo_service.engines.ort import padded, session
from mgeo_service.matcher import Matcher, length_sorted_chunks
cores = os.cpu_count()
matcher = Matcher(device="cpu", threads=cores)
packed = Matcher(device="cpu", threads=cores, backend="torch")
checkpoint = load_checkpoint(matcher.model_dir)
model = build_model(checkpoint)
int8 = session(onnx_files(checkpoint, "")[1], cores)
encoded = matcher.encode(pairs())
orders = {"arrival": [list(range(i, min(i + 32, len(encoded)))) for i in range(0, len(encoded), 32)],
          "sorted": length_sorted_chunks(encoded, 32)}
results = {}
for name, forward in (("onnxruntime", matcher.forward),
                      ("onnxruntime_int8", lambda b: torch.from_numpy(int8.run(None, padded(b))[0])),
                      ("torch_packed", packed.forward), ("transformers_padded", lambda b: padded_forward(model, b))):
    for order, chunks in orders.items():
        forward([encoded[i] for i in chunks[0]])
        started = time.perf_counter()
        for chunk in chunks:
            forward([encoded[i] for i in chunk])
        results[f"{name} {order}"] = round(len(encoded) / (time.perf_counter() - started), 1)
print(json.dumps(results))
"""
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.splitlines()[-1])


def physical_limit(model_dir: str = "", int8: bool = False) -> dict:
    """Model FLOPs per pair at the stream's mean length over the matmul FLOP/s ONNX Runtime reaches on all
    cores for a 2048x2048 product: float32 (MatMul), or with ``int8`` uint8 x int8 with int32 sums
    (MatMulInteger, what its dynamic int8 multiplies with)."""
    code = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, onnx, onnxruntime
from onnx import TensorProto, helper
from bench.run import pairs
from mgeo_service.checkpoint import load_checkpoint
from mgeo_service.matcher import DEFAULT_MODEL_DIR, Matcher
int8 = sys.argv[3] == "int8"
checkpoint = load_checkpoint(sys.argv[2] or DEFAULT_MODEL_DIR)
items = pairs()
encoded = checkpoint.tokenizer([a for a, _ in items], [b for _, b in items], truncation="longest_first",
                               max_length=128)["input_ids"]
tokens = sum(len(ids) for ids in encoded) / len(items)
c = checkpoint.config
h, i, n = c.hidden_size, c.intermediate_size, tokens
# Per layer and token: Q, K, V and output projections, the two feed-forward matrices, and
# attention's scores and weighted sum over the pair's n tokens; then pooler and classifier.
flops = c.num_hidden_layers * n * 2 * (4 * h * h + 2 * h * i + 2 * n * h) + 2 * h * h + 2 * h * c.num_labels
rng = np.random.default_rng(0)
if int8:
    a, b = rng.integers(0, 255, (2048, 2048), dtype=np.uint8), rng.integers(-127, 127, (2048, 2048), dtype=np.int8)
    node, types = helper.make_node("MatMulInteger", ["a", "b"], ["c"]), (TensorProto.UINT8, TensorProto.INT8)
    out_type = TensorProto.INT32
else:
    a, b = rng.standard_normal((2048, 2048), dtype=np.float32), rng.standard_normal((2048, 2048), dtype=np.float32)
    node, types, out_type = helper.make_node("MatMul", ["a", "b"], ["c"]), (TensorProto.FLOAT,) * 2, TensorProto.FLOAT
graph = helper.make_graph([node], "matmul", [helper.make_tensor_value_info(n, t, [2048, 2048])
                                             for n, t in zip("ab", types)],
                          [helper.make_tensor_value_info("c", out_type, [2048, 2048])])
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = os.cpu_count()
product = onnxruntime.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                       .SerializeToString(), options, providers=["CPUExecutionProvider"])
times = []
for _ in range(12):
    started = time.perf_counter()
    product.run(None, {"a": a, "b": b})
    times.append(time.perf_counter() - started)
matmul = 2 * 2048 ** 3 / min(times[2:])
print(json.dumps({"mean_tokens": round(tokens, 2), "gflop_per_pair": round(flops / 1e9, 3),
                  "matmul_gflops": round(matmul / 1e9, 1), "pairs_per_second": round(matmul / flops, 1)}))
"""
    out = subprocess.run([sys.executable, "-c", code, ROOT, model_dir, "int8" if int8 else "float32"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.splitlines()[-1])


def drain(metrics_url: str, timeout: float = 120.0) -> None:
    """Until no /predict is in progress: requests a load left behind (its clients gone) still hold
    threads and count against admission until their forward starts."""
    deadline = time.monotonic() + timeout
    while any(value for series, value in scrape(metrics_url).items()
              if series.startswith("mgeo_requests_inprogress") and "/predict" in series):
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not drain")
        time.sleep(0.2)


def single_pairs_with_probes(url: str, seconds: int, connections: int, repeat_share: float = 0.0,
                             metrics_url: str | None = None) -> dict:
    """Single pairs at ``connections`` after a warm-up (and, given ``metrics_url``, once the warm-up's
    requests are answered), with liveness and readiness probed 10 times a second each during the
    load: wrk's summary plus the probes' latencies."""
    wrk(url + "/predict", 3, connections, repeat_share=repeat_share).communicate(timeout=60)
    if metrics_url:
        drain(metrics_url)
    probes = {"live": Probe(url + "/health/live", seconds), "ready": Probe(url + "/health/ready", seconds)}
    for probe in probes.values():
        probe.start()
    result = wrk_result(wrk(url + "/predict", seconds, connections, repeat_share=repeat_share))
    result["probes"] = {name: probe.result() for name, probe in probes.items()}
    return result


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


def scrape(metrics_url: str) -> dict[str, float]:
    """Each sample of the sidecar's /metrics by its series, e.g. 'mgeo_cache_requests_total{result="hit"}'."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {series: float(value) for series, _, value in
            (line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#"))}


def worker_starts(metrics_url: str) -> float:
    return scrape(metrics_url)["mgeo_worker_starts_total"]


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def churn(restarts: int) -> dict:
    """f: worker churn through max_requests; scrape time and directory size against no churn."""
    # Readiness probes would count towards max_requests too: wait for liveness only.
    process, url, metrics_url, directory, _ = serve({"MGEO_MAX_REQUESTS": "2", "MGEO_WORKERS": "2"},
                                                    ready_path="/health/live")
    try:
        started = time.monotonic()
        while True:
            for _ in range(50):
                get(url + "/health/live")
            starts = worker_starts(metrics_url)
            if starts - 2 >= restarts or time.monotonic() - started > 900:
                break
        churned = {"worker_restarts": int(starts - 2), "seconds": round(time.monotonic() - started, 1),
                   "scrape": scrape_latencies(metrics_url), "directory_bytes": directory_bytes(directory),
                   "files": len(os.listdir(directory))}
    finally:
        process.stop()
    process, url, metrics_url, directory, _ = serve({"MGEO_WORKERS": "2"})
    try:
        for _ in range(200):
            get(url + "/health/live")
        calm = {"scrape": scrape_latencies(metrics_url), "directory_bytes": directory_bytes(directory),
                "files": len(os.listdir(directory))}
    finally:
        process.stop()
    return {"after_churn": churned, "without_churn": calm,
            "directory_ratio": round(churned["directory_bytes"] / calm["directory_bytes"], 2)}


def peer_litserve(seconds: int, connections: int, env: dict | None = None) -> dict:
    port = free_port()
    process = Process([sys.executable, "-m", "bench.peers.litserve_app", str(port)], env)
    try:
        wait_for(f"http://127.0.0.1:{port}/health")
        return load(f"http://127.0.0.1:{port}/predict", seconds, connections)
    finally:
        process.stop()


BENTOML_VENV = os.path.join(ROOT, ".venv-bentoml")


def peer_bentoml(seconds: int, connections: int, multiples=(2, 4), give_up: float = 2.0) -> dict:
    """``bursts`` against BentoML (bench/peers/bentoml_app.py) on the same weights, its timeout the clients'."""
    port = free_port()
    process = Process([os.path.join(BENTOML_VENV, "bin", "bentoml"), "serve", "bench.peers.bentoml_app:MGeo",
                       "--host", "127.0.0.1", "--port", str(port)],
                      {"PYTHONPATH": ROOT, "BENCH_TIMEOUT_S": str(give_up), "BENTOML_DO_NOT_TRACK": "True"})
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", timeout=300)
        return bursts(f"http://127.0.0.1:{port}/predict", seconds, connections, multiples, give_up, listed=True,
                      probes={"live": f"http://127.0.0.1:{port}/livez", "ready": f"http://127.0.0.1:{port}/readyz"},
                      keep_alive=(False, True))
    finally:
        process.stop()


def peer_flask(seconds: int, connections: int, env: dict | None = None) -> dict:
    port = free_port()
    process = Process([sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}",
                       "bench.peers.flask_exporter_app:app"],
                      {"PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-peer-"), **(env or {})})
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


def base_size(seconds: int, connections: int, ceiling_pairs: int) -> dict:
    """MGeo base's shape (bench/base.py): per precision the ceiling on ``ceiling_pairs``, the physical limit,
    single pairs at ``connections`` and 32-pair requests at 2 connections through the service; the peers in
    float32. Loads run twice ``seconds``: a base-size forward of 32 pairs takes seconds here."""
    mgeo, hf = build_checkpoints(os.path.join(tempfile.gettempdir(), "mgeo-bench-base"))
    result = {}
    for precision, int8 in (("float32", False), ("int8", True)):
        measured = {"ceiling": ceiling(mgeo, int8, ceiling_pairs, batches=(32,)),
                    "ceiling_torch": ceiling(mgeo, False, ceiling_pairs, batches=(32,), backend="torch")
                    if not int8 else None,
                    "physical_limit": physical_limit(mgeo, int8)}
        process, url, metrics_url, _, _ = serve({**BASE_SERVICE_ENV, "MGEO_MODEL_DIR": mgeo,
                                                 "MGEO_INT8": str(int(int8))})
        try:
            measured["service"] = single_pairs_with_probes(url, 2 * seconds, connections,
                                                           metrics_url=metrics_url)
            drain(metrics_url)
            measured["service_batch"] = load(url + "/predict", 2 * seconds, 2, batch=32)
        finally:
            process.stop()
        measured["single_vs_ceiling"] = round(
            measured["service"]["pairs_per_second"] / measured["ceiling"]["pairs_per_second"], 3)
        result[precision] = measured
        print(f"bench: base_size {precision}: {json.dumps(measured)}", file=sys.stderr, flush=True)
    peers = {"BENCH_MODEL_DIR": hf}
    result["peer_litserve"] = peer_litserve(2 * seconds, connections, peers)
    result["peer_litserve_onnx"] = peer_litserve(2 * seconds, connections, {**peers, "BENCH_ENGINE": "onnx"})
    result["peer_flask_exporter"] = peer_flask(2 * seconds, connections, peers)
    single = result["float32"]["service"]["pairs_per_second"]
    result["int8_vs_float32_service"] = round(result["int8"]["service"]["pairs_per_second"] / single, 2)
    result["vs_litserve"] = round(single / result["peer_litserve"]["pairs_per_second"], 2)
    result["vs_flask_exporter"] = round(single / result["peer_flask_exporter"]["pairs_per_second"], 2)
    return result


def bursts(url: str, seconds: int, connections: int, multiples, give_up: float, listed: bool = False,
           forwards=None, probes: dict | None = None, keep_alive=(False,)) -> dict:
    """Closed-loop capacity (wrk, single pairs), then open-loop arrivals at ``multiples`` of it for
    ``seconds`` each, every client giving up after ``give_up`` s, the ``probes`` (name: URL) probed
    during each burst, for each kind of client in ``keep_alive`` (a new connection per request; a
    kept-alive pool); after each burst, the time one request takes (and, given ``forwards``, a
    count of forwards: the ones that ran for it)."""
    capacity = load(url, seconds, connections, listed=listed)
    with open(bodies_file(listed=listed), "rb") as f:
        bodies = f.read().splitlines()
    results = {"closed_loop": capacity}
    for multiple, pooled in ((m, k) for k in keep_alive for m in multiples):
        rate = capacity["pairs_per_second"] * multiple
        probing = {name: Probe(probe_url, seconds) for name, probe_url in (probes or {}).items()}
        for probe in probing.values():
            probe.start()
        answers = open_loop(url, bodies, rate, int(rate * seconds), give_up, keep_alive=pooled)
        result = summary(answers, give_up)
        result["in_time_vs_capacity"] = round(result["pairs_in_time_per_second"] / capacity["pairs_per_second"], 3)
        if probing:
            result["probes"] = {name: probe.result() for name, probe in probing.items()}
        before = forwards() if forwards else 0
        started = time.perf_counter()
        after, = open_loop(url, bodies[:1], 1, 1, 60)
        result["after_burst"] = {"status": after.status, "seconds": round(time.perf_counter() - started, 3)}
        if forwards:
            result["after_burst"]["forwards"] = forwards() - before
        results[f"open_loop_{multiple}x" + ("_keep_alive" if pooled else "")] = result
    return results


def slow_clients(seconds: int, connections: int, slow: int = 128) -> dict:
    """Closed-loop single pairs (wrk) alone, then beside ``slow`` connections (2x the worker's threads) that
    send a head and half a body, then nothing, each opened again once the service closes it: p99s, and
    how each slow connection ended and when."""
    process, url, metrics_url, _, _ = serve()
    try:
        alone = load(url + "/predict", seconds, connections)
        drain(metrics_url)
        port = int(url.rpartition(":")[2])
        body = b'{"address1": "\\u5317\\u4eac", "address2": "\\u5317\\u4eac"}'
        head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        ends, stop = [], threading.Event()

        def hold():
            while not stop.is_set():
                opened = time.perf_counter()
                with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
                    connection.sendall(head + body[:len(body) // 2])
                    answer = connection.recv(4096)
                    ends.append((answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed",
                                 time.perf_counter() - opened))
        holders = [threading.Thread(target=hold, daemon=True) for _ in range(slow)]
        for holder in holders:
            holder.start()
        beside = load(url + "/predict", seconds, connections)
        stop.set()
        for holder in holders:
            holder.join(60)
        outcomes = {}
        for line, _ in ends:
            outcomes[line] = outcomes.get(line, 0) + 1
        return {"alone": alone, "beside_slow": beside, "slow_connections": slow, "slow_outcomes": outcomes,
                "slow_longest_seconds": round(max(s for _, s in ends), 3) if ends else None,
                "p99_ratio": round(beside["p99_ms"] / alone["p99_ms"], 2)}
    finally:
        process.stop()


def overload(seconds: int, connections: int, multiples=(2, 4), give_up: float = 2.0) -> dict:
    """``bursts`` against the service (its default deadline is the clients' ``give_up``), with the
    requests it refused by reason."""
    process, url, metrics_url, _, _ = serve()
    try:
        results = bursts(url + "/predict", seconds, connections, multiples, give_up,
                         forwards=lambda: scrape(metrics_url)["mgeo_inference_batch_size_count"],
                         probes={"live": url + "/health/live", "ready": url + "/health/ready"},
                         keep_alive=(False, True))
        samples = scrape(metrics_url)
        results["rejected"] = {series: value for series, value in samples.items()
                               if series.startswith("mgeo_rejected_requests_total")}
        return results
    finally:
        process.stop()


def sighup(seconds: int, clients: int = 8) -> dict:
    """SIGHUP (reload every worker) in the middle of a load of client threads, a new connection per request."""
    process, url, metrics_url, _, _ = serve()
    body = json.dumps({"address1": "北京市海淀区中关村大街1号", "address2": "北京海淀中关村大街1号"}).encode()
    statuses, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            request = urllib.request.Request(url + "/predict", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    response.read()
                    statuses.append(response.status)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)
            except (OSError, http.client.HTTPException) as exc:
                failures.append(type(exc).__name__)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(seconds / 3)
        before, workers = len(statuses), worker_starts(metrics_url)
        process.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and worker_starts(metrics_url) < 2 * workers:  # the new workers
            time.sleep(0.2)
        time.sleep(seconds / 3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        process.stop()
    return {"requests": len(statuses) + len(failures), "after_sighup": len(statuses) - before,
            "non_200": sum(status != 200 for status in statuses), "failed": len(failures)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15, help="length of each load")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--batch-connections", type=int, default=4, help="connections sending 32-pair requests")
    parser.add_argument("--restarts", type=int, default=1000)
    parser.add_argument("--base-pairs", type=int, default=400, help="pairs of the base-size in-process ceiling")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (no targets then)")
    args = parser.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "cpu": cpu(), "platform": platform.platform(),
                           "python": platform.python_version()},
               "command": "make bench", "pairs_file": os.path.relpath(PAIRS_FILE, ROOT),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def step(name, run):
        if args.only and name not in args.only:
            return
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        results[name] = run()
        print(f"bench: {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)

    step("ceiling", ceiling)
    step("ceiling_int8", lambda: ceiling(int8=True))
    step("ceiling_torch", lambda: ceiling(backend="torch"))
    step("physical_limit", physical_limit)
    step("forwards", forwards)
    ready_times = []

    def service(env: dict | None = None, repeat_share: float = 0.0) -> dict:
        """Single pairs at --connections, probed (single_pairs_with_probes); ``env`` on top of serve's."""
        process, url, metrics_url, _, ready = serve(env)
        ready_times.append(ready)
        try:
            # after the warm-up's abandoned requests are answered: they would count against admission
            result = single_pairs_with_probes(url, args.seconds, args.connections, repeat_share, metrics_url)
            if repeat_share:
                samples = scrape(metrics_url)
                hits, misses = (samples[f'mgeo_cache_requests_total{{result="{r}"}}'] for r in ("hit", "miss"))
                result["cache_hit_ratio"] = round(hits / (hits + misses), 3)
            return result
        finally:
            process.stop()

    def service_batch(env: dict | None = None) -> dict:
        process, url, _, _, ready = serve(env)
        ready_times.append(ready)
        try:
            return load(url + "/predict", args.seconds, args.batch_connections, batch=32)
        finally:
            process.stop()

    def service_traced(ratio: float) -> dict:
        """``service`` with every worker exporting traces to a receiver on this host, sampled at ``ratio``."""
        with OtlpReceiver(keep=False) as receiver:
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
            if ratio < 1:
                env |= {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(ratio)}
            result = service(env)
            result["spans_exported"] = receiver.span_count
            return result

    step("service", service)
    step("slow_clients", lambda: slow_clients(args.seconds, args.connections))
    step("service_batch", service_batch)
    # The engine's share of b and c: the same service on the torch engine (the packed forward).
    step("service_torch", lambda: service({"MGEO_BACKEND": "torch"}))
    step("service_batch_torch", lambda: service_batch({"MGEO_BACKEND": "torch"}))
    step("service_metrics_off", lambda: service({"MGEO_METRICS": "0"}))
    step("service_int8", lambda: service({"MGEO_INT8": "1"}))
    step("service_traced", lambda: service_traced(1.0))
    step("service_traced_1_percent", lambda: service_traced(0.01))
    # The only scenario with the result cache on (as shipped): 90% of requests repeat 200 pairs.
    step("service_repeat_heavy", lambda: service({"MGEO_CACHE_SIZE": SETTINGS["MGEO_CACHE_SIZE"]["default"]}, 0.9))
    step("overload", lambda: overload(args.seconds, args.connections))
    step("sighup", lambda: sighup(args.seconds))
    step("churn", lambda: churn(args.restarts))
    if ready_times:
        step("time_to_ready", lambda: {"seconds": [round(t, 2) for t in ready_times],
                                       "median_seconds": round(statistics.median(ready_times), 2)})
    step("peer_litserve", lambda: peer_litserve(args.seconds, args.connections))
    step("peer_litserve_onnx", lambda: peer_litserve(args.seconds, args.connections, {"BENCH_ENGINE": "onnx"}))
    step("peer_flask_exporter", lambda: peer_flask(args.seconds, args.connections))
    step("peer_bentoml", lambda: peer_bentoml(args.seconds, args.connections))
    step("base_size", lambda: base_size(args.seconds, args.connections, args.base_pairs))

    if args.only:
        print(json.dumps({name: results[name] for name in args.only if name in results}, indent=2))
        return 0
    top = results["ceiling"]["pairs_per_second"]
    single = results["service"]["pairs_per_second"]
    plain = results["forwards"]["transformers_padded sorted"]
    results["targets"] = {
        "single_vs_plain_transformers (>= 1.5)": round(single / plain, 2),
        "single_vs_ceiling (>= 0.70)": round(single / top, 3),
        "batch_vs_ceiling (>= 0.85)": round(results["service_batch"]["pairs_per_second"] / top, 3),
        "refused_by_closed_loop_of_32 (0)": results["service"]["non_2xx"],
        "ceiling_vs_torch_ceiling": round(top / results["ceiling_torch"]["pairs_per_second"], 2),
        # int8 pays only on CPUs with int8 dot-product instructions: they are named beside its figures
        "cpu_int8_instructions": results["machine"]["cpu"]["int8_instructions"],
        "int8_served (int8 where >= 1.1x float32 at load)": results["ceiling_int8"]["precision"],
        "int8_vs_float32_in_process (>= 2.0 with VNNI/AMX)": round(
            results["ceiling_int8"]["pairs_per_second"] / top, 2),
        "int8_vs_float32_service (>= 1.8 with VNNI/AMX; never < 1 - noise)": round(
            results["service_int8"]["pairs_per_second"] / single, 2),
        "ceiling_vs_physical_limit": round(top / results["physical_limit"]["pairs_per_second"], 3),
        "live_p99_ms (<= 50)": results["service"]["probes"]["live"]["p99_ms"],
        "ready_p99_ms (<= 100)": results["service"]["probes"]["ready"]["p99_ms"],
        "vs_litserve (>= 1.5)": round(single / results["peer_litserve"]["pairs_per_second"], 2),
        "vs_flask_exporter (>= 1.5)": round(single / results["peer_flask_exporter"]["pairs_per_second"], 2),
        "metrics_cost (within noise)": round(1 - single / results["service_metrics_off"]["pairs_per_second"], 3),
        "tracing_cost_100_percent": round(1 - results["service_traced"]["pairs_per_second"] / single, 3),
        "tracing_cost_1_percent": round(1 - results["service_traced_1_percent"]["pairs_per_second"] / single, 3),
        "scrape_p99_ms_after_churn (<= 50)": results["churn"]["after_churn"]["scrape"]["p99_ms"],
        "time_to_ready_seconds (<= 10)": results["time_to_ready"]["median_seconds"],
        "sighup_failed_requests (0)": results["sighup"]["non_200"] + results["sighup"]["failed"],
        "open_loop_2x_in_time_vs_capacity (>= 0.9)": results["overload"]["open_loop_2x"]["in_time_vs_capacity"],
        "open_loop_4x_in_time_vs_capacity (>= 0.8)": results["overload"]["open_loop_4x"]["in_time_vs_capacity"],
        **{f"open_loop_{m}x_429_p99_ms (<= 20)": results["overload"][f"open_loop_{m}x"]["p99_429_ms"] for m in (2, 4)},
        **{f"open_loop_{m}x_{name}_p99_ms (<= {limit})": results["overload"][f"open_loop_{m}x"]["probes"][name]["p99_ms"]
           for m in (2, 4) for name, limit in (("live", 50), ("ready", 100))},
        "after_burst_seconds (<= 1)": max(results["overload"][f"open_loop_{m}x"]["after_burst"]["seconds"]
                                          for m in (2, 4)),
        "vs_bentoml_closed_loop (> 1)": round(results["overload"]["closed_loop"]["pairs_per_second"]
                                              / results["peer_bentoml"]["closed_loop"]["pairs_per_second"], 2),
        **{f"vs_bentoml_open_loop_{m}x_in_time (> 1)": round(
            results["overload"][f"open_loop_{m}x"]["pairs_in_time_per_second"]
            / max(0.1, results["peer_bentoml"][f"open_loop_{m}x"]["pairs_in_time_per_second"]), 2) for m in (2, 4)},
        "base_single_vs_ceiling_float32 (>= 0.70)": results["base_size"]["float32"]["single_vs_ceiling"],
        "base_single_vs_ceiling_int8 (>= 0.70)": results["base_size"]["int8"]["single_vs_ceiling"],
        "base_int8_vs_float32_service (>= 1 where int8 is served)": results["base_size"]["int8_vs_float32_service"],
        "base_vs_litserve (>= 1.5)": results["base_size"]["vs_litserve"],
        "base_vs_flask_exporter (>= 1.5)": results["base_size"]["vs_flask_exporter"],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    print(json.dumps(results["targets"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
