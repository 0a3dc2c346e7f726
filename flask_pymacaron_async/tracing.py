"""Trace and log correlation: the W3C trace context travels with a task, and log records name the request.

**Traces.** When OpenTelemetry is installed (the ``otel`` extra) and a span
is active where a task is queued, its context travels in the standard
``traceparent`` / ``tracestate`` message headers, outside the signed context
snapshot (a trace id is never trusted for identity). In the worker the task
runs in a span that is a child of it, so the spans it makes join the trace of
the request. When OpenTelemetry's own Celery instrumentation is active it does
both already, and this module stands aside: no double injection.

**Logs.** :class:`RequestIdFilter` adds ``request_id`` and ``task_id`` to
every log record: the id of the request that queued the running task (or of
the current request), and the running task's id; ``"-"`` when there is none.

.. code-block:: python

    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(request_id)s %(task_id)s %(message)s"))
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from typing import Any, Iterator

from flask import has_request_context, request

#: The message headers of the W3C trace context.
TRACE_HEADERS = ("traceparent", "tracestate")

_REQUEST_ID = "HTTP_X_REQUEST_ID"
# A request without an X-Request-Id gets an id on first use, kept here: the
# endpoint's log lines and its tasks' (which see it as X-Request-Id) share it.
_GENERATED_ID = "pymacaron_async.request_id"


def request_id_of(environ: dict[str, Any]) -> str:
    """The id of the request of ``environ``: its ``X-Request-Id``, else one made for it (the same each time)."""
    found = environ.get(_REQUEST_ID) or environ.get(_GENERATED_ID)
    if not found:
        found = environ[_GENERATED_ID] = uuid.uuid4().hex
    return str(found)


@functools.cache
def _opentelemetry_api() -> Any:
    """OpenTelemetry's ``propagate`` and ``trace``, imported once; None when it is not installed."""
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return None
    return propagate, trace


@functools.cache
def _celery_instrumentor() -> Any:
    try:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
    except ImportError:
        return None
    return CeleryInstrumentor()


def _opentelemetry() -> Any:
    """OpenTelemetry's API, or None when it is not installed or its Celery instrumentation does the work."""
    api = _opentelemetry_api()
    if api is None:
        return None
    instrumentor = _celery_instrumentor()
    if instrumentor is not None and instrumentor.is_instrumented_by_opentelemetry:
        return None
    return api


def trace_headers() -> dict[str, str]:
    """The trace context to send with a task queued now (empty without an active span)."""
    otel = _opentelemetry()
    if otel is None:
        return {}
    propagate, trace = otel
    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {k: v for k, v in carrier.items() if k in TRACE_HEADERS}


@contextlib.contextmanager
def task_span(task_name: str, task_id: str | None, carrier: dict[str, Any]) -> Iterator[None]:
    """Run a task in a span that is a child of the trace context it was queued with (when there is one)."""
    otel = _opentelemetry() if carrier.get("traceparent") else None
    if otel is None:
        yield
        return
    propagate, trace = otel
    parent = propagate.extract({k: v for k, v in carrier.items() if k in TRACE_HEADERS and isinstance(v, str)})
    tracer = trace.get_tracer("flask_pymacaron_async")
    attributes = {"celery.task_name": task_name, "messaging.message.id": task_id or ""}
    with tracer.start_as_current_span(
        f"run {task_name}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    ):
        yield


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (of the request that queued the running task) and ``task_id`` to log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = task_id = None
        if has_request_context():
            request_id = request_id_of(request.environ)
        from celery import current_task

        if current_task and not current_task.request.called_directly:
            task_id = current_task.request.id
        record.request_id = request_id or "-"
        record.task_id = task_id or "-"
        return True
