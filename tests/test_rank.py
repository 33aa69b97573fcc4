"""POST /rank: one query against candidates, scored exactly as /predict scores each pair, best first."""
import json

import pytest

from conftest import DATA, http
from mgeo_service.dataset import read_pairs
from test_app import assert_error, make_app

PAIRS = list(read_pairs(f"{DATA}/address_pairs.tsv"))
QUERIES = sorted({p.address1 for p in PAIRS})[:8]
CANDIDATES = sorted({p.address2 for p in PAIRS})[:24]


@pytest.fixture(scope="module")
def client():
    return make_app().test_client()


def rank(client, body, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body)
    return client.post("/rank", data=data, content_type="application/json", **kwargs)


@pytest.mark.parametrize("query", QUERIES)
def test_candidates_come_sorted_by_the_similarity_predict_gives(client, query):
    predicted = client.post("/predict", json={"pairs": [{"address1": query, "address2": c} for c in CANDIDATES]})
    expected = predicted.get_json()["results"]
    response = rank(client, {"query": query, "candidates": CANDIDATES})
    assert response.status_code == 200
    body = response.get_json()
    assert body["model"] == predicted.get_json()["model"]
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(CANDIDATES)))
    for result in results:
        assert {k: v for k, v in result.items() if k != "index"} == expected[result["index"]]  # exactly /predict's
    order = [(-r["similarity"], r["index"]) for r in results]
    assert order == sorted(order)  # best first, ties by position
    assert len({r["similarity"] for r in results}) > 1


def test_ids_round_trip_as_given_and_top_n_cuts(client):
    candidates = [{"address": CANDIDATES[0], "id": "poi-1"}, {"address": CANDIDATES[1], "id": 7},
                  {"address": CANDIDATES[2], "id": None}, {"address": CANDIDATES[3], "id": 2.5},
                  {"address": CANDIDATES[4], "id": False}, {"address": CANDIDATES[5]}, CANDIDATES[6]]
    full = rank(client, {"query": QUERIES[0], "candidates": candidates}).get_json()["results"]
    given = {0: "poi-1", 1: 7, 2: None, 3: 2.5, 4: False}
    for result in full:
        if result["index"] in given:
            assert "id" in result and result["id"] == given[result["index"]]
            assert type(result["id"]) is type(given[result["index"]])
        else:
            assert "id" not in result
    top = rank(client, {"query": QUERIES[0], "candidates": candidates, "top_n": 3}).get_json()["results"]
    assert top == full[:3]
    assert rank(client, {"query": QUERIES[0], "candidates": candidates, "top_n": 3.0}).get_json()["results"] == top
    assert rank(client, {"query": QUERIES[0], "candidates": candidates, "top_n": 100}).get_json()["results"] == full
    assert rank(client, {"query": QUERIES[0], "candidates": candidates, "top_n": None}).get_json()["results"] == full


def test_the_same_candidate_twice_ranks_by_position(client):
    results = rank(client, {"query": QUERIES[0], "candidates": [CANDIDATES[0]] * 3}).get_json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2]


@pytest.mark.parametrize("body, code", [
    ({"query": QUERIES[0], "candidates": CANDIDATES[:1] * 65}, "too_many_pairs"),
    ({"query": QUERIES[0], "candidates": CANDIDATES[:1] * 200}, "too_many_pairs"),
    ({"candidates": CANDIDATES}, "missing_field"),
    ({"query": QUERIES[0]}, "missing_field"),
    ({"query": QUERIES[0], "candidates": []}, "invalid_request"),
    ({"query": QUERIES[0], "candidates": "北京"}, "invalid_request"),
    ({"query": "  ", "candidates": CANDIDATES}, "invalid_address"),
    ({"query": QUERIES[0], "candidates": [""]}, "invalid_address"),
    ({"query": QUERIES[0], "candidates": [7]}, "invalid_address"),
    ({"query": QUERIES[0], "candidates": [{"id": 1}]}, "missing_field"),
    ({"query": QUERIES[0], "candidates": [{"address": "北京", "name": "x"}]}, "invalid_request"),
    ({"query": QUERIES[0], "candidates": [{"address": "北京", "id": [1]}]}, "invalid_request"),
    ({"query": QUERIES[0], "candidates": CANDIDATES, "top_n": 0}, "invalid_request"),
    ({"query": QUERIES[0], "candidates": CANDIDATES, "top_n": "3"}, "invalid_request"),
    ({"query": QUERIES[0], "candidates": CANDIDATES, "top_n": True}, "invalid_request"),
    ({"query": QUERIES[0], "candidates": CANDIDATES, "top_n": 2.5}, "invalid_request"),
    (b'{"query": "\\u5317", "candidates": ["\\u5317"], "top_n": 1e400}', "invalid_request"),
    ({"query": QUERIES[0], "candidates": CANDIDATES, "extra": 1}, "invalid_request"),
    ({"query": "北" * 1001, "candidates": CANDIDATES}, "address_too_long"),
    ([QUERIES[0]], "invalid_request"),
])
def test_a_bad_body_is_a_clear_400_that_echoes_no_address(client, body, code):
    answer = assert_error(rank(client, body), 400, code)
    assert "北" not in answer["error"]["message"] and QUERIES[0] not in answer["error"]["message"]


def test_the_token_guards_rank_too():
    client = make_app(MGEO_API_TOKEN="s3cret").test_client()
    assert_error(rank(client, {"query": QUERIES[0], "candidates": CANDIDATES[:2]}), 401, "unauthorized")
    ok = rank(client, {"query": QUERIES[0], "candidates": CANDIDATES[:2]}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_a_live_rank_is_counted_under_its_own_route(service_factory):
    service = service_factory().wait_ready()
    status, _, body = http("POST", service.url + "/rank", {"query": QUERIES[0], "candidates": CANDIDATES[:5]})
    assert status == 200 and len(body["results"]) == 5
    status, _, _ = http("POST", service.url + "/rank", {"query": QUERIES[0], "candidates": []})
    assert status == 400
    samples = service.scrape()
    counted = {dict(labels)["status"]: value for (name, labels), value in samples.items()
               if name == "mgeo_request_total" and dict(labels).get("endpoint") == "/rank"}
    assert counted == {"200": 1.0, "400": 1.0}
    lines = [json.loads(line) for line in service.log().splitlines() if line.startswith('{"ts"')]
    assert [line["status"] for line in lines if line["route"] == "/rank"] == [200, 400]
    assert QUERIES[0] not in service.log()


@pytest.mark.parametrize("candidates, named", [
    ([CANDIDATES[0], " "], "candidates[1] must have a visible character"),
    ([CANDIDATES[0], {"address": " ", "id": 3}], "candidates[1].address must have a visible character"),
])
def test_an_error_names_the_field_the_request_sent(client, candidates, named):
    response = client.post("/rank", json={"query": QUERIES[0], "candidates": candidates})
    assert response.status_code == 400 and response.get_json()["error"]["message"] == named
