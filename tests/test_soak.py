"""A bounded soak: mixed good and bad traffic, random worker kills, and exact accounting.

What the clients saw, by status, must equal the increase of mgeo_request_total by status,
except for requests that were in flight in a killed worker: those the client saw fail
(connection reset), and the server may or may not have counted them.
"""
import collections
import random
import threading
import time
from http.client import HTTPException

from conftest import http
from test_faults import kill_holding

KILLS = 5
MIN_REQUESTS = 300
LIMIT_SECONDS = 180  # a bound on a stalled run, not a pace: the soak ends on counts
PAIR = {"address1": "北京市海淀区中关村大街1号", "address2": "北京海淀中关村街1号"}
REQUESTS = [  # (method, path, body, headers)
    ("POST", "/predict", PAIR, None),
    ("POST", "/predict", {"pairs": [PAIR] * 8}, None),
    ("POST", "/predict", b"{broken", {"Content-Type": "application/json"}),
    ("POST", "/predict", b"x", {"Content-Type": "text/plain"}),
    ("POST", "/predict", {"address1": "", "address2": "x"}, None),
    ("GET", "/predict", None, None),
    ("GET", "/nowhere", None, None),
    ("GET", "/health/live", None, None),
]


def is_sidecar(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mgeo_service.sidecar" in f.read()
    except FileNotFoundError:  # gone already: not a worker to kill either
        return True


def by_status(service):
    totals = collections.Counter()
    for (name, labels), value in service.scrape().items():
        if name == "mgeo_request_total":
            totals[dict(labels)["status"]] += value
    return totals


def test_soak_with_worker_kills(service_factory):
    service = service_factory(MGEO_THREADS="8").wait_ready()  # 6 requests may wait: the 6 clients
    before = by_status(service)
    seen = collections.Counter()
    failed = []
    lock = threading.Lock()
    stop = threading.Event()
    rng = random.Random(20211)

    def client(seed):
        local = random.Random(seed)
        while not stop.is_set():
            method, path, body, headers = local.choice(REQUESTS)
            try:
                status = http(method, service.url + path, body, headers, timeout=30)[0]
            except (OSError, HTTPException) as exc:  # reset, refused or cut short
                with lock:
                    failed.append(type(exc).__name__)
                continue
            with lock:
                seen[str(status)] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    kills = held = 0
    deadline = time.monotonic() + LIMIT_SECONDS
    while (kills < KILLS or sum(seen.values()) < MIN_REQUESTS) and time.monotonic() < deadline:
        time.sleep(rng.uniform(2, 5))
        workers = [pid for pid in service.children() if not is_sidecar(pid)]
        if workers and kills < KILLS:
            held += kill_holding(rng.choice(workers), service.port)
            kills += 1
    stop.set()
    for t in threads:
        t.join(60)
    service.wait_until(lambda: service.metric("mgeo_worker_starts_total") == 2 + kills, 60, "replacements")

    after = by_status(service)
    increase = {status: after[status] - before.get(status, 0) for status in after}
    assert kills == KILLS and sum(seen.values()) >= MIN_REQUESTS
    assert set(seen) >= {"200", "400", "404", "405", "415"}
    for status, count in seen.items():
        # the server counted everything the clients saw; it may also have counted a
        # request whose worker died before the answer reached the client
        assert increase.get(status, 0) >= count, (status, increase, seen)
    extra = sum(increase.values()) - sum(seen.values())
    assert 0 <= extra <= len(failed), (increase, seen, failed)
    assert len(failed) <= held  # at most the connections the killed workers held
