"""The example's views: queue a task, then poll its result with ``AsyncResult(id)``."""

from __future__ import annotations

from celery.result import AsyncResult
from flask import Blueprint, request

from . import tasks

bp = Blueprint("tasks", __name__, url_prefix="/tasks")


@bp.route("/result/<id>")  # the example says @bp.get: Flask 2+, and legacy runs Flask 1.1
def result(id: str) -> dict[str, object]:
    found = AsyncResult(id)
    ready = found.ready()
    return {
        "ready": ready,
        "successful": found.successful() if ready else None,
        "value": found.get() if ready else found.result,
        "state": found.state,
    }


@bp.route("/add", methods=["POST"])
def add() -> dict[str, object]:
    a = request.form.get("a", type=int)
    b = request.form.get("b", type=int)
    return {"result_id": tasks.add.delay(a, b).id}


@bp.route("/block", methods=["POST"])
def block() -> dict[str, object]:
    return {"result_id": tasks.block.delay().id}


@bp.route("/process", methods=["POST"])
def process() -> dict[str, object]:
    return {"result_id": tasks.process.delay(total=request.form.get("total", type=int)).id}


@bp.route("/where", methods=["POST"])
def where() -> dict[str, object]:
    return {"result_id": tasks.where.delay().id}
