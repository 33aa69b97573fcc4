"""Generates deploy/kubernetes/base/alertmanagerconfig.yaml from prometheus/alertmanager.yml:
`python deploy/kubernetes/generate_alertmanagerconfig.py` (a test fails when the committed file differs).

With the Prometheus Operator, Alertmanager takes its routes from AlertmanagerConfig objects: the
same routes, intervals, inhibitions and webhook receivers as the one-host file, in the CRD's
camelCase. The operator scopes them to the object's namespace. The notification templates are
the Alertmanager's own: mount prometheus/mgeo-notifications.tmpl there if chat receivers use it.
"""
import os
import re

import yaml

from generate_rules import generated, write

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "..", "prometheus", "alertmanager.yml")
OUTPUT = os.path.join(HERE, "base", "alertmanagerconfig.yaml")
_MATCHER = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"(.*)"\s*$')
_INTERVALS = {"group_wait": "groupWait", "group_interval": "groupInterval", "repeat_interval": "repeatInterval"}


def matcher(text: str) -> dict:
    """'severity="page"' -> {"name": "severity", "matchType": "=", "value": "page"}"""
    name, match_type, value = _MATCHER.match(text).groups()
    return {"name": name, "matchType": match_type, "value": value}


def route(source: dict) -> dict:
    out = {"receiver": source["receiver"]}
    if "group_by" in source:
        out["groupBy"] = source["group_by"]
    out.update({camel: source[snake] for snake, camel in _INTERVALS.items() if snake in source})
    if "matchers" in source:
        out["matchers"] = [matcher(m) for m in source["matchers"]]
    if source.get("routes"):
        out["routes"] = [route(r) for r in source["routes"]]
    return out


def alertmanager_config() -> dict:
    with open(SOURCE, encoding="utf-8") as f:
        source = yaml.safe_load(f)
    return {
        "apiVersion": "monitoring.coreos.com/v1alpha1",
        "kind": "AlertmanagerConfig",
        "metadata": {"name": "mgeo-service", "labels": {"app.kubernetes.io/name": "mgeo-service"}},
        "spec": {
            "route": route(source["route"]),
            "inhibitRules": [{"sourceMatch": [matcher(m) for m in rule["source_matchers"]],
                              "targetMatch": [matcher(m) for m in rule["target_matchers"]],
                              "equal": rule["equal"]} for rule in source["inhibit_rules"]],
            "receivers": [{"name": r["name"],
                           "webhookConfigs": [{"url": w["url"], "sendResolved": w["send_resolved"]}
                                              for w in r["webhook_configs"]]} for r in source["receivers"]],
        },
    }


def render() -> str:
    return generated(alertmanager_config(), "generate_alertmanagerconfig.py", "prometheus/alertmanager.yml")


if __name__ == "__main__":
    write(OUTPUT, render())
