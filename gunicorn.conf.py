"""Gunicorn settings for mgeo-service (``mgeo-service serve`` runs Gunicorn with this file).

Every value comes from the MGEO_* settings, validated by mgeo_service.config:
a bad value stops start-up here with a message naming the variable.
"""
import os
import sys

from mgeo_service import multiproc
from mgeo_service.config import load_settings_or_exit
from mgeo_service.server import SidecarSupervisor

# Import the heavy libraries once in the master, so that a worker forked from it starts in
# a fraction of a second. Importing initialises neither CUDA nor any thread pool; the app,
# its metrics, the model and CUDA are all created in each worker after the fork.
# Not ONNX Runtime: its module state, made at import, cannot be destroyed in a forked child
# (every worker's exit aborted with std::system_error), so each worker imports it itself.
import torch  # noqa: F401
import transformers.models.bert.modeling_bert  # noqa: F401
import mgeo_service.engines.packed  # noqa: F401  (compiles its TorchScript once, here)

_settings = load_settings_or_exit("mgeo-service")

bind = [_settings.bind]
workers = _settings.workers
# gthread: health probes get their own thread while other threads wait on the model; the main
# thread reads every request whole before a thread takes it, and refuses there while the worker
# is full (mgeo_service/worker.py).
worker_class = "mgeo_service.worker.WholeRequestWorker"
threads = _settings.threads
graceful_timeout = _settings.graceful_timeout
# Workers restart after max_requests (0: never); jitter keeps them from restarting together.
max_requests = _settings.max_requests
max_requests_jitter = _settings.max_requests // 10
# The app is created, and the model loaded, in each worker after the fork:
# the master never touches CUDA or NVML.
preload_app = False
loglevel = _settings.log_level
# The app writes its own JSON access log without addresses.
accesslog = None
# The control socket has one default path per user: several instances on a host would fight over it.
control_socket_disable = True


def on_starting(server):
    # Stale files from an earlier run would add their counts to this one.
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        sys.exit("mgeo-service: PROMETHEUS_MULTIPROC_DIR is not set; start with `mgeo-service serve`")
    multiproc.prepare(path)
    # Ctrl-C (SIGINT) drains as SIGTERM does: requests in flight are answered and workers exit cleanly
    # (Gunicorn's own INT is a quick stop). SIGQUIT stays the quick stop.
    server.handle_int = server.handle_term


def when_ready(server):
    # The sidecar serves :8000 for all workers; the master keeps it alive.
    if not hasattr(server, "mgeo_sidecar"):
        server.mgeo_sidecar = SidecarSupervisor().start()


def post_fork(server, worker):
    # While a worker sheds, its main thread refuses (mgeo_service/worker.py), and each of its turns at
    # the GIL waits out the switch interval behind request threads' Python: 1 ms, not 5, keeps refusals
    # prompt under a flood (BENCHMARKS.md, "Overload").
    sys.setswitchinterval(0.001)


def child_exit(server, worker):
    # A dead worker's live gauges (in progress, model ready) must stop counting, and its
    # counters fold into one aggregate so that worker churn cannot grow the directory.
    multiproc.fold_dead_process(os.environ["PROMETHEUS_MULTIPROC_DIR"], worker.pid)


def on_exit(server):
    if hasattr(server, "mgeo_sidecar"):
        server.mgeo_sidecar.stop()
