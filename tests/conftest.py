"""Shared fixtures: free loopback ports, the shipped model, and a real `mgeo-service serve`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import tempfile
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
PROMETHEUS = os.path.join(ROOT, "prometheus")
GRAFANA = os.path.join(ROOT, "grafana")
RULE_FILES = [os.path.join(PROMETHEUS, "rules", f) for f in ("mgeo-recording.yml", "mgeo-alerts.yml")]
# ONNX exports of the tests' checkpoints go to a cache of this run's own, inherited by the services it starts.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="mgeo-test-cache-")
DASHBOARDS = [os.path.join(GRAFANA, "dashboards", f) for f in ("mgeo-service.json", "mgeo-gpu.json")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, headers=None, timeout: float = 30.0):
    """(status, headers, parsed JSON or text) for one request; HTTP errors are answers, not exceptions."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    headers = dict(headers or {})
    if body is not None and not isinstance(body, bytes):
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, got_headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, got_headers, raw = exc.code, exc.headers, exc.read()
    text = raw.decode("utf-8")
    try:
        return status, got_headers, json.loads(text)
    except ValueError:
        return status, got_headers, text


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label pairs): value} from the Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# Panels proven apart from the service's own: the ALERTS series is empty while nothing fires
# (tests/test_alerting.py proves it), and the host row reads node_exporter (tests/test_monitoring.py).
PANEL_GROUPS = {"Firing alerts": "alerts", "Host CPU busy": "host", "Host memory used": "host"}


def dashboard_queries(path: str, group: str = "service") -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables) for every query of a dashboard's panels of one
    group: "service" (the service's metrics), "alerts" or "host"."""
    with open(path) as f:
        board = json.load(f)
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])
            if PANEL_GROUPS.get(p["title"], "service") == group]


def grafana_to_promql(expr: str, instance: str = ".*") -> str:
    """A panel query as Grafana sends it with job and host "All" and the given instance selection."""
    return (expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", instance)
            .replace("$node", ".*"))


def wait_for_ready(url: str, process: subprocess.Popen, log_path, timeout: float = 60.0,
                   path: str = "/-/ready") -> None:
    """Until GET <url><path> answers 200 (Prometheus and Alertmanager both serve /-/ready)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http("GET", url + path, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready after {timeout}s"
        assert process.poll() is None, open(log_path).read()[-3000:]
        time.sleep(0.3)


class Prometheus:
    """The real Prometheus with the shipped config and rules, scraping every second, finding the
    service instances (and any Alertmanager) through targets files in the shipped file_sd format."""

    def __init__(self, tmp_path, targets: list[str], alertmanagers: list[str] = (), nodes: list[str] = ()):
        with open(os.path.join(PROMETHEUS, "prometheus.yml")) as f:
            config = yaml.safe_load(f)
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = RULE_FILES
        jobs = {"mgeo", "node"} if nodes else {"mgeo"}
        config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] in jobs]
        with open(os.path.join(PROMETHEUS, "targets", "mgeo.json")) as f:
            group = json.load(f)[0]
        (tmp_path / "targets").mkdir()
        (tmp_path / "targets" / "mgeo.json").write_text(json.dumps([{**group, "targets": targets}]))
        if nodes:
            (tmp_path / "targets" / "node.json").write_text(json.dumps([{"targets": list(nodes)}]))
        if alertmanagers:
            (tmp_path / "targets" / "alertmanager.json").write_text(json.dumps([{"targets": list(alertmanagers)}]))
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "prometheus.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_ready(self.url, self.process, self.log_path)

    def query(self, expr: str, at: float | None = None):
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        status, _, body = http("GET", f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        return status, body

    def values(self, expr: str, at: float | None = None) -> dict[tuple, float]:
        """{sorted label pairs: value} of an instant query that must succeed."""
        status, body = self.query(expr, at)
        assert status == 200 and body["status"] == "success", (expr, body)
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in body["data"]["result"]}

    def alerts(self) -> list[dict]:
        return http("GET", self.url + "/api/v1/alerts")[2]["data"]["alerts"]

    def wait_until(self, check, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not (result := check()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)
        return result

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


class NodeExporter:
    """Debian's real node_exporter on a free loopback port, with the collectors the host row reads."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        log_path = tmp_path / "node_exporter.log"
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(
            ["prometheus-node-exporter", f"--web.listen-address={self.target}", "--collector.disable-defaults",
             "--collector.cpu", "--collector.meminfo", "--collector.uname"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_ready(f"http://{self.target}", self.process, log_path, 30, "/metrics")  # it has no /-/ready

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


class Service:
    """A real `mgeo-service serve` (Gunicorn master, workers, metrics sidecar) on free loopback ports."""

    def __init__(self, tmp_path, **env):
        self.port, self.metrics_port = free_port(), free_port()
        self.multiproc_dir = str(tmp_path / "multiproc")
        self.log_path = str(tmp_path / "service.log")
        # The shell's own settings stay out: every service here is what its test says it is.
        scrubbed = {k: v for k, v in os.environ.items()
                    if not k.startswith(("MGEO_", "OTEL_")) and k != "GUNICORN_CMD_ARGS"}
        self.env = {**scrubbed, "MGEO_BIND": f"127.0.0.1:{self.port}",
                    "MGEO_METRICS_PORT": str(self.metrics_port), "MGEO_METRICS_BIND": "127.0.0.1",
                    "MGEO_WORKERS": "2", "MGEO_READY_CACHE_SECONDS": "0",
                    "PROMETHEUS_MULTIPROC_DIR": self.multiproc_dir, **env}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> "Service":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "mgeo_service", "serve"], env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def access_lines(self) -> list[dict]:
        """The JSON access log's lines so far."""
        return [json.loads(line) for line in self.log().splitlines() if line.startswith('{"ts"')]

    def wait_until(self, check, timeout: float = 60.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                result = check()
                if result:
                    return result
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-3000:]}")

    def wait_ready(self, timeout: float = 60.0):
        """Ready means: every worker answers ready and the sidecar reports them all."""
        def all_ready():
            return self.metric("mgeo_model_ready") == int(self.env["MGEO_WORKERS"])
        self.wait_until(lambda: http("GET", self.url + "/health/ready", timeout=5)[0] == 200, timeout, "readiness")
        self.wait_until(all_ready, timeout, "all workers ready")
        return self

    def scrape(self) -> dict:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return parse_metrics(response.read().decode())

    def metric(self, name: str, **labels) -> float | None:
        return self.scrape().get((name, tuple(sorted(labels.items()))))

    def children(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process:
            try:  # nothing of ours may outlive the test
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture
def service_factory(tmp_path):
    started = []

    def make(**env) -> Service:
        service = Service(tmp_path / f"service{len(started)}", **env)
        (tmp_path / f"service{len(started)}").mkdir()
        started.append(service)
        return service.start()

    yield make
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def default_matcher():
    from mgeo_service.matcher import Matcher
    return Matcher(device="cpu")
