"""The result cache: bounded, least recently used out first, copies, off at size 0."""
from mgeo_service.cache import ResultCache


def rows(*values):
    return [[v, 0.0, 1.0 - v] for v in values]


def test_hits_misses_and_least_recently_used_eviction():
    cache = ResultCache(2)
    assert cache.lookup(["a", "b"]) == [None, None]
    cache.store(["a", "b"], rows(0.1, 0.2))
    assert cache.lookup(["a"]) == [(0.1, 0.0, 0.9)]  # a is now the most recent
    cache.store(["c"], rows(0.3))
    found = cache.lookup(["a", "b", "c"])
    assert len(cache) == 2 and found == [(0.1, 0.0, 0.9), None, (0.3, 0.0, 0.7)]


def test_stored_rows_are_copies_the_caller_cannot_change():
    cache = ResultCache(4)
    batch = rows(0.1, 0.2)
    cache.store(["a", "b"], batch)
    batch[1][0] = 0.5
    assert cache.lookup(["b"]) == [(0.2, 0.0, 0.8)]


def test_size_zero_is_off():
    cache = ResultCache(0)
    cache.store(["a"], rows(0.1))
    assert cache.lookup(["a"]) == [None] and len(cache) == 0
