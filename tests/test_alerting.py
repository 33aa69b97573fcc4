"""From a failing worker to a person: the real service, Prometheus with the shipped rules, and
Alertmanager with the shipped routes, inhibitions and templates, all on loopback.

The test's copy of alertmanager.yml differs from the shipped one in two things only: the
receivers' URLs point at a webhook server here, and the routes' waits are seconds instead of
minutes, so that the whole path is proven in a few minutes.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from conftest import (DASHBOARDS, PROMETHEUS, Prometheus, dashboard_queries, free_port, grafana_to_promql, http,
                      wait_for_ready)
from mgeo_service.matcher import DEFAULT_MODEL_DIR

ALERTMANAGER_CONFIG = os.path.join(PROMETHEUS, "alertmanager.yml")
TEMPLATES = os.path.join(PROMETHEUS, "mgeo-notifications.tmpl")
RECEIVERS = {"page": "mgeo-page", "ticket": "mgeo-ticket", "warning": "mgeo-warning"}


def amtool(*args):
    return subprocess.run(["amtool", *args], capture_output=True, text=True, cwd=PROMETHEUS, timeout=60)


def test_amtool_checks_the_shipped_config():
    result = amtool("check-config", "alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "1 templates" in result.stdout


@pytest.mark.parametrize("severity, receiver", RECEIVERS.items())
def test_each_severity_routes_to_its_receiver(severity, receiver):
    result = amtool("config", "routes", "test", "--config.file=alertmanager.yml", "--verify.receivers=" + receiver,
                    "alertname=MGeoTargetDown", f"severity={severity}", "instance=a:8000")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_the_commented_receiver_examples_work_uncommented(tmp_path):
    # Example lines are commented YAML (a lower-case key or a list item); prose starts otherwise.
    with open(ALERTMANAGER_CONFIG, encoding="utf-8") as f:
        text = re.sub(r"(?m)^(\s*)# ((?:- |  )*[a-z_]+:)", r"\1\2", f.read())
    config = yaml.safe_load(text)
    page = next(r for r in config["receivers"] if r["name"] == "mgeo-page")
    assert {"wechat_configs", "slack_configs", "pagerduty_configs"} <= set(page)
    assert any("dingtalk" in hook["url"] for hook in page["webhook_configs"])
    (tmp_path / "alertmanager.yml").write_text(text, encoding="utf-8")
    shutil.copy(TEMPLATES, tmp_path)
    result = amtool("check-config", str(tmp_path / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_alert_without_severity_still_reaches_someone():
    result = amtool("config", "routes", "test", "--config.file=alertmanager.yml", "alertname=Other")
    assert result.stdout.strip() == "mgeo-warning", result.stdout + result.stderr


class Webhook:
    """A webhook receiver on loopback: every notification Alertmanager posts, with its path."""

    def __init__(self):
        self.notifications: list[tuple[str, dict]] = []
        received = self.notifications

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path.strip("/"), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, **labels):
        """(receiver, status, alert) for every alert notified so far whose labels include ``labels``."""
        return [(receiver, alert["status"], alert) for receiver, payload in list(self.notifications)
                for alert in payload["alerts"] if labels.items() <= alert["labels"].items()]

    def wait_for(self, what: str, timeout: float, **labels) -> tuple[str, dict]:
        status = labels.pop("status")
        deadline = time.monotonic() + timeout
        while True:
            for receiver, got, alert in self.alerts(**labels):
                if got == status:
                    return receiver, alert
            assert time.monotonic() < deadline, f"no {status} notification of {what}: {self.notifications}"
            time.sleep(0.5)

    def stop(self):
        self.server.shutdown()


class Alertmanager:
    """The real Alertmanager with the shipped routes and templates; receivers point at ``webhook``."""

    def __init__(self, tmp_path, webhook: Webhook):
        with open(ALERTMANAGER_CONFIG) as f:
            config = yaml.safe_load(f)
        for receiver in config["receivers"]:
            for hook in receiver["webhook_configs"]:
                hook["url"] = f"{webhook.url}/{receiver['name']}"
        for route in [config["route"], *config["route"]["routes"]]:
            route.update(group_wait="1s", group_interval="2s", repeat_interval="1h")
        folder = tmp_path / "alertmanager"
        folder.mkdir()
        (folder / "alertmanager.yml").write_text(yaml.safe_dump(config))
        shutil.copy(TEMPLATES, folder)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_path = tmp_path / "alertmanager.log"
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(
            ["prometheus-alertmanager", f"--config.file={folder / 'alertmanager.yml'}",
             f"--storage.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--cluster.listen-address="], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_ready(self.url, self.process, log_path)

    def alerts(self, **labels) -> list[dict]:
        query = urllib.parse.urlencode([("filter", f'{k}="{v}"') for k, v in labels.items()])
        return http("GET", f"{self.url}/api/v2/alerts?{query}")[2]

    def stop(self):
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def render(template: str, payload: dict, tmp_path) -> str:
    """A notification template rendered by amtool with the data Alertmanager sent."""
    data = tmp_path / "notification.json"
    data.write_text(json.dumps(payload))
    result = amtool("template", "render", f"--template.glob={TEMPLATES}", f"--template.data={data}",
                    "--template.text={{ template \"%s\" . }}" % template)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def stack(tmp_path, service_factory):
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    service = service_factory(MGEO_MODEL_DIR=str(model))
    webhook = Webhook()
    alertmanager = Alertmanager(tmp_path, webhook)
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{service.metrics_port}"], [f"127.0.0.1:{alertmanager.port}"])
    yield model, service, webhook, alertmanager, prometheus
    prometheus.stop()
    alertmanager.stop()
    webhook.stop()


def test_a_readiness_failure_pages_with_its_reason_and_fix_then_resolves_and_target_down_inhibits(stack, tmp_path):
    model, service, webhook, alertmanager, prometheus = stack
    instance = f"127.0.0.1:{service.metrics_port}"

    # 1. The model cannot load: after 30 s of failed checks the page arrives, with reason and fix.
    receiver, alert = webhook.wait_for("the readiness alert", 180, alertname="MGeoReadinessFailing",
                                       instance=instance, status="firing")
    assert receiver == "mgeo-page"
    assert alert["labels"]["reason"] == "model_load_failed" and alert["labels"]["severity"] == "page"
    assert alert["annotations"]["fix"].startswith("The model directory cannot be loaded: check that MGEO_MODEL_DIR")
    payload = next(p for r, p in webhook.notifications if any(a["labels"] == alert["labels"] for a in p["alerts"]))
    text = render("mgeo.text", payload, tmp_path)
    for part in (alert["annotations"]["summary"], f"instance: {instance}", "reason: model_load_failed",
                 "fix: The model directory cannot be loaded", "runbook: curl"):
        assert part in text, text
    assert render("mgeo.title", payload, tmp_path).startswith(
        f"[FIRING:1] MGeoReadinessFailing on {instance} (model_load_failed)")
    # the dashboard's alerts row shows it too
    [(title, expr)] = [query for path in DASHBOARDS for query in dashboard_queries(path, "alerts")]
    shown = prometheus.values(grafana_to_promql(expr, instance=instance))
    assert any(dict(labels).get("alertname") == "MGeoReadinessFailing"
               and dict(labels).get("reason") == "model_load_failed" for labels in shown), (title, shown)

    # 2. The directory is repaired and the workers reload: the resolved notification follows.
    shutil.copy(os.path.join(DEFAULT_MODEL_DIR, "model.safetensors"), model / "model.safetensors")
    service.process.send_signal(signal.SIGHUP)
    service.wait_ready(120)
    receiver, _ = webhook.wait_for("the readiness alert", 120, alertname="MGeoReadinessFailing",
                                   instance=instance, status="resolved")
    assert receiver == "mgeo-page"

    # 3. The target goes down: MGeoTargetDown pages, and it silences the instance's other alerts.
    os.killpg(service.process.pid, signal.SIGKILL)
    service.process.wait(30)
    killed_at = len(webhook.notifications)
    webhook.wait_for("the target down", 180, alertname="MGeoTargetDown", instance=instance, status="firing")
    starts = "2000-01-01T00:00:00Z"
    latency = {"labels": {"alertname": "MGeoLatencyP95High", "instance": instance, "job": "mgeo",
                          "severity": "warning"}, "annotations": {"summary": "slow"}, "startsAt": starts}
    elsewhere = {**latency, "labels": {**latency["labels"], "instance": "other:8000"}}
    assert http("POST", alertmanager.url + "/api/v2/alerts", [latency, elsewhere])[0] == 200
    webhook.wait_for("the other instance's alert", 60, alertname="MGeoLatencyP95High", instance="other:8000",
                     status="firing")
    [suppressed] = alertmanager.alerts(alertname="MGeoLatencyP95High", instance=instance)
    assert suppressed["status"]["state"] == "suppressed" and suppressed["status"]["inhibitedBy"]
    after_kill = [alert["labels"]["alertname"] for _, payload in webhook.notifications[killed_at:]
                  for alert in payload["alerts"] if alert["labels"].get("instance") == instance
                  and alert["status"] == "firing"]
    assert set(after_kill) == {"MGeoTargetDown"}, after_kill
