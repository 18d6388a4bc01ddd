"""OpenTelemetry traces: a span per job, a child span per stage (dump, encode, upload, manifest, copy,
validate, restore, drill, and each DR step).

Code that does the work only opens spans (``stage``); whether they go anywhere is the composition root's
choice (``configure_tracing``). Without a configured provider the OpenTelemetry API hands out non-recording
spans, which cost a context-variable lookup, so an agent without ``telemetry.otlp_endpoint`` pays nothing
measurable (the benchmark's "tracing on" row is the cost with an exporter).

Attributes are chosen, never dumped: database names, backup ids, sizes, step names. No DSN, URL with
credentials, token or key ever becomes an attribute; an exception recorded on a span is our own
operator-facing message (``KybdrError`` texts are written to be safe to show).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Final

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, Status, StatusCode

TRACER_NAME: Final = "kybdr_agent"
AttributeValue = str | bool | int | float
# BatchSpanProcessor's own bounds, named: spans waiting for export, and how long one export may take.
MAX_QUEUED_SPANS: Final = 2048
EXPORT_TIMEOUT_MILLIS: Final = 10_000


def _attributes(values: Mapping[str, object]) -> dict[str, AttributeValue]:
    return {f"kybdr.{k}": v for k, v in values.items() if isinstance(v, str | bool | int | float)}


@contextmanager
def stage(name: str, **attributes: object) -> Iterator[Span]:
    """A span for one stage of the current job (or a root span outside one). A failure marks it as an
    error with the exception's type and message; cancellation is recorded as such, not as an error."""
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        name, attributes=_attributes(attributes), record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except Exception as exc:
            if span.is_recording():
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
                span.set_attribute("kybdr.error_type", type(exc).__name__)
            raise
        except BaseException:
            if span.is_recording():
                span.set_attribute("kybdr.cancelled", True)
            raise


def annotate(span: Span, **attributes: object) -> None:
    """Add what a stage learned as it ran (bytes moved, the backup id) to its span."""
    if span.is_recording():
        span.set_attributes(_attributes(attributes))


def configure_tracing(
    endpoint: str | None, *, version: str, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Install the process's tracer provider: spans exported by OTLP/HTTP to ``endpoint`` (``/v1/traces``
    is appended when the URL names no path), or to ``exporter`` (tests). None when neither: spans stay
    non-recording. Call once per process (OpenTelemetry refuses a second provider)."""
    if exporter is None and endpoint is None:
        return None
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        url = endpoint.rstrip("/") if endpoint else ""
        if url.count("/") <= 2:  # scheme://host:port with no path
            url += "/v1/traces"
        exporter = OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT_MILLIS / 1000)
    provider = TracerProvider(resource=Resource.create({"service.name": "kybdr-agent", "service.version": version}))
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_queue_size=MAX_QUEUED_SPANS, export_timeout_millis=EXPORT_TIMEOUT_MILLIS)
    )
    trace.set_tracer_provider(provider)
    return provider
