"""Faults with real processes: killed workers and sidecar, bad model directories, signals under load."""
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.client import HTTPException

import pytest

from conftest import free_port, http

PAIR = {"address1": "北京市海淀区中关村大街1号", "address2": "北京海淀中关村街1号"}
# Letters around the number: no timestamp, duration or hex request id can spell "Zq9527Xy".
SECRET = {"address1": "私密街道Zq9527Xy号隐私小区", "address2": "私密街道Zq9527Xy号"}


class Load:
    """Client threads posting /predict until stopped (bounded: at most `limit` seconds)."""

    def __init__(self, url, clients=6, limit=60.0, body=PAIR):
        self.url, self.body, self.limit = url, body, limit
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def _run(self):
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.statuses.append(http("POST", self.url + "/predict", self.body, timeout=30)[0])
            except (OSError, HTTPException) as exc:  # reset, refused or cut short: it failed
                self.failures.append(type(exc).__name__)

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def bad(self):
        return [s for s in self.statuses if s != 200] + self.failures

    def wait_for(self, answered: int, timeout: float = 120.0):
        """Until ``answered`` more requests have ended (well or badly): a count, not a duration."""
        target = len(self.statuses) + len(self.failures) + answered
        deadline = time.monotonic() + timeout
        while len(self.statuses) + len(self.failures) < target:
            assert time.monotonic() < deadline, f"the load stalled at {len(self.statuses)} answers"
            time.sleep(0.1)


def held_connections(pid: int, port: int) -> int:
    """Established TCP connections to ``port`` that process ``pid`` holds open.

    A gthread worker accepts connections beyond its threads and queues them, so this, not the
    thread count, bounds the requests that fail when it dies.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    held = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    held += 1
    return held


def kill_holding(pid: int, port: int) -> int:
    """SIGKILL a worker and say how many connections it held: stopped first, so it accepts none after the count."""
    os.kill(pid, signal.SIGSTOP)
    held = held_connections(pid, port)
    os.kill(pid, signal.SIGKILL)
    return held


def request_totals(service):
    return {labels: v for (name, labels), v in service.scrape().items() if name == "mgeo_request_total"}


def sidecar_pid(service):
    for pid in service.children():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"mgeo_service.sidecar" in f.read():
                return pid
    raise AssertionError("no sidecar process")


def test_sigkill_a_worker_under_load(service_factory):
    # 8 threads: admission lets 6 requests wait (the 6 clients) and keeps 2 for refusals and probes.
    service = service_factory(MGEO_THREADS="8").wait_ready()
    before = request_totals(service)
    victim = http("GET", service.url + "/health/live")[2]["pid"]
    with Load(service.url) as load:
        load.wait_for(10)
        held = kill_holding(victim, service.port)
        load.wait_for(20)  # the other worker, then the replacement, go on serving
    # only the requests on connections the killed worker held may fail
    assert len(load.bad()) <= held, (load.bad(), held)
    assert load.statuses.count(200) >= 20
    service.wait_until(lambda: service.metric("mgeo_worker_starts_total") == 3, 60, "a replacement worker")
    service.wait_ready()
    after = request_totals(service)
    for labels, value in before.items():
        assert after[labels] >= value


def test_sigkill_the_sidecar(service_factory):
    service = service_factory().wait_ready()
    for _ in range(5):
        http("POST", service.url + "/predict", PAIR)
    before = request_totals(service)
    killed = sidecar_pid(service)
    os.kill(killed, signal.SIGKILL)
    service.wait_until(lambda: service.scrape(), 60, "the sidecar back")  # how soon is BENCHMARKS' business
    assert sidecar_pid(service) != killed
    assert request_totals(service) == before  # nothing lost, nothing counted twice


@pytest.mark.parametrize("layout", ["missing", "corrupt", "unknown"])
def test_a_bad_model_directory_is_not_ready_without_crash_looping(service_factory, tmp_path, layout):
    model = tmp_path / "model"
    if layout != "missing":
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "bert"}' if layout == "corrupt" else "{}")
        if layout == "corrupt":
            (model / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
            (model / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    service = service_factory(MGEO_MODEL_DIR=str(model))
    service.wait_until(lambda: http("GET", service.url + "/health/ready")[2].get("reason") == "model_load_failed",
                       60, "readiness to report the failed load")
    assert http("GET", service.url + "/health/live")[0] == 200
    status, _, body = http("POST", service.url + "/predict", PAIR)
    assert status == 503 and body["error"]["code"] == "not_ready"
    service.wait_until(lambda: service.metric("mgeo_worker_starts_total") == 2, 30, "both workers")
    workers = sorted(pid for pid in service.children() if pid != sidecar_pid(service))
    assert len(workers) == 2
    time.sleep(3)
    assert sorted(pid for pid in service.children() if pid != sidecar_pid(service)) == workers  # no crash loop
    assert service.metric("mgeo_worker_starts_total") == 2
    assert service.metric("mgeo_readiness_failures_total", reason="model_load_failed") >= 1
    assert "model load failed (model_load_failed)" in service.log()


def test_an_unwritable_multiprocess_directory_stops_start_up(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / "multiproc"
    result = subprocess.run([sys.executable, "-m", "mgeo_service", "serve"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(target),
                                             "MGEO_BIND": f"127.0.0.1:{free_port()}",
                                             "MGEO_METRICS_PORT": str(free_port())})
    assert result.returncode != 0
    assert f"PROMETHEUS_MULTIPROC_DIR={target}" in result.stderr


@pytest.mark.parametrize("stop", ["SIGTERM to the master", "Ctrl-C: SIGINT to the whole process group"])
def test_a_stop_lets_in_flight_requests_finish(service_factory, stop):
    # A deadline far above the six requests' work on any machine: what is tested is the shutdown, not admission.
    service = service_factory(MGEO_GRACEFUL_TIMEOUT="20", MGEO_REQUEST_TIMEOUT_MS="60000").wait_ready()
    big = {"pairs": [PAIR] * 64}
    results = []

    def send():
        try:
            results.append(http("POST", service.url + "/predict", big, timeout=60)[0])
        except OSError as exc:
            results.append(type(exc).__name__)

    def all_taken():  # every request begun in a worker or answered: none is left in the listen queue
        samples = service.scrape()
        running = samples.get(("mgeo_requests_inprogress", (("endpoint", "/predict"), ("method", "POST"))), 0)
        answered = samples.get(("mgeo_request_total", (("endpoint", "/predict"), ("method", "POST"),
                                                       ("status", "200"))), 0)
        return running + answered == 6

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    service.wait_until(all_taken, 60, "the six requests taken by the workers")
    if stop.startswith("SIGTERM"):
        service.process.send_signal(signal.SIGTERM)
    else:  # as a terminal sends it: master, workers and sidecar alike (the service runs in its own session)
        os.killpg(service.process.pid, signal.SIGINT)
    for t in threads:
        t.join(60)
    assert service.process.wait(60) == 0
    assert results == [200] * 6  # answered, not cut off: Gunicorn kills what outlives the graceful timeout
    # Each worker drained and exited cleanly: no native abort at exit, no signal for the master to report.
    log = service.log()
    assert log.count("Worker exiting") == 2
    for crash in ("terminate called", "SIGABRT", "SIGSEGV", "exited with code", "Traceback", "sidecar exited"):
        assert crash not in log, crash


def test_sighup_reload_fails_no_request(service_factory):
    service = service_factory().wait_ready()
    old_workers = set(service.children()) - {sidecar_pid(service)}
    with Load(service.url, clients=4) as load:
        load.wait_for(5)
        service.process.send_signal(signal.SIGHUP)
        service.wait_until(lambda: service.metric("mgeo_worker_starts_total") == 4, 60, "the new workers")
        service.wait_until(lambda: not old_workers & set(service.children()), 30, "the old workers to finish")
        load.wait_for(10)  # answered by the new workers
    assert load.bad() == []
    assert len(load.statuses) >= 15


def test_addresses_never_reach_the_log_or_the_metrics(service_factory):
    service = service_factory().wait_ready()
    http("POST", service.url + "/predict", SECRET)
    http("POST", service.url + "/predict", {"pairs": [SECRET]})
    http("POST", service.url + "/predict", {"address1": SECRET["address1"], "address2": 42})
    http("POST", service.url + "/predict", {"address1": SECRET["address1"] * 100, "address2": "x"})
    log = service.log()
    metrics = urllib.request.urlopen(service.metrics_url, timeout=10).read().decode()
    for text in (log, metrics):
        assert "私密" not in text and "Zq9527Xy" not in text
    assert '"route": "/predict"' in log
