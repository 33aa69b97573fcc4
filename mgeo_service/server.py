"""``mgeo-service serve``: prepare the environment, then run Gunicorn with ``gunicorn.conf.py``.

Also the supervisor, run by the Gunicorn master, that keeps the metrics sidecar running.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading

from .config import Settings

log = logging.getLogger(__name__)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUNICORN_CONFIG = os.path.join(PROJECT_ROOT, "gunicorn.conf.py")
WSGI_APP = "mgeo_service.app:create_app()"


def default_multiproc_dir(settings: Settings) -> str:
    port = settings.bind.rpartition(":")[2]
    return os.path.join(tempfile.gettempdir(), f"mgeo-metrics-{port}")


class SidecarSupervisor:
    """Runs ``python -m mgeo_service.sidecar`` and starts it again whenever it exits."""

    POLL_INTERVAL = 0.2
    RESTART_DELAY = 0.5

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._spawning = threading.Lock()

    def start(self) -> "SidecarSupervisor":
        # A worker forked while Popen waits for the sidecar's exec would inherit the write end
        # of Popen's exec-status pipe, and Popen would block until that worker exits: the
        # master's forks wait for a spawn in progress.
        os.register_at_fork(before=self._spawning.acquire, after_in_parent=self._spawning.release,
                            after_in_child=self._spawning.release)
        threading.Thread(target=self._run, name="sidecar-supervisor", daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._spawning:
                self._process = subprocess.Popen([sys.executable, "-m", "mgeo_service.sidecar"])
            # Poll, not wait(): the Gunicorn master reaps every child with waitpid(-1), and a
            # blocking wait can sleep through an exit that the master reaped first.
            while self._process.poll() is None and not self._stopping.wait(self.POLL_INTERVAL):
                pass
            if not self._stopping.is_set():
                log.warning("metrics sidecar exited with %s; starting it again", self._process.returncode)
                self._stopping.wait(self.RESTART_DELAY)

    def stop(self) -> None:
        self._stopping.set()
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()


def serve(settings: Settings) -> int:
    if not os.path.exists(GUNICORN_CONFIG):
        print(f"mgeo-service serve: {GUNICORN_CONFIG} not found; run from a checkout of the project",
              file=sys.stderr)
        return 2
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", default_multiproc_dir(settings))
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "--config", GUNICORN_CONFIG, WSGI_APP])
