"""Dead workers' metric files fold into aggregates: totals stay exact, the directory stays flat."""
import os
import subprocess
import sys

from mgeo_service import multiproc
from mgeo_service.sidecar import render_metrics

from conftest import http, parse_metrics

WORKER = """
from mgeo_service import metrics
for _ in range({n}):
    metrics.REQUESTS.labels("POST", "/predict", "200").inc()
    metrics.REQUEST_DURATION.labels("POST", "/predict").observe(0.02)
metrics.MODEL_READY.set(1)
"""


class NoGpu:
    """A collector with no GPU series: these scrapes are about the workers' files."""
    def collect(self):
        return iter(())


def scrape(path):
    return parse_metrics(render_metrics(path, NoGpu()).decode())


def test_folding_keeps_totals_exact_and_the_directory_flat(tmp_path):
    path = str(tmp_path)
    multiproc.prepare(path)
    pids = []
    for n in (3, 5, 7):
        process = subprocess.Popen([sys.executable, "-c", WORKER.format(n=n)],
                                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": path})
        process.wait(60)
        pids.append(process.pid)
    requests = ("mgeo_request_total", (("endpoint", "/predict"), ("method", "POST"), ("status", "200")))
    count = ("mgeo_request_duration_seconds_count", (("endpoint", "/predict"), ("method", "POST")))
    before = scrape(path)
    assert before[requests] == 15 and before[count] == 15
    for pid in pids:
        multiproc.fold_dead_process(path, pid)
        assert scrape(path)[requests] == 15  # never down, never double
    after = scrape(path)
    assert after[requests] == 15 and after[count] == 15
    assert after[("mgeo_request_duration_seconds_bucket",
                  (("endpoint", "/predict"), ("le", "0.025"), ("method", "POST")))] == 15
    assert ("mgeo_model_ready", ()) not in after or after[("mgeo_model_ready", ())] == 0  # dead: not ready
    assert sorted(f for f in os.listdir(path) if f.endswith(".db")) == ["counter_aggregate.db",
                                                                        "histogram_aggregate.db"]


def test_worker_churn_under_max_requests(service_factory):
    service = service_factory(MGEO_MAX_REQUESTS="10").wait_ready()
    sent = 120
    for _ in range(sent):
        assert http("GET", service.url + "/health/live")[0] == 200
    service.wait_until(lambda: service.metric("mgeo_worker_starts_total") >= 10, 60, "worker churn")
    service.wait_ready()
    samples = service.scrape()
    live = samples[("mgeo_request_total", (("endpoint", "/health/live"), ("method", "GET"), ("status", "200")))]
    assert live == sent  # every answer counted once, across all the dead workers
    files = [f for f in os.listdir(service.multiproc_dir) if f.endswith(".db")]
    # two live workers' files plus one aggregate per type, however many workers died
    assert len(files) <= 2 * 5 + 3, files
