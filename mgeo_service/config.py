"""Every ``MGEO_*`` setting: read from the environment and validated in one place.

A bad value raises ``ConfigError`` naming the variable, and start-up stops.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}" if high is not None else f"must be >= {low}")
        return value
    return parse


def _number(low: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not value >= low:
            raise ValueError(f"must be >= {low}")
        return value
    return parse


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text.lower()
    return parse


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return text


def _bind(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 0.0.0.0:5000")
    return text


def _text(text: str) -> str:
    return text


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(origin.strip() for origin in text.split(",") if origin.strip())
    for origin in origins:
        if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:\d{1,5})?", origin):
            raise ValueError(f"{origin!r} is not an origin: scheme://host[:port], no path, no wildcard")
    return origins


def _setting(default: str, parse: Callable[[str], object], doc: str):
    return {"default": default, "parse": parse, "doc": doc}


# name -> default (as the environment would spell it), parser, what it is for.
# The settings table of docs/configuration.md is this dictionary.
SETTINGS = {
    "MGEO_MODEL_DIR": _setting("", _text, "model directory (HF or ModelScope layout); empty: the shipped default model"),
    "MGEO_DEVICE": _setting("auto", _device, "auto (CUDA when available), cpu, cuda or cuda:N"),
    "MGEO_BACKEND": _setting("auto", _choice("auto", "onnxruntime", "torch"), "the engine: auto (ONNX Runtime on a "
                             "CPU, torch on CUDA), onnxruntime (CPU only) or torch"),
    "MGEO_ONNX_CACHE_DIR": _setting("", _text, "where ONNX Runtime's export of a checkpoint is kept (made once, "
                                    "shared by workers and restarts) unless the model directory ships it "
                                    "(`mgeo-service export`); empty: $XDG_CACHE_HOME/mgeo-service/onnx, else "
                                    "~/.cache/mgeo-service/onnx"),
    "MGEO_FP16": _setting("0", _boolean, "run the model in float16 (CUDA only)"),
    "MGEO_INT8": _setting("0", _boolean, "int8 on ONNX Runtime (CPU only): served where it measures at least "
                          "1.1x as fast as float32 at load, else float32 with a warning; results close to "
                          "float32's, not equal, and the same for a pair in any batch (MODEL_CARD.md)"),
    "MGEO_MAX_LENGTH": _setting("128", _integer(8, 512), "tokens per pair; longer pairs are truncated"),
    "MGEO_TORCH_THREADS": _setting("0", _integer(0), "CPU threads each forward uses (torch's, or ONNX Runtime's "
                                   "intra-op threads); 0: 1 when serving (forwards run side by side instead), every "
                                   "core for predict and evaluate"),
    "MGEO_BIND": _setting("0.0.0.0:5000", _bind, "address of the HTTP API"),
    "MGEO_WORKERS": _setting("1", _integer(1, 64), "Gunicorn worker processes; one holds every connection, so "
                             "every request reaches the next free forward"),
    "MGEO_THREADS": _setting("64", _integer(1, 1024), "threads per worker (gthread); above the connections a worker "
                             "holds: 3/4 of them may wait for forwards, the rest refuse (429) and answer probes"),
    "MGEO_GRACEFUL_TIMEOUT": _setting("30", _integer(1), "seconds in-flight requests get on SIGTERM/SIGHUP"),
    "MGEO_MAX_REQUESTS": _setting("0", _integer(0), "restart a worker after this many requests; 0: never"),
    "MGEO_METRICS": _setting("1", _boolean, "instrument requests (0 turns the request metrics off)"),
    "MGEO_METRICS_PORT": _setting("8000", _integer(1, 65535), "port of the metrics sidecar"),
    "MGEO_METRICS_BIND": _setting("0.0.0.0", _text, "address of the metrics sidecar"),
    "MGEO_GPU_POLL_SECONDS": _setting("5", _number(0.1), "NVML poll interval"),
    "MGEO_MAX_PAIRS": _setting("64", _integer(1, 10000), "most pairs in one /predict request"),
    "MGEO_MAX_BODY_BYTES": _setting("65536", _integer(64), "largest /predict body"),
    "MGEO_MAX_ADDRESS_CHARS": _setting("1000", _integer(1), "longest address accepted (before tokenising)"),
    "MGEO_BATCH_MAX_PAIRS": _setting("32", _integer(1, 4096), "most pairs in one coalesced forward"),
    "MGEO_BATCH_MAX_TOKENS": _setting("2048", _integer(1), "most tokens in one coalesced forward (a longer pair "
                                      "runs alone): bounds a forward's time and memory by its work, not its pairs"),
    "MGEO_BATCH_WAIT_MS": _setting("2", _number(0), "how long a forward waits for more requests to join"),
    "MGEO_BATCH_THREADS": _setting("0", _integer(0, 256), "forwards a worker runs side by side; 0: CPU cores / "
                                   "(workers x torch threads) on a CPU, 1 on a GPU"),
    "MGEO_REQUEST_TIMEOUT_MS": _setting("2000", _integer(1), "each /predict request's deadline; a client's "
                                        "X-Request-Timeout-Ms header may shorten it; pairs not started by then "
                                        "answer 504 and work the worker cannot finish by then answers 429"),
    "MGEO_READ_TIMEOUT_MS": _setting("2000", _integer(1), "how long a request may take to arrive whole from its "
                                     "first byte: later, 408 and the connection closes (a slow client holds no "
                                     "thread meanwhile, only a buffer); the default request deadline, which starts "
                                     "at the same byte, could not be met by a request still arriving after it"),
    "MGEO_CACHE_SIZE": _setting("10000", _integer(0), "scored pairs each worker keeps to answer repeats; 0: no cache"),
    "MGEO_READY_MIN_GPU_FREE_MB": _setting("1024", _integer(0), "free GPU memory readiness needs (CUDA only)"),
    "MGEO_READY_CACHE_SECONDS": _setting("10", _number(0), "how long a readiness result is reused"),
    "MGEO_LOAD_WAIT_SECONDS": _setting("30", _number(0), "how long /predict waits for a loading model before 503"),
    "MGEO_CORS_ORIGINS": _setting("", _origins, "comma-separated origins (scheme://host[:port]) whose browser pages "
                                  "may call /predict and /rank; empty: no CORS headers at all"),
    "MGEO_API_TOKEN": _setting("", _text, "bearer token /predict and /rank require; empty: no token"),
    "MGEO_LOG_LEVEL": _setting("info", _choice("debug", "info", "warning", "error"), "log level"),
}

# Read by the libraries underneath, not by Settings; deployments may set them too.
# `mgeo-service serve` sets PROMETHEUS_MULTIPROC_DIR to <tmp>/mgeo-metrics-<port> when unset.
LIBRARY_VARIABLES = {
    "PROMETHEUS_MULTIPROC_DIR": "folder of the workers' metric files, merged by the sidecar (prometheus_client)",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "OTLP/HTTP collector (e.g. http://otel-collector:4318); set, it turns traces on "
                                   "(or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, the full /v1/traces URL)",
    "OTEL_SERVICE_NAME": "the traces' service.name; unset: mgeo-service",
    "OTEL_TRACES_SAMPLER": "which requests are traced, e.g. parentbased_traceidratio with OTEL_TRACES_SAMPLER_ARG="
                           "0.01; unset: parentbased_always_on (every request, or as the caller sampled it)",
    "OTEL_TRACES_EXPORTER": "otlp (the default) or none (traces off); other exporters are refused at start-up",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf, the only protocol shipped; grpc is refused at start-up",
    "OTEL_SDK_DISABLED": "true turns traces off whatever else is set",
}
# OTLP's other variables (headers, timeout, compression, OTEL_BSP_* batching) reach the SDK unchanged.


SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    """Whether the standard OTEL_* variables ask for traces; a value this service cannot honour is a ConfigError."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter == "none":
        return False
    if exporter != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter!r}: must be otlp or none")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip()
        if protocol:  # the traces-specific one wins when both are set
            if protocol != "http/protobuf":
                raise ConfigError(f"{name}={protocol!r}: only http/protobuf is supported")
            break
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler and sampler not in SAMPLERS:  # the SDK would fall back to tracing everything, with a warning
        raise ConfigError(f"OTEL_TRACES_SAMPLER={sampler!r}: must be one of {', '.join(SAMPLERS)}")
    if sampler.endswith("traceidratio"):
        ratio = environ.get("OTEL_TRACES_SAMPLER_ARG", "1").strip()
        try:
            valid = 0 <= float(ratio) <= 1
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={ratio!r}: must be a ratio between 0 and 1")
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
                or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())


@dataclass(frozen=True)
class Settings:
    model_dir: str
    device: str
    backend: str
    onnx_cache_dir: str
    fp16: bool
    int8: bool
    max_length: int
    torch_threads: int
    bind: str
    workers: int
    threads: int
    graceful_timeout: int
    max_requests: int
    metrics: bool
    metrics_port: int
    metrics_bind: str
    gpu_poll_seconds: float
    max_pairs: int
    max_body_bytes: int
    max_address_chars: int
    batch_max_pairs: int
    batch_max_tokens: int
    batch_wait_ms: float
    batch_threads: int
    request_timeout_ms: int
    read_timeout_ms: int
    cache_size: int
    ready_min_gpu_free_mb: int
    ready_cache_seconds: float
    load_wait_seconds: float
    cors_origins: tuple[str, ...]
    api_token: str
    log_level: str
    tracing: bool  # from the OTEL_* variables (tracing_enabled), not an MGEO_* setting

    @property
    def worker_torch_threads(self) -> int:
        """Threads each forward of a worker uses: one unless set, the cores go to forwards side by side."""
        return self.torch_threads or 1

    def worker_batch_threads(self, on_gpu: bool) -> int:
        """Forwards a worker runs side by side: the CPU cores shared out among the workers; one on a GPU."""
        if self.batch_threads:
            return self.batch_threads
        return 1 if on_gpu else max(1, (os.cpu_count() or 1) // (self.workers * self.worker_torch_threads))


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values = {}
    for name, spec in SETTINGS.items():
        text = environ.get(name, spec["default"]).strip()
        try:
            values[name.removeprefix("MGEO_").lower()] = spec["parse"](text)
        except ValueError as exc:
            raise ConfigError(f"{name}={text!r}: {exc}") from None
    if values["backend"] == "onnxruntime" and values["device"].startswith("cuda"):
        raise ConfigError(f"MGEO_BACKEND=onnxruntime runs on the CPU only; MGEO_DEVICE={values['device']} asks for "
                          "CUDA (use MGEO_BACKEND=auto or torch there)")
    return Settings(**values, tracing=tracing_enabled(environ))


def load_settings_or_exit(program: str) -> Settings:
    """The settings, or an exit with a message that names the bad variable."""
    try:
        return load_settings()
    except ConfigError as exc:
        raise SystemExit(f"{program}: {exc}") from None
