"""The GPU figures of BENCHMARKS.md, on a CUDA host: `python bench/gpu.py OUT.json`.

A base-size checkpoint (12 layers, hidden 768) in MGeo's ModelScope layout with random weights.
In-process first: the packed forward against transformers' padded one (batches of 32 in arrival
order), and its batches against each pair alone. Then served by `mgeo-service serve` on cuda with fp16 off and on; per setting the throughput of
32-pair requests and of single pairs (Python client threads on 127.0.0.1, the project's own
test pairs), the NVML gauges the sidecar reads during the load, and readiness while another
process holds nearly all the free GPU memory. Needs no wrk and no shared data.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from conftest import Service, http, parse_metrics  # noqa: E402
from mgeo_service.dataset import read_pairs  # noqa: E402
from bench.run import padded_forward  # noqa: E402
from mgeo_service.matcher import DEFAULT_MODEL_DIR, Matcher  # noqa: E402

PAIRS = [{"address1": p.address1, "address2": p.address2}
         for name in ("address_pairs.tsv", "contrast_pairs.tsv")
         for p in read_pairs(os.path.join(ROOT, "tests", "data", name))]


def base_checkpoint(folder: str) -> str:
    """Random weights of MGeo's size, saved as ModelScope does (text encoder under bert.text_encoder.)."""
    with open(os.path.join(DEFAULT_MODEL_DIR, "vocab.txt"), encoding="utf-8") as f:
        vocab = f.read()
    config = BertConfig(vocab_size=len(vocab.splitlines()), hidden_size=768, num_hidden_layers=12,
                        num_attention_heads=12, intermediate_size=3072, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    state = {k.replace("bert.", "bert.text_encoder.", 1): v for k, v in model.state_dict().items()}
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    config.to_json_file(os.path.join(folder, "config.json"))
    with open(os.path.join(folder, "configuration.json"), "w") as f:
        json.dump({"framework": "pytorch", "task": "sentence-similarity", "model": {"type": "mgeo"}}, f)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write(vocab)
    return folder


def load(url: str, seconds: float, clients: int, batch: int) -> dict:
    """Client threads posting requests of ``batch`` pairs for ``seconds``: pairs/s and latency."""
    latencies, failures, stop = [], [], time.monotonic() + seconds

    def client(offset):
        i = offset
        while time.monotonic() < stop:
            body = ({"pairs": [PAIRS[(i + k) % len(PAIRS)] for k in range(batch)]} if batch > 1
                    else PAIRS[i % len(PAIRS)])
            started = time.perf_counter()
            status = http("POST", url + "/predict", body, timeout=60)[0]
            (latencies if status == 200 else failures).append(time.perf_counter() - started)
            i += clients

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"clients": clients, "pairs_per_request": batch, "pairs_per_second": round(len(latencies) * batch / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1), "failed": len(failures)}


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


def forwards(model: str) -> dict:
    """In-process, batches of 32 in arrival order: the packed forward against transformers' padded one,
    and the packed forward's batches against each pair alone."""
    figures = {}
    for fp16 in (False, True):
        matcher = Matcher(model, device="cuda", fp16=fp16)
        encoded = matcher.encode([(p["address1"], p["address2"]) for p in PAIRS]) * 4
        batches = [encoded[i:i + 32] for i in range(0, len(encoded), 32)]
        alone = torch.cat([matcher.forward([pair]) for pair in encoded[:len(PAIRS)]])
        batched = torch.cat([matcher.forward(batch) for batch in batches])[:len(PAIRS)]
        result = {"max_abs_difference_batched_vs_alone": (batched - alone).abs().max().item()}
        for name, forward in (("packed", matcher.forward), ("transformers_padded", lambda b: padded_forward(matcher, b))):
            for batch in batches[:3]:
                forward(batch)
            torch.cuda.synchronize()
            started = time.perf_counter()
            for batch in batches:
                forward(batch)
            torch.cuda.synchronize()
            result[f"{name}_pairs_per_second"] = round(len(encoded) / (time.perf_counter() - started), 1)
        figures[f"fp16={int(fp16)}"] = result
    return figures


def main(out: str) -> None:
    work = tempfile.mkdtemp(prefix="mgeo-gpu-")
    model = base_checkpoint(os.path.join(work, "mgeo-base-random"))
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "forwards": forwards(model),
              "settings": {}}
    print(json.dumps(report["forwards"]), flush=True)
    for fp16 in ("0", "1"):
        folder = pathlib.Path(work, f"fp16-{fp16}")
        folder.mkdir()
        service = Service(folder, MGEO_MODEL_DIR=model, MGEO_DEVICE="cuda",
                          MGEO_FP16=fp16, MGEO_WORKERS="2", MGEO_GPU_POLL_SECONDS="1",
                          MGEO_READY_CACHE_SECONDS="0", MGEO_CACHE_SIZE="0").start()
        try:
            service.wait_ready(300)
            figures = {"ready": http("GET", service.url + "/health/ready")[2]}
            load(service.url, 3, 8, 32)  # warm-up
            during = {}
            sampler = threading.Timer(8, lambda: during.update(gpu_gauges(service)))
            sampler.start()
            figures["batch32_8_clients"] = load(service.url, 15, 8, 32)
            sampler.join()
            figures["gauges_during_load"] = during
            figures["single_32_clients"] = load(service.url, 15, 32, 1)
            holder = hold_gpu_memory()
            try:
                status, _, body = http("GET", service.url + "/health/ready")
                figures["ready_with_memory_held"] = {"status": status, **body}
            finally:
                holder.kill()
            report["settings"][f"fp16={fp16}"] = figures
        finally:
            service.stop()
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
