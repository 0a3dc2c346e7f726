"""This extension: a Flask app whose endpoint queues a no-op task (worker: ``benchmarks.app_ext:celery``)."""

from __future__ import annotations

import os

from celery import signals
from flask import Flask, g

from benchmarks.common import (
    ARGS,
    PUBLISH_ENV,
    SECRET_KEY,
    USER_ID,
    broker_url,
    enqueue_routes,
    queue_name,
    record_mark,
    record_ready,
)
from flask_pymacaron_async import PymacaronAsync

ext = PymacaronAsync()


@ext.user_dumper
def dump_user():
    return USER_ID


@ext.user_loader
def load_user(user_id):
    g.user = {"id": user_id}


@ext.task
def noop(a, b):
    return None


@ext.task
def mark(key):
    record_mark(key)


def create_app(publish: str | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        PYMACARON_ASYNC_BROKER_URL=broker_url(),
        PYMACARON_ASYNC_PUBLISH=publish or os.environ.get(PUBLISH_ENV, "immediate"),
        CELERY={"task_default_queue": queue_name("bench-ext")},
    )
    ext.init_app(app)

    enqueue_routes(app, lambda: noop.delay(*ARGS))

    @app.get("/batch/<int:n>")
    def view_batch(n):
        with ext.batch():
            for _ in range(n):
                noop.delay(*ARGS)
        return "ok"

    return app


app = create_app()
celery = ext.celery
signals.worker_ready.connect(record_ready)
