"""The Python client against the real service: chunks in order, ranks, raises the server's errors, and gets a
long list through a worker that is shedding load, every pair answered once."""
import threading

import pytest

from conftest import DATA, http
from mgeo_service.client import ApiError, Client
from mgeo_service.dataset import read_pairs

PAIRS = [(p.address1, p.address2) for p in read_pairs(f"{DATA}/address_pairs.tsv")]
MANY = (PAIRS * 16)[:1000]  # the 66 real pairs over and over: a long list


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from conftest import Service
    # The other client's requests below ask for 10 s deadlines: the server's cap must allow them.
    service = Service(tmp_path_factory.mktemp("client"), MGEO_WORKERS="1", MGEO_CACHE_SIZE="0",
                      MGEO_API_TOKEN="t0ken", MGEO_REQUEST_TIMEOUT_MS="10000").start()
    yield service.wait_ready(120)
    service.stop()


def test_predict_chunks_a_long_list_and_keeps_its_order(service):
    client = Client(service.url, token="t0ken", max_pairs=7)
    results = client.predict(PAIRS[:50])
    singles = [http("POST", service.url + "/predict", {"address1": a, "address2": b},
                    {"Authorization": "Bearer t0ken"})[2] for a, b in PAIRS[:50]]
    assert [{k: r[k] for k in ("label", "similarity", "scores")} for r in results] == \
        [{k: s[k] for k in ("label", "similarity", "scores")} for s in singles]
    assert client.retries == 0


def test_rank_sends_ids_and_top_n(service):
    client = Client(service.url, token="t0ken")
    results = client.rank(PAIRS[0][0], [{"address": b, "id": f"poi-{i}"} for i, (_, b) in enumerate(PAIRS[:10])],
                          top_n=4)
    assert len(results) == 4 and all(r["id"] == f"poi-{r['index']}" for r in results)
    assert [r["similarity"] for r in results] == sorted((r["similarity"] for r in results), reverse=True)


def test_errors_carry_the_server_s_code_and_are_not_retried(service):
    with pytest.raises(ApiError) as unauthorized:
        Client(service.url, token="wrong").predict(PAIRS[:1])
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
    client = Client(service.url, token="t0ken")
    with pytest.raises(ApiError) as invalid:
        client.predict([("北京", " ")])
    assert (invalid.value.status, invalid.value.code) == (400, "invalid_address") and client.retries == 0


def test_a_refusal_is_retried_until_max_wait_then_raised(service):
    # 1 ms cannot score 64 pairs: each try is refused (429) or its deadline passes first (504).
    client = Client(service.url, token="t0ken", timeout_ms=1, max_wait=3)
    with pytest.raises(ApiError) as refused:
        client.predict(PAIRS[:64])
    assert refused.value.code in ("overloaded", "deadline_exceeded") and client.retries >= 1


def test_a_long_list_gets_through_a_shedding_worker_each_pair_answered_once_in_order(service):
    expected = {pair: result for pair, result in zip(PAIRS, Client(service.url, token="t0ken").predict(PAIRS))}
    pairs_total = sum(v for (name, _), v in service.scrape().items() if name == "mgeo_pairs_total")
    rejected = service.metric("mgeo_rejected_requests_total", reason="overloaded")

    # Load from elsewhere: 8 connections, 5 requests of 64 pairs each, admitted with a 10 s deadline; while
    # they are queued (at least 5 x 64 pairs ahead: over a second of work on 2 cores) the client's requests,
    # with a 600 ms deadline, are refused.
    answered, lock = [], threading.Lock()

    def other_client():
        for start in range(0, 5 * 64, 64):
            body = {"pairs": [{"address1": a, "address2": b} for a, b in MANY[start:start + 64]]}
            status, _, _ = http("POST", service.url + "/predict", body,
                                {"Authorization": "Bearer t0ken", "X-Request-Timeout-Ms": "10000"}, timeout=60)
            with lock:
                answered.append(len(body["pairs"]) if status == 200 else 0)

    others = [threading.Thread(target=other_client) for _ in range(8)]
    for thread in others:
        thread.start()
    service.wait_until(lambda: (service.metric("mgeo_requests_inprogress", method="POST", endpoint="/predict") or 0)
                       >= 6, 60, "the other client's requests in progress")
    client = Client(service.url, token="t0ken", timeout_ms=600, max_pairs=16, max_wait=300)
    results = client.predict(MANY)
    for thread in others:
        thread.join(120)

    assert client.retries >= 1  # the client was refused, and retried
    assert service.metric("mgeo_rejected_requests_total", reason="overloaded") > rejected
    assert results == [expected[pair] for pair in MANY]  # every pair, in order
    scored = sum(v for (name, _), v in service.scrape().items() if name == "mgeo_pairs_total") - pairs_total
    assert len(answered) == 40 and sum(answered) > 0
    assert scored == len(MANY) + sum(answered)  # none scored twice: refusals computed nothing


def test_the_client_waits_what_retry_after_says(service_factory, tmp_path):
    # A worker whose model cannot load answers every /predict 503 not_ready with Retry-After: 1.
    service = service_factory(MGEO_WORKERS="1", MGEO_MODEL_DIR=str(tmp_path / "missing"))
    service.wait_until(lambda: http("GET", service.url + "/health/ready")[2].get("reason") == "model_load_failed",
                       60, "readiness to report the failed load")
    client = Client(service.url, max_wait=3.5)
    with pytest.raises(ApiError) as refused:
        client.predict(PAIRS[:1])
    assert refused.value.status == 503 and refused.value.code == "not_ready"
    tries = [line["ts"] for line in service.access_lines() if line["route"] == "/predict"]
    # At least a second between tries, as the header says: a slow machine only adds to it. Without the
    # wait, 3.5 s would hold about 70 tries at the client's own 50 ms pause.
    assert 2 <= len(tries) <= 4 and client.retries == len(tries) - 1
    assert all(later - earlier >= 0.99 for earlier, later in zip(tries, tries[1:])), tries
