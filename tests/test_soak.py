"""Load: 4 client threads queue 5,000 tasks through the Flask endpoint while a worker runs them.

Every task runs exactly once (count and ids), the whole run stays within 60 s,
and the worker's memory (main process and pool) stays flat.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.apps import reliable
from tests.faults import RedisServer, rss_kib, unique_queue, wait_for

pytestmark = pytest.mark.slow

TASKS = 5000
THREADS = 4
WARMUP = 300
# Worker RSS (main process + 4 pool processes) may grow this much over the run.
RSS_BOUND_KIB = 20 * 1024


@pytest.fixture
def server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def _post_all(app, run: str, ids: list[int], errors: list) -> None:
    web = app.test_client()
    for n in ids:
        response = web.post(f"/queue/{run}/{n}")
        if response.status_code != 200:
            errors.append((n, response.status_code))


def test_soak_5000_tasks_through_the_endpoint(server, start_worker):
    started = time.monotonic()
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, prefix="soak")
    env = {"PMA_REL_BROKER_URL": server.url, "PMA_REL_QUEUE": queue, "PMA_REL_PREFIX": "soak"}
    worker = start_worker("tests.apps.reliable:celery", "--pool=prefork", "-c", "4", env=env, queue=queue)
    client = server.client()

    # Warm up the pool, then take the reference memory figure.
    errors: list = []
    _post_all(app, "warmup", list(range(WARMUP)), errors)
    wait_for(lambda: client.scard("soak:warmup:done") >= WARMUP, 30, what="the warm-up tasks")
    rss_before = rss_kib(worker.pid)

    ids = list(range(TASKS))
    threads = [threading.Thread(target=_post_all, args=(app, "soak", ids[i::THREADS], errors)) for i in range(THREADS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    queued_in = time.monotonic() - t0
    assert not errors
    wait_for(
        lambda: client.scard("soak:soak:done") >= TASKS, max(5, 55 - (time.monotonic() - started)), 0.2, "all done"
    )
    ran_in = time.monotonic() - t0
    time.sleep(0.5)
    rss_after = rss_kib(worker.pid)

    done = {int(n) for n in client.smembers("soak:soak:done")}
    runs = client.llen("soak:soak:runs")
    print(
        f"\nsoak: {TASKS} tasks from {THREADS} threads queued in {queued_in:.1f}s ({TASKS / queued_in:.0f}/s), "
        f"all run in {ran_in:.1f}s ({TASKS / ran_in:.0f}/s); worker RSS {rss_before // 1024} MiB -> "
        f"{rss_after // 1024} MiB ({(rss_after - rss_before) / 1024:+.1f} MiB)"
    )
    assert done == set(ids)
    assert runs == TASKS  # exactly once
    assert client.llen(queue) == 0 and client.hlen("unacked") == 0
    assert rss_after - rss_before < RSS_BOUND_KIB
    assert worker.alive()
    assert time.monotonic() - started < 60
