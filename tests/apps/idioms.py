"""Celery's everyday idioms on the extension: retries, errbacks, ``base=``, eager calls.

Its tasks write what they saw (request, user, attempt) to Redis under the
run's prefix; the worker consumes a queue of its own, so the dead letters
the tests look at are only this app's.
"""

from __future__ import annotations

import os

import redis
from celery import Task
from flask import Flask, current_app, g, has_request_context, request

from flask_pymacaron_async import PymacaronAsync, signals
from tests.apps import carry_g_user

QUEUE = os.environ.get("PMA_TEST_QUEUE", "pma-test") + "-idioms"
PREFIX = os.environ.get("PMA_TEST_PREFIX", "pma-test")
BROKER_URL = os.environ.get("PMA_TEST_BROKER_URL", "redis://127.0.0.1:6379/0")

ext = PymacaronAsync()
carry_g_user(ext)


def create_app(**config) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="test-secret",
        PYMACARON_ASYNC_BROKER_URL=BROKER_URL,
        PYMACARON_ASYNC_RESULT_BACKEND=BROKER_URL,
        # Results and done marks expire soon: the run leaves nothing for long on the machine's Redis.
        CELERY={"task_default_queue": QUEUE, "result_expires": 600},
        PYMACARON_ASYNC_DONE_TTL=600,
    )
    app.config.update(config)
    ext.init_app(app)

    return app


def report(key: str, value) -> None:
    import json

    with redis.Redis.from_url(BROKER_URL) as client:
        client.rpush(f"{PREFIX}:{key}", json.dumps(value))


def attempt(key: str) -> int:
    """The how-many-th run of this key's task this is (from 1)."""
    with redis.Redis.from_url(BROKER_URL) as client:
        name = f"{PREFIX}:{key}:attempts"
        count = int(client.incr(name))
        client.expire(name, 600)
        return count


def seen() -> dict:
    return {
        "app": current_app.import_name,
        "user": g.get("user"),
        "url": request.url if has_request_context() else None,
    }


@ext.task(bind=True, max_retries=3)
def retries_once(self, key):
    report(key, {**seen(), "retries": self.request.retries})
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)
    return "done"


@ext.task(autoretry_for=(ValueError,), max_retries=3, retry_backoff=1, retry_backoff_max=1, retry_jitter=False)
def flaky(key):
    n = attempt(key)
    report(key, {**seen(), "attempt": n})
    if n < 3:
        raise ValueError(f"flaky attempt {n}")
    return n


@ext.task(bind=True, autoretry_for=(ValueError,), max_retries=2, default_retry_delay=0.1)
def always_fails(self, key):
    report(key, {**seen(), "retries": self.request.retries})
    raise ValueError(f"attempt {self.request.retries + 1} failed")


@ext.task
def fails(key):
    raise ValueError("for the errback")


@ext.task
def on_error(task_request, exc, traceback):
    key = task_request.args[0]
    report(key, {**seen(), "failed_id": task_request.id, "exc": repr(exc)})


@ext.task
def on_error_old(task_id):
    report(f"errback:{task_id}", {**seen(), "failed_id": task_id})


class Audited(Task):
    """A user's base class, as Celery's docs write them."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        report(args[0] + ":on_failure", {**seen(), "exc": repr(exc)})

    def __call__(self, *args, **kwargs):
        report(args[0] + ":base_call", seen())
        return super().__call__(*args, **kwargs)


@ext.task(base=Audited)
def audited(key, fail=False):
    report(key, seen())
    if fail:
        raise ValueError("audited failure")


@ext.task
def eager_echo(key, value=None):
    return {**seen(), "value": value, "type": type(value).__name__}


@signals.task_failed.connect
def _failed(sender, task_name, task_id, **extra):
    if sender.import_name == __name__:
        report(f"failed:{task_id}", task_name)


app = create_app()
celery = ext.celery
