"""The Flask app the core tests queue tasks from and run workers for.

Its tasks write what they saw to Redis keys under the run's prefix.
Configured from the environment the test fixtures set.
"""

from __future__ import annotations

import json
import os
import time

import redis
from flask import Flask, current_app, g, request, url_for

from flask_pymacaron_async import PymacaronAsync, asynctask
from tests.apps import carry_g_user

ext = PymacaronAsync()


def create_app(**config):
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="test-secret",
        PYMACARON_ASYNC_BROKER_URL=os.environ.get("PMA_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
        PYMACARON_ASYNC_RESULT_BACKEND=os.environ.get("PMA_TEST_BROKER_URL"),
        PYMACARON_ASYNC_CONTEXT_HEADERS=["User-Agent", "X-Request-Id", "X-Tenant"],
        # Results expire soon: the test run leaves nothing on the machine's Redis.
        CELERY={"task_default_queue": os.environ.get("PMA_TEST_QUEUE", "pma-test"), "result_expires": 600},
        REPORT_PREFIX=os.environ.get("PMA_TEST_PREFIX", "pma-test"),
        PYMACARON_ASYNC_PUBLISH=os.environ.get("PMA_TEST_PUBLISH", "immediate"),
        PYMACARON_ASYNC_DONE_TTL=600,
    )
    app.config.update(config)
    ext.init_app(app)

    @app.route("/items/<int:item_id>", methods=["POST", "GET"])
    def item(item_id):
        g.user = request.headers.get("X-User")
        key = request.args.get("key", "item")
        record_context.delay(key)
        return {"queued": key}

    @app.route("/chain")
    def chain_view():
        from celery import chain

        g.user = request.headers.get("X-User")
        chain(add.s(1, 2), record_value.s("chained")).delay()
        return {"ok": True}

    return app


carry_g_user(ext)


def report(key, value):
    url = (
        current_app.config["PMA_TEST_BROKER_URL_FOR_REPORTS"]
        if "PMA_TEST_BROKER_URL_FOR_REPORTS" in current_app.config
        else current_app.config["PYMACARON_ASYNC_BROKER_URL"]
    )
    with redis.Redis.from_url(url) as client:
        client.rpush(f"{current_app.config['REPORT_PREFIX']}:{key}", json.dumps(value))


def context_seen():
    from flask import has_request_context

    seen = {"app": current_app.import_name, "user": g.get("user"), "has_request": has_request_context()}
    if has_request_context():
        seen.update(
            url=request.url,
            method=request.method,
            args=request.args.to_dict(),
            endpoint=request.endpoint,
            view_args=request.view_args,
            headers={k: v for k, v in request.headers.items()},
            remote_addr=request.remote_addr,
            url_for=url_for("item", item_id=7, _external=True),
        )
    return seen


@asynctask
def record_context(key):
    report(key, context_seen())


@asynctask()
def record_value(value, key):
    report(key, {"value": value, "type": type(value).__name__})


@asynctask(queue=None)
def record_types(key, *args, **kwargs):
    report(key, {"args": [repr(a) for a in args], "kwargs": {k: repr(v) for k, v in kwargs.items()}})


@asynctask(delay=1.5)
def later(key):
    report(key, time.time())


@asynctask(publish="immediate")
def urgent(key):
    report(key, "urgent")


@asynctask
def add(x, y):
    return x + y


@asynctask
def record_with_user(value, key):
    report(key, {"value": value, "user": g.get("user"), "url": request.url if request else None})


@asynctask
def nested(key):
    record_context.delay(key)


@asynctask
def fail(key):
    report(key, "ran")
    raise ValueError("boom")


@asynctask
def slow(key, seconds):
    time.sleep(seconds)
    report(key, "done")


app = create_app()
celery = ext.celery


def _record_signal(name):
    def receiver(sender, task_name, task_id, **extra):
        if task_name.endswith((".add", ".fail")):
            report(
                f"signal:{task_id}",
                {"signal": name, "sender": sender.import_name, **{k: repr(v) for k, v in extra.items()}},
            )

    return receiver


# Worker-side signals, reported to Redis so the tests can see them.
_receivers = [_record_signal(n) for n in ("task_started", "task_succeeded", "task_failed")]
for _name, _receiver in zip(("task_started", "task_succeeded", "task_failed"), _receivers):
    getattr(__import__("flask_pymacaron_async.signals", fromlist=[_name]), _name).connect(_receiver)
