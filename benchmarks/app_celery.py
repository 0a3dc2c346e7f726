"""Raw Celery as in Flask's "Background Tasks with Celery" recipe (worker: ``benchmarks.app_celery:celery``)."""

from __future__ import annotations

import os

from celery import Celery, Task, shared_task, signals
from flask import Flask

from benchmarks.common import ARGS, SECRET_KEY, broker_url, enqueue_routes, queue_name, record_mark, record_ready

#: Set to "1" to give raw Celery the extension's reliability defaults (acks_late, prefetch 1).
RELIABLE_ENV = "PMA_BENCH_CELERY_RELIABLE"


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


@shared_task
def noop(a, b):
    return None


@shared_task
def mark(key):
    record_mark(key)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["SECRET_KEY"] = SECRET_KEY
    settings = {
        "broker_url": broker_url(),
        "task_ignore_result": True,
        "task_default_queue": queue_name("bench-celery"),
    }
    if os.environ.get(RELIABLE_ENV) == "1":
        settings.update(task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1)
    app.config.from_mapping(CELERY=settings)
    celery_init_app(app)

    enqueue_routes(app, lambda: noop.delay(*ARGS))
    return app


app = create_app()
celery = app.extensions["celery"]
signals.worker_ready.connect(record_ready)
