"""A test app with a Redis result backend whose results are read through ``ext.result_for``.

Its user is ``g.user``, taken from the ``X-User`` header of each request
(none: anonymous). The worker consumes a queue of its own.
"""

from __future__ import annotations

import json
import os

import redis
from flask import Flask, abort, g, request

from flask_pymacaron_async import PymacaronAsync
from tests.apps import carry_g_user

QUEUE = os.environ.get("PMA_TEST_QUEUE", "pma-test") + "-results"
PREFIX = os.environ.get("PMA_TEST_PREFIX", "pma-test")
BROKER_URL = os.environ.get("PMA_TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
#: Results (their owners, the done marks) expire soon: the run leaves nothing for long on the machine's Redis.
RESULT_EXPIRES = 600

ext = PymacaronAsync()
carry_g_user(ext)


def create_app(**config) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="results-secret",
        PYMACARON_ASYNC_BROKER_URL=BROKER_URL,
        PYMACARON_ASYNC_RESULT_BACKEND=BROKER_URL,
        CELERY={"task_default_queue": QUEUE, "result_expires": RESULT_EXPIRES},
        PYMACARON_ASYNC_DONE_TTL=RESULT_EXPIRES,
    )
    app.config.update(config)
    ext.init_app(app)

    @app.before_request
    def log_in():
        g.user = request.headers.get("X-User")

    @app.route("/double/<int:n>", methods=["POST"])
    def queue_double(n):
        return {"id": double.delay(n).id}

    @app.route("/quiet/<key>", methods=["POST"])
    def queue_quiet(key):
        return {"id": quiet.delay(key).id}

    @app.route("/results/<task_id>")
    def result(task_id):
        found = ext.result_for(task_id)
        if found is None:
            abort(404)
        return {"state": found.state, "value": found.result if found.successful() else None}

    return app


@ext.task
def double(n):
    return {"n": n * 2, "user": g.get("user")}


@ext.task(ignore_result=True)
def quiet(key):
    with redis.Redis.from_url(BROKER_URL) as client:
        client.rpush(f"{PREFIX}:{key}", json.dumps({"user": g.get("user")}))


app = create_app()
celery = ext.celery
