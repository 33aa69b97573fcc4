"""The HTTP contract through Flask's test client, on the real default model."""
import json

import pytest

from mgeo_service.app import create_app
from mgeo_service.config import load_settings
from mgeo_service.loader import ModelLoader

PAIR = {"address1": "北京市海淀区中关村大街1号", "address2": "北京海淀中关村街1号"}
LABELS = {"not_match", "partial_match", "exact_match"}


def make_app(**env):
    app = create_app(load_settings({"MGEO_DEVICE": "cpu", "MGEO_READY_CACHE_SECONDS": "0", **env}))
    app.extensions["mgeo"].loader.wait(120)
    return app


@pytest.fixture(scope="module")
def client():
    return make_app().test_client()


def post(client, body, **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    kwargs.setdefault("content_type", "application/json")
    return client.post("/predict", data=data, **kwargs)


def assert_error(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def test_single_pair(client):
    response = post(client, PAIR)
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"label", "similarity", "scores", "model"}
    assert body["label"] in LABELS and set(body["scores"]) == LABELS
    assert body["model"].startswith("mgeo-default@")


def test_batch_keeps_input_order(client):
    pairs = [PAIR, {"address1": "上海市浦东新区世纪大道100号", "address2": "广州市天河区体育西路103号"}, PAIR]
    body = post(client, {"pairs": pairs}).get_json()
    assert set(body) == {"results", "model"} and len(body["results"]) == 3
    singles = [post(client, p).get_json() for p in pairs]
    for result, single in zip(body["results"], singles):
        assert "model" not in result
        assert result["label"] == single["label"]
        assert result["similarity"] == pytest.approx(single["similarity"], abs=1e-4)


def test_the_answer_is_the_same_whichever_address_comes_first(client):
    a, b = "北京市海淀区中关村大街1号", "北京市海淀区中关村大街11号"  # issue 35's first complaint
    forward = post(client, {"address1": a, "address2": b}).get_json()
    assert post(client, {"address1": b, "address2": a}).get_json() == forward
    ranked = client.post("/rank", json={"query": b, "candidates": [a]}).get_json()["results"][0]
    keys = ("label", "similarity", "scores")
    assert [ranked[k] for k in keys] == [forward[k] for k in keys]


@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b'{"address1": NaN, "address2": "x"}', "invalid_json"),
    (b"[1, 2]", "invalid_request"),
    (b'"just a string"', "invalid_request"),
    ({"address1": "北京"}, "missing_field"),
    ({"address1": "北京", "address2": ""}, "invalid_address"),
    ({"address1": "北京", "address2": "   "}, "invalid_address"),
    ({"address1": "\u200b\u200b", "address2": "北京"}, "invalid_address"),  # zero-width characters alone
    ({"address1": "北京", "address2": "\ufeff \u00ad\x00"}, "invalid_address"),
    ({"address1": "北京", "address2": 5}, "invalid_address"),
    ({"address1": "北京", "address2": None}, "invalid_address"),
    ({"address1": "北京", "address2": "上海", "extra": 1}, "invalid_request"),
    ({"pairs": []}, "invalid_request"),
    ({"pairs": "x"}, "invalid_request"),
    ({"pairs": [PAIR], "address1": "x"}, "invalid_request"),
    ({"pairs": [PAIR, {"address1": "北京"}]}, "missing_field"),
    ({"pairs": [PAIR, ["a", "b"]]}, "invalid_request"),
    ({"pairs": [PAIR] * 65}, "too_many_pairs"),
    ({"address1": "北" * 1001, "address2": "上海"}, "address_too_long"),
    (b'{"address1": "\\ud800", "address2": "x"}', "invalid_unicode"),
    (b'{"address1": "\\u5317\\udfff\\u4eac", "address2": "x"}', "invalid_unicode"),
    (b'{"pairs": [{"address1": "a", "address2": "b"}, {"address1": "a", "address2": "\\udbff"}]}',
     "invalid_unicode"),
])
def test_bad_input_is_a_400(client, body, code):
    assert_error(post(client, body), 400, code)


def test_encodable_code_points_from_escapes_are_scored(client):
    # A surrogate pair is one character (U+1F3E0); noncharacters and controls are encodable text.
    for escaped in ("\\ud83c\\udfe0", "\\uffff", "\\ufdd0", "\\u0000\\u5317", "\\ufffe"):
        body = ('{"address1": "%s", "address2": "\\u5317\\u4eac"}' % escaped).encode()
        response = post(client, body)
        assert response.status_code == 200, (escaped, response.get_json())


def test_error_messages_never_echo_addresses(client):
    secret = "秘密路123号" * 200
    body = assert_error(post(client, {"address1": secret, "address2": 7}), 400, "address_too_long")
    assert "秘密" not in json.dumps(body, ensure_ascii=False)


def test_body_too_large_is_a_413(client):
    assert_error(post(client, {"address1": "北" * 70000, "address2": "x"}), 413, "payload_too_large")


def test_wrong_content_type_is_a_415(client):
    assert_error(post(client, json.dumps(PAIR), content_type="text/plain"), 415, "unsupported_media_type")
    assert_error(client.post("/predict", data=json.dumps(PAIR)), 415, "unsupported_media_type")


def test_unknown_path_and_wrong_method_are_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    response = client.get("/predict")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]
    assert_error(client.post("/health/live"), 405, "method_not_allowed")


def test_request_id_is_echoed_or_generated(client):
    assert post(client, PAIR, headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    generated = client.get("/health/live").headers["X-Request-ID"]
    assert len(generated) == 32
    assert client.get("/health/live", headers={"X-Request-ID": "bad id!"}).headers["X-Request-ID"] != "bad id!"


def test_liveness(client):
    body = client.get("/health/live").get_json()
    assert body["status"] == "alive" and body["pid"] > 0 and body["uptime_seconds"] >= 0


def test_readiness_when_ready(client):
    response = client.get("/health/ready")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ready"
    assert body["checks"]["model"] == "ready" and body["checks"]["tokenizer"] and body["checks"]["forward"]
    assert client.get("/healthz").get_json() == {"status": "ok"}


def cache_lookups(result: str) -> float:
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value("mgeo_cache_requests_total", {"result": result}) or 0.0


def test_a_repeated_pair_is_answered_from_the_cache_as_the_model_would(client):
    pair = {"address1": "上海市徐汇区漕溪北路18号", "address2": "上海徐汇漕溪北路18号"}
    hits, misses = cache_lookups("hit"), cache_lookups("miss")
    first = post(client, pair).get_json()
    assert (cache_lookups("hit"), cache_lookups("miss")) == (hits, misses + 1)
    other = {"address1": "上海市徐汇区漕溪北路18号", "address2": "上海市静安区漕溪北路18号"}
    again, new = post(client, {"pairs": [pair, other]}).get_json()["results"]  # one hit, one miss
    assert (cache_lookups("hit"), cache_lookups("miss")) == (hits + 1, misses + 2)
    assert again == {k: v for k, v in first.items() if k != "model"}
    alone = post(client, other).get_json()  # now a hit too
    assert new == {k: v for k, v in alone.items() if k != "model"} and cache_lookups("hit") == hits + 2


def test_no_cache_when_its_size_is_zero():
    client = make_app(MGEO_CACHE_SIZE="0").test_client()
    hits, misses = cache_lookups("hit"), cache_lookups("miss")
    for _ in range(2):
        assert post(client, PAIR).status_code == 200
    assert (cache_lookups("hit"), cache_lookups("miss")) == (hits, misses)


def test_not_ready_while_loading_and_after_a_failed_load(tmp_path):
    import threading
    release = threading.Event()

    def slow_load():
        release.wait(30)
        raise FileNotFoundError("no model here")

    loader = ModelLoader(slow_load)
    settings = load_settings({"MGEO_READY_CACHE_SECONDS": "0", "MGEO_LOAD_WAIT_SECONDS": "0.2"})
    client = create_app(settings, loader=loader).test_client()
    assert client.get("/health/live").status_code == 200
    body = client.get("/health/ready").get_json()
    assert (body["status"], body["reason"]) == ("not_ready", "model_loading")
    assert_error(post(client, PAIR), 503, "not_ready")
    release.set()
    loader.wait(10)
    response = client.get("/health/ready")
    assert response.status_code == 503 and response.get_json()["reason"] == "model_load_failed"
    assert client.get("/healthz").get_json() == {"status": "not ready", "reason": "model_load_failed"}
    assert client.get("/health/live").status_code == 200


def test_a_missing_model_directory_is_model_load_failed(tmp_path):
    client = make_app(MGEO_MODEL_DIR=str(tmp_path / "absent")).test_client()
    body = client.get("/health/ready").get_json()
    assert body["reason"] == "model_load_failed"
    assert "does not exist" in body["checks"]["error"]


def test_bearer_token(tmp_path):
    client = make_app(MGEO_API_TOKEN="s3cret").test_client()
    missing = post(client, PAIR)
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(post(client, PAIR, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    assert post(client, PAIR, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health/ready").status_code == 200  # health stays open


def test_an_inference_error_fails_only_its_own_request(default_matcher):
    """A forward that fails (CUDA out of memory, injected at the matcher boundary) answers 503 for
    the request that caused it; requests batched with it still get results; the worker serves on."""
    import threading

    import torch
    from prometheus_client import REGISTRY

    poison = len(default_matcher.encode([("炸" * 40, "炸" * 40)])[0][0])

    class FailingMatcher:
        """The real matcher, except that a forward holding the poisoned pair runs out of memory."""
        def __getattr__(self, name):
            return getattr(default_matcher, name)

        def forward(self, encoded):
            if any(len(ids) == poison for ids, _ in encoded):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return default_matcher.forward(encoded)

    loader = ModelLoader(FailingMatcher)
    settings = load_settings({"MGEO_READY_CACHE_SECONDS": "0", "MGEO_BATCH_WAIT_MS": "200"})
    client = create_app(settings, loader=loader).test_client()
    loader.wait(10)
    before = REGISTRY.get_sample_value("mgeo_inference_errors_total", {"reason": "out_of_memory"}) or 0

    answers = {}

    def send(name, body):
        answers[name] = post(client, body)

    threads = [threading.Thread(target=send, args=("good", PAIR)),
               threading.Thread(target=send, args=("poisoned", {"address1": "炸" * 40, "address2": "炸" * 40})),
               threading.Thread(target=send, args=("batch", {"pairs": [PAIR, PAIR]}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers["good"].status_code == 200
    assert len(answers["batch"].get_json()["results"]) == 2
    body = assert_error(answers["poisoned"], 503, "inference_failed")
    assert "out_of_memory" in body["error"]["message"]
    assert answers["poisoned"].headers["Retry-After"] == "1"
    assert REGISTRY.get_sample_value("mgeo_inference_errors_total", {"reason": "out_of_memory"}) == before + 1
    assert post(client, PAIR).status_code == 200  # the worker keeps serving


def test_responses_match_the_openapi_description(client):
    from jsonschema import Draft202012Validator
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.1")

    def check(path, method, response):
        declared = spec["paths"][path][method]["responses"][str(response.status_code)]
        if "$ref" in declared:
            declared = spec["components"]["responses"][declared["$ref"].rsplit("/", 1)[1]]
        schema = declared["content"]["application/json"]["schema"]
        Draft202012Validator({**schema, "components": spec["components"]}).validate(response.get_json())

    check("/predict", "post", post(client, PAIR))
    check("/predict", "post", post(client, {"pairs": [PAIR, PAIR]}))
    check("/predict", "post", post(client, {"address1": "x"}))
    check("/predict", "post", post(client, b"x", content_type="text/plain"))
    check("/health/live", "get", client.get("/health/live"))
    check("/health/ready", "get", client.get("/health/ready"))
    check("/healthz", "get", client.get("/healthz"))
    # and the request schemas accept what the API accepts, refuse what it refuses
    body_schema = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**body_schema, "components": spec["components"]})
    assert validator.is_valid(PAIR) and validator.is_valid({"pairs": [PAIR]})
    for bad in ({"address1": "x"}, {"pairs": []}, {**PAIR, "extra": 1}, {"address1": "", "address2": "x"}):
        assert not validator.is_valid(bad)
        assert post(client, bad).status_code == 400


def test_readiness_cache_gives_way_when_the_load_finishes(default_matcher):
    import threading
    release = threading.Event()
    loader = ModelLoader(lambda: release.wait(30) and default_matcher)
    settings = load_settings({"MGEO_READY_CACHE_SECONDS": "3600", "MGEO_LOAD_WAIT_SECONDS": "0"})
    client = create_app(settings, loader=loader).test_client()
    assert client.get("/health/ready").get_json()["reason"] == "model_loading"
    release.set()
    loader.wait(10)
    # the load ended: the hour-long cache must not hide it
    assert client.get("/health/ready").get_json()["status"] == "ready"


def test_a_request_timeout_header_that_is_not_milliseconds_is_a_400(client):
    for value in ("abc", "0", "-5", "1.5", "000", "١٢٣", "12 3"):  # ASCII digits only
        assert_error(post(client, PAIR, headers={"X-Request-Timeout-Ms": value}), 400, "invalid_header")
    for value in ("60000", "9" * 20, " 500", "0500"):  # capped, not refused; what openapi.json's pattern allows
        assert post(client, PAIR, headers={"X-Request-Timeout-Ms": value}).status_code == 200, value


def test_a_compressed_body_is_a_415_that_says_so(client):
    import gzip
    response = post(client, gzip.compress(json.dumps(PAIR).encode()), headers={"Content-Encoding": "gzip"})
    body = assert_error(response, 415, "unsupported_media_type")
    assert "Content-Encoding" in body["error"]["message"]


def test_log_level_warning_turns_the_access_lines_off_with_the_rest():
    import logging
    from mgeo_service.logs import ACCESS_LOGGER
    make_app(MGEO_LOG_LEVEL="warning")
    assert not logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)  # access lines are INFO
    make_app()  # info, the default
    assert logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)


def test_a_full_worker_refuses_new_pairs_with_429_and_still_answers_cached_ones():
    app = make_app()
    client = app.test_client()
    cached = {"address1": "杭州市西湖区文三路90号", "address2": "杭州西湖文三路90号"}
    assert post(client, cached).status_code == 200
    state = app.extensions["mgeo"]
    batcher = state.batcher(state.loader.matcher)
    batcher._requests = 10 ** 9  # as many requests waiting as the worker may hold
    refused = post(client, {"address1": "杭州市西湖区文三路91号", "address2": "杭州西湖文三路91号"})
    assert_error(refused, 429, "overloaded")
    assert int(refused.headers["Retry-After"]) >= 1
    assert post(client, cached).status_code == 200  # every pair in the cache: no queue needed


def test_the_root_points_a_person_to_the_docs_and_the_routes(client):
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.get_json()
    assert body["docs"] == "/docs/" and body["openapi"] == "/openapi.json"
    for path in (body["docs"], body["openapi"], body["health"]["live"]):
        assert client.get(path).status_code == 200
    assert body["scoring"] == ["POST /predict", "POST /rank"]


def test_a_redirect_is_counted_under_the_route_it_leads_to(client):
    from prometheus_client import REGISTRY

    def count(endpoint):
        return REGISTRY.get_sample_value("mgeo_request_total",
                                         {"method": "GET", "endpoint": endpoint, "status": "308"}) or 0.0

    before_docs, before_unmatched = count("/docs/"), count("unmatched")
    assert client.get("/docs").status_code == 308
    assert count("/docs/") == before_docs + 1 and count("unmatched") == before_unmatched


def test_the_description_names_the_token_only_where_one_is_set(client):
    from mgeo_service.api import OPENAPI
    assert make_app(MGEO_API_TOKEN="s3cret").test_client().get("/openapi.json").get_json() == OPENAPI
    assert "securitySchemes" not in client.get("/openapi.json").get_json()["components"]


@pytest.mark.parametrize("route", ["/predict", "/rank"])
def test_every_example_of_the_description_is_answered_as_it_says(client, route):
    from mgeo_service.api import OPENAPI
    operation = OPENAPI["paths"][route]["post"]
    requests = operation["requestBody"]["content"]["application/json"]["examples"]
    answers = operation["responses"]["200"]["content"]["application/json"]["examples"]
    assert any("北京" in json.dumps(example["value"], ensure_ascii=False) for example in requests.values())
    labels = {"exact_match", "not_match"}  # each example is a clear case, never a partial one
    for name, example in requests.items():
        response = client.post(route, json=example["value"])
        assert response.status_code == 200, (name, response.get_json())
        got = response.get_json()
        if name in answers:
            expected = answers[name]["value"]
            shape = lambda body: [(r.get("index"), r.get("id"), r["label"]) for r in body.get("results", [body])]
            assert shape(got) == shape(expected), name
        assert {r["label"] for r in got.get("results", [got])} <= labels, name
