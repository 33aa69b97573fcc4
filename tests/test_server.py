"""Real Gunicorn through `mgeo-service serve`: requests of each kind, every metric, a killed worker."""
import json
import os
import signal
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, http
from mgeo_service.batcher import FAILURE_REASONS
from mgeo_service.readiness import FAILURE_REASONS as READINESS_FAILURE_REASONS

PAIR = {"address1": "北京市海淀区中关村大街1号", "address2": "北京海淀中关村街1号"}
FAKE_GPU = {"gpus": [{"name": "NVIDIA H100", "uuid": "GPU-aaa", "util": 50, "used": 2 << 30, "total": 80 << 30,
                      "temp": 55, "power_mw": 100000}]}


def counters(samples, name):
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def test_service_metrics_and_worker_replacement(service_factory):
    service = service_factory(PYTHONPATH=os.path.join(ROOT, "tests", "fake_pynvml"), FAKE_NVML=json.dumps(FAKE_GPU))
    service.wait_ready()

    for _ in range(5):
        assert http("POST", service.url + "/predict", PAIR)[0] == 200
    for _ in range(3):
        status, _, body = http("POST", service.url + "/predict", {"pairs": [PAIR, PAIR, PAIR, PAIR]})
        assert status == 200 and len(body["results"]) == 4
    for _ in range(2):
        assert http("POST", service.url + "/predict", b"{oops", {"Content-Type": "application/json"})[0] == 400
    assert http("POST", service.url + "/predict", b"x", {"Content-Type": "text/plain"})[0] == 415
    assert http("GET", service.url + "/predict")[0] == 405
    for path in ("/nope", "/admin/../etc", "/a/b/c"):
        assert http("GET", service.url + path)[0] == 404
    assert http("GET", service.url + "/health/live")[0] == 200

    samples = service.scrape()
    requests = counters(samples, "mgeo_request_total")

    def count(method, endpoint, status):
        return requests.get((("endpoint", endpoint), ("method", method), ("status", status)), 0)

    assert count("POST", "/predict", "200") == 8
    assert count("POST", "/predict", "400") == 2
    assert count("POST", "/predict", "415") == 1
    assert count("GET", "/predict", "405") == 1
    assert count("GET", "unmatched", "404") == 3  # unknown paths never make new series
    assert count("GET", "/health/live", "200") == 1
    assert count("GET", "/health/ready", "200") >= 1
    assert not [labels for labels in requests if dict(labels)["endpoint"] not in
                ("/predict", "unmatched", "/health/live", "/health/ready", "/healthz")]

    duration_count = samples[("mgeo_request_duration_seconds_count", (("endpoint", "/predict"), ("method", "POST")))]
    assert duration_count == 11
    assert samples[("mgeo_request_duration_seconds_bucket",
                    (("endpoint", "/predict"), ("le", "10.0"), ("method", "POST")))] == 11
    assert samples[("mgeo_requests_inprogress", (("endpoint", "/predict"), ("method", "POST")))] == 0

    assert sum(counters(samples, "mgeo_pairs_total").values()) == 5 + 3 * 4
    cache = counters(samples, "mgeo_cache_requests_total")
    hits, misses = cache[(("result", "hit"),)], cache[(("result", "miss"),)]
    assert hits + misses == 5 + 3 * 4 and 1 <= misses <= 2 * 4  # each worker scores PAIR once per request at most
    # only the misses reach the model; readiness forwards skip the batcher
    assert samples[("mgeo_inference_batch_size_sum", ())] == misses
    assert samples[("mgeo_inference_duration_seconds_count", ())] >= 1
    assert samples[("mgeo_queue_duration_seconds_count", ())] == misses
    assert samples[("mgeo_model_ready", ())] == 2
    info = counters(samples, "mgeo_model_info")
    assert len(info) == 1 and list(info.values()) == [1.0]
    assert {k: dict(next(iter(info)))[k] for k in ("device", "model", "backend", "precision", "note")} == \
        {"device": "cpu", "model": "mgeo-default", "backend": "onnxruntime", "precision": "float32", "note": ""}
    assert samples[("mgeo_worker_starts_total", ())] == 2
    # every reason exported from the start, at 0
    assert counters(samples, "mgeo_readiness_failures_total") == \
        {(("reason", r),): 0.0 for r in READINESS_FAILURE_REASONS}
    assert counters(samples, "mgeo_inference_errors_total") == {(("reason", r),): 0.0 for r in FAILURE_REASONS}
    assert samples[("mgeo_nvml_up", ())] == 1
    gpu = (("gpu", "0"), ("name", "NVIDIA H100"), ("uuid", "GPU-aaa"))
    assert samples[("nvidia_gpu_memory_total_bytes", gpu)] == 80 << 30
    assert samples[("nvidia_gpu_utilization_ratio", gpu)] == 0.5

    with pytest.raises(urllib.error.HTTPError) as other_path:
        urllib.request.urlopen(service.metrics_url.replace("/metrics", "/other"), timeout=5)
    assert other_path.value.code == 404

    # SIGKILL one worker: the master replaces it, readiness recovers, no counter goes down.
    before = counters(service.scrape(), "mgeo_request_total")
    victim = http("GET", service.url + "/health/live")[2]["pid"]
    os.kill(victim, signal.SIGKILL)
    service.wait_until(lambda: service.metric("mgeo_worker_starts_total") == 3, 60, "a replacement worker")
    service.wait_ready()
    assert victim not in service.children()
    after = counters(service.scrape(), "mgeo_request_total")
    for labels, value in before.items():
        assert after.get(labels, 0) >= value, labels
    assert http("POST", service.url + "/predict", PAIR)[0] == 200
