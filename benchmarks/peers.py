"""The peers' endpoints: Flask-CeleryExt, RQ, Dramatiq and a bare redis-py LPUSH.

Each builder returns a Flask app whose ``/queue`` enqueues one no-op call
with :data:`~benchmarks.common.ARGS`, the way that library's docs show, and
whose ``/fan/<n>`` enqueues ``n`` of them (benchmarks/fanout.py).
"""

from __future__ import annotations

import json

from flask import Flask

from benchmarks.common import ARGS, SECRET_KEY, broker_url, enqueue_routes, queue_name


def build_celeryext() -> Flask:
    from flask_celeryext import FlaskCeleryExt

    app = Flask("bench_celeryext")
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        CELERY_BROKER_URL=broker_url(),
        CELERY_TASK_IGNORE_RESULT=True,
        CELERY_TASK_DEFAULT_QUEUE=queue_name("bench-celeryext"),
    )
    celery = FlaskCeleryExt(app).celery

    @celery.task
    def noop(a, b):
        return None

    enqueue_routes(app, lambda: noop.delay(*ARGS))

    return app


def build_rq() -> Flask:
    import redis
    from rq import Queue

    queue = Queue(queue_name("bench-rq"), connection=redis.Redis.from_url(broker_url()))
    app = Flask("bench_rq")
    app.config["SECRET_KEY"] = SECRET_KEY

    @app.get("/queue")
    def view_queue():
        queue.enqueue(rq_noop, *ARGS)
        return "ok"

    @app.get("/fan/<int:n>")
    def view_fan(n):
        # RQ's own batch: one pipeline for the n jobs.
        queue.enqueue_many([Queue.prepare_data(rq_noop, ARGS) for _ in range(n)])
        return "ok"

    return app


def rq_noop(a, b):
    return None


def build_dramatiq() -> Flask:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    dramatiq.set_broker(RedisBroker(url=broker_url()))

    @dramatiq.actor(queue_name=queue_name("bench_dramatiq"))
    def noop(a, b):
        return None

    app = Flask("bench_dramatiq")
    app.config["SECRET_KEY"] = SECRET_KEY

    @app.get("/queue")
    def view_queue():
        noop.send(*ARGS)
        return "ok"

    @app.get("/fan/<int:n>")
    def view_fan(n):
        # Dramatiq has no batch enqueue for independent messages: one send each.
        for _ in range(n):
            noop.send(*ARGS)
        return "ok"

    return app


def build_lpush() -> Flask:
    import redis

    client = redis.Redis.from_url(broker_url())
    key = queue_name("bench-lpush")
    app = Flask("bench_lpush")
    app.config["SECRET_KEY"] = SECRET_KEY

    @app.get("/queue")
    def view_queue():
        client.lpush(key, json.dumps({"task": "noop", "args": ARGS}))
        return "ok"

    @app.get("/fan/<int:n>")
    def view_fan(n):
        # The floor: one pipeline of n LPUSH.
        with client.pipeline(transaction=False) as pipe:
            for _ in range(n):
                pipe.lpush(key, json.dumps({"task": "noop", "args": ARGS}))
            pipe.execute()
        return "ok"

    return app
