"""Fill a queue for the worker benchmark: ``python -m benchmarks.fill TARGET COUNT START_KEY END_KEY``.

Queues ``mark(START_KEY)``, COUNT no-op calls, then ``mark(END_KEY)``, from inside a
request (so this extension's worker rebuilds a request context, as it would
in production), and prints the names of the Redis keys written. TARGET is
``ext``, ``celery``, ``dramatiq`` or ``huey``.
"""

from __future__ import annotations

import json
import sys

import redis

from benchmarks.common import ARGS, HEADERS, broker_url


def fill(target: str, count: int, start_key: str, end_key: str) -> list[str]:
    if target in ("dramatiq", "huey"):
        from benchmarks import app_peers_workers as peers

        mark, noop = (
            (peers.dramatiq_mark.send, peers.dramatiq_noop.send)
            if target == "dramatiq"
            else (peers.huey_mark, peers.huey_noop)
        )
        mark(start_key)
        for _ in range(count):
            noop(*ARGS)
        mark(end_key)
        client = redis.Redis.from_url(broker_url())
        # Their queues and message stores (Dramatiq keeps the bodies in a hash).
        return sorted(k.decode() for k in client.scan_iter())
    if target == "ext":
        from benchmarks.app_ext import app, mark, noop
    else:
        from benchmarks.app_celery import app, mark, noop
    with app.test_request_context("/queue?page=2", headers=HEADERS):
        mark.delay(start_key)
        for _ in range(count):
            noop.delay(*ARGS)
        mark.delay(end_key)
    client = redis.Redis.from_url(broker_url())
    return sorted(k.decode() for k in client.scan_iter() if client.type(k) == b"list")


if __name__ == "__main__":
    print(json.dumps(fill(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])))
