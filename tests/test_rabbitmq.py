"""The same guarantees on RabbitMQ: refused and failed messages kept in a dead-letter queue, requeued, deferred.

The machine's RabbitMQ (guest/guest), on a vhost of this test run when
rabbitmqctl can make one (see the ``rabbitmq_url`` fixture); real `celery
worker` processes of tests/apps/reliable.py. Tasks write their reports to
the test run's Redis, under a key prefix of their own.
"""

from __future__ import annotations

import bz2
import copy
import json
import os
import time
import uuid

import pytest
from kombu import Connection

from flask_pymacaron_async import _context as context
from flask_pymacaron_async import _deadletter as deadletter
from flask_pymacaron_async import serialization
from tests.apps import reliable
from tests.faults import cli as _cli
from tests.faults import listed_dead as _dead
from tests.faults import unique_queue, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def amqp(rabbitmq_url, broker_url, start_worker, unique):
    """A queue on RabbitMQ, the web app publishing to it, and a way to start its workers."""
    queue = unique_queue()
    prefix = f"{os.environ['PMA_TEST_PREFIX']}-{unique}"  # the run's prefix: tests/conftest.py's cleanup removes it

    def env(**extra: str) -> dict[str, str]:
        return {
            "PMA_REL_BROKER_URL": rabbitmq_url,
            "PMA_REL_QUEUE": queue,
            "PMA_REL_PREFIX": prefix,
            "PMA_REL_REPORT_URL": broker_url,
            **extra,
        }

    def worker(**variables: str):
        return start_worker("tests.apps.reliable:celery", "--pool=solo", env=env(**variables), queue=queue)

    def app(**config):
        return reliable.create_app(broker=rabbitmq_url, queue=queue, prefix=prefix, reports=broker_url, **config)

    yield queue, prefix, app, worker
    with Connection(rabbitmq_url) as connection:
        channel = connection.channel()
        for name in (queue, queue + deadletter.SUFFIX, queue + deadletter.DEFERRED_SUFFIX):
            try:
                channel.queue_delete(name)
            except Exception:  # not declared by this test; its channel is closed by the broker
                channel = connection.channel()


def test_a_failed_task_is_kept_and_runs_once_when_requeued(amqp, redis_client):
    queue, prefix, make_app, start = amqp
    app = make_app()
    start()
    with app.test_request_context("/fail"):
        result = reliable.fails_until_allowed.delay("amqp")
    wait_for(lambda: _dead(app), 20, what="the failed task in the dead-letter queue")
    (letter,) = _dead(app)
    assert letter["id"] == result.id and letter["kind"] == "failed" and letter["exception"] == "RuntimeError"
    assert letter["queue"] == queue and "not allowed yet" in letter["reason"]
    # Listing does not take them away.
    assert len(_dead(app)) == 1
    status = json.loads(_cli(app, "status", "--json").output)
    assert status["dead_letters"][queue] == 1

    redis_client.set(f"{prefix}:amqp:allow", 1)
    requeued = _cli(app, "requeue", "--all")
    assert requeued.exit_code == 0 and f"Requeued {result.id}" in requeued.output
    wait_for(lambda: redis_client.sismember(f"{prefix}:amqp:done", 1), 20, what="the requeued task")
    time.sleep(1)
    assert redis_client.llen(f"{prefix}:amqp:runs") == 2
    assert _dead(app) == []


def test_a_forged_context_is_refused_kept_and_purged(amqp, redis_client, rabbitmq_url):
    queue, prefix, make_app, start = amqp
    app = make_app()
    worker = start()
    # Alice's honest header, taken from a real message, on a message of mallory's.
    with app.test_request_context("/alice"):
        reliable.count.delay("alice", 1)
    with Connection(rabbitmq_url) as connection:
        wait_for(lambda: redis_client.sismember(f"{prefix}:alice:done", 1), 20, what="alice's task")
        worker.stop()
        with app.test_request_context("/alice"):
            reliable.count.delay("alice", 2)
        message = connection.default_channel.basic_get(queue, no_ack=True)
        headers = dict(message.headers)
        forged = copy.deepcopy(headers)
        forged["id"] = str(uuid.uuid4())
        honest = message.body if isinstance(message.body, bytes) else message.body.encode()
        body = honest.replace(b'"alice",2', b'"mallory",666')
        assert body != honest
        producer = connection.Producer()
        for h, b in ((forged, body), (headers, honest)):
            producer.publish(
                b,
                routing_key=queue,
                headers=h,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
            )
    worker = start()
    wait_for(lambda: redis_client.sismember(f"{prefix}:alice:done", 2), 20, what="alice's second task")
    wait_for(lambda: _dead(app), 20, what="the forged message kept")
    (letter,) = _dead(app)
    assert letter["task_id"] == forged["id"] and "does not match this message" in letter["reason"]
    assert not redis_client.exists(f"{prefix}:mallory:done")
    assert "Rejected task tests.apps.reliable.count" in worker.log()
    purged = _cli(app, "dead", "--purge", "--yes")
    assert purged.exit_code == 0 and "Deleted 1 dead letter." in purged.output
    assert _dead(app) == []


def test_a_task_an_old_worker_does_not_know_waits_for_a_new_worker(amqp, redis_client):
    queue, prefix, make_app, start = amqp
    app = make_app()
    old = start(PMA_REL_VERSION="1")
    with app.test_request_context("/deploy"):
        reliable.added_in_v2.delay("deploy", 1)
    wait_for(lambda: "Deferred task tests.apps.reliable.added_in_v2" in old.log(), 20, what="the old worker deferring")
    start()
    old.stop()
    wait_for(lambda: redis_client.sismember(f"{prefix}:deploy:done", 1), 45, what="the new worker running it")
    time.sleep(1)
    assert redis_client.llen(f"{prefix}:deploy:runs") == 1
    assert _dead(app) == []


def test_an_unreadable_body_is_kept_never_decoded(amqp, rabbitmq_url, tmp_path):
    """A pickle is refused for its content type, and kept: the worker never unpickles it."""
    queue, prefix, make_app, start = amqp
    app = make_app()
    worker = start()
    with Connection(rabbitmq_url) as connection:
        connection.Producer().publish(
            b"\x80\x04K\x01.",
            routing_key=queue,
            headers={"task": "tests.apps.reliable.count", "id": "pickled", context.HEADER: "x.y"},
            content_type="application/x-python-serialize",
            content_encoding="binary",
            declare=[],
        )
    wait_for(lambda: _dead(app), 20, what="the pickle kept")
    (letter,) = _dead(app)
    assert letter["id"] == "pickled" and "is not accepted" in letter["reason"]
    assert worker.alive()


def test_a_compressed_body_is_bounded_and_an_undecodable_one_kept(amqp, rabbitmq_url):
    """A bz2 bomb and a body that is not what its compression header says: dead letters, logged without headers."""
    queue, prefix, make_app, start = amqp
    app = make_app()
    worker = start()
    compressor = bz2.BZ2Compressor(9)
    bomb = b"".join([*(compressor.compress(b"\0" * (1 << 20)) for _ in range(256)), compressor.flush()])
    with Connection(rabbitmq_url) as connection:
        for task_id, body in (("bomb", bomb), ("mismatch", b'[["x", 1], {}, {}]')):
            connection.Producer().publish(
                body,
                routing_key=queue,
                headers={
                    "task": "tests.apps.reliable.count",
                    "id": task_id,
                    context.HEADER: "secret-context-token.sig",
                    "compression": "application/x-bz2",
                },
                content_type=serialization.CONTENT_TYPE,
                content_encoding="utf-8",
                declare=[],
            )
    wait_for(lambda: len(_dead(app)) == 2, 20, what="both kept")
    reasons = {letter["id"]: letter["reason"] for letter in _dead(app)}
    assert "inflates past" in reasons["bomb"]
    assert "cannot be decoded" in reasons["mismatch"]
    assert worker.alive()
    assert "secret-context-token" not in worker.log()
    assert "Can't decode message body" not in worker.log()
