"""OpenTelemetry traces of ``/predict`` and ``/rank``: off unless the standard ``OTEL_*`` variables ask for them.

Each worker makes its own tracer after the fork (the exporter's thread cannot cross one) and
exports OTLP/HTTP protobuf in the background (``BatchSpanProcessor``). Spans carry counts and
codes, never an address: a request span continued from the caller's W3C ``traceparent``, with
children for validation, the cache lookup, tokenising and the wait in the batch queue, and
one forward span per model forward, linked to every request it served.

Off, the tracer is the API's no-op tracer: a span costs a function call and nothing is
exported. ``config.tracing_enabled`` reads the variables that turn traces on.
"""
from __future__ import annotations

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Link, NoOpTracer, Span, SpanKind, StatusCode, Tracer

from . import __version__

DEFAULT_SERVICE_NAME = "mgeo-service"
TRACED_ROUTES = frozenset({"/predict", "/rank"})  # probes and scrapes every few seconds would bury the requests


def make_tracer(enabled: bool) -> Tracer:
    """This worker's tracer: exporting over OTLP/HTTP as the ``OTEL_*`` variables say, or a no-op one."""
    if not enabled:
        return NoOpTracer()
    # Imported only when on: the SDK, the exporter and protobuf cost every worker memory and start-up time.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.version": __version__})  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER and its argument, read by the SDK
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # OTEL_EXPORTER_OTLP_*, OTEL_BSP_*
    return provider.get_tracer("mgeo_service", __version__)


def start_request_span(tracer: Tracer, method: str, route: str, headers, attributes: dict):
    """(span, token): a server span continued from the caller's ``traceparent``, made current in this
    thread until ``end_request_span``."""
    span = tracer.start_span(f"{method} {route}", context=propagate.extract(headers), kind=SpanKind.SERVER,
                             attributes={"http.request.method": method, "http.route": route, **attributes})
    return span, context.attach(trace.set_span_in_context(span))


def end_request_span(span: Span, token, status: int, error_code: str | None) -> None:
    span.set_attribute("http.response.status_code", status)
    if error_code:
        span.set_attribute("error.type", error_code)
    if status >= 500:  # a server span's 4xx is the client's error, not the service's
        span.set_status(StatusCode.ERROR)
    span.end()
    context.detach(token)


def trace_id(span: Span) -> str | None:
    """The span's trace id as W3C spells it, for the access log; None when there is no trace."""
    span_context = span.get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


def current_context() -> context.Context:
    """The calling thread's trace context, to carry into another thread (the batcher's)."""
    return context.get_current()


def links_to(contexts) -> list[Link]:
    """Links to the spans current in ``contexts`` (the requests a forward serves)."""
    spans = (trace.get_current_span(ctx).get_span_context() for ctx in contexts)
    return [Link(span_context) for span_context in spans if span_context.is_valid]
