"""The GPU figures of BENCHMARKS.md, on a CUDA host: `python bench/gpu.py OUT.json` (a few minutes).

MGeo base's shape with random weights (bench/base.py: ModelScope layout for the service, the same
weights in Hugging Face's layout for transformers' own forward). In order, each part written to
OUT.json as soon as it is measured, so that a run cut short still reports what it did:

1. the GPU's own limit: matmul TFLOP/s in float32 (TF32 off and on) and float16;
2. the packed forward, float32 and fp16, on the project's real pairs of mixed lengths: each pair
   batched (arrival order, 32 a batch) against alone, and against transformers' own SDPA forward
   of a padded batch (the issue's bounds: 1e-5 float32, 1e-3 fp16);
3. in-process speed, fp16: packed against transformers' SDPA forward by batch size and token
   budget, and whether torch.compile (dynamic shapes) or CUDA graphs (compile's reduce-overhead
   mode, on padded buckets) speed transformers' forward up;
4. the service (`mgeo-service serve`, fp16 unless said): per layout of workers, pairs and token
   budget, 32-pair requests and single pairs from client processes on 127.0.0.1 (keep-alive
   connections), with the NVML gauges the sidecar reads during the load;
5. readiness while another process holds nearly all the free GPU memory.

`--device cpu --quick` runs every part small on a CPU (no NVML, no memory hold): a check that the
script works before GPU minutes are spent on it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.client import HTTPConnection

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bench.base import build_checkpoints  # noqa: E402
from bench.run import padded_forward  # noqa: E402
from conftest import Service, http, parse_metrics  # noqa: E402
from mgeo_service.dataset import read_pairs  # noqa: E402
from mgeo_service.matcher import DEFAULT_MODEL_DIR, Matcher, length_sorted_chunks  # noqa: E402

PAIRS = [(p.address1, p.address2) for name in ("address_pairs.tsv", "contrast_pairs.tsv")
         for p in read_pairs(os.path.join(ROOT, "tests", "data", name))]
BOUNDS = {"float32": 1e-5, "float16": 1e-3}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rates(device: str, size: int) -> dict:
    rates = {}
    for name, dtype, tf32 in (("float32", torch.float32, False), ("tf32", torch.float32, True),
                              ("float16", torch.float16, False)):
        if device == "cpu" and dtype == torch.float16:
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        times = []
        for _ in range(10):
            synchronize(device)
            started = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - started)
        rates[f"{name}_tflops"] = round(2 * size ** 3 / min(times[2:]) / 1e12, 1)
    torch.backends.cuda.matmul.allow_tf32 = False
    return rates


def correctness(model: str, device: str) -> dict:
    figures = {}
    for precision in ("float32", "float16") if device == "cuda" else ("float32",):
        matcher = Matcher(model, device=device, backend="torch", fp16=precision == "float16")
        encoded = matcher.encode(PAIRS)
        alone = torch.cat([matcher.forward([pair]) for pair in encoded])
        batches = [encoded[i:i + 32] for i in range(0, len(encoded), 32)]
        batched = torch.cat([matcher.forward(batch) for batch in batches])
        reference = torch.cat([padded_forward(matcher, batch) for batch in batches])
        lengths = [len(ids) for ids, _ in encoded]
        result = {"pairs": len(encoded), "tokens_min_mean_max": [min(lengths), round(statistics.mean(lengths), 1),
                                                                max(lengths)],
                  "max_abs_batched_vs_alone": (batched - alone).abs().max().item(),
                  "max_abs_packed_vs_transformers": (batched - reference).abs().max().item(),
                  "bound": BOUNDS[precision]}
        result["exact"] = max(result["max_abs_batched_vs_alone"], result["max_abs_packed_vs_transformers"]) <= \
            BOUNDS[precision]
        figures[precision] = result
    return figures


def rate(forward, chunks, pairs: int, device: str, repeats: int = 3) -> float:
    for chunk in chunks[:2]:
        forward(chunk)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        for chunk in chunks:
            forward(chunk)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return round(pairs / best, 1)


BATCHES = [(32, None), (64, None), (128, None), (256, None), (128, 8192), (256, 8192), (256, 16384), (512, 16384)]


def speed(model: str, device: str, copies: int, batches=BATCHES) -> dict:
    """Pairs/s in-process: packed against transformers' SDPA padded forward, length-sorted chunks."""
    fp16 = device == "cuda"
    matcher = Matcher(model, device=device, backend="torch", fp16=fp16)
    encoded = matcher.encode(PAIRS) * copies
    figures = {"precision": matcher.precision, "pairs": len(encoded)}
    for pairs, tokens in batches:
        chunks = [[encoded[i] for i in chunk] for chunk in length_sorted_chunks(encoded, pairs, tokens)]
        key = f"pairs={pairs} tokens={tokens or '-'}"
        figures[f"packed {key}"] = rate(matcher.forward, chunks, len(encoded), device)
        figures[f"transformers_sdpa {key}"] = rate(lambda c: padded_forward(matcher, c), chunks, len(encoded), device)
    return figures


def compiled(model: str, device: str) -> dict:
    """transformers' padded forward eager, torch.compile with dynamic shapes, and CUDA graphs
    (reduce-overhead) on batches padded to 64 tokens: pairs/s on the same chunks."""
    matcher = Matcher(model, device=device, backend="torch", fp16=device == "cuda")
    encoded = [pair for pair in matcher.encode(PAIRS) if len(pair[0]) <= 64] * 4
    chunks = [encoded[i:i + 64] for i in range(0, len(encoded) - 63, 64)]
    model_module = matcher.engine.model

    def padded(forward):
        def run(chunk):
            ids = torch.zeros((len(chunk), 64), dtype=torch.long)
            types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
            for row, (token_ids, type_ids) in enumerate(chunk):
                ids[row, :len(token_ids)], types[row, :len(type_ids)] = torch.tensor(token_ids), torch.tensor(type_ids)
                mask[row, :len(token_ids)] = 1
            with torch.inference_mode():
                return forward(input_ids=ids.to(device), token_type_ids=types.to(device),
                               attention_mask=mask.to(device)).logits
        return run

    figures = {"eager padded to 64": rate(padded(model_module), chunks, len(encoded) - len(encoded) % 64, device)}
    for name, options in (("torch.compile dynamic", {"dynamic": True}),
                          ("cuda graphs (reduce-overhead)", {"mode": "reduce-overhead"})):
        if name.startswith("cuda") and device != "cuda":
            continue
        try:
            figures[name] = rate(padded(torch.compile(model_module, **options)), chunks,
                                 len(encoded) - len(encoded) % 64, device)
        except Exception as exc:  # report either way
            figures[name] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    figures["packed, same chunks"] = rate(matcher.forward, chunks, len(encoded) - len(encoded) % 64, device)
    return figures


def _client_process(url: str, seconds: float, threads: int, batch: int, offset: int, out) -> None:
    host, port = url.removeprefix("http://").split(":")
    latencies, failures = [], [0]
    stop = time.monotonic() + seconds

    def client(number):
        connection = HTTPConnection(host, int(port), timeout=60)
        i = number
        while time.monotonic() < stop:
            pairs = [PAIRS[(i + k) % len(PAIRS)] for k in range(batch)]
            body = {"pairs": [{"address1": a, "address2": b} for a, b in pairs]} if batch > 1 else \
                {"address1": pairs[0][0], "address2": pairs[0][1]}
            started = time.perf_counter()
            try:
                connection.request("POST", "/predict", json.dumps(body, ensure_ascii=False).encode(),
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures[0] += 1
            except OSError:
                failures[0] += 1
                connection = HTTPConnection(host, int(port), timeout=60)
            i += 7919

    workers = [threading.Thread(target=client, args=(offset * threads + n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put((latencies, failures[0]))


def load(url: str, seconds: float, clients: int, batch: int, processes: int) -> dict:
    """``clients`` keep-alive connections over ``processes`` client processes posting ``batch`` pairs."""
    queue = multiprocessing.Queue()
    per = max(1, clients // processes)
    started = time.monotonic()
    children = [multiprocessing.Process(target=_client_process, args=(url, seconds, per, batch, n, queue))
                for n in range(processes)]
    for child in children:
        child.start()
    results = [queue.get() for _ in children]
    for child in children:
        child.join()
    elapsed = time.monotonic() - started
    latencies = sorted(t for times, _ in results for t in times)
    if not latencies:
        return {"failed": sum(f for _, f in results)}
    return {"clients": per * processes, "pairs_per_request": batch,
            "pairs_per_second": round(len(latencies) * batch / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
            "failed": sum(f for _, f in results)}


def gpu_gauges(service) -> dict:
    samples = parse_metrics(http("GET", service.metrics_url)[2])
    return {f"{name}{dict(labels).get('gpu', '')}": value for (name, labels), value in samples.items()
            if name.startswith("nvidia_gpu_") or name == "mgeo_nvml_up"}


def hold_gpu_memory() -> subprocess.Popen:
    """Another process that takes all but 256 MiB of the free GPU memory and keeps it."""
    code = ("import torch, sys, time; free, _ = torch.cuda.mem_get_info();"
            "x = torch.empty(free - (256 << 20), dtype=torch.uint8, device='cuda');"
            "print('held', x.numel() >> 20, 'MiB', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("held")
    return process


def served(model: str, work: str, device: str, layout: dict, seconds: float, quick: bool) -> dict:
    name = "-".join(f"{k}={v}" for k, v in layout.items())
    folder = pathlib.Path(work, name)
    folder.mkdir()
    settings = {"MGEO_MODEL_DIR": model, "MGEO_DEVICE": device, "MGEO_GPU_POLL_SECONDS": "1",
                "MGEO_READY_CACHE_SECONDS": "0", "MGEO_CACHE_SIZE": "0", "MGEO_REQUEST_TIMEOUT_MS": "30000",
                **{f"MGEO_{k}": str(v) for k, v in layout.items()}}
    service = Service(folder, **settings).start()
    processes = 2 if quick else 8
    try:
        service.wait_ready(600)
        figures = {"ready": http("GET", service.url + "/health/ready")[2]["status"]}
        load(service.url, 2, 8, 32, processes)  # warm-up: every worker, both shapes
        during = {}
        sampler = threading.Timer(seconds / 2, lambda: during.update(gpu_gauges(service)))
        sampler.start()
        figures["batch32"] = load(service.url, seconds, 32 if not quick else 4, 32, processes)
        sampler.join()
        figures["gauges_during_batch32_load"] = during
        figures["single"] = load(service.url, seconds, 128 if not quick else 8, 1, processes)
        forwards = service.metric("mgeo_inference_batch_size_count") or 0
        figures["mean_pairs_per_forward"] = round(service.metric("mgeo_inference_batch_size_sum") / forwards, 1) \
            if forwards else None
        if device == "cuda" and layout == LAYOUTS[0]:
            holder = hold_gpu_memory()
            try:
                status, _, body = http("GET", service.url + "/health/ready")
                figures["ready_with_memory_held"] = {"status": status, **body}
            finally:
                holder.kill()
        return figures
    finally:
        service.stop()


# The layouts the service is measured in on a GPU: the first is the recommended one (docs/configuration.md).
LAYOUTS = [
    {"FP16": 1, "WORKERS": 2, "BATCH_MAX_PAIRS": 128, "BATCH_MAX_TOKENS": 8192},
    {"FP16": 1, "WORKERS": 4, "BATCH_MAX_PAIRS": 128, "BATCH_MAX_TOKENS": 8192},
    {"FP16": 1, "WORKERS": 2, "BATCH_MAX_PAIRS": 256, "BATCH_MAX_TOKENS": 16384},
    {"FP16": 1, "WORKERS": 1, "BATCH_MAX_PAIRS": 64, "BATCH_MAX_TOKENS": 4096},
    {"FP16": 0, "WORKERS": 2, "BATCH_MAX_PAIRS": 128, "BATCH_MAX_TOKENS": 8192},
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes: check the script on a CPU")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mgeo-gpu-")
    model, _ = build_checkpoints(os.path.join(work, "mgeo-base-random"))
    if args.quick:  # the shipped model: a base-size forward on a CPU would take the check minutes
        model = DEFAULT_MODEL_DIR
    report = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__}

    def part(name, run):
        started = time.monotonic()
        try:
            report[name] = run()
        except Exception:
            report[name] = {"failed": traceback.format_exc()[-2000:]}
        report[name + "_seconds"] = round(time.monotonic() - started, 1)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(name, json.dumps(report[name])[:2000], flush=True)

    part("matmul", lambda: matmul_rates(args.device, 1024 if args.quick else 8192))
    part("correctness", lambda: correctness(model, args.device))
    part("speed", lambda: speed(model, args.device, 1 if args.quick else 8, BATCHES[:2] if args.quick else BATCHES))
    part("compiled", lambda: compiled(model, args.device))
    layouts = LAYOUTS[:1] if args.quick else LAYOUTS
    for layout in layouts:
        if args.device != "cuda":
            layout = {k: v for k, v in layout.items() if k != "FP16"}
        part("service " + " ".join(f"{k}={v}" for k, v in layout.items()),
             lambda layout=layout: served(model, work, args.device, layout, 3 if args.quick else 12, args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
