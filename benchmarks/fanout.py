"""Fan-out: the cost per task when one request queues N tasks: ``python -m benchmarks.fanout TARGET``.

Runs in a process of its own per target and prints one JSON object. Each
request goes through Flask's test client and is closed (so work done on
close, after_response mode's publishing, is counted); per task is
(median of ``/fan/<n>`` − median of ``/noop``) / N. The queues are emptied
between requests, outside the timed part, so Redis does not grow.

Targets: this extension in immediate mode (N ``.delay()``), after_response
mode (N ``.delay()`` held, published on close) and ``with ext.batch():``;
raw Celery (the Flask recipe), Flask-CeleryExt and Dramatiq (N sends each:
they have no batch enqueue), RQ (``Queue.enqueue_many``, one pipeline), and
the floor: one redis-py pipeline of N ``LPUSH``.

For the extension and raw Celery, also the size of one queued message
(bytes of the Redis list item) for the same call, and for the extension the
commands Redis processed per request (``INFO stats``).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any, Callable

from flask import Flask

from benchmarks import peers
from benchmarks.common import HEADERS, broker_url, median
from benchmarks.endpoint import build_celery, build_ext

#: Tasks per request, and requests per N (fewer when each request does more).
SIZES = {1: 400, 10: 150, 50: 50, 200: 15}
WARMUP = 10

TARGETS: dict[str, tuple[Callable[[], Flask], str]] = {
    "ext_immediate": (lambda: build_ext("immediate"), "/fan/{n}"),
    "ext_after_response": (lambda: build_ext("after_response"), "/fan/{n}"),
    "ext_batch": (lambda: build_ext("immediate"), "/batch/{n}"),
    "celery": (build_celery, "/fan/{n}"),
    "celeryext": (peers.build_celeryext, "/fan/{n}"),
    "rq": (peers.build_rq, "/fan/{n}"),
    "dramatiq": (peers.build_dramatiq, "/fan/{n}"),
    "pipeline": (peers.build_lpush, "/fan/{n}"),
}


def _data_keys(client: Any) -> list[bytes]:
    """What the target queued (lists, hashes, sets, sorted sets), not kombu's bindings."""
    return [
        key
        for key in client.scan_iter()
        if not key.startswith(b"_kombu.binding") and client.type(key) in (b"list", b"hash", b"zset")
    ]


def measure(target: str) -> dict[str, Any]:
    import redis

    build, path = TARGETS[target]
    try:
        app = build()
    except ModuleNotFoundError as exc:
        return {"target": target, "error": f"not installed ({exc}): pip install flask-celeryext rq 'dramatiq[redis]'"}
    if "/noop" not in {rule.rule for rule in app.url_map.iter_rules()}:
        app.add_url_rule("/noop", "noop", lambda: "ok")
    client = redis.Redis.from_url(broker_url())
    test_client = app.test_client()

    def get(url: str) -> float:
        started = time.perf_counter()
        response = test_client.get(url, headers=HEADERS)
        response.close()
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"{target} {url} answered {response.status_code}: {response.get_data(True)}")
        return elapsed

    get(path.format(n=1))
    keys = _data_keys(client)
    result: dict[str, Any] = {"target": target}
    if target.startswith("ext_") or target == "celery":
        (queue,) = [k for k in keys if client.type(k) == b"list"]
        result["message_bytes"] = len(client.lindex(queue, 0))
    if keys:
        client.delete(*keys)
    per_task: dict[str, float] = {}
    commands: dict[str, float] = {}
    for n, requests in SIZES.items():
        noop: list[float] = []
        fan: list[float] = []
        spent: list[int] = []
        for i in range(WARMUP + requests):
            idle = get("/noop")
            before = client.info("stats")["total_commands_processed"]
            busy = get(path.format(n=n))
            # The INFO that read `before` is one command; this one is not counted.
            spent.append(client.info("stats")["total_commands_processed"] - before - 1)
            queued = _data_keys(client)
            if queued:
                client.delete(*queued)
            if i >= WARMUP:
                noop.append(idle)
                fan.append(busy)
            if i == WARMUP:
                gc.collect()
        per_task[str(n)] = (median(fan) - median(noop)) / n * 1e6
        commands[str(n)] = median([float(s) for s in spent[WARMUP:]])
    result["per_task_us"] = per_task
    result["redis_commands_per_request"] = commands
    return result


def main(argv: list[str]) -> None:
    print(json.dumps(measure(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
