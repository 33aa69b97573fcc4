"""Every metric the service exports, declared once.

Workers write them through prometheus_client's multiprocess mode (one mmap file
per process in ``PROMETHEUS_MULTIPROC_DIR``); the sidecar merges the files. The
GPU gauges are not here: the sidecar's NVML poller builds them per scrape
(``nvml.py``), since no worker touches NVML.
"""
from prometheus_client import Counter, Gauge, Histogram

# 5 ms to 10 s: a small model answers in milliseconds, a base-size model on a busy CPU in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "mgeo_request", "HTTP requests answered, by route template and status code.",
    ["method", "endpoint", "status"])
REQUEST_DURATION = Histogram(
    "mgeo_request_duration_seconds", "Time from request to response, by route template.",
    ["method", "endpoint"], buckets=LATENCY_BUCKETS)
REQUESTS_IN_PROGRESS = Gauge(
    "mgeo_requests_inprogress", "Requests being answered now.",
    ["method", "endpoint"], multiprocess_mode="livesum")

INFERENCE_DURATION = Histogram(
    "mgeo_inference_duration_seconds", "Time of one model forward over a batch of pairs.",
    buckets=LATENCY_BUCKETS)
INFERENCE_BATCH_SIZE = Histogram(
    "mgeo_inference_batch_size", "Pairs in one model forward.", buckets=BATCH_SIZE_BUCKETS)
QUEUE_DURATION = Histogram(
    "mgeo_queue_duration_seconds", "Time a pair waited in the micro-batch queue for its forward.",
    buckets=LATENCY_BUCKETS)
QUEUE_PAIRS = Gauge(
    "mgeo_queue_pairs", "Pairs admitted and waiting for their forward to start.", multiprocess_mode="livesum")
REJECTED_REQUESTS = Counter(
    "mgeo_rejected_requests", "/predict and /rank requests refused before their forward, by reason: overloaded (429), "
    "deadline_exceeded (504), client_gone (the client left).", ["reason"])
INFERENCE_ERRORS = Counter(
    "mgeo_inference_errors", "Model forwards that failed, by reason.", ["reason"])
PAIRS = Counter("mgeo_pairs", "Address pairs scored, by predicted label.", ["label"])
CACHE_REQUESTS = Counter(
    "mgeo_cache_requests", "Pairs looked up in the result cache: hit (answered without the model) or miss.",
    ["result"])

MODEL_READY = Gauge(
    "mgeo_model_ready", "Workers whose model is loaded and passed its readiness check.",
    multiprocess_mode="livesum")
MODEL_INFO = Gauge(
    "mgeo_model_info", "The model each worker serves (value 1): its engine (backend), what it computes in "
    "(precision), and why that is not what was asked (note; empty when it is).",
    ["model", "version", "device", "backend", "precision", "note"], multiprocess_mode="livemax")
WORKERS_NOT_READY = Gauge(
    "mgeo_workers_not_ready", "Workers whose last readiness check failed, by reason (alerts carry the reason).",
    ["reason"], multiprocess_mode="livesum")
READINESS_FAILURES = Counter(
    "mgeo_readiness_failures", "Readiness checks that failed, by reason.", ["reason"])
WORKER_STARTS = Counter("mgeo_worker_starts", "Gunicorn worker processes started.")
