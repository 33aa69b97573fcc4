"""Hypothesis against a live service: raw bodies and headers never get a 5xx or kill a worker."""
import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Service

RARE = "𠀀𪚥龘齉鱻\u3007\U0001F600\U0001F3E0"
addresses = st.one_of(
    st.text(min_size=0, max_size=40),
    st.text(alphabet=st.sampled_from(list("北京市海淀区中关村大街1号楼室" + RARE + "\x00\x01\x1f\u200b\ufeff")),
            max_size=60),
    st.integers(min_value=0, max_value=10_000).map(lambda n: "路" * n),  # up to 10,000 characters
    st.none(), st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.text(max_size=3), max_size=3),
)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=20)
documents = st.one_of(
    st.fixed_dictionaries({"address1": addresses, "address2": addresses}),
    st.fixed_dictionaries({"pairs": st.lists(st.fixed_dictionaries({"address1": addresses, "address2": addresses}),
                                             max_size=70)}),
    json_values,
)
bodies = st.one_of(
    documents.map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.binary(max_size=2000),                                                     # random bytes
    st.binary(max_size=50).map(lambda b: b'{"address1": "' + b + b'\xff\xfe", "address2": "x"}'),  # bad UTF-8
    st.integers(1, 100_000).map(lambda depth: b"[" * depth + b"]" * depth),       # deep nesting
    st.integers(1, 10_000).map(lambda n: b'{"address1": ' + b"9" * n + b', "address2": "x"}'),  # huge numbers
    st.just('{"address1": "北京", "address1": "上海", "address2": "北京市"}'.encode()),  # duplicate keys
    st.just(b'{"address1": NaN, "address2": Infinity}'),
)
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                                 "application/problem+json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "", "application/json; charset=latin-1"])


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    service = Service(tmp_path_factory.mktemp("fuzz")).start()
    service.wait_ready()
    workers = sorted(service.children())
    yield service
    try:
        assert sorted(service.children()) == workers, "a worker died during fuzzing"
        assert service.metric("mgeo_worker_starts_total") == 2
    finally:
        service.stop()


def send(service, body: bytes, content_type: str, length_delta: int):
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        connection.putrequest("POST", "/predict")
        if content_type:
            connection.putheader("Content-Type", content_type)
        connection.putheader("Content-Length", str(max(0, len(body) - length_delta)))
        connection.endheaders()
        connection.send(body)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(body=bodies, content_type=content_types, length_delta=st.sampled_from([0, 0, 0, 1, 7]))
def test_every_answer_is_a_result_or_a_4xx_json_error(service, body, content_type, length_delta):
    status, mimetype, raw = send(service, body, content_type, length_delta)
    assert status == 200 or 400 <= status < 500, (status, raw[:300])
    assert mimetype == "application/json"
    answer = json.loads(raw)
    if status == 200:
        assert "label" in answer or len(answer["results"]) >= 1
    else:
        assert set(answer) == {"error"} and answer["error"]["code"] and answer["error"]["message"]
