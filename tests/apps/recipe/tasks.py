"""The example's tasks: plain ``@shared_task`` functions, as in the Flask docs."""

from __future__ import annotations

import time

from celery import Task, shared_task
from flask import g, request


@shared_task(ignore_result=False)
def add(a: int, b: int) -> int:
    return a + b


@shared_task()
def block() -> None:
    time.sleep(0.5)


@shared_task(bind=True, ignore_result=False)
def process(self: Task, total: int) -> object:
    for i in range(total):
        self.update_state(state="PROGRESS", meta={"current": i + 1, "total": total})
        time.sleep(0.3)
    return {"current": total, "total": total}


@shared_task(ignore_result=False)
def where() -> dict[str, object]:
    """Not in the example: what a shared task sees of the request that queued it."""
    return {"url": request.url, "agent": request.headers.get("User-Agent"), "has_g": g is not None}
