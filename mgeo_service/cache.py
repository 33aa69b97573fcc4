"""The result cache: a worker answers a pair it has already scored without the model.

Keyed by a 128-bit digest of the two addresses exactly as sent and the model's name and
version: a hit is the answer the model would give (tokenising is deterministic), it is
found before any tokenising (so a worker with a full queue still answers it), and no
address text is kept. Bounded (least recently used out first), in the worker's memory
only: never on disk or in logs, and a worker that reloads its model starts with an empty one.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Hashable, Sequence

from . import metrics


def pair_key(model_id: str, address1: str, address2: str) -> bytes:
    """The cache key of one pair for one model."""
    text = repr((model_id, address1, address2))  # unambiguous whatever characters the addresses hold
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class ResultCache:
    def __init__(self, size: int, instrument: bool = True):
        self._size = size
        self._instrument = instrument
        self._rows: OrderedDict[Hashable, tuple[float, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, keys: Sequence[Hashable]) -> list[tuple[float, ...] | None]:
        """The cached probabilities of each key, None where it has none."""
        if not self._size:
            return [None] * len(keys)
        with self._lock:
            found = [self._rows.get(key) for key in keys]
            for key, row in zip(keys, found):
                if row is not None:
                    self._rows.move_to_end(key)
        if self._instrument:
            hits = sum(row is not None for row in found)
            metrics.CACHE_REQUESTS.labels("hit").inc(hits)
            metrics.CACHE_REQUESTS.labels("miss").inc(len(keys) - hits)
        return found

    def holds_all(self, keys: Sequence[Hashable]) -> bool:
        """Whether every key has its probabilities here; a look only (no hit counted, no order changed)."""
        with self._lock:
            return all(key in self._rows for key in keys)

    def store(self, keys: Sequence[Hashable], rows: Sequence[Sequence[float]]) -> None:
        if not self._size:
            return
        with self._lock:
            for key, row in zip(keys, rows):
                self._rows[key] = tuple(row)  # a copy the caller cannot change
                self._rows.move_to_end(key)
            while len(self._rows) > self._size:
                self._rows.popitem(last=False)
