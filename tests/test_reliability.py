"""At-least-once: no task is lost when a worker dies, stops or loses Redis.

Each test owns a redis-server (append-only file, so a restart keeps what
Redis acknowledged), a queue and real `celery worker` processes (prefork pool),
and kills or stops them by pid. Tasks record their number in a Redis set
(``done``) and a list (``runs``, one entry per execution); ``lost`` is what
was queued and never ran, ``duplicates`` what ran more than once. A test that
stops the broker's Redis has its tasks record in a second one that stays up.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.apps import reliable
from tests.faults import RedisServer, children, kill_tree, unique_queue, wait_for

pytestmark = pytest.mark.slow

TASKS = 200
# Short, so a task held by a worker killed with SIGKILL comes back quickly.
VISIBILITY = 3


@pytest.fixture
def server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def reports(tmp_path):
    """A second redis-server for what the tasks record, never stopped by the test."""
    server = RedisServer(tmp_path / "reports").start()
    yield server
    server.stop()


def _rig(server, start_worker, reports_url: str):
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, visibility=VISIBILITY, prefix="rel", reports=reports_url)
    env = {
        "PMA_REL_BROKER_URL": server.url,
        "PMA_REL_QUEUE": queue,
        "PMA_REL_VISIBILITY": str(VISIBILITY),
        "PMA_REL_PREFIX": "rel",
        "PMA_REL_REPORT_URL": reports_url,
    }

    def worker(*extra: str):
        return start_worker(
            "tests.apps.reliable:celery", *(extra or ("--pool=prefork", "-c", "2")), env=env, queue=queue
        )

    return app, queue, worker


@pytest.fixture
def setup(server, start_worker):
    """The queue, the app that publishes to it, and a way to start its workers."""
    return _rig(server, start_worker, server.url)


def _queue_work(app, run: str, count: int) -> set[int]:
    with app.test_request_context(f"/runs/{run}"):
        for n in range(count):
            reliable.work.delay(run, n, 20 + (n * 7) % 31)  # 20 to 50 ms
    return set(range(count))


def _figures(client, run: str, queued: set[int]) -> dict[str, int]:
    done = {int(n) for n in client.smembers(f"rel:{run}:done")}
    runs = client.llen(f"rel:{run}:runs")
    return {"queued": len(queued), "executed": len(done), "lost": len(queued - done), "duplicates": runs - len(done)}


def _started(client, run: str) -> int:
    return client.llen(f"rel:{run}:started")


def _running_pid(client, run: str) -> int:
    return json.loads(client.lindex(f"rel:{run}:started", -1))[1]


def test_pool_child_killed_loses_no_task(setup, server):
    """(a) SIGKILL a pool child mid-task: Celery sees the worker lost and requeues its task."""
    app, queue, start = setup
    worker = start()
    client = server.client()
    queued = _queue_work(app, "child", TASKS)
    killed = []
    for threshold in (40, 120):
        wait_for(lambda: _started(client, "child") >= threshold, 60, what=f"{threshold} tasks started")  # noqa: B023
        pid = _running_pid(client, "child")
        assert pid in children(worker.pid)
        unacked = client.hlen("unacked")
        signal_sent = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        killed.append((pid, unacked))
    wait_for(lambda: client.scard("rel:child:done") >= TASKS, 60, what="every task done")
    recovered = time.monotonic() - signal_sent
    figures = _figures(client, "child", queued)
    print(
        f"\npool child SIGKILL x{len(killed)}: {figures}, unacked at kill {[u for _, u in killed]}, "
        f"all done {recovered:.1f}s after the last kill"
    )
    assert figures["lost"] == 0
    assert worker.alive()
    # Prefetch does not hoard: the worker holds what its 2 processes run, and
    # what they just finished and is being acknowledged, never the queue.
    assert all(unacked <= 4 for _, unacked in killed)
    assert "exited with 'signal 9 (SIGKILL)'" in worker.log() or "signal 9" in worker.log()
    wait_for(lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0, 15, what="nothing left unacked")


def test_whole_worker_killed_loses_no_task(setup, server):
    """(b) SIGKILL the worker and its pool mid-run, twice, starting a new one each time: all run."""
    app, queue, start = setup
    client = server.client()
    queued = _queue_work(app, "whole", TASKS)
    held = []
    for threshold in (40, 110):
        worker = start()
        wait_for(lambda: _started(client, "whole") >= threshold, 60, what=f"{threshold} tasks started")  # noqa: B023
        held.append(client.hlen("unacked"))
        kill_tree(worker)
        killed_at = time.monotonic()
    # What the dead workers held waits in Redis for the visibility timeout.
    assert client.hlen("unacked") >= 1
    last = start()
    wait_for(lambda: client.scard("rel:whole:done") >= TASKS, 90, what="every task done")
    recovered = time.monotonic() - killed_at
    figures = _figures(client, "whole", queued)
    print(
        f"\nwhole worker SIGKILL x2: {figures}, unacked at kills {held}, all done {recovered:.1f}s after the last kill"
    )
    assert figures["lost"] == 0
    assert last.alive()
    wait_for(lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0, 15, what="nothing left unacked")


def test_sigterm_finishes_the_running_task(setup, server):
    """Warm shutdown: SIGTERM lets the running task finish; what was not started stays queued."""
    app, queue, start = setup
    worker = start("--pool=prefork", "-c", "1")
    client = server.client()
    with app.test_request_context("/warm"):
        reliable.long.delay("warm", 2)
        for n in range(3):
            reliable.work.delay("warm-after", n, 0)
    wait_for(lambda: client.llen("rel:warm:started"), 15, what="the long task started")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 0
    assert client.llen("rel:warm:done") == 1, worker.log()
    assert "Warm shutdown" in worker.log()
    # Not lost: the tasks it had not started are in the queue, nothing is left unacked.
    ran = client.scard("rel:warm-after:done")
    assert client.llen(queue) + ran == 3
    assert client.hlen("unacked") == 0


# Celery retries the broker after 0, 2 and 6 s: a 0.5 s outage has the worker
# back before the visibility timeout, so the late acks of the tasks that ran
# through it reach the restarted Redis; a 4 s one has their messages restored
# and run again first.
@pytest.mark.parametrize("outage", [0.5, 4], ids=["back-within-visibility", "back-after-visibility"])
def test_redis_restart_under_a_running_worker(server, reports, start_worker, outage):
    """Redis stops mid-run and comes back: the worker reconnects and every queued task runs."""
    app, queue, start = _rig(server, start_worker, reports.url)
    worker = start()
    client = reports.client()
    queued = _queue_work(app, "restart", 100)
    wait_for(lambda: _started(client, "restart") >= 30, 60, what="30 tasks started")
    server.stop()
    stopped_at = time.monotonic()
    time.sleep(outage)
    server.start()
    wait_for(lambda: client.scard("rel:restart:done") >= 100, 90, what="every task done")
    recovered = time.monotonic() - stopped_at
    figures = _figures(client, "restart", queued)
    print(f"\nredis restart ({outage}s outage): {figures}, all done {recovered:.1f}s after the stop")
    assert figures["lost"] == 0
    # The tasks running at the stop finished: none failed on its way.
    assert client.llen("rel:failed") == 0
    assert worker.alive()
    # It goes on consuming new work.
    with app.test_request_context("/after"):
        reliable.work.delay("after-restart", 1, 0)
    wait_for(lambda: client.sismember("rel:after-restart:done", 1), 30, what="a task queued after the restart")
    broker = server.client()
    wait_for(lambda: broker.llen(queue) == 0 and broker.hlen("unacked") == 0, 15, what="nothing left unacked")
