"""Redis behind Sentinel (``sentinel://``) gets every guarantee ``redis://`` has.

Real processes: a master, a replica and a Sentinel (``redis-server --sentinel``)
this module owns on free ports (``tests.faults.SentinelSet``), real
``celery worker`` processes. Tasks write their reports to the run's Redis, not
to the Sentinel-managed one.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from kombu import Connection
from kombu.transport import redis as kombu_redis

from flask_pymacaron_async import AsyncUnavailable
from flask_pymacaron_async import _transport as transport
from flask_pymacaron_async._compat import KombuRedisChannel
from flask_pymacaron_async.errors import ConfigError
from tests.apps import reliable
from tests.conftest import BROKER_URL
from tests.faults import RedisServer, SentinelSet, free_port, kill_tree, unique_queue, wait_for
from tests.faults import cli as _cli

# PYMACARON_ASYNC_PUBLISH_TIMEOUT is 2 s by default; generous: other tests share the machine.
# Report keys under the run's prefix: the session removes them from the machine's Redis.
SENT = os.environ["PMA_TEST_PREFIX"] + "-sent"
BOUND = 2.0 + 3.0
VISIBILITY = 3


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory):
    cluster = SentinelSet(tmp_path_factory.mktemp("sentinel"), replicas=1, sentinels=1).start()
    yield cluster
    cluster.stop()
    assert not any(s.alive() for s in (*cluster.servers, *cluster.sentinels))


@pytest.fixture
def deploy(sentinels, start_worker):
    """A queue on the Sentinel-managed Redis, the web app publishing to it, and a way to start its workers."""
    queue = unique_queue()
    options = sentinels.transport_options

    def app(**config):
        return reliable.create_app(
            broker=sentinels.url,
            queue=queue,
            visibility=VISIBILITY,
            prefix=SENT,
            reports=BROKER_URL,
            transport_options=options,
            **config,
        )

    def worker(*extra: str):
        env = {
            "PMA_REL_BROKER_URL": sentinels.url,
            "PMA_REL_QUEUE": queue,
            "PMA_REL_PREFIX": SENT,
            "PMA_REL_VISIBILITY": str(VISIBILITY),
            "PMA_REL_REPORT_URL": BROKER_URL,
            "PMA_REL_TRANSPORT_OPTIONS": json.dumps(options),
            "PMA_REL_GRACE": "0",
        }
        return start_worker("tests.apps.reliable:celery", *(extra or ("--pool=solo",)), env=env, queue=queue)

    yield queue, app, worker
    client = sentinels.master.client()
    keys = list(client.scan_iter(f"{queue}*")) + list(client.scan_iter(f"_kombu.binding*{queue}*"))
    if keys:
        client.delete(*keys)


# -- the same transport -------------------------------------------------------------


def test_sentinel_urls_get_the_guarded_transport(sentinels):
    app = reliable.create_app(broker=sentinels.url, queue=unique_queue(), transport_options=sentinels.transport_options)
    conf = app.extensions["pymacaron_async"].celery.conf
    assert conf.broker_transport == transport.SENTINEL_TRANSPORT
    assert conf.worker_consumer == transport.CONSUMER
    options = conf.broker_transport_options
    # The app's master_name adds to the extension's options, it does not replace them.
    assert options["master_name"] == sentinels.master_name
    assert options["socket_timeout"] == 2.0 and options["visibility_timeout"] == 3600
    assert options["sentinel_kwargs"] == {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    several = reliable.create_app(broker="sentinel://127.0.0.1:1;sentinel://127.0.0.1:2", queue="q")
    assert several.extensions["pymacaron_async"].celery.conf.broker_transport == transport.SENTINEL_TRANSPORT
    # A failover list of plain Redis URLs is kombu's business.
    failover = reliable.create_app(broker="redis://127.0.0.1:1;redis://127.0.0.1:2", queue="q")
    assert failover.extensions["pymacaron_async"].celery.conf.broker_transport is None


def test_one_implementation_serves_redis_and_sentinel():
    channel = transport.SentinelChannel
    assert issubclass(channel, transport.Channel) and issubclass(channel, kombu_redis.SentinelChannel)
    mro = channel.__mro__
    assert mro.index(KombuRedisChannel) < mro.index(kombu_redis.SentinelChannel)
    # kombu's Sentinel channel changes how the pool is made, never a hook the extension overrides.
    for hook in KombuRedisChannel.HOOKS:
        assert hook not in vars(kombu_redis.SentinelChannel), hook
        assert getattr(channel, hook) is getattr(KombuRedisChannel, hook)
    # Its own: the options of both, redis-py's Sentinel-managed connections,
    # and closing the connections to the Sentinels (kombu < 5.7 leaves them open).
    own = set(vars(channel)) - {"__module__", "__doc__", "__qualname__", "__firstlineno__", "__static_attributes__"}
    assert own == {
        "from_transport_options",
        "connection_class",
        "connection_class_ssl",
        "__init__",
        "make_pool",
        "close",
        "_pma_close_sentinels",
    }
    assert channel.connection_class is kombu_redis.SentinelChannel.connection_class
    assert transport.Channel.connection_class.__name__ == "MasterConnection"
    assert "master_name" in channel.from_transport_options and "min_replicas" in channel.from_transport_options
    assert transport.SentinelTransport.Channel is channel and transport.SentinelTransport.default_port == 26379


def test_a_connection_keeps_the_transport_when_it_moves_to_the_next_sentinel():
    """kombu takes the transport from the next URL's scheme; the app's connections keep theirs."""
    app = reliable.create_app(
        broker="sentinel://127.0.0.1:1;sentinel://127.0.0.1:2;sentinel://127.0.0.1:3",
        queue="q",
        transport_options={"master_name": "m"},
    )
    celery = app.extensions["pymacaron_async"].celery
    with celery.connection_for_write() as connection:
        assert connection.transport_cls == transport.SENTINEL_TRANSPORT
        connection.switch("sentinel://127.0.0.1:2")
        assert connection.transport_cls == transport.SENTINEL_TRANSPORT
        assert (connection.hostname, connection.port) == ("127.0.0.1", 2)
        assert connection.transport.Channel is transport.SentinelChannel
    # And so do the connections of the producer pool the web side publishes with.
    with celery.pool.acquire() as pooled:
        pooled.switch("sentinel://127.0.0.1:3")
        assert pooled.transport_cls == transport.SENTINEL_TRANSPORT
    # A connection given no transport is kombu's own.
    with Connection("redis://127.0.0.1:1;redis://127.0.0.1:2") as plain:
        plain.switch("redis://127.0.0.1:2")
        assert plain.transport_cls == "redis"


# -- a worker on Sentinel -------------------------------------------------------------


def _garbage(template: dict) -> dict[str, bytes]:
    no_properties = dict(template)
    no_properties.pop("properties")
    return {
        "not-utf8": b"\xff\xfe\x00garbage",
        "not-json": b"{not json",
        "json-number": b"42",
        "no-properties": json.dumps(no_properties).encode(),
    }


def test_garbage_is_dead_lettered_and_the_worker_goes_on(deploy, sentinels):
    queue, make_app, start = deploy
    app = make_app()
    master = sentinels.master.client()
    with app.test_request_context("/template"):
        reliable.count.delay("sent-template", 0)
    template = json.loads(master.rpop(queue))
    worker = start("--pool=prefork", "-c", "1")
    items = _garbage(template)
    for item in items.values():
        master.lpush(queue, item)
    run = f"sent-{time.monotonic_ns()}"
    with app.test_request_context("/after"):
        reliable.count.delay(run, 1)
    reports = reliable_reports(app)
    wait_for(lambda: reports.smembers(f"{SENT}:{run}:done") == {b"1"}, 20, what="the task after the garbage ran")
    assert worker.alive()
    log = worker.log()
    assert "Unrecoverable error" not in log and "CRITICAL" not in log
    assert len(re.findall(r"kept as dead letter", log)) == len(items), log
    # Set aside, not deleted, and the CLI reads them through the Sentinels.
    result = _cli(app, "dead", "--json", "--queue", queue)
    assert result.exit_code == 0, result.output
    dead = json.loads(result.output)
    assert len(dead) == len(items)
    assert {d["queue"] for d in dead} == {queue}
    # Nothing left unacknowledged or on the queue.
    wait_for(lambda: master.llen(queue) == 0 and master.hlen("unacked") == 0, 10, what="nothing unacknowledged")
    result = _cli(app, "dead", "--purge", "--yes", "--queue", queue)
    assert result.exit_code == 0, result.output
    assert master.llen(f"{queue}.pma.dead") == 0


def reliable_reports(app):
    with app.app_context():
        return reliable.client()


def test_status_and_purge_through_the_sentinels(deploy, sentinels):
    queue, make_app, _start = deploy
    app = make_app()
    with app.test_request_context("/status"):
        for n in range(3):
            reliable.count.delay("sent-status", n)
        reliable.count.apply_async(("sent-status", 9), countdown=3600)
    result = _cli(app, "status", "--json", "--queue", queue)
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["broker"]["ok"] and status["broker"]["url"].startswith("sentinel://")
    assert status["queues"] == {queue: 3} and status["delayed"] == {queue: 1}
    # The replica has them too: what the master acknowledged is on its way there.
    wait_for(lambda: sentinels.replicas[0].client().llen(queue) == 3, 5, what="replicated")
    result = _cli(app, "purge", "--yes", "--queue", queue)
    assert result.exit_code == 0, result.output
    assert sentinels.master.client().llen(queue) == 0
    assert sentinels.master.client().zcard(f"{queue}.pma.scheduled") == 0


def test_taken_atomically_and_back_after_the_visibility_timeout(deploy, sentinels):
    queue, make_app, start = deploy
    app = make_app()
    master = sentinels.master.client()
    reports = reliable_reports(app)
    run = f"sent-vis-{time.monotonic_ns()}"
    worker = start("--pool=prefork", "-c", "1")
    with app.test_request_context("/long"):
        reliable.long.delay(run, 2)
    wait_for(lambda: reports.llen(f"{SENT}:{run}:started") == 1, 15, what="the task started")
    # Taken and recorded in one step: off the queue, unacknowledged on the master.
    assert master.llen(queue) == 0 and master.hlen("unacked") == 1
    kill_tree(worker)
    start("--pool=prefork", "-c", "1")
    wait_for(lambda: reports.llen(f"{SENT}:{run}:done") == 1, VISIBILITY + 20, what="the task ran again")
    assert reports.llen(f"{SENT}:{run}:started") == 2
    wait_for(lambda: master.hlen("unacked") == 0, 10, what="nothing unacknowledged")


# -- no master ------------------------------------------------------------------------


def _call(app) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        with app.test_request_context("/call"):
            reliable.count.delay("sent-down", 1)
    except AsyncUnavailable as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


@pytest.mark.parametrize("case", ["no-sentinel-answers", "sentinels-know-no-such-master"])
def test_no_master_raises_async_unavailable_quickly(sentinels, case):
    if case == "no-sentinel-answers":
        url, options = f"sentinel://127.0.0.1:{free_port()}", {"master_name": "pma-none"}
    else:
        url, options = sentinels.url, {"master_name": "pma-no-such-master"}
    app = reliable.create_app(broker=url, queue=unique_queue(), transport_options=options)
    for _ in range(2):
        took, exc = _call(app)
        assert isinstance(exc, AsyncUnavailable), exc
        assert "broker is unavailable" in str(exc)
        assert took < BOUND
    print(f"\n{case}: AsyncUnavailable after {took * 1000:.0f} ms")


# -- acknowledged by replicas -----------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 1.5, True, "1"])
def test_min_replicas_is_validated(value):
    with pytest.raises(ConfigError, match="PYMACARON_ASYNC_BROKER_MIN_REPLICAS"):
        reliable.create_app(queue="q", PYMACARON_ASYNC_BROKER_MIN_REPLICAS=value)


def test_min_replicas_waits_for_the_replica(deploy, sentinels):
    queue, make_app, _start = deploy
    app = make_app(PYMACARON_ASYNC_BROKER_MIN_REPLICAS=1)
    assert app.extensions["pymacaron_async"].celery.conf.broker_transport_options["min_replicas"] == 1
    replica = sentinels.replicas[0].client()
    with app.test_request_context("/one"):
        reliable.count.delay("sent-wait", 1)
    # Returned only once the replica had it.
    assert replica.llen(queue) == 1
    with app.test_request_context("/batch"), reliable.ext.batch():
        for n in range(2, 5):
            reliable.count.delay("sent-wait", n)
    assert replica.llen(queue) == 4
    with app.test_request_context("/later"):
        reliable.count.apply_async(("sent-wait", 5), countdown=3600)
    assert replica.zcard(f"{queue}.pma.scheduled") == 1


def test_min_replicas_not_reached_raises_within_the_timeout(deploy, sentinels):
    queue, make_app, _start = deploy
    app = make_app(PYMACARON_ASYNC_BROKER_MIN_REPLICAS=2, PYMACARON_ASYNC_PUBLISH_TIMEOUT=1.0)
    took, exc = _call(app)
    assert isinstance(exc, AsyncUnavailable), exc
    assert "1 of the 2 replica(s)" in str(exc) and "may run" in str(exc)
    assert 0.4 < took < 1.0 + 3.0
    # The master has it: the error says it may run, and it does not vanish.
    assert sentinels.master.client().llen(queue) == 1


# -- a master demoted under the worker ---------------------------------------------------


@pytest.mark.slow
def test_a_worker_whose_master_becomes_a_replica_reconnects(tmp_path, start_worker):
    """``UNBLOCKED``/``READONLY`` from a demoted master: a lost connection, not an unrecoverable error."""
    broker = RedisServer(tmp_path / "a", appendonly=False).start()
    other = RedisServer(tmp_path / "b", appendonly=False).start()
    try:
        queue = unique_queue()
        app = reliable.create_app(broker=broker.url, queue=queue, prefix=SENT, reports=BROKER_URL)
        env = {
            "PMA_REL_BROKER_URL": broker.url,
            "PMA_REL_QUEUE": queue,
            "PMA_REL_PREFIX": SENT,
            "PMA_REL_REPORT_URL": BROKER_URL,
        }
        worker = start_worker("tests.apps.reliable:celery", "--pool=solo", env=env, queue=queue)
        reports = reliable_reports(app)
        run = f"sent-demoted-{time.monotonic_ns()}"
        with app.test_request_context("/before"):
            reliable.count.delay(run, 1)
        wait_for(lambda: reports.sismember(f"{SENT}:{run}:done", 1), 15, what="a task before")
        time.sleep(0.5)  # the worker waits on its queue again
        broker.client().replicaof("127.0.0.1", other.port)
        wait_for(lambda: "Connection to broker lost" in worker.log(), 15, what="the worker seeing the demotion")
        broker.client().replicaof("NO", "ONE")
        with app.test_request_context("/after"):
            reliable.count.delay(run, 2)
        wait_for(lambda: reports.sismember(f"{SENT}:{run}:done", 2), 30, what="a task after the master is back")
        assert worker.alive() and "Unrecoverable error" not in worker.log()
        worker.stop()  # while its broker answers
    finally:
        broker.stop()
        other.stop()
