"""RabbitMQ quorum queues (``task_default_queue_type = "quorum"``, Celery 5.5+): the same guarantees.

The machine's RabbitMQ, on the run's vhost (see the ``rabbitmq_url``
fixture); real `celery worker` processes of tests/apps/reliable.py, reporting
to the run's Redis. Each test has its own queue, deleted at its end with its
dead letters. tests/test_rabbitmq.py runs the same app on classic queues.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import celery
import pytest
from kombu import Connection, Queue

from flask_pymacaron_async import _amqp as amqp
from flask_pymacaron_async import _deadletter as deadletter
from flask_pymacaron_async.errors import ConfigError
from tests.apps import reliable
from tests.faults import cli as _cli
from tests.faults import kill_tree, unique_queue, wait_for
from tests.faults import listed_dead as _dead

QUORUM = {"task_default_queue_type": "quorum"}


@pytest.fixture
def quorum(rabbitmq_url, broker_url, start_worker, unique):
    """A quorum queue on RabbitMQ, the web app publishing to it, and a way to start its workers."""
    version = tuple(int(p) for p in celery.__version__.split(".")[:2])
    if version < (5, 5):
        pytest.skip(
            f"quorum queues need Celery 5.5+ (task_default_queue_type); this environment has {celery.__version__}"
        )
    queue = unique_queue()
    prefix = f"{os.environ['PMA_TEST_PREFIX']}-{unique}"

    def worker(*extra: str, **config):
        env = {
            "PMA_REL_BROKER_URL": rabbitmq_url,
            "PMA_REL_QUEUE": queue,
            "PMA_REL_PREFIX": prefix,
            "PMA_REL_REPORT_URL": broker_url,
            "PMA_REL_GRACE": "0",
            "PMA_REL_CELERY": json.dumps(QUORUM),
            "PMA_REL_CONFIG": json.dumps(config),
        }
        return start_worker("tests.apps.reliable:celery", *(extra or ("--pool=solo",)), env=env, queue=queue)

    def app(**config):
        return reliable.create_app(
            broker=rabbitmq_url, queue=queue, prefix=prefix, reports=broker_url, celery=QUORUM, **config
        )

    yield queue, prefix, app, worker
    with Connection(rabbitmq_url) as connection:
        for name in (queue, queue + deadletter.SUFFIX, queue + deadletter.DEFERRED_SUFFIX):
            channel = connection.channel()
            try:
                channel.queue_delete(name)
            except Exception:  # not declared by this test; the broker closed the channel
                pass


def _queues(rabbitmq_url: str) -> dict[str, tuple[str, str]]:
    """name -> (type, arguments) of the queues of the test's vhost, as RabbitMQ lists them."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.skip("rabbitmqctl is needed to read a queue's type")
    vhost = rabbitmq_url.rsplit("/", 1)[1] or "/"
    out = subprocess.run(
        [ctl, "list_queues", "-q", "-p", vhost, "name", "type", "arguments"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            found[parts[0]] = (parts[1], parts[2])
    return found


def test_quorum_queues_get_a_delivery_limit_and_a_dead_letter_route():
    """Any Celery version: a queue declared as a quorum queue in ``task_queues``."""
    app = reliable.create_app(
        queue="plain",
        celery={
            "task_queues": [
                Queue("mail", queue_arguments={"x-queue-type": "quorum"}),
                Queue("plain"),
                Queue("own", queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": 5}),
            ]
        },
        PYMACARON_ASYNC_DELIVERY_LIMIT=7,
    )
    queues = app.extensions["pymacaron_async"].celery.amqp.queues
    assert queues["mail"].queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 7,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "mail" + deadletter.SUFFIX,
    }
    assert not queues["plain"].queue_arguments
    assert queues["own"].queue_arguments["x-delivery-limit"] == 5
    for value in (0, -1, True, "20"):
        with pytest.raises(ConfigError, match="PYMACARON_ASYNC_DELIVERY_LIMIT"):
            reliable.create_app(queue="q", PYMACARON_ASYNC_DELIVERY_LIMIT=value)


@pytest.mark.slow
def test_quorum_queue_with_its_delivery_limit_and_dead_letters(quorum, rabbitmq_url, redis_client):
    queue, prefix, make_app, start = quorum
    app = make_app()
    (declared,) = app.extensions["pymacaron_async"].celery.amqp.queues.values()
    assert declared.queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": amqp.DELIVERY_LIMIT,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue + deadletter.SUFFIX,
    }
    start()
    with app.test_request_context("/quorum"):
        reliable.count.delay("quorum", 1)
    wait_for(lambda: redis_client.sismember(f"{prefix}:quorum:done", 1), 20, what="the task on a quorum queue")
    queues = _queues(rabbitmq_url)
    assert queues[queue][0] == "quorum" and "x-delivery-limit" in queues[queue][1]
    # Declared by the worker before anything can be dead-lettered into it.
    assert queues[queue + deadletter.SUFFIX][0] == "quorum"


@pytest.mark.slow
def test_a_worker_killed_mid_task_loses_nothing(quorum, redis_client):
    queue, prefix, make_app, start = quorum
    app = make_app()
    worker = start("--pool=prefork", "-c", "1")
    with app.test_request_context("/long"):
        reliable.long.delay("killed", 2)
    wait_for(lambda: redis_client.llen(f"{prefix}:killed:started") == 1, 20, what="the task started")
    kill_tree(worker)
    start("--pool=prefork", "-c", "1")
    wait_for(lambda: redis_client.llen(f"{prefix}:killed:done") == 1, 30, what="the task run again to its end")
    assert redis_client.llen(f"{prefix}:killed:started") == 2
    assert _dead(app) == []


@pytest.mark.slow
def test_garbage_is_set_aside_not_redelivered(quorum, rabbitmq_url, redis_client):
    queue, prefix, make_app, start = quorum
    app = make_app()
    worker = start()
    with Connection(rabbitmq_url) as connection:
        producer = connection.Producer()
        producer.publish(b"{not json", routing_key=queue, content_type="application/json", headers={}, declare=[])
        producer.publish(
            b"\x80\x04K\x01.",
            routing_key=queue,
            headers={"task": "tests.apps.reliable.count", "id": "pickled"},
            content_type="application/x-python-serialize",
            content_encoding="binary",
            declare=[],
        )
    with app.test_request_context("/after"):
        reliable.count.delay("garbage", 1)
    wait_for(lambda: redis_client.sismember(f"{prefix}:garbage:done", 1), 20, what="the task after the garbage")
    wait_for(lambda: len(_dead(app)) == 2, 20, what="both kept as dead letters")
    assert worker.alive() and "Unrecoverable error" not in worker.log()
    time.sleep(1)
    with Connection(rabbitmq_url) as connection:
        # Taken once: nothing back on the queue, nothing unacknowledged.
        assert connection.default_channel.queue_declare(queue, passive=True).message_count == 0
    assert worker.log().count("kept as dead letter") == 2


@pytest.mark.slow
def test_a_message_that_kills_its_worker_ends_in_the_dead_letters(quorum, redis_client):
    """A poison message: each delivery kills the pool process; past the delivery limit RabbitMQ sets it aside."""
    queue, prefix, make_app, start = quorum
    limit = 2
    app = make_app(PYMACARON_ASYNC_DELIVERY_LIMIT=limit)
    worker = start("--pool=prefork", "-c", "1", PYMACARON_ASYNC_DELIVERY_LIMIT=limit)
    with app.test_request_context("/poison"):
        result = reliable.crash.delay("poison")
    wait_for(lambda: _dead(app), 60, what="the poison message in the dead letters")
    (letter,) = _dead(app)
    assert letter["task_id"] == result.id and letter["task"] == "tests.apps.reliable.crash"
    assert "delivered too many times" in letter["reason"]
    # The first delivery and `limit` more, then never again.
    runs = redis_client.llen(f"{prefix}:poison:runs")
    assert runs == limit + 1
    time.sleep(2)
    assert redis_client.llen(f"{prefix}:poison:runs") == runs
    assert worker.alive()
    # Back from the dead letters, it is a new message: delivered again (and set aside again).
    assert _cli(app, "dead", "--purge", "--yes").exit_code == 0
