"""Trace and log correlation: the W3C trace context goes with the task; the worker's log records name the request."""

from __future__ import annotations

import json
import os
import uuid

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the tracing tests need OpenTelemetry's SDK (modern environment)")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from flask_pymacaron_async import _context as context  # noqa: E402
from flask_pymacaron_async import tracing
from tests.faults import wait_for  # noqa: E402


@pytest.fixture
def queue(redis_client):
    name = f"{os.environ['PMA_TEST_PREFIX']}-traced-{uuid.uuid4().hex[:6]}"
    os.environ["PMA_TRACED_QUEUE"] = name
    yield name
    redis_client.delete(name)
    os.environ.pop("PMA_TRACED_QUEUE")


@pytest.fixture
def tracer():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("tests"), exporter, provider
    provider.shutdown()


def _app():
    from tests.apps import traced

    return traced.create_app(), traced


def _headers(redis_client, queue) -> dict:
    raw = redis_client.lrange(queue, 0, -1)
    assert len(raw) == 1
    return json.loads(raw[0])["headers"]


def test_the_trace_context_travels_outside_the_signed_context(tracer, redis_client, queue):
    app, traced = _app()
    tracer, exporter, provider = tracer
    with tracer.start_as_current_span("GET /orders") as span, app.test_request_context("/orders"):
        traced.traced.delay("t")
    headers = _headers(redis_client, queue)
    version, trace_id, span_id, _flags = headers["traceparent"].split("-")
    assert trace_id == format(span.get_span_context().trace_id, "032x")
    assert span_id == format(span.get_span_context().span_id, "016x")
    # Not part of the signed snapshot: identity never comes from a trace id.
    payload = context.ContextSigner.decode(headers[context.HEADER])
    assert "traceparent" not in json.dumps(payload)


def test_no_trace_headers_without_an_active_span(redis_client, queue):
    app, traced = _app()
    with app.test_request_context("/orders"):
        traced.traced.delay("t")
    assert "traceparent" not in _headers(redis_client, queue)


def test_the_task_runs_in_a_child_span_and_its_logs_name_the_request(tracer, queue, start_worker, reports, tmp_path):
    app, traced = _app()
    tracer, exporter, provider = tracer
    log_file = tmp_path / "traced.log"
    start_worker("tests.apps.traced:celery", queue=queue, env={"PMA_TRACED_LOG": str(log_file)})
    key = uuid.uuid4().hex[:8]
    with tracer.start_as_current_span("POST /orders") as span:
        with app.test_request_context("/orders", headers={"X-Request-Id": "req-42"}):
            result = traced.traced.delay(key)
    seen = reports.one(key)
    assert seen["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert seen["parent_span_id"] == format(span.get_span_context().span_id, "016x")
    assert seen["name"] == "run tests.apps.traced.traced"
    wait_for(lambda: log_file.exists() and key in log_file.read_text(), 10, what="the task's log line")
    assert f"req-42 {result.id} inside the task {key}" in log_file.read_text()


def test_no_double_injection_with_opentelemetry_s_celery_instrumentation(tracer, redis_client, queue):
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.celery")
    app, traced = _app()
    tracer, exporter, provider = tracer
    instrumentor = instrumentation.CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        assert tracing._opentelemetry() is None  # the instrumentation does it: this module stands aside
        with tracer.start_as_current_span("GET /orders") as span, app.test_request_context("/orders"):
            assert tracing.trace_headers() == {}
            traced.traced.delay("t")
    finally:
        instrumentor.uninstrument()
    headers = _headers(redis_client, queue)
    # One trace context: the instrumentation's publish span, a child of the request's.
    assert headers["traceparent"].split("-")[1] == format(span.get_span_context().trace_id, "032x")
    published = [s for s in exporter.get_finished_spans() if s.kind.name == "PRODUCER"]
    assert len(published) == 1 and headers["traceparent"].split("-")[2] == format(published[0].context.span_id, "016x")


def test_the_log_filter_outside_any_task():
    import logging

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert tracing.RequestIdFilter().filter(record) and (record.request_id, record.task_id) == ("-", "-")
