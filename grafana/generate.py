"""Generates grafana/dashboards/*.json: `python grafana/generate.py` (a test checks the JSON is current).

Plain dictionaries in Grafana's dashboard schema (v39, Grafana 11): timeseries and stat
panels only, a `datasource` variable (no ${DS_...} inputs, which break file provisioning),
`job` and `instance` variables, fixed uids, a unit on every panel.
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SELECTOR = 'job=~"$job", instance=~"$instance"'
SLO_BUDGET = "(1 - scalar(mgeo:slo_availability:target))"


def variables(metric: str) -> list[dict]:
    def label_variable(name, query):
        return {"name": name, "label": name, "type": "query", "datasource": DATASOURCE,
                "query": {"qryType": 1, "query": query, "refId": f"{name}-variable"},
                "definition": query, "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
                "current": {"text": ["All"], "value": ["$__all"]}, "sort": 1}
    return [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {"text": "Prometheus", "value": "mgeo-prometheus"}, "refresh": 1},
        label_variable("job", f"label_values({metric}, job)"),
        label_variable("instance", f'label_values({metric}{{job=~"$job"}}, instance)'),
    ]


def panel(kind: str, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int,
          w: int = 12, h: int = 8, description: str = "", **custom) -> dict:
    defaults = {"unit": unit}
    if "min" in custom:
        defaults["min"] = custom.pop("min")
    if "max" in custom:
        defaults["max"] = custom.pop("max")
    result = {
        "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
        "options": custom or ({"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
                              if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}}),
    }
    return result


def dashboard(uid: str, title: str, metric: str, panels: list[dict]) -> dict:
    for number, p in enumerate(panels, start=1):
        p["id"] = number
    return {"uid": uid, "title": title, "tags": ["mgeo"], "timezone": "browser", "schemaVersion": 39,
            "version": 1, "editable": True, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": variables(metric)}, "annotations": {"list": []}, "panels": panels}


def service_dashboard() -> dict:
    rate = "$__rate_interval"
    predict = f'{SELECTOR}, endpoint="/predict"'
    return dashboard("mgeo-service", "MGeo service", "mgeo_request_total", [
        panel("timeseries", "Request rate by status", "reqps",
              [(f"sum by (status) (rate(mgeo_request_total{{{SELECTOR}}}[{rate}]))", "{{status}}")], 0, 0,
              description="Answers per second, all endpoints, by HTTP status."),
        panel("stat", "Success ratio", "percentunit",
              [(f'sum(rate(mgeo_request_total{{{SELECTOR}, status=~"[24].."}}[{rate}])) '
                f"/ sum(rate(mgeo_request_total{{{SELECTOR}}}[{rate}]))", "success")], 12, 0, w=6,
              description="Answers that are 2xx, or 4xx for bad input, over all answers.", min=0, max=1),
        panel("stat", "Error budget remaining (30 days)", "percentunit",
              [(f'1 - (1 - sum(rate(mgeo_request_total{{{predict}, status=~"[24].."}}[30d])) '
                f"/ sum(rate(mgeo_request_total{{{predict}}}[30d]))) / {SLO_BUDGET}", "budget")], 18, 0, w=6,
              description="Share of the /predict error budget (SLO mgeo:slo_availability:target) left over 30 days.",
              max=1),
        panel("timeseries", "/predict latency p50 / p95 / p99", "s",
              [(f"histogram_quantile({q}, sum by (le) (rate(mgeo_request_duration_seconds_bucket{{{predict}}}[{rate}])))",
                f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], 0, 8),
        panel("timeseries", "Requests in progress", "short",
              [(f"sum by (instance) (mgeo_requests_inprogress{{{SELECTOR}}})", "{{instance}}")], 12, 8),
        panel("timeseries", "Pairs per model forward", "short",
              [(f"sum(rate(mgeo_inference_batch_size_sum{{{SELECTOR}}}[{rate}])) "
                f"/ sum(rate(mgeo_inference_batch_size_count{{{SELECTOR}}}[{rate}]))", "mean batch size")], 0, 16,
              description="Mean pairs per coalesced forward (micro-batching)."),
        panel("timeseries", "Inference and queue time p95", "s",
              [(f"histogram_quantile(0.95, sum by (le) (rate(mgeo_inference_duration_seconds_bucket{{{SELECTOR}}}[{rate}])))",
                "forward p95"),
               (f"histogram_quantile(0.95, sum by (le) (rate(mgeo_queue_duration_seconds_bucket{{{SELECTOR}}}[{rate}])))",
                "queue p95")], 12, 16),
        panel("timeseries", "Ready workers per instance", "short",
              [(f"sum by (instance) (mgeo_model_ready{{{SELECTOR}}})", "{{instance}}")], 0, 24, min=0),
        panel("timeseries", "Predicted-label mix", "percentunit",
              [(f"sum by (label) (rate(mgeo_pairs_total{{{SELECTOR}}}[{rate}])) "
                f"/ ignoring(label) group_left sum(rate(mgeo_pairs_total{{{SELECTOR}}}[{rate}]))", "{{label}}")],
              12, 24, min=0, max=1),
    ])


def gpu_dashboard() -> dict:
    gpu = f"{SELECTOR}"
    legend = "{{instance}} GPU {{gpu}} {{name}}"
    return dashboard("mgeo-gpu", "MGeo GPU", "mgeo_nvml_up", [
        panel("timeseries", "GPU utilisation", "percentunit",
              [(f"nvidia_gpu_utilization_ratio{{{gpu}}}", legend)], 0, 0, min=0, max=1),
        panel("timeseries", "GPU memory used / total", "bytes",
              [(f"nvidia_gpu_memory_used_bytes{{{gpu}}}", "used " + legend),
               (f"nvidia_gpu_memory_total_bytes{{{gpu}}}", "total " + legend)], 12, 0, min=0),
        panel("timeseries", "GPU temperature", "celsius",
              [(f"nvidia_gpu_temperature_celsius{{{gpu}}}", legend)], 0, 8),
        panel("timeseries", "GPU power", "watt", [(f"nvidia_gpu_power_watts{{{gpu}}}", legend)], 12, 8, min=0),
        panel("stat", "NVML up", "bool_yes_no", [(f"min by (instance) (mgeo_nvml_up{{{SELECTOR}}})", "{{instance}}")],
              0, 16, w=24, h=4),
    ])


DASHBOARDS = {"mgeo-service.json": service_dashboard, "mgeo-gpu.json": gpu_dashboard}


def render(build) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    for name, build in DASHBOARDS.items():
        with open(os.path.join(HERE, "dashboards", name), "w", encoding="utf-8") as f:
            f.write(render(build))
