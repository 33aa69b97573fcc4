"""Settings: defaults, and bad values that stop start-up naming the variable."""
import subprocess
import sys

import pytest

from mgeo_service.config import LIBRARY_VARIABLES, SETTINGS, ConfigError, Settings, load_settings


def test_defaults():
    settings = load_settings({})
    assert settings.bind == "0.0.0.0:5000"
    assert (settings.workers, settings.threads) == (1, 64)
    assert (settings.metrics_port, settings.metrics_bind) == (8000, "0.0.0.0")
    assert (settings.max_pairs, settings.max_body_bytes) == (64, 65536)
    assert (settings.ready_min_gpu_free_mb, settings.ready_cache_seconds) == (1024, 10)
    assert (settings.batch_max_pairs, settings.batch_wait_ms) == (32, 2)
    assert settings.gpu_poll_seconds == 5
    assert settings.model_dir == "" and settings.device == "auto"


def test_the_cores_go_to_forwards_side_by_side_unless_set(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    settings = load_settings({"MGEO_WORKERS": "2"})
    assert settings.worker_torch_threads == 1
    assert settings.worker_batch_threads(on_gpu=False) == 8
    assert settings.worker_batch_threads(on_gpu=True) == 1  # a GPU runs one forward at a time anyway
    settings = load_settings({"MGEO_WORKERS": "2", "MGEO_TORCH_THREADS": "4"})
    assert (settings.worker_torch_threads, settings.worker_batch_threads(on_gpu=False)) == (4, 2)
    settings = load_settings({"MGEO_WORKERS": "4", "MGEO_BATCH_THREADS": "3"})
    assert settings.worker_batch_threads(on_gpu=False) == settings.worker_batch_threads(on_gpu=True) == 3


def test_every_setting_is_declared_once():
    assert set(SETTINGS) == {"MGEO_" + f.upper() for f in Settings.__dataclass_fields__ if f != "tracing"}


ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}


@pytest.mark.parametrize("env, enabled", [
    ({}, False),
    (ENDPOINT, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
    ({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}, False),
    # metrics may go over gRPC elsewhere; the traces' own protocol is what counts
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, True),
])
def test_traces_are_on_only_when_the_otel_variables_give_an_otlp_endpoint(env, enabled):
    assert load_settings(env).tracing is enabled


@pytest.mark.parametrize("name, value", [
    ("OTEL_TRACES_EXPORTER", "zipkin"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"), ("OTEL_TRACES_SAMPLER", "sometimes"),
])
def test_otel_values_the_service_cannot_honour_stop_start_up(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings({**ENDPOINT, name: value})


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "often"])
def test_a_sampling_ratio_outside_0_to_1_stops_start_up(ratio):
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER_ARG"):
        load_settings({**ENDPOINT, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": ratio})


@pytest.mark.parametrize("name, value", [
    ("MGEO_WORKERS", "zero"), ("MGEO_WORKERS", "0"), ("MGEO_DEVICE", "tpu"), ("MGEO_BIND", "5000"),
    ("MGEO_METRICS_PORT", "70000"), ("MGEO_FP16", "maybe"), ("MGEO_INT8", "2"), ("MGEO_LOG_LEVEL", "loud"),
    ("MGEO_READY_CACHE_SECONDS", "-1"), ("MGEO_MAX_PAIRS", ""), ("MGEO_BACKEND", "tensorrt"),
    ("MGEO_CORS_ORIGINS", "*"), ("MGEO_CORS_ORIGINS", "http://a.example/path"), ("MGEO_CORS_ORIGINS", "a.example"),
])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_onnx_runtime_asked_for_on_cuda_stops_start_up(device):
    with pytest.raises(ConfigError, match="MGEO_BACKEND=onnxruntime runs on the CPU only"):
        load_settings({"MGEO_BACKEND": "onnxruntime", "MGEO_DEVICE": device})


def test_the_backend_is_auto_unless_set():
    assert load_settings({}).backend == "auto"
    assert load_settings({"MGEO_BACKEND": "Torch", "MGEO_DEVICE": "cuda"}).backend == "torch"


def test_serve_refuses_a_bad_setting_at_once():
    result = subprocess.run([sys.executable, "-m", "mgeo_service", "serve"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "MGEO_WORKERS": "many"}, timeout=60)
    assert result.returncode != 0
    assert "MGEO_WORKERS" in result.stderr


def test_the_docs_list_every_setting_with_its_default():
    import os
    from conftest import ROOT
    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as f:
        docs = f.read()
    for name, spec in SETTINGS.items():
        default = f"`{spec['default']}`" if spec["default"] else "(empty)"
        assert f"| `{name}` | {default} | {spec['doc']} |" in docs, name
    with open(os.path.join(ROOT, "docs", "tracing.md"), encoding="utf-8") as f:
        tracing = f.read()
    for name in LIBRARY_VARIABLES:  # the variables the libraries read, each documented where it belongs
        assert f"`{name}`" in docs + tracing, name
