"""What every benchmark target shares: the Redis URL, queue names, the call and the request."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

#: Set by run.py for its children: the benchmark's own Redis, and a queue per target.
BROKER_ENV = "PMA_BENCH_BROKER_URL"
QUEUE_ENV = "PMA_BENCH_QUEUE"
#: "immediate" or "after_response", for the extension's app.
PUBLISH_ENV = "PMA_BENCH_PUBLISH"

#: The arguments of every enqueued call, for every target.
ARGS = (42, "hello")
#: The headers of every request: what a browser sends, plus a request id.
HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) bench",
    "Accept": "application/json",
    "Accept-Language": "en-GB,en;q=0.8",
    "X-Request-Id": "bench-request-id",
}
#: Every app has one, so Flask's session handling costs the same in all of them.
SECRET_KEY = "bench-secret"
#: The user every request is made by (for the targets that carry one).
USER_ID = 1234


def broker_url() -> str:
    return os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/15")


def queue_name(default: str) -> str:
    return os.environ.get(QUEUE_ENV, default)


def record_mark(key: str) -> None:
    """Called by the marker task in a worker: push the wall-clock time to a Redis list."""
    import redis

    client = redis.Redis.from_url(broker_url())
    client.rpush(key, repr(time.time()))
    client.close()


#: Where a worker writes the time it became ready (Celery's ``worker_ready`` signal).
READY_KEY = "bench:ready"


def record_ready(**_kwargs: object) -> None:
    """Connected to ``worker_ready``: the worker is consuming; its first task comes next."""
    record_mark(READY_KEY)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def enqueue_routes(app: Any, enqueue: Callable[[], Any]) -> None:
    """``/noop``, ``/queue`` (one ``enqueue()``) and ``/fan/<n>`` (``n`` of them, one after the other)."""

    @app.get("/noop")
    def view_noop() -> str:
        return "ok"

    @app.get("/queue")
    def view_queue() -> str:
        enqueue()
        return "ok"

    @app.get("/fan/<int:n>")
    def view_fan(n: int) -> str:
        for _ in range(n):
            enqueue()
        return "ok"
