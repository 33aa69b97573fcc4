"""deploy/kubernetes, docker-compose.yml and the Dockerfile: rendered with kustomize, validated
against the Kubernetes and custom-resource schemas, and held to the service's own contracts."""
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, RULE_FILES, free_port, http
from mgeo_service.config import LIBRARY_VARIABLES, SETTINGS, load_settings

KUBERNETES = os.path.join(ROOT, "deploy", "kubernetes")
VALIDATOR = os.path.join(ROOT, "tests", "kubernetes")
KUBERNETES_VERSION = "1.32"
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "AlertmanagerConfig", "ScaledObject"}
# The shipped variants: the two overlays, and the base with every alternative component.
VARIANTS = {
    "cpu": ["overlays/cpu"],
    "gpu": ["overlays/gpu"],
    "alternatives": ["base", "components/hpa-cpu", "components/podmonitor", "components/mgeo-checkpoint",
                     "components/ingress-nginx"],
}


class _Loader(yaml.SafeLoader):
    """YAML 1.2 as Kubernetes reads it: a bare `=` (an AlertmanagerConfig matchType) is a string,
    not PyYAML's YAML 1.1 'value' tag."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def kustomize(path: str) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", path], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.load_all(result.stdout, Loader=_Loader) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    variants = {}
    for name, (resource, *components) in VARIANTS.items():
        if not components:
            variants[name] = kustomize(os.path.join(KUBERNETES, resource))
            continue
        folder = tmp_path_factory.mktemp(name)
        relative = os.path.relpath(KUBERNETES, folder)  # kustomize refuses absolute paths
        (folder / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f"{relative}/{resource}"], "components": [f"{relative}/{c}" for c in components]}))
        variants[name] = kustomize(str(folder))
    return variants


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def container(docs):
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def environment(docs) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(docs)["env"]}


def test_each_variant_renders_its_objects(rendered):
    kinds = {name: sorted(d["kind"] for d in docs) for name, docs in rendered.items()}
    core = ["AlertmanagerConfig", "Deployment", "PodDisruptionBudget", "PrometheusRule", "Service"]
    assert kinds["cpu"] == sorted(core + ["Namespace", "ScaledObject", "ServiceMonitor"])
    assert kinds["gpu"] == sorted(core + ["Namespace", "PersistentVolumeClaim", "ScaledObject", "ServiceMonitor"])
    assert kinds["alternatives"] == sorted(core + ["HorizontalPodAutoscaler", "Ingress", "PersistentVolumeClaim",
                                                   "PodMonitor"])
    for name in ("cpu", "gpu"):
        assert {d["metadata"].get("namespace") for d in rendered[name] if d["kind"] != "Namespace"} == {"mgeo"}


def test_core_objects_pass_the_kubernetes_schemas(rendered):
    checked = set()
    for docs in rendered.values():
        for doc in docs:
            if doc["kind"] not in CUSTOM_KINDS:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                checked.add(doc["kind"])
    assert checked == {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim",
                        "HorizontalPodAutoscaler", "Ingress"}
    broken = {**one(rendered["cpu"], "Deployment"), "spec": {"replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def validate_custom_resources(docs) -> subprocess.CompletedProcess:
    return subprocess.run(["node", "validate-custom-resources.mjs"], input=json.dumps(docs), capture_output=True,
                          text=True, cwd=VALIDATOR, timeout=120)


def test_custom_resources_pass_their_schemas(rendered):
    custom = [d for docs in rendered.values() for d in docs if d["kind"] in CUSTOM_KINDS]
    assert {d["kind"] for d in custom} == CUSTOM_KINDS
    result = validate_custom_resources(custom)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("\nok ") + result.stdout.startswith("ok ") == len(custom)
    scaled = one(rendered["cpu"], "ScaledObject")
    broken = {**scaled, "spec": {**scaled["spec"], "triggers": {"type": "prometheus"}}}
    assert validate_custom_resources([broken]).returncode == 1  # the validator can fail


def current_generator(name: str):
    """The generator script deploy/kubernetes/<name>.py, once its committed output is shown current."""
    sys.path.insert(0, KUBERNETES)
    try:
        generator = importlib.import_module(name)
    finally:
        sys.path.remove(KUBERNETES)
    with open(generator.OUTPUT, encoding="utf-8") as f:
        assert f.read() == generator.render(), f"stale: run python deploy/kubernetes/{name}.py"
    return generator


def test_the_prometheusrule_is_generated_from_the_rule_files(rendered):
    current_generator("generate_rules")
    groups = []
    for path in sorted(RULE_FILES):
        with open(path, encoding="utf-8") as f:
            groups += yaml.safe_load(f)["groups"]
    names = [g["name"] for g in groups]
    assert len(set(names)) == len(names), "the operator refuses a PrometheusRule with two groups of one name"
    for docs in rendered.values():
        assert one(docs, "PrometheusRule")["spec"]["groups"] == groups


def test_the_alertmanagerconfig_is_generated_from_alertmanager_yml(rendered):
    generator = current_generator("generate_alertmanagerconfig")
    with open(generator.SOURCE, encoding="utf-8") as f:
        source = yaml.safe_load(f)
    for docs in rendered.values():
        spec = one(docs, "AlertmanagerConfig")["spec"]
        routes = {tuple(m["value"] for m in r["matchers"]): (r["receiver"], r["groupWait"], r["groupInterval"],
                                                             r["repeatInterval"]) for r in spec["route"]["routes"]}
        assert routes == {tuple(m.split('"')[1] for m in r["matchers"]): (
            r["receiver"], r["group_wait"], r["group_interval"], r["repeat_interval"])
            for r in source["route"]["routes"]}
        assert set(routes) == {("page",), ("ticket",), ("warning",)}
        assert spec["route"]["groupBy"] == ["alertname", "instance"]
        assert len(spec["inhibitRules"]) == len(source["inhibit_rules"])


def test_the_deployment_follows_the_contract(rendered):
    for name, docs in rendered.items():
        deployment = one(docs, "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        main = container(docs)
        env = environment(docs)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert deployment["spec"]["replicas"] >= 2
        assert ports == {"http": 5000, "metrics": 8000}
        assert env["MGEO_BIND"].endswith(f":{ports['http']}") and env["MGEO_METRICS_PORT"] == str(ports["metrics"])

        startup, live, ready = main["startupProbe"], main["livenessProbe"], main["readinessProbe"]
        assert startup["failureThreshold"] * startup["periodSeconds"] >= 300, name
        assert (startup["httpGet"]["path"], live["httpGet"]["path"], ready["httpGet"]["path"]) == (
            "/health/ready", "/health/live", "/health/ready")
        assert {p["httpGet"]["port"] for p in (startup, live, ready)} == {"http"}

        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
        multiproc = mounts[env["PROMETHEUS_MULTIPROC_DIR"]]
        assert volumes[multiproc["name"]]["emptyDir"]["medium"] == "Memory"
        for path, mount in mounts.items():  # the root filesystem is read-only: writable paths are emptyDirs
            assert "emptyDir" in volumes[mount["name"]] or mount.get("readOnly"), path

        assert {"cpu", "memory"} <= set(main["resources"]["requests"]) and {"cpu", "memory"} <= set(
            main["resources"]["limits"])
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert main["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                           "capabilities": {"drop": ["ALL"]}}
        pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep" and 0 < int(pre_stop[1]) <= 15
        graceful = load_settings(env).graceful_timeout
        assert pod["terminationGracePeriodSeconds"] > graceful + int(pre_stop[1])


def test_services_monitors_and_autoscalers_point_at_the_pods(rendered):
    for name, docs in rendered.items():
        deployment = one(docs, "Deployment")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        container_ports = {p["name"] for p in container(docs)["ports"]}
        service = one(docs, "Service")
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "metrics": "metrics"}
        assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

        monitors = [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")]
        assert len(monitors) == 1, f"{name}: scrape each pod once"
        monitor = monitors[0]
        if monitor["kind"] == "ServiceMonitor":
            assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
            endpoint, = monitor["spec"]["endpoints"]
        else:
            assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
            endpoint, = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics" and endpoint["port"] in container_ports and endpoint["path"] == "/metrics"
        assert {"targetLabel": "job", "replacement": "mgeo"} in endpoint["relabelings"]

        scalers = [d for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
        assert len(scalers) == 1
        target = scalers[0]["spec"]["scaleTargetRef"]["name"]
        assert target == deployment["metadata"]["name"]
        if scalers[0]["kind"] == "ScaledObject":
            assert scalers[0]["spec"]["minReplicaCount"] >= 2
            in_progress, queued = scalers[0]["spec"]["triggers"]
            for trigger in (in_progress, queued):
                assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            assert 'mgeo_requests_inprogress{job="mgeo"}' in in_progress["metadata"]["query"]
            assert 'mgeo_queue_pairs{job="mgeo"}' in queued["metadata"]["query"]


def test_the_gpu_overlay_and_the_checkpoint_volume(rendered):
    gpu = rendered["gpu"]
    pod = one(gpu, "Deployment")["spec"]["template"]["spec"]
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert load_settings(environment(gpu)).device == "cuda"
    assert "MGEO_MODEL_DIR" not in environment(rendered["cpu"])  # the default model
    for name in ("gpu", "alternatives"):
        docs = rendered[name]
        model_dir = environment(docs)["MGEO_MODEL_DIR"]
        mount, = [m for m in container(docs)["volumeMounts"] if m["mountPath"] == model_dir]
        volume, = [v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
                   if v["name"] == mount["name"]]
        assert mount["readOnly"] and volume["persistentVolumeClaim"]["claimName"] == one(
            docs, "PersistentVolumeClaim")["metadata"]["name"]


def test_every_env_var_is_a_setting_the_config_module_knows(rendered):
    for name, docs in rendered.items():
        env = environment(docs)
        assert set(env) <= set(SETTINGS) | set(LIBRARY_VARIABLES), name
        load_settings(env)  # and every value is valid


def test_probe_paths_and_ports_answer_on_a_live_service(rendered, service_factory):
    docs = rendered["cpu"]
    main = container(docs)
    env = environment(docs)
    # The manifest's settings, with its ports and folders moved to free loopback ports and a
    # temporary folder; the probes name their ports, so they map onto these by name.
    local = ("MGEO_BIND", "MGEO_METRICS_PORT", "MGEO_METRICS_BIND", "PROMETHEUS_MULTIPROC_DIR")
    service = service_factory(**{k: v for k, v in env.items() if k not in local})
    ports = {"http": service.port, "metrics": service.metrics_port}

    def probe(spec):
        return http("GET", f"http://127.0.0.1:{ports[spec['httpGet']['port']]}{spec['httpGet']['path']}",
                    timeout=spec["timeoutSeconds"])

    startup = main["startupProbe"]
    service.wait_until(lambda: probe(startup)[0] == 200, startup["failureThreshold"] * startup["periodSeconds"],
                       "the startup probe")
    # Each worker loads its own model: once all have, every probe passes on whichever answers.
    service.wait_until(lambda: service.metric("mgeo_model_ready") == int(env["MGEO_WORKERS"]), 60, "all workers")
    for _ in range(10):
        status, _, body = probe(main["livenessProbe"])
        assert status == 200 and body["status"] == "alive"
        status, _, body = probe(main["readinessProbe"])
        assert status == 200 and body["status"] == "ready"
    monitor = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    status, _, text = http("GET", f"http://127.0.0.1:{ports[monitor['port']]}{monitor['path']}")
    assert status == 200 and "mgeo_requests_inprogress" in text and "mgeo_queue_pairs" in text  # the KEDA triggers


def test_the_compose_file_parses_and_mounts_what_exists():
    result = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config"], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    compose = yaml.safe_load(result.stdout)
    assert set(compose["services"]) == {"nginx", "mgeo", "prometheus", "alertmanager", "grafana", "node-exporter"}
    for name, spec in compose["services"].items():
        for volume in spec.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("/") and source.startswith(ROOT):
                assert os.path.exists(source), (name, source)
    targets_dir = os.path.join(ROOT, "deploy", "compose", "targets")
    for job in ("mgeo", "node", "alertmanager"):
        with open(os.path.join(targets_dir, f"{job}.json")) as f:
            groups = json.load(f)
        assert groups and all(isinstance(g["targets"], list) for g in groups)
    mgeo = compose["services"]["mgeo"]
    assert set(mgeo.get("environment", {})) <= set(SETTINGS) | set(LIBRARY_VARIABLES)
    # Clients reach the API through nginx only.
    assert "ports" not in mgeo and compose["services"]["nginx"]["environment"]["MGEO_UPSTREAM"] == "mgeo:5000"


def test_the_dockerfile_copies_what_exists_and_runs_as_non_root():
    with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
        dockerfile = f.read()
    copies = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, re.M)
    assert copies
    for sources in copies:
        for source in sources.split():
            assert os.path.exists(os.path.join(ROOT, source)), source
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^ARG BASE_IMAGE=", dockerfile, re.M) and "FROM ${BASE_IMAGE}" in dockerfile
    assert re.search(r"^EXPOSE 5000 8000$", dockerfile, re.M)


def nginx_in_front(tmp_path, upstream_port: int) -> tuple[subprocess.Popen, str]:
    """Debian's nginx with the compose file's template, filled in as the official image does; (process, url)."""
    with open(os.path.join(ROOT, "deploy", "compose", "nginx", "mgeo.conf.template"), encoding="utf-8") as f:
        template = f.read()
    port = free_port()
    tmp_path.mkdir()
    site = template.replace("${MGEO_UPSTREAM}", f"127.0.0.1:{upstream_port}").replace("${NGINX_PORT}",
                                                                                    f"127.0.0.1:{port}")
    (tmp_path / "mgeo.conf").write_text(site)
    # The official image's nginx.conf, reduced to what a run as this user in tmp_path needs.
    (tmp_path / "nginx.conf").write_text(f"""
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp_path}/access.log;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    include {tmp_path}/mgeo.conf;
}}
""")
    check = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, url
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None, "nginx did not start"
            time.sleep(0.05)


def test_nginx_in_front_holds_slow_clients_and_passes_whole_requests(service_factory, tmp_path):
    service = service_factory(MGEO_WORKERS="1", MGEO_THREADS="8").wait_ready()
    proxy, url = nginx_in_front(tmp_path / "nginx", int(service.url.rsplit(":", 1)[1]))
    try:
        # Twice the worker's threads in bodies that stop short of their Content-Length.
        slow = []
        for _ in range(16):
            sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"address1\": ")
            slow.append(sock)
        pair = {"address1": "北京市朝阳区建国路88号", "address2": "北京朝阳建国路88号"}
        for n in range(20):
            status, headers, body = http("POST", url + "/predict", pair, headers={"X-Request-ID": f"through-{n}"})
            assert status == 200 and body["label"] in ("exact_match", "partial_match", "not_match"), body
            assert headers["X-Request-ID"] == f"through-{n}"  # the client's id, passed on and echoed
        # Each slow connection ends at nginx's body timeout; the service never saw one of them.
        for sock in slow:
            answer = sock.recv(4096)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:100]
            sock.close()
        lines = [json.loads(line) for line in service.log().splitlines() if line.startswith('{"ts"')]
        predicts = [line for line in lines if line.get("route") == "/predict"]
        assert [line["status"] for line in predicts] == [200] * 20
        # nginx's own refusals keep the service's JSON error shape.
        status, _, body = http("POST", url + "/predict", b"{" + b" " * 70000 + b"}",
                               headers={"Content-Type": "application/json"})
        assert status == 413 and body["error"]["code"] == "payload_too_large"
        service.process.terminate()
        service.process.wait(60)
        status, headers, body = http("POST", url + "/predict", pair)
        assert status == 502 and body["error"]["code"] == "upstream_unavailable" and headers["Retry-After"] == "1"
    finally:
        proxy.terminate()
        proxy.wait(30)
