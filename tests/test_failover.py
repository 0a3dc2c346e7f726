"""A Sentinel failover under a steady stream of tasks, measured.

A master, one replica and three Sentinels (``tests.faults.SentinelSet``), a
prefork worker, and a thread queuing a task every ~20 ms from request
contexts. The master is SIGKILLed; the Sentinels promote the replica; the old
master comes back (as its supervisor would restart it) as a replica of the
new one. The test counts the tasks queued (the call returned: the broker
acknowledged them), refused (``AsyncUnavailable``), run, run twice and lost,
and how long the web side and the worker took to recover. Every process it
starts is stopped by pid at its end.

Run with ``-s`` to see the figures; docs/workers.rst quotes them.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time

import pytest

from flask_pymacaron_async import AsyncUnavailable
from flask_pymacaron_async import _transport as transport
from tests.apps import reliable
from tests.conftest import BROKER_URL
from tests.faults import SentinelSet, unique_queue, wait_for

pytestmark = pytest.mark.slow

# Report keys under the run's prefix: the session removes them from the machine's Redis.
HA = os.environ["PMA_TEST_PREFIX"] + "-ha"
PUBLISH_TIMEOUT = 2.0
# Generous: other tests share the machine.
BOUND = PUBLISH_TIMEOUT + 3.0
VISIBILITY = 5
DOWN_AFTER_MS = 2000


class Stream(threading.Thread):
    """Queues ``count(run, n)`` for n = 1, 2, ... until stopped; records each call's outcome and duration."""

    def __init__(self, app, run: str) -> None:
        super().__init__(daemon=True)
        self.app, self.run_name = app, run
        self.stopped = threading.Event()
        self.queued: dict[int, float] = {}  # n -> when the call returned
        self.started: dict[int, float] = {}  # n -> when the call began
        self.refused: dict[int, float] = {}
        self.errors: list[BaseException] = []
        self.slowest = 0.0

    def run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            n += 1
            started = self.started[n] = time.monotonic()
            try:
                with self.app.test_request_context(f"/stream/{n}"):
                    reliable.count.delay(self.run_name, n)
            except AsyncUnavailable:
                self.refused[n] = time.monotonic()
            except Exception as exc:  # anything else is a defect: the test fails on it
                self.errors.append(exc)
            else:
                self.queued[n] = time.monotonic()
            self.slowest = max(self.slowest, time.monotonic() - started)
            time.sleep(0.02)

    def stop(self) -> None:
        self.stopped.set()
        self.join(BOUND + 5)
        assert not self.is_alive()


@pytest.mark.parametrize("min_replicas", [0, 1], ids=["min-replicas-0", "min-replicas-1"])
def test_failover_under_a_stream_of_tasks(tmp_path, start_worker, min_replicas):
    began = time.monotonic()
    # Down after 2 s without an answer: Sentinels ping every second, and a
    # shorter delay makes a busy machine fail over twice.
    cluster = SentinelSet(tmp_path / "ha", replicas=1, sentinels=3, down_after_ms=DOWN_AFTER_MS).start()
    workers = []

    def start(*args, **kwargs):
        workers.append(start_worker(*args, **kwargs))
        return workers[-1]

    try:
        figures = _failover(cluster, start, min_replicas)
    finally:
        # The worker first, while its broker answers: a warm shutdown
        # without a broker can outlast the fixture's grace period.
        for worker in workers:
            worker.stop()
        cluster.stop()
    assert not any(s.alive() for s in (*cluster.servers, *cluster.sentinels))
    figures["test_seconds"] = round(time.monotonic() - began, 1)
    print(f"\nfailover, PYMACARON_ASYNC_BROKER_MIN_REPLICAS={min_replicas}: {json.dumps(figures)}")
    assert figures["test_seconds"] < 60


def _named(sentinel, name: str):
    try:
        return sentinel.client().sentinel_get_master_addr_by_name(name)
    except Exception as exc:  # reported, not raised: this is a diagnostic
        return repr(exc)


def _failover(cluster: SentinelSet, start_worker, min_replicas: int) -> dict:
    queue = unique_queue()
    run = f"failover-{queue[-10:]}"
    options = cluster.transport_options
    app = reliable.create_app(
        broker=cluster.url,
        queue=queue,
        visibility=VISIBILITY,
        prefix=HA,
        reports=BROKER_URL,
        transport_options=options,
        PYMACARON_ASYNC_PUBLISH_TIMEOUT=PUBLISH_TIMEOUT,
        PYMACARON_ASYNC_BROKER_MIN_REPLICAS=min_replicas,
    )
    env = {
        "PMA_REL_BROKER_URL": cluster.url,
        "PMA_REL_QUEUE": queue,
        "PMA_REL_PREFIX": HA,
        "PMA_REL_VISIBILITY": str(VISIBILITY),
        "PMA_REL_REPORT_URL": BROKER_URL,
        "PMA_REL_TRANSPORT_OPTIONS": json.dumps(options),
    }
    worker = start_worker("tests.apps.reliable:celery", "--pool=prefork", "-c", "2", env=env, queue=queue)
    with app.app_context():
        reports = reliable.client()
    done_key, runs_key = f"{HA}:{run}:done", f"{HA}:{run}:runs"

    def ran() -> set[int]:
        return {int(n) for n in reports.smembers(done_key)}

    stream = Stream(app, run)
    stream.start()
    try:
        wait_for(lambda: len(ran()) >= 50, 20, what="a steady stream running")
        old = cluster.master
        killed = time.monotonic()
        old.kill()
        # A call that began after this went to no process of the old master.
        gone = time.monotonic()
        new_port = wait_for(
            lambda: (port := cluster.master_port()) not in (None, old.port) and port, 20, what="a new master"
        )
        promoted = time.monotonic()
        # Its supervisor restarts the old master; it comes back as a replica
        # of the new one, once every Sentinel knows of the new one.
        wait_for(lambda: cluster.agreed_master_port() == new_port, 10, what="the Sentinels agreeing")
        old.replica_of = new_port
        old.start()

        def first_after_kill() -> int | None:
            return min((n for n in stream.queued if stream.started[n] > gone), default=None)

        first_queued = wait_for(first_after_kill, 20, what="a task queued after the kill")
        published_again = stream.queued[first_queued]
        try:
            wait_for(lambda: first_queued in ran(), 30, what="the worker running tasks queued after the failover")
        except AssertionError:
            # Celery's worker dumps the stack of each thread on SIGUSR1.
            os.kill(worker.pid, signal.SIGUSR1)
            time.sleep(1)
            print("".join(worker.log().splitlines(keepends=True)[-150:]))
            print("sentinels:", [_named(s, cluster.master_name) for s in cluster.sentinels])
            raise
        worker_again = time.monotonic()
        time.sleep(2)  # the stream goes on on the new master
    finally:
        stream.stop()
    assert not stream.errors, stream.errors
    new = cluster.server_on(new_port).client()
    # Everything the new master has is run, or comes back after the visibility timeout and is run.
    wait_for(
        lambda: new.llen(queue) == 0 and new.hlen("unacked") == 0,
        VISIBILITY + 20,
        interval=0.2,
        what="the queue drained and nothing unacknowledged",
    )
    time.sleep(1)  # the last acknowledged tasks write their reports
    assert worker.alive() and "Unrecoverable error" not in worker.log()
    # Reconnected through the extension's transport, not kombu's own Sentinel
    # transport, on both sides.
    assert "Connected to sentinel://" not in worker.log()
    with app.extensions["pymacaron_async"].celery.producer_or_acquire() as producer:
        assert producer.connection.transport_cls == transport.SENTINEL_TRANSPORT
    runs = collections.Counter(int(n) for n in reports.lrange(runs_key, 0, -1))
    queued, refused = set(stream.queued), set(stream.refused)
    lost = sorted(queued - set(runs))
    figures = {
        "calls": len(queued) + len(refused),
        "queued": len(queued),
        "refused": len(refused),
        "refused_but_ran": len(refused & set(runs)),
        "run": len(set(runs) & queued),
        "run_twice": sum(1 for n, c in runs.items() if c > 1),
        "lost": len(lost),
        "lost_queued_ms_before_kill": [round((killed - stream.queued[n]) * 1000) for n in lost],
        "promoted_after_s": round(promoted - killed, 2),
        "publishing_again_after_s": round(published_again - killed, 2),
        "worker_running_again_after_s": round(worker_again - killed, 2),
        "slowest_call_s": round(stream.slowest, 2),
    }
    # The web side never hangs: each call queues or raises within the publish timeout.
    assert stream.slowest < BOUND, figures
    # What was queued after the failover is never lost; with a replica's
    # acknowledgement, nothing queued is lost at all.
    assert all(stream.started[n] < gone for n in lost), figures
    if min_replicas:
        assert not lost, figures
    # At-least-once, never more than twice here.
    assert max(runs.values()) <= 2, figures
    return figures
