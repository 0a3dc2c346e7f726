"""Checked by mypy in `make lint` (not run): the task objects' Celery API is typed."""

from __future__ import annotations

from typing import Any

from celery.canvas import Signature
from celery.result import AsyncResult, EagerResult

from flask_pymacaron_async import AsyncTask, asynctask


@asynctask
def charge(order_id: int) -> str:
    return str(order_id)


@asynctask(queue="mail", autoretry_for=(TimeoutError,))
def mail(to: str) -> None:
    return None


def uses() -> None:
    task: AsyncTask[str] = charge
    queued: AsyncResult = charge(7)
    delayed: AsyncResult = charge.delay(7)
    eager: EagerResult = charge.apply((7,))
    looked_up: AsyncResult = charge.AsyncResult("id")
    mapped: Signature = charge.map([1, 2])
    starmapped: Signature = charge.starmap([(1,), (2,)])
    chunked: Signature = charge.chunks([(1,), (2,)], 1)
    signature: Signature = mail.s("ada@example.com")
    request: Any = charge.request
    backend: Any = charge.backend
    name: str = charge.name
    charge.update_state(state="PROGRESS", meta={"done": 1})
    print(task, queued, delayed, eager, looked_up, mapped, starmapped, chunked, signature, request, backend, name)
