"""An app whose worker traces with OpenTelemetry's SDK and logs through RequestIdFilter.

The task reports its span context and the span's parent to the run's Redis;
PMA_TRACED_LOG names the file its log records go to, formatted with
``%(request_id)s`` and ``%(task_id)s``.
"""

from __future__ import annotations

import json
import logging
import os

import redis
from flask import Flask, current_app
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from flask_pymacaron_async import PymacaronAsync
from flask_pymacaron_async.tracing import RequestIdFilter

ext = PymacaronAsync()
log = logging.getLogger("tests.traced")

if os.environ.get("PMA_TRACED_LOG"):
    # In the worker only: a real tracer, and the log file the test reads.
    trace.set_tracer_provider(TracerProvider())
    handler = logging.FileHandler(os.environ["PMA_TRACED_LOG"])
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(request_id)s %(task_id)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="traced-secret",
        PYMACARON_ASYNC_BROKER_URL=os.environ.get("PMA_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
        CELERY={"task_default_queue": os.environ.get("PMA_TRACED_QUEUE", "pma-traced")},
        REPORT_PREFIX=os.environ.get("PMA_TEST_PREFIX", "pma-test"),
    )
    ext.init_app(app)
    return app


@ext.task
def traced(key):
    span = trace.get_current_span()
    context = span.get_span_context()
    parent = getattr(span, "parent", None)
    log.info("inside the task %s", key)
    seen = {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "name": getattr(span, "name", None),
    }
    with redis.Redis.from_url(current_app.config["PYMACARON_ASYNC_BROKER_URL"]) as client:
        client.rpush(f"{current_app.config['REPORT_PREFIX']}:{key}", json.dumps(seen))


app = create_app()
celery = ext.celery
