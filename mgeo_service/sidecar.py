"""The metrics sidecar: one process that serves ``GET /metrics`` for all workers.

Each scrape builds a fresh registry: a ``MultiProcessCollector`` over the
workers' files in ``PROMETHEUS_MULTIPROC_DIR`` plus the NVML poller's GPU
gauges. Started (and restarted) by the Gunicorn master; exits when the master
is gone.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from . import logs, multiproc
from .config import load_settings_or_exit
from .nvml import GpuPoller

log = logging.getLogger(__name__)


def render_metrics(multiproc_dir: str, gpu: GpuPoller) -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiproc_dir)
    registry.register(gpu)
    with multiproc.locked(multiproc_dir, exclusive=False):  # never half-way through a fold
        return generate_latest(registry)


def make_handler(multiproc_dir: str, gpu: GpuPoller):
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?", 1)[0] != "/metrics":
                self._send(404, b"not found: metrics are at /metrics\n", "text/plain; charset=utf-8")
                return
            try:
                body = render_metrics(multiproc_dir, gpu)
            except Exception as exc:
                log.exception("scrape failed")
                self._send(500, f"scrape failed: {exc}\n".encode(), "text/plain; charset=utf-8")
                return
            self._send(200, body, CONTENT_TYPE_LATEST)

        def _send(self, status: int, body: bytes, content_type: str):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds would drown the log
            pass

    return MetricsHandler


def _exit_with_parent(parent: int, server: ThreadingHTTPServer) -> None:
    stop = threading.Event()
    while not stop.wait(1.0):
        if os.getppid() != parent:
            log.info("Gunicorn master is gone; metrics sidecar exits")
            server.shutdown()
            return


def main() -> int:
    settings = load_settings_or_exit("mgeo-service sidecar")
    # Ctrl-C reaches the whole process group: metrics stay served while the workers drain, and the
    # master stops the sidecar when it exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(settings.log_level)
    multiproc_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    gpu = GpuPoller(settings.gpu_poll_seconds).start()
    server = ThreadingHTTPServer((settings.metrics_bind, settings.metrics_port),
                                 make_handler(multiproc_dir, gpu))
    server.daemon_threads = True
    threading.Thread(target=_exit_with_parent, args=(os.getppid(), server), daemon=True).start()
    log.info("metrics sidecar on %s:%d", settings.metrics_bind, settings.metrics_port)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
