"""What ``PYMACARON_ASYNC_BROKER_MIN_REPLICAS = 1`` costs per enqueue.

A master, one replica and one Sentinel of its own (``tests.faults.SentinelSet``,
each an owned process on a free port, stopped by pid at the end). For each
broker URL (the master's ``redis://``, the Sentinel's ``sentinel://``) and
each setting (0, 1), one Flask app queues a no-op task with ``.delay()``
inside a request context, ``--calls`` times after 200 warm-up calls, over
``--rounds`` rounds; the table shows the median per call and the added cost
of waiting for the replica (``WAIT`` in the same round trip). A batch of 50
(``ext.batch()``) is measured too: one ``WAIT`` covers the whole batch.

    python -m benchmarks.replicas [--calls 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from flask import Flask

from benchmarks.common import ARGS, HEADERS, SECRET_KEY
from flask_pymacaron_async import PymacaronAsync
from tests.faults import SentinelSet


def make_app(url: str, options: dict, min_replicas: int, queue: str):
    app = Flask(f"bench_replicas_{min_replicas}_{uuid.uuid4().hex[:6]}")
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        PYMACARON_ASYNC_BROKER_URL=url,
        PYMACARON_ASYNC_BROKER_MIN_REPLICAS=min_replicas,
        CELERY={"task_default_queue": queue, "broker_transport_options": options},
    )
    ext = PymacaronAsync(app)

    @ext.task
    def noop(a, b):
        return None

    return app, ext, noop


def per_call(app, noop, calls: int) -> float:
    """Median seconds of one ``noop.delay()`` in a request context."""
    times = []
    with app.test_request_context("/queue", headers=HEADERS):
        for _ in range(200):
            noop.delay(*ARGS)
        for _ in range(calls):
            started = time.perf_counter()
            noop.delay(*ARGS)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def per_batch(app, ext, noop, batches: int, size: int = 50) -> float:
    """Median seconds of one batch of ``size`` calls."""
    times = []
    with app.test_request_context("/queue", headers=HEADERS):
        for i in range(batches + 5):
            started = time.perf_counter()
            with ext.batch():
                for _ in range(size):
                    noop.delay(*ARGS)
            if i >= 5:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="pma-bench-replicas-"))
    rows = []
    with SentinelSet(directory, replicas=1, sentinels=1) as cluster:
        master = cluster.master.client()
        brokers = {
            "redis://": (cluster.master.url, {}),
            "sentinel://": (cluster.url, cluster.transport_options),
        }
        for label, (url, options) in brokers.items():
            figures: dict[int, dict[str, list[float]]] = {0: {"call": [], "batch": []}, 1: {"call": [], "batch": []}}
            for _ in range(args.rounds):
                for replicas in (0, 1):
                    queue = f"bench-replicas-{uuid.uuid4().hex[:8]}"
                    app, ext, noop = make_app(url, options, replicas, queue)
                    figures[replicas]["call"].append(per_call(app, noop, args.calls))
                    figures[replicas]["batch"].append(per_batch(app, ext, noop, max(args.calls // 50, 20)))
                    ext.celery.close()
                    master.delete(queue)
            for replicas in (0, 1):
                call = statistics.median(figures[replicas]["call"])
                batch = statistics.median(figures[replicas]["batch"])
                rows.append((label, replicas, call, batch))
    print(f"\n{'broker':<12} {'MIN_REPLICAS':>12} {'per .delay()':>14} {'added':>10} {'batch of 50':>12} {'added':>10}")
    base: dict[str, tuple[float, float]] = {}
    for label, replicas, call, batch in rows:
        if replicas == 0:
            base[label] = (call, batch)
        added_call = call - base[label][0]
        added_batch = batch - base[label][1]
        print(
            f"{label:<12} {replicas:>12} {call * 1e6:>11.0f} µs {added_call * 1e6:>+7.0f} µs "
            f"{batch * 1e3:>9.2f} ms {added_batch * 1e3:>+7.2f} ms"
        )
    print(
        f"\n{args.rounds} rounds of {args.calls} calls; medians. "
        "Master, replica and Sentinel on this machine (loopback)."
    )


if __name__ == "__main__":
    main()
