"""Traces, live: real Gunicorn workers export OTLP/HTTP to a receiver here that decodes the real
protobuf; the spans, their parents from the caller's traceparent, the forward's links, the trace id
in the access log and the absence of addresses are checked."""
import json
import sys
import threading
import time

from conftest import ROOT, http

sys.path.insert(0, ROOT)
from bench.otlp import OtlpReceiver  # noqa: E402
from mgeo_service.config import load_settings  # noqa: E402
from mgeo_service.tracing import make_tracer  # noqa: E402

SERVER = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
GROUP = 8  # concurrent single-pair requests; MGEO_BATCH_MAX_PAIRS below, so they fill one forward


def traceparent(number: int) -> tuple[str, str, str]:
    """(header, trace id, parent span id) of a caller's sampled trace."""
    trace_id, parent_id = f"{0xabc0000 + number:032x}", f"{0xdef00 + number:016x}"
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def attributes(span) -> dict:
    values = {}
    for item in span.attributes:
        kind = item.value.WhichOneof("value")
        values[item.key] = getattr(item.value, kind)
    return values


def by_trace(receiver: OtlpReceiver, trace_id: str) -> list:
    return [span for _, span in list(receiver.spans) if span.trace_id.hex() == trace_id]


def request_span(spans: list):
    (span,) = [s for s in spans if s.kind == SERVER]
    return span


def children(spans: list, parent) -> dict:
    return {s.name: s for s in spans if s.parent_span_id == parent.span_id}


def test_off_unless_configured_the_tracer_is_a_no_op():
    tracer = make_tracer(load_settings({}).tracing)
    with tracer.start_as_current_span("validate") as span:
        assert not span.is_recording() and not span.get_span_context().is_valid


def test_requests_are_traced_from_the_callers_traceparent_without_addresses(service_factory):
    with OtlpReceiver() as receiver:
        # A forward waits up to 3 s for GROUP pairs: the group below fills one; the deadline outlasts the wait.
        service = service_factory(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100", OTEL_SERVICE_NAME="",
            OTEL_RESOURCE_ATTRIBUTES="", OTEL_TRACES_SAMPLER="parentbased_always_on",
            MGEO_WORKERS="1", MGEO_BATCH_THREADS="1", MGEO_BATCH_MAX_PAIRS=str(GROUP), MGEO_BATCH_WAIT_MS="3000",
            MGEO_REQUEST_TIMEOUT_MS="60000", MGEO_CACHE_SIZE="100").wait_ready(120)
        addresses = []

        def predict(number: int, body: dict, request_id: str) -> int:
            for pair in body.get("pairs", [body]):
                addresses.extend(value for value in pair.values() if isinstance(value, str))
            header = traceparent(number)[0]
            return http("POST", service.url + "/predict", body,
                        {"traceparent": header, "X-Request-ID": request_id}, timeout=120)[0]

        single = {"address1": "杭州市西湖区文三路90号", "address2": "杭州西湖文三路90号"}
        assert predict(1, single, "trace-single") == 200
        assert predict(2, single, "trace-cached") == 200  # the same pair: a cache hit
        batch = {"pairs": [{"address1": f"上海市徐汇区漕溪北路{n}号", "address2": f"上海徐汇漕溪北路{n}号"}
                           for n in range(3)]}
        assert predict(3, batch, "trace-batch") == 200
        assert predict(4, {"address1": "广州市天河区体育西路1号"}, "trace-invalid") == 400

        barrier = threading.Barrier(GROUP)
        statuses = []

        def one_of_group(number: int):
            barrier.wait()
            statuses.append(predict(10 + number, {"address1": f"深圳市南山区科技园{number}栋",
                                                  "address2": f"深圳南山科技园{number}栋"}, f"trace-group-{number}"))
        threads = [threading.Thread(target=one_of_group, args=(n,)) for n in range(GROUP)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert statuses == [200] * GROUP

        expected = [1, 2, 3, 4] + [10 + n for n in range(GROUP)]
        service.wait_until(lambda: all(any(s.kind == SERVER for s in by_trace(receiver, traceparent(n)[1]))
                                       for n in expected), 60, "every request span exported")
        time.sleep(1)  # the forward span of the last batch ends just after its requests are answered
        service.wait_until(lambda: sum(len(s.links) for _, s in receiver.spans if s.name == "forward") == GROUP + 2,
                           60, "every forward span exported")

        # every request: a server span continued from the caller's trace, its parent the caller's span
        for number in expected:
            _, trace_id, parent_id = traceparent(number)
            span = request_span(by_trace(receiver, trace_id))
            assert span.name == "POST /predict" and span.parent_span_id.hex() == parent_id

        spans = by_trace(receiver, traceparent(1)[1])
        single_span = request_span(spans)
        steps = children(spans, single_span)
        assert set(steps) == {"validate", "cache lookup", "tokenize", "queue wait", "forward"}
        assert attributes(single_span) | {"mgeo.pairs": 1, "mgeo.cache_hits": 0} == attributes(single_span)
        assert attributes(single_span)["http.response.status_code"] == 200
        assert attributes(single_span)["mgeo.request_id"] == "trace-single"
        assert attributes(steps["tokenize"])["mgeo.tokens"] > 2
        forward = attributes(steps["forward"])
        assert (forward["mgeo.batch.pairs"], forward["mgeo.batch.requests"]) == (1, 1)
        assert [link.span_id for link in steps["forward"].links] == [single_span.span_id]
        assert steps["queue wait"].end_time_unix_nano <= steps["forward"].start_time_unix_nano

        spans = by_trace(receiver, traceparent(2)[1])
        cached = request_span(spans)
        assert set(children(spans, cached)) == {"validate", "cache lookup"}  # nothing left to score
        assert attributes(cached)["mgeo.cache_hits"] == 1

        spans = by_trace(receiver, traceparent(3)[1])
        batched = request_span(spans)
        assert attributes(batched)["mgeo.pairs"] == 3
        assert attributes(children(spans, batched)["forward"])["mgeo.batch.pairs"] == 3

        spans = by_trace(receiver, traceparent(4)[1])
        invalid = request_span(spans)
        assert set(children(spans, invalid)) == {"validate"}
        assert attributes(invalid)["http.response.status_code"] == 400
        assert attributes(invalid)["error.type"] == "missing_field"

        # the group: each request is linked from exactly one forward, which runs under one of them
        group = {request_span(by_trace(receiver, traceparent(10 + n)[1])).span_id for n in range(GROUP)}
        forwards = [s for _, s in receiver.spans if s.name == "forward" and {l.span_id for l in s.links} & group]
        linked = [link.span_id for s in forwards for link in s.links]
        assert sorted(linked) == sorted(group)
        for span in forwards:
            assert attributes(span)["mgeo.batch.requests"] == len(span.links)
            assert span.parent_span_id in {link.span_id for link in span.links}
        assert max(len(s.links) for s in forwards) > 1  # requests that arrived together shared a forward

        # the resource names the service; probes are not traced; no address anywhere
        assert {resource["service.name"] for resource, _ in receiver.spans} == {"mgeo-service"}
        assert not [s for _, s in receiver.spans if "health" in s.name]
        exported = b"".join(receiver.bodies)
        for address in addresses:
            assert address.encode() not in exported

        # the access log carries the trace id beside the request id
        lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
        (line,) = [line for line in lines if line.get("request_id") == "trace-single"]
        assert line["trace_id"] == traceparent(1)[1]
