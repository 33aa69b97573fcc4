"""Three service instances on loopback and the real Prometheus finding them through a file_sd
targets file in the shipped format: the dashboards, the alerts and the autoscaling query hold
across instances."""
import json
import os
import re
import signal
import threading
import time
import urllib.parse

import yaml

from conftest import DASHBOARDS, ROOT, Prometheus, dashboard_queries, grafana_to_promql, http

PAIR = {"address1": "北京市海淀区中关村大街1号", "address2": "北京海淀中关村街1号"}
SCALED_OBJECT = os.path.join(ROOT, "deploy", "kubernetes", "components", "keda", "scaledobject.yaml")

# How each panel combines the instances. Every panel must be listed: a new one needs a rule.
PER_INSTANCE = {"Requests in progress", "Ready workers per instance", "GPU utilisation", "GPU memory used / total",
                "GPU temperature", "GPU power", "NVML up", "Queue: pairs waiting for a forward"}
SUM_OF_INSTANCES = {"Request rate by status", "Shed requests by reason"}
# Ratios and quantiles of the pooled counts: a weighted mean of the instances' values, so it
# lies between the smallest and the largest of them.
POOLED = {"Success ratio", "Error budget remaining (30 days)", "/predict latency p50 / p95 / p99",
          "Pairs per model forward", "Inference and queue time p95", "Predicted-label mix", "Result cache hit ratio"}


def fake_gpu(number: int) -> str:
    return json.dumps({"gpus": [{"name": "NVIDIA L4", "uuid": f"GPU-{number}", "util": 20 * number,
                                 "used": number << 30, "total": 24 << 30, "temp": 50 + number,
                                 "power_mw": 30000 * number}]})


def drive(services, seconds: float):
    """Different traffic on each instance: more requests, and more bad ones, on later ones."""
    def run(index, service):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(index + 1):
                assert http("POST", service.url + "/predict", PAIR)[0] == 200
            assert http("POST", service.url + "/predict", {"pairs": [PAIR] * (index + 1)})[0] == 200
            if index:
                assert http("POST", service.url + "/predict", {"address1": ""})[0] == 400
            time.sleep(0.05)
    threads = [threading.Thread(target=run, args=pair) for pair in enumerate(services)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def assert_panels_combine_the_instances(prometheus, instances):
    titles = {title for path in DASHBOARDS for title, _ in dashboard_queries(path)}
    assert titles == PER_INSTANCE | SUM_OF_INSTANCES | POOLED
    at = time.time() - 1  # one evaluation time for every query: the figures must add up exactly
    for path in DASHBOARDS:
        for title, expr in dashboard_queries(path):
            pooled = prometheus.values(grafana_to_promql(expr), at)
            each = {i: prometheus.values(grafana_to_promql(expr, instance=i), at) for i in instances}
            assert pooled, title
            assert all(each.values()), f"{title}: an instance shows no data"
            if title in PER_INSTANCE:
                union = {labels: v for values in each.values() for labels, v in values.items()}
                assert pooled == union, title
                assert {dict(labels)["instance"] for labels in pooled} == set(instances), title
                continue
            for labels, value in pooled.items():
                parts = [values[labels] for values in each.values() if labels in values]
                if title in SUM_OF_INSTANCES:
                    assert abs(value - sum(parts)) <= 1e-9 * max(1.0, value), (title, labels, value, parts)
                else:
                    assert min(parts) - 1e-9 <= value <= max(parts) + 1e-9, (title, labels, value, parts)


def test_three_instances_behind_one_prometheus(service_factory, tmp_path):
    services = [service_factory(MGEO_WORKERS="1", PYTHONPATH=os.path.join(ROOT, "tests", "fake_pynvml"),
                                FAKE_NVML=fake_gpu(n)) for n in range(1, 4)]
    instances = [f"127.0.0.1:{s.metrics_port}" for s in services]
    prometheus = Prometheus(tmp_path, instances)
    try:
        for service in services:
            service.wait_ready()
        prometheus.wait_until(lambda: len(prometheus.values('up{job="mgeo"} == 1')) == 3, 30, "three targets up")
        drive(services, 8)
        time.sleep(3)  # the last requests scraped

        # The dashboards' instance variable lists all three.
        for path in DASHBOARDS:
            with open(path) as f:
                variable, = [v for v in json.load(f)["templating"]["list"] if v["name"] == "instance"]
            series, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"]).groups()
            query = urllib.parse.urlencode({"match[]": grafana_to_promql(series)})
            listed = http("GET", f"{prometheus.url}/api/v1/label/{label}/values?{query}")[2]["data"]
            assert sorted(listed) == sorted(instances), path

        assert_panels_combine_the_instances(prometheus, instances)

        # The autoscaling queries: one value in all, the sum of one value per instance.
        with open(SCALED_OBJECT) as f:
            triggers = yaml.safe_load(f)["spec"]["triggers"]
        for query in (trigger["metadata"]["query"] for trigger in triggers):
            assert query.startswith("sum(")
            at = time.time() - 1
            total = prometheus.values(query, at)
            per_instance = prometheus.values(query.replace("sum(", "sum by (instance) (", 1), at)
            assert len(total) == 1 and {dict(labels)["instance"] for labels in per_instance} == set(instances)
            assert list(total.values())[0] == sum(per_instance.values())

        # One instance dies: MGeoTargetDown fires for it alone, and nothing else alerts.
        victim = instances[1]
        os.killpg(services[1].process.pid, signal.SIGKILL)
        services[1].process.wait(10)

        def fired():
            down = [a for a in prometheus.alerts() if a["labels"]["alertname"] == "MGeoTargetDown"]
            return [a for a in down if a["state"] == "firing"]
        firing = prometheus.wait_until(fired, 90, "MGeoTargetDown to fire")  # its `for` is 1 minute
        assert [a["labels"]["instance"] for a in firing] == [victim]
        assert {a["labels"].get("instance") for a in prometheus.alerts()} == {victim}
        assert len(prometheus.values('up{job="mgeo"} == 1')) == 2
    finally:
        prometheus.stop()
