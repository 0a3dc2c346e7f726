"""Unit tests of the guards: transport/consumer settings, envelope checks, snapshot age."""

from __future__ import annotations

import ssl
import time
from types import SimpleNamespace
from unittest import mock

import pytest
from flask import Flask, request

from flask_pymacaron_async import ConfigError, ContextError, PymacaronAsync
from flask_pymacaron_async import _context as context
from flask_pymacaron_async import _transport as transport

ext = PymacaronAsync()
SEEN: list = []


@ext.task
def outer():
    SEEN.append(("outer", request.environ[context._CARRIED_ENVIRON_KEY]["ts"]))
    inner.delay()


@ext.task
def inner():
    SEEN.append(("inner", request.environ[context._CARRIED_ENVIRON_KEY]["ts"]))


def _celery(broker="redis://127.0.0.1:6379/0", **config):
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k", PYMACARON_ASYNC_BROKER_URL=broker, **config)
    return PymacaronAsync(app).celery


# -- which Celery settings the guards take --------------------------------------


def test_redis_broker_gets_the_guarded_transport_and_consumer():
    conf = _celery().conf
    assert conf.broker_transport == transport.TRANSPORT
    assert conf.worker_consumer == transport.CONSUMER
    assert conf.broker_transport_options["socket_timeout"] == 2.0


def test_amqp_broker_gets_the_consumer_only():
    conf = _celery("amqp://guest:guest@127.0.0.1:5672//").conf
    assert conf.broker_transport in (None, "")
    assert conf.worker_consumer == transport.CONSUMER


def test_celery_settings_of_the_app_win():
    conf = _celery(CELERY={"worker_consumer": "my.consumer:Consumer", "broker_transport": "redis"}).conf
    assert conf.worker_consumer == "my.consumer:Consumer"
    assert conf.broker_transport == "redis"
    # A broker URL given through CELERY decides too.
    conf = _celery(CELERY={"broker_url": "amqp://127.0.0.1//"}).conf
    assert conf.broker_transport in (None, "")


def test_rediss_verifies_certificates_unless_told_otherwise():
    conf = _celery("rediss://127.0.0.1:6380/0").conf
    assert conf.broker_transport == transport.TRANSPORT
    assert conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    mine = {"ssl_cert_reqs": ssl.CERT_NONE}
    assert _celery("rediss://127.0.0.1:6380/0", CELERY={"broker_use_ssl": mine}).conf.broker_use_ssl == mine


# -- envelopes the transport drops -----------------------------------------------


def _envelope(**changes):
    envelope = {
        "body": "W1tdLHt9LHt9XQ==",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {},
        "properties": {
            "delivery_tag": "t1",
            "delivery_info": {"exchange": "", "routing_key": "q"},
            "body_encoding": "base64",
        },
    }
    envelope.update(changes)
    return envelope


@pytest.mark.parametrize(
    ("envelope", "problem"),
    [
        (None, "a JSON null"),
        ([1], "a JSON array"),
        ("x", "a JSON string"),
        (_envelope(properties=None), "no 'properties'"),
        (_envelope(properties={"delivery_info": {"exchange": "", "routing_key": "q"}}), "no 'delivery_tag'"),
        (_envelope(properties={"delivery_tag": "t"}), "no 'delivery_info'"),
        (_envelope(headers=None), "'headers' is not a mapping"),
        (_envelope(body=3), "'body' is not a string"),
        (_envelope(body="%%%"), "not base64"),
        (_envelope(**{"content-type": 1}), "'content-type' is not a string"),
    ],
)
def test_envelope_problem(envelope, problem):
    assert problem in transport.envelope_problem(envelope)


def test_valid_envelope_has_no_problem():
    assert transport.envelope_problem(_envelope()) is None
    assert transport.envelope_problem(_envelope(body=None)) is None


# -- the age of the context snapshot ----------------------------------------------


def _signed(signer, snapshot, name="t", task_id="id-1", body=b"[]"):
    return signer.sign(signer.payload(snapshot), name, task_id, body)


def test_snapshot_max_age():
    signer = context.ContextSigner("k")
    snapshot = {"app": "a", "rid": None, "user": None, "env": None}
    fresh = _signed(signer, snapshot)
    assert signer.verify(fresh, "t", "id-1", b"[]", max_age=60)["ts"] == pytest.approx(time.time(), abs=5)
    with mock.patch("flask_pymacaron_async._context.time.time", return_value=time.time() - 3600):
        old = _signed(signer, snapshot)
    with pytest.raises(ContextError, match=r"expired: signed 3\d\d\ds ago, over PYMACARON_ASYNC_CONTEXT_MAX_AGE=60"):
        signer.verify(old, "t", "id-1", b"[]", max_age=60)
    assert signer.verify(old, "t", "id-1", b"[]")["env"] is None  # no max age: any age
    # A worker whose clock runs behind the caller's does not see it as expired.
    with mock.patch("flask_pymacaron_async._context.time.time", return_value=time.time() + 600):
        ahead = _signed(signer, snapshot)
    assert signer.verify(ahead, "t", "id-1", b"[]", max_age=60)
    unstamped = signer.sign('{"app":"a","env":null}', "t", "id-1", b"[]")
    with pytest.raises(ContextError, match="no signing time"):
        signer.verify(unstamped, "t", "id-1", b"[]", max_age=60)


@pytest.mark.parametrize("value", [0, -1, "7d", True, [1]])
def test_context_max_age_is_validated(value):
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k", PYMACARON_ASYNC_CONTEXT_MAX_AGE=value)
    with pytest.raises(ConfigError, match="PYMACARON_ASYNC_CONTEXT_MAX_AGE"):
        PymacaronAsync(app)


def test_context_max_age_none_and_default():
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k", PYMACARON_ASYNC_CONTEXT_MAX_AGE=None)
    PymacaronAsync(app)
    assert app.extensions["pymacaron_async"].settings.context_max_age is None
    other = Flask(__name__)
    other.config["SECRET_KEY"] = "k"
    PymacaronAsync(other)
    assert other.extensions["pymacaron_async"].settings.context_max_age == 7 * 24 * 3600


def test_a_task_queued_from_a_task_is_signed_again():
    """Its age counts from the hop that queued it, not from the first request."""
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k", PYMACARON_ASYNC_ENABLED=False)
    ext.init_app(app)
    SEEN.clear()
    six_days_ago = time.time() - 6 * 24 * 3600
    with app.test_request_context("/start"):
        with mock.patch("flask_pymacaron_async._context.time.time", return_value=six_days_ago):
            token = context.take(app.extensions["pymacaron_async"])
        outer.delay()
    assert token
    (_, outer_ts), (_, inner_ts) = SEEN
    assert outer_ts == int(six_days_ago)
    assert inner_ts == pytest.approx(time.time(), abs=5)


# -- the consumer's last line of defence -------------------------------------------


class _Channel:
    """The part of our Redis channel the consumer uses to dead-letter a message."""

    no_ack_consumers = None

    def __init__(self):
        self.dead = []
        self.acked = []
        kombu_connection = SimpleNamespace(
            connection_errors=(OSError,), channel_errors=(), transport=SimpleNamespace(driver_type="redis")
        )
        self.connection = SimpleNamespace(client=kombu_connection)

    def pma_dead_letter(self, delivery_tag, reason, **fields):
        self.dead.append((delivery_tag, reason, fields))
        return fields.get("task_id")

    def basic_ack(self, delivery_tag, multiple=False):
        self.acked.append(delivery_tag)


def _task_message(app, channel):
    from kombu.message import Message

    from tests.apps import basic

    state = app.extensions["pymacaron_async"]
    body = b'[["v", "k"], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    headers = {"task": basic.record_value.name, "id": "id-1", "retries": 0}
    bound = context.bound_headers(headers, "application/x-pymacaron-json")
    with app.test_request_context("/x"):
        headers[context.HEADER] = state.signer.sign(context.take(state), basic.record_value.name, "id-1", body, bound)
    message = Message(
        body=body,
        delivery_tag="tag-1",
        content_type="application/x-pymacaron-json",
        content_encoding="utf-8",
        headers=headers,
        channel=channel,
    )
    message.accept = {"application/x-pymacaron-json", "application/json"}
    return message


def test_an_error_while_celery_handles_a_message_rejects_the_message(app, monkeypatch, caplog):
    """Whatever Celery raises on a message that passed the checks, the message goes, the worker stays."""
    from celery.worker.consumer import Consumer as CeleryConsumer

    from flask_pymacaron_async._consumer import Consumer

    raised = []

    def handler_factory(self, *args, **kwargs):
        def handle(message):
            raise raised[-1]

        return handle

    monkeypatch.setattr(CeleryConsumer, "create_task_handler", handler_factory)
    consumer = Consumer.__new__(Consumer)
    consumer.app = app.extensions["pymacaron_async"].celery
    consumer.connection_errors, consumer.channel_errors = (OSError, KeyError), ()
    on_task_received = consumer.create_task_handler()

    channel = _Channel()
    raised.append(KeyError("id"))
    on_task_received(_task_message(app, channel))
    ((tag, reason, fields),) = channel.dead
    assert tag == "tag-1" and reason.startswith("Celery could not handle it: KeyError")
    assert fields["task"] == "tests.apps.basic.record_value" and fields["task_id"] == "id-1"
    assert channel.acked == ["tag-1"]

    # A broker error is the broker's: kombu and Celery reconnect.
    raised.append(ConnectionResetError("gone"))
    with pytest.raises(ConnectionResetError):
        on_task_received(_task_message(app, _Channel()))


# -- taking a message is one atomic step -------------------------------------------


@pytest.fixture
def own_redis(tmp_path):
    from tests.faults import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_a_taken_message_is_recorded_before_the_worker_reads_it(own_redis):
    """kombu's BRPOP leaves a taken message only in the worker's memory; the take script records it first."""
    from kombu import Connection, Queue

    queue = Queue("atomic", routing_key="atomic")
    client = own_redis.client()
    with Connection(own_redis.url, transport=transport.TRANSPORT) as conn:
        conn.Producer().publish({"n": 1}, routing_key="atomic", declare=[queue])
        channel = conn.default_channel
        channel.basic_consume("atomic", False, lambda message: None, "tag")
        conn.transport.cycle._register_BRPOP(channel)  # what the event loop does: the take is sent
        deadline = time.monotonic() + 5
        while client.llen("atomic") and time.monotonic() < deadline:
            time.sleep(0.01)
        # Off the queue, not yet read by the consumer, and already unacknowledged.
        assert client.llen("atomic") == 0
        assert client.hlen("unacked") == 1 and client.zcard("unacked_index") == 1
        # The consumer goes away before reading it: the message goes back to its queue now.
        channel.close()
        assert client.llen("atomic") == 1
        assert client.hlen("unacked") == 0


def _calls(client, command: str) -> int:
    """How many times the server ran ``command`` (its own server: nothing else talks to it)."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_an_acknowledgement_goes_with_the_next_take(own_redis):
    """On the event loop's thread, an ack rides in the take script its freed slot sends: one round trip, no MULTI."""
    import threading

    from kombu import Connection, Queue

    queue = Queue("acks", routing_key="acks")
    client = own_redis.client()
    with Connection(own_redis.url, transport=transport.TRANSPORT) as conn:
        producer = conn.Producer()
        for n in range(3):
            producer.publish({"n": n}, routing_key="acks", declare=[queue])
        got = []
        channel = conn.default_channel
        channel.basic_qos(0, 1, False)  # one message at a time, as the worker's prefetch
        channel.basic_consume("acks", False, lambda message: got.append(message), "tag")
        conn.drain_events(timeout=5)
        first = got[0]
        assert client.hgetall("unacked").keys() == {first.delivery_tag.encode()}
        execs = _calls(client, "exec")

        first.ack()  # the slot it frees sends the next take, carrying the ack
        assert channel._pma_acks == []
        conn.drain_events(timeout=5)
        second = got[1]
        # The first is acknowledged in Redis, the second recorded, in one script run and no MULTI/EXEC.
        assert client.hgetall("unacked").keys() == {second.delivery_tag.encode()}
        assert client.zrange("unacked_index", 0, -1) == [second.delivery_tag.encode()]
        assert _calls(client, "exec") == execs

        # From another thread (a thread pool's worker): one MULTI/EXEC in one write, done when ack() returns.
        acker = threading.Thread(target=second.ack)
        acker.start()
        acker.join()
        assert _calls(client, "exec") == execs + 1
        assert not client.hexists("unacked", second.delivery_tag)
        assert client.zscore("unacked_index", second.delivery_tag) is None
        conn.drain_events(timeout=5)
        got[2].ack()
    # The last ack went with a take that found nothing; closing the channel read its reply.
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0 and client.llen("acks") == 0


def test_an_acknowledgement_that_no_take_can_carry_is_sent_at_once(own_redis):
    """No next take (the consumer is cancelled): the ack is kombu's, before ack() returns."""
    from kombu import Connection, Queue

    client = own_redis.client()
    with Connection(own_redis.url, transport=transport.TRANSPORT) as conn:
        conn.Producer().publish({"n": 1}, routing_key="alone", declare=[Queue("alone", routing_key="alone")])
        got = []
        channel = conn.default_channel
        channel.basic_consume("alone", False, got.append, "tag")
        conn.drain_events(timeout=5)
        channel.basic_cancel("tag")  # no active queue: no take to send
        got[0].ack()
        assert channel._pma_acks == [] and not channel.polling
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_queues_consumed_without_acknowledgement_keep_brpop(own_redis):
    from kombu import Connection, Queue

    with Connection(own_redis.url, transport=transport.TRANSPORT) as conn:
        conn.Producer().publish({"n": 1}, routing_key="noack", declare=[Queue("noack", routing_key="noack")])
        got = []
        channel = conn.default_channel
        channel.basic_consume("noack", True, got.append, "tag")
        conn.drain_events(timeout=5)
        assert channel._pma_sent == "BRPOP"
        assert len(got) == 1 and own_redis.client().hlen("unacked") == 0


def test_a_reply_out_of_step_reconnects_instead_of_dropping_every_message(own_redis, caplog):
    """A BRPOP reply of the wrong shape is a connection out of step: reconnect, then go on consuming."""
    from kombu import Connection, Queue

    queue = Queue("resync", routing_key="resync")
    with Connection(own_redis.url, transport=transport.TRANSPORT) as conn:
        channel = conn.default_channel
        got = []
        channel.basic_consume("resync", True, got.append, "tag")  # no ack: kombu's BRPOP path
        conn.transport.cycle._register_BRPOP(channel)  # the event loop's poll: a connection in use

        connection = channel.client.connection
        # A reply that is not [queue, item]: what a connection out of step reads.
        with mock.patch.object(channel.client, "parse_response", return_value=b"OK"):
            with mock.patch.object(connection, "disconnect", wraps=connection.disconnect) as disconnect:
                with pytest.raises(transport.Empty):
                    channel._brpop_read()
        assert disconnect.called
        assert "Reconnecting to the broker" in caplog.text
        conn.Producer().publish({"n": 2}, routing_key="resync", declare=[queue])
        conn.drain_events(timeout=5)
        assert len(got) == 1
