"""Dramatiq's and Huey's workers for the worker benchmark: a no-op task and the marker, on the benchmark's Redis.

``dramatiq benchmarks.app_peers_workers`` and
``huey_consumer benchmarks.app_peers_workers.huey``; filled by
``python -m benchmarks.fill dramatiq|huey``.
"""

from __future__ import annotations

from benchmarks.common import broker_url, queue_name, record_mark

try:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
except ModuleNotFoundError:  # pragma: no cover - a peer not installed: its rows show n/a
    dramatiq = None
else:
    dramatiq.set_broker(RedisBroker(url=broker_url()))

    @dramatiq.actor(queue_name=queue_name("bench_worker_dramatiq"))
    def dramatiq_noop(a, b):
        return None

    @dramatiq.actor(queue_name=queue_name("bench_worker_dramatiq"))
    def dramatiq_mark(key):
        record_mark(key)


try:
    from huey import RedisHuey
except ModuleNotFoundError:  # pragma: no cover
    huey = None
else:
    huey = RedisHuey(queue_name("bench_worker_huey"), url=broker_url(), results=False)

    @huey.task()
    def huey_noop(a, b):
        return None

    @huey.task()
    def huey_mark(key):
        record_mark(key)
