"""Traces and metrics of every dvp process: set up once per process, from the environment.

Traces follow the standard ``OTEL_*`` variables: with ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, spans go over OTLP/HTTP to it, batched
(``OTEL_BSP_*``), under ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``;
``OTEL_TRACES_EXPORTER=console`` prints them instead, ``none`` or ``OTEL_SDK_DISABLED=true``
turns them off; with none of these nothing is set up and nothing is exported. When
tracing is on, every Temporal client (and so every worker built on one) carries the
SDK's ``TracingInterceptor``, so a trade is one trace from the client that submits it
through its workflow to each ledger call.

Metrics go to a Prometheus endpoint that the worker opens when asked to
(``dvp worker --metrics-port``): the Temporal SDK's own and dvp's, both recorded
through the Temporal runtime's meter (see ``metrics_runtime``). What each dvp metric
means: docs/operations.md, "Metrics".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

__all__ = [
    "LATENCY_BUCKETS",
    "configure_tracing",
    "flush_tracing",
    "metrics_runtime",
    "tracing_enabled",
    "tracing_interceptors",
]

log = logging.getLogger("dvp.telemetry")

# Seconds: a trade settles in tens of milliseconds when all is well, and may wait for
# approvals, funds or a ledger for up to its deadline (minutes, hours).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

_provider: TracerProvider | None = None


def _exporter() -> SpanExporter | None:
    """The span exporter the environment asks for, if any."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleSpanExporter()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint and kind != "otlp":
        return None
    # Imported here: a process that exports nothing never loads the exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # reads the endpoint, headers, timeout... from OTEL_*


def configure_tracing(service_name: str) -> bool:
    """Set this process's tracer provider from the environment, once; True if tracing is on.

    ``service_name`` applies unless ``OTEL_SERVICE_NAME`` says otherwise.
    """
    global _provider
    if _provider is not None:
        return True
    exporter = _exporter()
    if exporter is None:
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing: spans of %s are exported (%s)", service_name, type(exporter).__name__)
    return True


def tracing_enabled() -> bool:
    """Whether ``configure_tracing`` set up an exporter in this process."""
    return _provider is not None


def tracing_interceptors() -> list[TracingInterceptor]:
    """The interceptors every Temporal client gets: the SDK's tracing one when tracing is on.

    None when it is off: the interceptor then only makes spans no one receives, at a cost
    on every workflow task.
    """
    return [TracingInterceptor()] if _provider is not None else []


def flush_tracing(timeout_millis: int = 5000) -> None:
    """Export the spans still batched; before a process ends without its teardown."""
    if _provider is not None:
        _provider.force_flush(timeout_millis)


def metrics_runtime(
    port: int, host: str = "127.0.0.1", buckets: Sequence[float] = LATENCY_BUCKETS
) -> Runtime:
    """A Temporal runtime serving Prometheus metrics at ``http://host:port/metrics``.

    The SDK's own metrics (workflow and activity task latencies, slots, polls...) and
    dvp's, which the workflows record through ``workflow.metric_meter()`` (it records
    nothing on replay), the activities through ``activity.metric_meter()`` and the
    worker through the runtime's meter. Counters end in ``_total``, durations are in
    seconds.
    """
    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=f"{host}:{port}",
                counters_total_suffix=True,
                durations_as_seconds=True,
                histogram_bucket_overrides={"dvp_settlement_latency": list(buckets)},
            )
        )
    )
