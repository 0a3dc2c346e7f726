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


def create_app(publish: str | None = None, big: bool = False) -> Flask:
    """The benchmark app; ``big``: with :func:`add_big_routes` before its own (1,000 more routes)."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        PYMACARON_ASYNC_BROKER_URL=broker_url(),
        PYMACARON_ASYNC_PUBLISH=publish or os.environ.get(PUBLISH_ENV, "immediate"),
        CELERY={"task_default_queue": queue_name("bench-ext")},
    )
    ext.init_app(app)
    if big:
        add_big_routes(app)

    enqueue_routes(app, lambda: noop.delay(*ARGS))

    @app.get("/batch/<int:n>")
    def view_batch(n):
        with ext.batch():
            for _ in range(n):
                noop.delay(*ARGS)
        return "ok"

    return app


#: Per blueprint: (rule, converters) of its routes, with Werkzeug's own converters.
_ROUTE_SHAPES = (
    "/items/<int:item_id>",
    "/items/<int:item_id>/edit",
    "/items/<uuid:key>/audit",
    "/files/<path:name>",
    "/prices/<float:amount>",
    "/users/<string:name>",
    "/users/<string:name>/orders/<int:order_id>",
    "/search",
    "/reports/<any(daily,weekly):period>",
    "/exports/<int:year>/<int:month>",
)


def add_big_routes(app: Flask, blueprints: int = 50, per_blueprint: int = 20) -> None:
    """A real app's size: ``blueprints`` blueprints of ``per_blueprint`` routes each, and a few hooks."""
    from flask import Blueprint

    def view(**kwargs: object) -> str:
        return "ok"

    for b in range(blueprints):
        blueprint = Blueprint(f"section{b}", __name__, url_prefix=f"/section{b}")
        for r in range(per_blueprint):
            shape = _ROUTE_SHAPES[r % len(_ROUTE_SHAPES)]
            blueprint.add_url_rule(f"/v{r // len(_ROUTE_SHAPES)}{shape}", f"route{r}", view, methods=["GET", "POST"])
        blueprint.before_request(lambda: None)
        app.register_blueprint(blueprint)
    for _ in range(3):
        app.before_request(lambda: None)


app = create_app()
celery = ext.celery
signals.worker_ready.connect(record_ready)
