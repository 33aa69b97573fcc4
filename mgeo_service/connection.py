"""What a request knows of its connection: whether its client is still there.

The worker's main thread watches the socket of every request a thread is answering and says
``set_gone()`` the moment the client closes it; whoever holds the request's work (the
batcher) asked ``on_gone`` to be told, and drops the work at once.
"""
from __future__ import annotations

import threading
from typing import Callable

# The WSGI environ keys the worker sets: the request's ClientWatch, and when its first byte was read
# (``time.perf_counter()``), where its deadline starts.
CLIENT_WATCH = "mgeo.client_watch"
FIRST_BYTE_AT = "mgeo.first_byte_at"


class ClientWatch:
    def __init__(self):
        self._lock = threading.Lock()
        self._gone = False
        self._callbacks: list[Callable[[], None]] = []

    @property
    def gone(self) -> bool:
        return self._gone

    def on_gone(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` once the client has gone: now, if it has already."""
        with self._lock:
            if not self._gone:
                self._callbacks.append(callback)
                return
        callback()

    def set_gone(self) -> None:
        with self._lock:
            if self._gone:
                return
            self._gone, callbacks, self._callbacks = True, self._callbacks, []
        for callback in callbacks:
            callback()
