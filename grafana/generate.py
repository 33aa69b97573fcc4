"""Generates grafana/dashboards/*.json: `python grafana/generate.py` (a test checks the JSON is current).

Built with Grafana's own typed builders (``grafana-foundation-sdk``, the build for Grafana
11.6; a build dependency of the dashboards, never of the service): timeseries, stat and
table panels, a `datasource` variable (no ${DS_...} inputs, which break file provisioning),
`job` and `instance` variables, fixed uids, a unit on every panel.
"""
import json
import os

from grafana_foundation_sdk.builders import common, dashboard as board, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models.dashboard import (DataSourceRef, GridPos, VariableOption, VariableRefresh,
                                                     VariableSort)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = os.path.dirname(os.path.abspath(__file__))
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SELECTOR = 'job=~"$job", instance=~"$instance"'
HOSTS = 'job="node", instance=~"$node"'
SLO_BUDGET = "(1 - scalar(mgeo:slo_availability:target))"
PANELS = {"timeseries": timeseries.Panel, "stat": stat.Panel, "table": table.Panel}


def label_variable(name: str, query: str, label: str | None = None):
    return (board.QueryVariable(name).label(label or name).datasource(DATASOURCE)
            .query({"qryType": 1, "query": query, "refId": f"{name}-variable"})
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).include_all(True).multi(True).all_value(".*")
            .current(VariableOption(text=["All"], value=["$__all"])).sort(VariableSort.ALPHABETICAL_ASC))


def variables(metric: str) -> list:
    return [
        board.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
        .current(VariableOption(text="Prometheus", value="mgeo-prometheus")),
        label_variable("job", f"label_values({metric}, job)"),
        label_variable("instance", f'label_values({metric}{{job=~"$job"}}, instance)'),
    ]


def panel(kind: str, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int,
          w: int = 12, h: int = 8, description: str = "", lowest: float | None = None, highest: float | None = None):
    built = (PANELS[kind]().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .grid_pos(GridPos(h=h, w=w, x=x, y=y)))
    if lowest is not None:
        built = built.min(lowest)
    if highest is not None:
        built = built.max(highest)
    for i, (expr, legend) in enumerate(targets):
        target = prometheus.Dataquery().ref_id(chr(ord("A") + i)).datasource(DATASOURCE).expr(expr)
        if kind == "table":  # what holds now, one row per series
            target = target.instant().format(PromQueryFormat.TABLE)
        built = built.with_target(target.legend_format(legend))
    if kind == "timeseries":
        built = (built.legend(common.VizLegendOptions().display_mode(common_models.LegendDisplayMode.LIST)
                              .placement(common_models.LegendPlacement.BOTTOM))
                 .tooltip(common.VizTooltipOptions().mode(common_models.TooltipDisplayMode.MULTI)))
    elif kind == "stat":
        built = built.reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
    return built


def row(title: str, y: int):
    return board.Row(title).grid_pos(GridPos(h=1, w=24, x=0, y=y))


def dashboard(uid: str, title: str, metric: str, panels: list, extra_variables: tuple = ()) -> dict:
    built = (board.Dashboard(title).uid(uid).tags(["mgeo"]).timezone("browser").version(1).editable()
             .refresh("30s").time("now-1h", "now").variables(variables(metric) + list(extra_variables)))
    for number, item in enumerate(panels, start=1):
        built = built.with_row(item.id(number)) if isinstance(item, board.Row) else built.with_panel(item.id(number))
    return json.loads(json.dumps(built.build(), cls=JSONEncoder))


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
              description="Answers that are 2xx, or 4xx for bad input, over all answers.", lowest=0, highest=1),
        panel("stat", "Error budget remaining (30 days)", "percentunit",
              [(f'1 - (1 - sum(rate(mgeo_request_total{{{predict}, status=~"[24].."}}[30d])) '
                f"/ sum(rate(mgeo_request_total{{{predict}}}[30d]))) / {SLO_BUDGET}", "budget")], 18, 0, w=6,
              description="Share of the /predict error budget (SLO mgeo:slo_availability:target) left over 30 days.",
              highest=1),
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
              [(f"sum by (instance) (mgeo_model_ready{{{SELECTOR}}})", "{{instance}}")], 0, 24, lowest=0),
        panel("timeseries", "Predicted-label mix", "percentunit",
              [(f"sum by (label) (rate(mgeo_pairs_total{{{SELECTOR}}}[{rate}])) "
                f"/ ignoring(label) group_left sum(rate(mgeo_pairs_total{{{SELECTOR}}}[{rate}]))", "{{label}}")],
              12, 24, lowest=0, highest=1),
        panel("timeseries", "Result cache hit ratio", "percentunit",
              [(f'sum(rate(mgeo_cache_requests_total{{{SELECTOR}, result="hit"}}[{rate}])) '
                f"/ sum(rate(mgeo_cache_requests_total{{{SELECTOR}}}[{rate}]))", "hit ratio")], 0, 32,
              description="Pairs answered from the workers' result cache (MGEO_CACHE_SIZE) over all pairs looked "
                          "up: repeated traffic; a sudden drop means new kinds of requests.", lowest=0, highest=1),
        panel("timeseries", "Shed requests by reason", "reqps",
              [(f"sum by (reason) (rate(mgeo_rejected_requests_total{{{SELECTOR}}}[{rate}]))", "{{reason}}")], 12, 32,
              description="/predict requests refused before their forward: overloaded (429: the worker could not "
                          "answer by the deadline), deadline_exceeded (504), client_gone (the client left). "
                          "MGeoShedding opens a ticket above 2% for 10 minutes: scale out.", lowest=0),
        panel("timeseries", "Queue: pairs waiting for a forward", "short",
              [(f"sum by (instance) (mgeo_queue_pairs{{{SELECTOR}}})", "{{instance}}")], 0, 40,
              description="Pairs admitted and not yet in a forward, summed over workers. Admission keeps it under "
                          "what the forwards finish by the requests' deadline; KEDA scales out on it.", lowest=0),
        # node_exporter's hosts have their own instances (host:9100), so the row has its own variable.
        row("Host", 48),
        panel("timeseries", "Host CPU busy", "percentunit",
              [(f'1 - avg by (instance) (rate(node_cpu_seconds_total{{{HOSTS}, mode="idle"}}[{rate}]))', "{{instance}}")],
              0, 49, description="Share of the host's CPU time not idle, all cores (node_exporter). The service "
                                 "saturates its cores by design under load; sustained 100% with shedding: scale out.",
              lowest=0, highest=1),
        panel("timeseries", "Host memory used", "percentunit",
              [(f"1 - node_memory_MemAvailable_bytes{{{HOSTS}}} / node_memory_MemTotal_bytes{{{HOSTS}}}",
                "{{instance}}")], 12, 49,
              description="Share of the host's memory not available to new work (node_exporter MemAvailable).",
              lowest=0, highest=1),
        row("Alerts", 57),
        panel("table", "Firing alerts", "short",
              [(f'sum by (alertname, severity, instance, reason) (ALERTS{{alertstate="firing", {SELECTOR}}})', "")],
              0, 58, w=24, description="The alerts of prometheus/rules firing now, with severity and readiness "
                                       "reason; Alertmanager routes them (docs/alerts.md)."),
    ], extra_variables=(label_variable("node", 'label_values(node_uname_info{job="node"}, instance)', "host"),))


def gpu_dashboard() -> dict:
    gpu = f"{SELECTOR}"
    legend = "{{instance}} GPU {{gpu}} {{name}}"
    return dashboard("mgeo-gpu", "MGeo GPU", "mgeo_nvml_up", [
        panel("timeseries", "GPU utilisation", "percentunit",
              [(f"nvidia_gpu_utilization_ratio{{{gpu}}}", legend)], 0, 0, lowest=0, highest=1),
        panel("timeseries", "GPU memory used / total", "bytes",
              [(f"nvidia_gpu_memory_used_bytes{{{gpu}}}", "used " + legend),
               (f"nvidia_gpu_memory_total_bytes{{{gpu}}}", "total " + legend)], 12, 0, lowest=0),
        panel("timeseries", "GPU temperature", "celsius",
              [(f"nvidia_gpu_temperature_celsius{{{gpu}}}", legend)], 0, 8),
        panel("timeseries", "GPU power", "watt", [(f"nvidia_gpu_power_watts{{{gpu}}}", legend)], 12, 8, lowest=0),
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
