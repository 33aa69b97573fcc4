"""Prometheus rules and Grafana dashboards: promtool checks, and every query against a real Prometheus."""
import json
import os
import re
import subprocess
import sys
import time

import yaml

from conftest import (DASHBOARDS, GRAFANA, PROMETHEUS, ROOT, RULE_FILES, NodeExporter, Prometheus,
                      dashboard_queries, grafana_to_promql, http)

ALERTS = {"MGeoTargetDown", "MGeoNotReady", "MGeoReadinessFailing", "MGeoErrorBudgetBurn", "MGeoLatencyP95High", "MGeoSuccessRateLow",
          "MGeoGPUMemoryHigh", "MGeoGPUTemperatureHigh", "MGeoNVMLDown", "MGeoWorkerRestarts", "MGeoShedding"}


def promtool(*args):
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=PROMETHEUS, timeout=120)


def rules(kind):
    for path in RULE_FILES:
        with open(path) as f:
            for group in yaml.safe_load(f)["groups"]:
                for rule in group["rules"]:
                    if kind in rule:
                        yield rule


def test_promtool_checks_config_and_rules():
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    checked = promtool("check", "rules", *RULE_FILES)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_rule_unit_tests_pass():
    result = promtool("test", "rules", "tests/mgeo-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_declared_annotated_and_unit_tested():
    alerts = list(rules("alert"))
    assert {a["alert"] for a in alerts} == ALERTS
    for alert in alerts:
        assert alert["labels"]["severity"] in ("page", "ticket", "warning"), alert["alert"]
        assert {"summary", "description", "runbook"} <= set(alert["annotations"]), alert["alert"]
        assert "$value" in alert["annotations"]["description"] or alert["alert"] in (
            "MGeoTargetDown", "MGeoNotReady", "MGeoNVMLDown"), alert["alert"]  # state alerts: the value is 0
    with open(os.path.join(PROMETHEUS, "tests", "mgeo-alerts.test.yml")) as f:
        cases = yaml.safe_load(f)["tests"]
    for name in ALERTS:
        checks = [(case, check) for case in cases for check in case["alert_rule_test"] if check["alertname"] == name]
        assert any(check["exp_alerts"] for _, check in checks), f"{name} never fires in a test"
        fired_instances = {a["exp_labels"].get("instance") for _, c in checks for a in c["exp_alerts"]}
        silent = any(not check["exp_alerts"] for _, check in checks) or any(
            re.search(r'instance="([^"]+)"', s["series"]).group(1) not in fired_instances
            for case, _ in checks for s in case["input_series"] if "instance=" in s["series"])
        assert silent, f"{name} has no case where it must stay silent"


def test_burn_rate_alerts_share_one_slo():
    slo = [r for r in rules("record") if r["record"] == "mgeo:slo_availability:target"]
    assert len(slo) == 1 and slo[0]["expr"] == "vector(0.995)"
    burns = [a for a in rules("alert") if a["alert"] == "MGeoErrorBudgetBurn"]
    assert [(a["labels"]["burn_rate"], a["labels"]["severity"]) for a in burns] == [
        ("14.4x", "page"), ("6x", "page"), ("1x", "ticket")]
    for alert in burns:
        assert "scalar(mgeo:slo_availability:target)" in alert["expr"]
        assert "0.995" not in alert["expr"] and "0.005" not in alert["expr"]


def test_dashboards_are_current_and_follow_the_rules():
    sys.path.insert(0, GRAFANA)
    try:
        import generate
    finally:
        sys.path.remove(GRAFANA)
    for name, build in generate.DASHBOARDS.items():
        with open(os.path.join(GRAFANA, "dashboards", name), encoding="utf-8") as f:
            assert f.read() == generate.render(build), f"{name} is stale: run python grafana/generate.py"
    uids = set()
    for path in DASHBOARDS:
        with open(path) as f:
            text = f.read()
        board = json.loads(text)
        assert "${DS_" not in text and '"graph"' not in text
        uids.add(board["uid"])
        assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "job", "instance"}
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["type"] in ("timeseries", "stat", "gauge", "bargauge", "table", "piechart"), panel["title"]
            assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
    assert uids == {"mgeo-service", "mgeo-gpu"}
    with open(os.path.join(GRAFANA, "provisioning", "datasources", "prometheus.yml")) as f:
        datasource = yaml.safe_load(f)["datasources"][0]
    assert datasource["uid"] == "mgeo-prometheus" and datasource["type"] == "prometheus"
    with open(os.path.join(GRAFANA, "provisioning", "dashboards", "mgeo.yml")) as f:
        assert yaml.safe_load(f)["providers"][0]["type"] == "file"


def test_rules_and_panels_against_a_real_prometheus(service_factory, tmp_path):
    fake_gpu = {"gpus": [{"name": "NVIDIA H100", "uuid": "GPU-aaa", "util": 50, "used": 2 << 30,
                          "total": 80 << 30, "temp": 55, "power_mw": 100000}]}
    service = service_factory(PYTHONPATH=os.path.join(ROOT, "tests", "fake_pynvml"), FAKE_NVML=json.dumps(fake_gpu))
    node = NodeExporter(tmp_path)
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{service.metrics_port}"], nodes=[node.target])
    try:
        service.wait_ready()
        pair = {"address1": "北京市海淀区中关村大街1号", "address2": "北京海淀中关村街1号"}
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:  # a few scrapes' worth of mixed traffic
            assert http("POST", service.url + "/predict", pair)[0] == 200
            assert http("POST", service.url + "/predict", {"pairs": [pair, pair]})[0] == 200
            assert http("POST", service.url + "/predict", b"{bad", {"Content-Type": "application/json"})[0] == 400
            assert http("GET", service.url + "/missing")[0] == 404
            time.sleep(0.1)
        time.sleep(3)

        for rule in rules("record"):
            status, body = prometheus.query(rule["expr"])
            assert status == 200 and body["status"] == "success", (rule["record"], body)
        for record in ("job:mgeo_requests:rate5m", "job_instance:mgeo_request_duration_seconds:p95_5m",
                       "job:mgeo_predict_errors:ratio_rate5m", "mgeo:slo_availability:target"):
            assert prometheus.query(record)[1]["data"]["result"], record

        for path in DASHBOARDS:
            for title, expr in dashboard_queries(path) + dashboard_queries(path, "host"):
                status, body = prometheus.query(grafana_to_promql(expr))
                assert status == 200 and body["status"] == "success", (title, body)
                assert body["data"]["result"], f"panel {title!r} shows no data: {grafana_to_promql(expr)}"
        (service_board,) = [path for path in DASHBOARDS if path.endswith("mgeo-service.json")]
        for title, expr in dashboard_queries(service_board, "host"):  # one line per host, a share of it
            values = prometheus.values(grafana_to_promql(expr))
            assert [dict(labels)["instance"] for labels in values] == [node.target], title
            assert all(0 <= value <= 1 for value in values.values()), (title, values)
        hosts = prometheus.values('node_uname_info{job="node"}')  # the series the host variable lists
        assert [dict(labels)["instance"] for labels in hosts] == [node.target]
        instances = prometheus.query('group by (instance) (mgeo_request_total{job=~".*"})')[1]["data"]["result"]
        assert [r["metric"]["instance"] for r in instances] == [f"127.0.0.1:{service.metrics_port}"]

        service.stop()
        down = prometheus.wait_until(lambda: [a for a in prometheus.alerts() if a["labels"]["alertname"] == "MGeoTargetDown"],
                                     30, "MGeoTargetDown")
        assert down[0]["state"] in ("pending", "firing")
        assert down[0]["labels"]["instance"] == f"127.0.0.1:{service.metrics_port}"
        assert down[0]["labels"]["job"] == "mgeo"
    finally:
        prometheus.stop()
        node.stop()
