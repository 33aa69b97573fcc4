"""Loading a worker's model in the background, so that liveness answers at once."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from .checkpoint import CheckpointError

log = logging.getLogger(__name__)

LOADING, READY, FAILED = "loading", "ready", "failed"


class ModelLoader:
    """Runs ``load()`` once in a daemon thread and holds what came of it.

    ``state`` is ``loading`` until the load ends, then ``ready`` (``matcher`` is
    set) or ``failed`` (``reason`` is a readiness code, ``error`` the cause).
    A failed load is not retried: a broken model directory would only fail again,
    and readiness keeps saying why instead of the worker crash-looping.
    """

    def __init__(self, load: Callable[[], object]):
        self._load = load
        self.state = LOADING
        self.matcher = None
        self.reason: str | None = "model_loading"
        self.error: str | None = None
        self._done = threading.Event()
        self._started = False
        self._start_lock = threading.Lock()

    def start(self) -> "ModelLoader":
        """Begin loading in the background; later calls do nothing."""
        with self._start_lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="model-loader", daemon=True).start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _run(self) -> None:
        try:
            self.matcher = self._load()
        except CheckpointError as exc:
            self._fail(exc.reason, str(exc))
        except Exception as exc:  # anything else a checkpoint can throw at load time
            self._fail("model_load_failed", f"{type(exc).__name__}: {exc}")
        else:
            self.state, self.reason = READY, None
        finally:
            self._done.set()

    def _fail(self, reason: str, error: str) -> None:
        log.error("model load failed (%s): %s", reason, error)
        self.state, self.reason, self.error = FAILED, reason, error
