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


def json_string(units) -> str:
    """A JSON string literal written entirely as \\uXXXX escapes of the given UTF-16 code units."""
    return '"' + "".join(f"\\u{u:04x}" for unit in units for u in (unit if isinstance(unit, tuple) else (unit,))) + '"'


# Every code unit of U+0000..U+FFFF, with lone surrogate halves and valid surrogate pairs drawn often.
code_units = st.one_of(st.integers(0, 0xFFFF), st.integers(0xD800, 0xDFFF),
                       st.tuples(st.integers(0xD800, 0xDBFF), st.integers(0xDC00, 0xDFFF)))
escaped_strings = st.one_of(st.lists(code_units, max_size=12).map(json_string),
                            st.lists(code_units, min_size=1, max_size=4).map(  # an escape amid real text
                                lambda units: json_string(units)[:-1] + '北京市海淀区1号"'))
escaped_keys = st.one_of(st.sampled_from(['"address1"', '"address2"', '"pairs"']),
                         st.sampled_from(["address1", "address2"]).map(lambda k: json_string(map(ord, k))),
                         escaped_strings)


def json_object(members) -> str:
    return "{" + ", ".join(f"{key}: {value}" for key, value in members) + "}"


escaped_pair = st.one_of(
    st.tuples(escaped_strings, escaped_strings).map(
        lambda v: json_object([('"address1"', v[0]), ('"address2"', v[1])])),
    st.lists(st.tuples(escaped_keys, escaped_strings), max_size=3).map(json_object),
)
escaped_documents = st.one_of(
    escaped_pair,
    st.lists(escaped_pair, min_size=1, max_size=5).map(lambda items: '{"pairs": [' + ", ".join(items) + "]}"),
    st.tuples(escaped_keys, st.lists(escaped_pair, min_size=1, max_size=3)).map(
        lambda v: json_object([(v[0], "[" + ", ".join(v[1]) + "]")])),
    st.lists(escaped_strings, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
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
        server_errors = {labels: value for (name, labels), value in service.scrape().items()
                         if name == "mgeo_request_total" and dict(labels)["endpoint"] == "/predict"
                         and dict(labels)["status"].startswith("5")}
        assert not server_errors, server_errors
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


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(document=escaped_documents)
def test_any_unicode_escape_in_any_string_is_a_result_or_a_4xx(service, document):
    json.loads(document)  # the body is valid JSON: the service must not answer it with a 5xx
    status, mimetype, raw = send(service, document.encode("utf-8"), "application/json", 0)
    assert status == 200 or 400 <= status < 500, (status, raw[:300])
    assert mimetype == "application/json"
    answer = json.loads(raw)
    if status != 200:
        assert set(answer) == {"error"} and answer["error"]["code"], answer
