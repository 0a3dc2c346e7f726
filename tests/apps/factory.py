"""An app factory whose tasks live in a blueprint module, declared before any app exists."""

from __future__ import annotations

import os

from flask import Blueprint, Flask, request

from flask_pymacaron_async import PymacaronAsync, asynctask

ext = PymacaronAsync()
bp = Blueprint("shop", __name__)


@asynctask(queue=None)
def ship(order_id, key):
    from tests.apps.basic import report

    report(key, {"order": order_id, "url": request.url, "endpoint": request.endpoint})


@bp.route("/orders/<int:order_id>/ship", methods=["POST"])
def ship_order(order_id):
    ship(order_id, request.args["key"])
    return {"shipping": order_id}


def create_app():
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="factory-secret",
        PYMACARON_ASYNC_BROKER_URL=os.environ.get("PMA_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
        CELERY={"task_default_queue": os.environ.get("PMA_TEST_QUEUE", "pma-test") + "-factory"},
        REPORT_PREFIX=os.environ.get("PMA_TEST_PREFIX", "pma-test"),
    )
    app.register_blueprint(bp)
    ext.init_app(app)
    return app
