"""The Redis transport the worker uses: no message lost with a worker, no item fatal.

:class:`Transport` is kombu's Redis transport with two gaps closed.

- kombu takes a message off its queue (``BRPOP``) and records it as
  unacknowledged in a second command: a worker killed in between, or stopped
  while the reply sits unread in its socket, loses that message for good.
  Here one Lua script takes the message *and* records it, so a message is
  always either on its queue or unacknowledged, and comes back after the
  visibility timeout if its worker dies. The worker waits for messages with
  a ``BLMOVE`` that leaves the list as it is (Redis 6.2+; older servers, and
  queues consumed without acknowledgement, keep kombu's ``BRPOP``).
- kombu decodes every item as a JSON message envelope, and an item that is
  not one (not JSON, not UTF-8, nested too deep, a JSON value that is not an
  envelope) raises inside the worker's event loop: Celery stops with
  "Unrecoverable error". Here such an item is logged on one line and moved
  into the dead letters of its queue in the same atomic step that takes it
  (:mod:`flask_pymacaron_async._deadletter`), and the worker goes on with the
  next one. What is inside a readable envelope (headers, body, signature) is
  checked by :class:`flask_pymacaron_async._consumer.Consumer`, which
  dead-letters what it refuses through :meth:`Channel.pma_dead_letter`.

The same implementation serves a Redis behind Sentinel (``sentinel://``):
:class:`SentinelTransport` is :class:`Transport` with kombu's
Sentinel-managed connection pool, which asks the Sentinels for the master at
every connection, so a worker reconnects to the new master by itself after
a failover.

With ``min_replicas`` (``PYMACARON_ASYNC_BROKER_MIN_REPLICAS``), a publish
returns only once that many replicas have the message (Redis ``WAIT``), so a
failover right after it cannot lose it.

It also keeps a message due later than half the visibility timeout (a long
``countdown`` or ``eta``) out of its queue, in a sorted set, until shortly
before it is due: a worker holding it unacknowledged past the visibility
timeout would see it run a second time.

kombu's private hooks are overridden through
:class:`~flask_pymacaron_async._compat.KombuRedisChannel`.

:func:`configure` makes a Celery app use both; :class:`PymacaronAsync` calls
it for the Celery app of every Flask app.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import threading
import weakref
from datetime import datetime
from json.encoder import encode_basestring_ascii
from queue import Empty
from time import time
from typing import Any, Iterator, Mapping, NamedTuple

import redis as redis_py
from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from . import _deadletter as deadletter
from . import _ids as ids
from . import _limits as limits
from ._compat import KombuRedisChannel, KombuRedisQoS, KombuRedisTransport, pool_connection
from ._shown import shown_text
from .errors import AsyncUnavailable, one_line

log = logging.getLogger(__name__)

#: ``broker_transport`` value that selects :class:`Transport`.
TRANSPORT = "flask_pymacaron_async._transport:Transport"
#: ``broker_transport`` value that selects :class:`SentinelTransport`.
SENTINEL_TRANSPORT = "flask_pymacaron_async._transport:SentinelTransport"
#: ``worker_consumer`` value that selects :class:`~flask_pymacaron_async._consumer.Consumer`.
CONSUMER = "flask_pymacaron_async._consumer:Consumer"

# Broker URL schemes served by kombu's plain Redis transport, and by its Sentinel one.
_REDIS_SCHEMES = ("redis", "rediss")
_SENTINEL_SCHEME = "sentinel"
_TAKE_CMD, _WAIT_CMD, _BRPOP_CMD = "EVAL", "BLMOVE", "BRPOP"
# Replies of a server that is not (or not yet) a master to write to: a
# failover is under way, and another connection will find the master.
_NOT_MASTER = ("READONLY", "UNBLOCKED", "MASTERDOWN")

_JSON_KINDS = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array"}


def configure(celery: Any, overrides: Mapping[str, Any]) -> None:
    """Make ``celery`` reject bad messages instead of dying on them.

    Sets ``worker_consumer`` (any broker) and, for a ``redis://``,
    ``rediss://`` or ``sentinel://`` broker (several Sentinels separated by
    ``;``), ``broker_transport``, unless ``overrides`` (the app's ``CELERY``
    setting) sets them itself.
    """
    conf = celery.conf
    if "worker_consumer" not in overrides:
        conf.worker_consumer = CONSUMER
    url = conf.broker_url
    if "broker_transport" in overrides or not isinstance(url, str):
        return
    schemes = {part.partition("://")[0] for part in url.split(";") if part.strip()}
    if schemes == {_SENTINEL_SCHEME}:
        conf.broker_transport = SENTINEL_TRANSPORT
        options = dict(conf.broker_transport_options or {})
        if "sentinel_kwargs" not in options:
            # redis-py asks the Sentinels without any timeout: a Sentinel
            # that accepts connections and never answers would hang a publish.
            timeout = options.get("socket_timeout") or conf.broker_connection_timeout
            options["sentinel_kwargs"] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
            conf.broker_transport_options = options
        return
    if len(schemes) != 1 or ";" in url:
        return
    (scheme,) = schemes
    if scheme not in _REDIS_SCHEMES:
        return
    conf.broker_transport = TRANSPORT
    if scheme == "rediss" and not conf.broker_use_ssl:
        # kombu turns on TLS from the URL's scheme only when it picks the
        # transport itself: say it, and verify the server's certificate.
        import ssl

        conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def envelope_problem(envelope: Any) -> str | None:
    """Why kombu could not turn ``envelope`` (a decoded queue item) into a message, or None."""
    if not isinstance(envelope, dict):
        kind = _JSON_KINDS.get(type(envelope), type(envelope).__name__)
        return f"the item is a JSON {kind}, not a message envelope"
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        return "the envelope has no 'properties'"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return "the envelope has no 'delivery_tag'"
    info = properties.get("delivery_info")
    if not (
        isinstance(info, dict) and isinstance(info.get("exchange"), str) and isinstance(info.get("routing_key"), str)
    ):
        return "the envelope has no 'delivery_info' with an exchange and a routing key"
    if not isinstance(envelope.get("headers"), dict):
        return "the envelope's 'headers' is not a mapping"
    for key in ("content-type", "content-encoding"):
        if not isinstance(envelope.get(key), (str, type(None))):
            return f"the envelope's {key!r} is not a string"
    body = envelope.get("body")
    if not isinstance(body, (str, type(None))):
        return "the envelope's 'body' is not a string"
    encoding = properties.get("body_encoding")
    if encoding == "base64":
        if body:
            try:
                base64.b64decode(body.encode("ascii"), validate=True)
            except (UnicodeEncodeError, binascii.Error, ValueError):
                return "the envelope's body is not base64"
    elif encoding is not None:
        return f"the envelope's body encoding {encoding!r} is not base64"
    return None


def broker_errors(connection: Any) -> tuple[type[BaseException], ...]:
    """The errors of ``connection`` (a kombu transport or connection) that mean the broker, not a message.

    kombu's Redis transport counts ``KeyError`` among its connection errors;
    raised while a message is handled, it is the message's fault.
    """
    errors = tuple(getattr(connection, "connection_errors", None) or ()) + tuple(
        getattr(connection, "channel_errors", None) or ()
    )
    return tuple(e for e in errors if not issubclass(e, LookupError))


def _master_connection(base: type[Any]) -> type[Any]:
    """``base`` (a redis-py connection class) turning a ``READONLY`` reply into a lost connection.

    A master demoted to a replica (a failover behind a DNS name, ``REPLICAOF``)
    answers writes with ``READONLY``: kombu would stop the worker with an
    "Unrecoverable error"; a lost connection makes it reconnect until it
    finds a master. redis-py's Sentinel connections do the same for
    ``sentinel://``.
    """

    def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return base.read_response(self, *args, **kwargs)
        except redis_py.ReadOnlyError as exc:
            self.disconnect()
            raise redis_py.ConnectionError(f"the broker is not a writable master: {one_line(exc)}") from exc

    return type(f"Master{base.__name__}", (base,), {"read_response": read_response, "__module__": __name__})


class QoS(KombuRedisQoS):
    """kombu's Redis QoS, looking for abandoned messages at every sweep."""

    channel: Channel

    def append(self, message: Any, delivery_tag: str) -> None:
        recorded = self.channel._pma_recorded
        if delivery_tag in recorded:
            # The take script already recorded it in Redis.
            recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        channel = self.channel
        channel._pma_keys.pop(delivery_tag, None)
        done = channel._pma_done.pop(delivery_tag, None)
        # The ack of a task that succeeded records its id as done in the same command (see pma_mark_done).
        ack = delivery_tag if done is None else f"{delivery_tag}\n{done}"
        if self._pma_closed(delivery_tag, "acknowledge"):
            return
        if channel.pma_ack_with_take(delivery_tag, ack):
            return
        with self._freed_on_broker_error(delivery_tag):
            # kombu's ack (a MULTI/EXEC through a new redis-py client), in one write.
            channel.pma_forget_unacked([ack])
            virtual.QoS.ack(self, delivery_tag)
        channel.wake_poller()

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.channel._pma_keys.pop(delivery_tag, None)
        self.channel._pma_done.pop(delivery_tag, None)
        if self._pma_closed(delivery_tag, "reject"):
            return
        with self._freed_on_broker_error(delivery_tag):
            super().reject(delivery_tag, requeue=requeue)
        self.channel.wake_poller()

    def restore_unacked(self, client: Any = None) -> None:
        # Called when the channel closes, also after its broker went away
        # (its connection half torn down): kombu would raise out of the
        # worker's reconnection and stop it.
        try:
            super().restore_unacked(client)
        except Exception as exc:  # whatever a closed transport raises: Redis keeps the messages
            log.warning(
                "Could not put the messages this worker held back on their queue (%s): they come back "
                "after the visibility timeout",
                one_line(exc),
            )
            self.forget_delivered()

    def _pma_closed(self, delivery_tag: str, what: str) -> bool:
        """Whether the channel's connection is closed (a reconnection under way); then forget the message here."""
        if getattr(self.channel.connection, "client", None) is not None:
            return False
        log.warning(
            "Could not %s message %s: its connection to the broker is closed; it stays unacknowledged "
            "in Redis and runs again after the visibility timeout",
            what,
            delivery_tag,
        )
        virtual.QoS.ack(self, delivery_tag)
        return True

    @contextlib.contextmanager
    def _freed_on_broker_error(self, delivery_tag: str) -> Iterator[None]:
        """When the broker goes away during an ack or a reject, free the message's prefetch slot all the same.

        kombu keeps the slot taken, and a worker whose slots are all taken
        stops polling the broker: it would never notice the lost connection
        (a master SIGKILLed under a busy worker, then a failover) and wait
        forever. The message stays unacknowledged in Redis and comes back
        after the visibility timeout; the error goes on to Celery, which logs it.
        """
        try:
            yield
        except self.channel.connection_errors:
            virtual.QoS.ack(self, delivery_tag)
            raise

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        # kombu scans for messages a dead worker left unacknowledged on one
        # sweep in ten (every ~100 s); a sweep is one small Redis query, so a
        # message comes back within the visibility timeout plus ~10 s.
        super().restore_visible(start=start, num=num, interval=self.channel.unacked_restore_throttle)


class Channel(KombuRedisChannel):
    """kombu's Redis channel: messages taken atomically, refused ones dead-lettered, long delays kept aside."""

    QoS = QoS
    connection_class = _master_connection(redis_py.Connection)
    connection_class_ssl = _master_connection(redis_py.SSLConnection)
    #: Scan on every sweep (``broker_transport_options`` may set it).
    unacked_restore_throttle = 1
    #: Entries kept per queue in the dead letters (``PYMACARON_ASYNC_DEAD_LETTER_MAX``).
    dead_letter_max = 10_000
    #: Replicas that must have a message before its publish returns
    #: (``PYMACARON_ASYNC_BROKER_MIN_REPLICAS``; 0: the master's word is enough).
    min_replicas = 0
    #: Bytes a queue item may take before it is parsed (:func:`~flask_pymacaron_async._limits.item_bytes`).
    max_item_bytes = limits.item_bytes(1024 * 1024)
    from_transport_options = (
        *KombuRedisChannel.from_transport_options,
        "unacked_restore_throttle",
        "dead_letter_max",
        "min_replicas",
        "max_item_bytes",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pma_recorded: set[str] = set()
        # Delivery tags of messages whose task id had succeeded when taken (see pma_replayed).
        self._pma_replays: set[str] = set()
        self._pma_no_ack: dict[str, bool] = {}
        # The list key each unacknowledged message was taken from, by delivery tag.
        self._pma_keys: dict[str, str] = {}
        # "<done key>\n<seconds>" by delivery tag: what the message's ack records (see pma_mark_done).
        self._pma_done: dict[str, str] = {}
        self._pma_sent = _BRPOP_CMD
        self._pma_next = _TAKE_CMD
        self._pma_atomic: bool | None = None
        # Delivery tags the next take script acknowledges (pma_ack_with_take),
        # and the thread of the event loop that reads the takes' replies.
        self._pma_acks: list[str] = []
        self._pma_loop_thread: int | None = None
        # While collecting (pma_collecting): the Redis commands of what is
        # published, and the routing tables read once for the whole block.
        self._pma_collected: list[tuple[str, tuple[Any, ...]]] | None = None
        self._pma_tables: dict[str, Any] = {}
        super().__init__(*args, **kwargs)
        channels = getattr(self.connection, "_pma_channels", None)
        if channels is not None:
            channels.add(self)

    def make_client(self, asynchronous: bool = False) -> Any:
        # kombu builds a new redis-py client for every command it sends (~60 us
        # each with redis-py 8); one client per pool serves them all.
        if asynchronous:
            return self.kombu_create_client(asynchronous=True)
        pool = self.pool
        cached = self.__dict__.get("_pma_client")
        if cached is None or cached[0] is not pool:
            cached = self._pma_client = (pool, self.kombu_create_client())
        return cached[1]

    def _pma_redis(self) -> Any:
        """A plain redis-py client on the channel's pool: it never adds ``global_keyprefix`` by itself."""
        pool = self.pool
        cached = self.__dict__.get("_pma_plain")
        if cached is None or cached[0] is not pool:
            cached = self._pma_plain = (pool, redis_py.Redis(connection_pool=pool))
        return cached[1]

    def _pma_key(self, name: str) -> str:
        return f"{self.global_keyprefix or ''}{name}"

    def _pma_queue(self, key: str) -> str:
        """The queue of a list key (without its priority suffix)."""
        return key.rsplit(self.sep, 1)[0]

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        self._pma_no_ack[queue] = bool(no_ack)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    # -- publishing: a long delay waits in a sorted set ----------------------------

    def put_one(self, queue: str, message: Any, **kwargs: Any) -> None:
        due = _due(message)
        # A worker holds a message it received early, unacknowledged, until it
        # is due: past the visibility timeout another worker would run it too.
        later = due is not None and due - time() > self.visibility_timeout / 2
        collected = self._pma_collected
        own = self.kombu_publishes_itself(queue, kwargs)
        if collected is None and self.min_replicas and not own:
            # Sent with the replicas' acknowledgement (see pma_collecting).
            with self.pma_collecting():
                return self.put_one(queue, message, **kwargs)
        if collected is None or own:
            collected = None  # published now (or by kombu's own batch)
        if not later:
            if collected is None:
                return self.kombu_put(queue, message, **kwargs)
            collected.append(
                ("lpush", (self._pma_key(self.queue_key(queue, self.priority_of(message))), dumps(message)))
            )
            return None
        key = self._pma_key(self.queue_key(queue, self.priority_of(message)))
        command = (
            "zadd",
            (self._pma_key(queue + deadletter.SCHEDULED_SUFFIX), {deadletter.member(key, dumps(message)): due}),
        )
        if collected is not None:
            collected.append(command)
        else:
            self._pma_redis().zadd(*command[1])
        return None

    def get_table(self, exchange: str) -> Any:
        """The bindings of ``exchange``: read once per :meth:`pma_collecting` block, not once per message."""
        if self._pma_collected is None:
            return super().get_table(exchange)
        table = self._pma_tables.get(exchange)
        if table is None:
            table = self._pma_tables[exchange] = super().get_table(exchange)
        return table

    def pma_mark(self) -> int:
        """Where the next command of the :meth:`pma_collecting` block will go (see :meth:`pma_template`)."""
        return len(self._pma_collected or ())

    def pma_template(self, mark: int, header_slots: tuple[str, ...]) -> Template | None:
        """The message published since ``mark`` and the lists it went to, when it can serve as a template.

        Only a message pushed at once (no delayed set) and base64-encoded, as
        this transport encodes bodies, can: :meth:`pma_put_like` then sends
        copies of it with another body, correlation id, delivery tag and
        values of the ``header_slots`` headers.
        """
        collected = self._pma_collected
        if not collected or mark >= len(collected):
            return None
        entries = collected[mark:]
        if any(name != "lpush" for name, _args in entries) or len({args[1] for _name, args in entries}) != 1:
            return None
        message = loads(entries[0][1][1])
        if message.get("properties", {}).get("body_encoding") != "base64":
            return None
        if not isinstance(message.get("headers"), dict) or not set(header_slots) <= message["headers"].keys():
            return None
        return Template([args[0] for _name, args in entries], message, _frame(message, header_slots))

    def pma_put_like(
        self, template: Template, body: bytes, header_values: tuple[Any, ...], correlation_id: str
    ) -> None:
        """Collect a copy of ``template``'s message with this body and header values, to the same lists.

        Everything else is the template's, except what kombu makes anew per
        message: the delivery tag. The copy is the text kombu would encode
        for it: the template's text, with the changed values encoded in
        their places.
        """
        values = (
            # Base64 and a uuid4's text are JSON strings as they are, between quotes.
            JSONText(f'"{base64.b64encode(body).decode("ascii")}"'),
            *header_values,
            correlation_id,
            JSONText(f'"{ids.uuid4()}"'),  # kombu's delivery tags are uuid4 text too
        )
        pieces = template.pieces
        parts = [pieces[0]]
        for value, piece in zip(values, pieces[1:]):
            kind = type(value)
            # kombu's JSON is ensure_ascii: a string is what encode_basestring_ascii writes.
            if kind is JSONText:
                parts.append(value)
            else:
                parts.append(encode_basestring_ascii(value) if kind is str else json.dumps(value))
            parts.append(piece)
        data = "".join(parts)
        assert self._pma_collected is not None
        self._pma_collected.extend(("lpush", (key, data)) for key in template.keys)

    @contextlib.contextmanager
    def pma_collecting(self) -> Iterator[None]:
        """Hold what this channel publishes in the block, then send it all in one round trip.

        The messages of one list go in one ``LPUSH`` of many values (in the
        order published: the first is taken first); several commands go in
        one ``MULTI``/``EXEC``. Either way the messages reach their queues all
        together, or none does. Nested blocks join the outer one; a block
        that raises sends nothing.
        """
        if self._pma_collected is not None:
            yield
            return
        collected: list[tuple[str, tuple[Any, ...]]] = []
        self._pma_collected = collected
        try:
            yield
        finally:
            self._pma_collected = None
            self._pma_tables.clear()
        if collected:
            self._pma_send(_merged(collected))

    def _pma_send(self, collected: list[tuple[str, tuple[Any, ...]]], *, replicated: bool = True) -> None:
        """Send ``collected`` in one write: one command as it is, several in one ``MULTI``/``EXEC``.

        One buffer, one system call: redis-py would write a command of many
        values in pieces of 6 kB (a batch of 50 messages: ~12 writes, each
        after a ``poll``). With :attr:`min_replicas`, in ``MULTI``/``EXEC``
        then ``WAIT`` for the replicas: ``WAIT`` counts the replicas that have
        the writes of *its* connection, so everything goes on one connection.

        :raises AsyncUnavailable: when fewer replicas acknowledged within half
            the socket timeout; the master has the messages, which may run.
        """
        commands: list[tuple[Any, ...]] = []
        for name, command_args in collected:
            if name == "zadd":
                key, scored = command_args
                commands.append(("ZADD", key, *(v for item, score in scored.items() for v in (score, item))))
            else:
                commands.append((name.upper(), *command_args))
        replicas = self.min_replicas if replicated else 0
        atomic = len(commands) > 1 or replicas
        if atomic:
            commands = [("MULTI",), *commands, ("EXEC",)]
        wait_ms = 0
        if replicas:
            wait_ms = max(int((self.socket_timeout or 2.0) * 500), 1)
            commands.append(("WAIT", replicas, wait_ms))
        pool = self.pool
        connection = pool_connection(pool)
        try:
            connection.send_packed_command([b"".join(connection.pack_commands(commands))])
            replies = [connection.read_response() for _ in commands]
        except BaseException:
            # Out of step with the replies (or gone): never reused.
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        if atomic:
            executed = replies[-2] if replicas else replies[-1]
            failed = [reply for reply in executed or () if isinstance(reply, Exception)]
            if failed:
                raise failed[0]
        if not replicas:
            return
        acknowledged = int(replies[-1])
        if acknowledged < replicas:
            raise AsyncUnavailable(
                f"the broker's master took {len(collected)} message(s) but {acknowledged} of the "
                f"{replicas} replica(s) PYMACARON_ASYNC_BROKER_MIN_REPLICAS asks for had them "
                f"after {wait_ms} ms: they may run, or be lost if the master fails now"
            )

    def pma_move_due(self) -> int:
        """Move the delayed messages of this channel's queues that are due soon onto their queue.

        Called every second in the worker; one atomic script, so with several
        workers each message moves once.
        """
        queues = list(self.active_queues)
        if not queues:
            return 0
        keys = [self._pma_key(queue + deadletter.SCHEDULED_SUFFIX) for queue in queues]
        return int(self._pma_redis().eval(deadletter.MOVE_DUE, len(keys), *keys, time() + self._pma_lead(), 100) or 0)

    def _pma_lead(self) -> float:
        """How early a delayed message moves onto its queue before it is due.

        Far below the visibility timeout: the worker that takes it holds it,
        unacknowledged, only that long before it runs it.
        """
        return float(min(self.visibility_timeout / 4, 5.0))

    # -- dead letters and deferred messages ----------------------------------------

    def pma_dead_letter(self, delivery_tag: str, reason: str, **fields: Any) -> str | None:
        """Move an unacknowledged message into the dead letters of its queue, atomically.

        :returns: the dead letter's id, or None when the message was not
            unacknowledged any more (back on its queue after the visibility timeout).
        """
        key = self._pma_keys.pop(delivery_tag, None)
        queue = self._pma_queue(key) if key is not None else fields.pop("queue", None) or "?"
        description = deadletter.entry(queue, reason, key=key or queue, format="unacked", **fields)
        reply = self._pma_redis().eval(
            deadletter.DEAD_FROM_UNACKED,
            2,
            self._pma_key(self.unacked_key),
            self._pma_key(self.unacked_index_key),
            delivery_tag,
            self.global_keyprefix or "",
            queue,
            description["id"],
            json.dumps(description),
            self.dead_letter_max,
        )
        if not reply:
            log.warning(
                "Task %s[%s] was back on its queue before it could be dead-lettered",
                shown_text(str(fields.get("task")), 200),
                shown_text(str(fields.get("task_id")), 200),
            )
            return None
        stored, dropped = str(bytes_to_str(reply[0])), int(reply[1])
        deadletter.stored(description, stored, dropped, self.dead_letter_max)
        return stored

    def pma_replayed(self, delivery_tag: str) -> bool:
        """Whether the message ``delivery_tag`` carries a task id that had succeeded when it was taken."""
        try:
            self._pma_replays.remove(delivery_tag)
        except KeyError:
            return False
        return True

    def pma_mark_done(self, delivery_tag: str, task_id: str, ttl: float, sent: str = "1") -> None:
        """Have the acknowledgement of ``delivery_tag`` record that task ``task_id`` succeeded, for ``ttl`` seconds.

        No command of its own: the key (:func:`deadletter.done_key`) is set
        by the same script or transaction that acknowledges the message.

        :param sent: what tells the message from another of the same id
            (:func:`~flask_pymacaron_async._context.message_tag`): the take
            script refuses this message if it comes again.
        """
        key = self._pma_key(deadletter.done_key(task_id))
        self._pma_done[delivery_tag] = f"{key}\n{max(1, int(ttl))}\n{sent}"

    def pma_defer(self, delivery_tag: str, envelope: dict[str, Any], delay: float) -> bool:
        """Put an unacknowledged message back on its queue in ``delay`` seconds, atomically.

        :param envelope: the message as it goes back (headers updated).
        :returns: False when the message was not unacknowledged any more.
        """
        key = self._pma_keys.pop(delivery_tag, None) or envelope["properties"]["delivery_info"]["routing_key"]
        scheduled = self._pma_key(self._pma_queue(key) + deadletter.SCHEDULED_SUFFIX)
        return bool(
            self._pma_redis().eval(
                deadletter.DEFER_FROM_UNACKED,
                3,
                self._pma_key(self.unacked_key),
                self._pma_key(self.unacked_index_key),
                scheduled,
                delivery_tag,
                # Not early: a deferred message has no due time for the worker to wait for.
                time() + delay + self._pma_lead(),
                deadletter.member(self._pma_key(key), dumps(envelope)),
            )
        )

    def _pma_dead_item(self, key: str, item: bytes, reason: str) -> None:
        """Dead-letter an item already off its queue (kombu's BRPOP and GET take it in one step)."""
        queue = self._pma_queue(key)
        description = deadletter.entry(queue, reason, key=key, raw=item)
        reply = self._pma_redis().eval(
            deadletter.DEAD_ITEM,
            0,
            self.global_keyprefix or "",
            queue,
            description["id"],
            json.dumps(description),
            item,
            self.dead_letter_max,
        )
        deadletter.stored(description, bytes_to_str(reply[0]), int(reply[1]), self.dead_letter_max)

    # -- taking messages -------------------------------------------------------

    def _atomic_take(self) -> bool:
        """Whether this channel takes messages with the take script."""
        if self._pma_atomic is None:
            try:
                version = str(self.client.info("server").get("redis_version", "0"))
                major, minor = (int(part) for part in version.split(".")[:2])
            except (ValueError, TypeError, self.ResponseError):  # INFO disabled or unreadable
                major = minor = 0
            self._pma_atomic = (major, minor) >= (6, 2)
        return self._pma_atomic and not any(self._pma_no_ack.get(q, True) for q in self.active_queues)

    def take_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = getattr(self, "brpop_timeout", 1)  # kombu 5.2: always 1
        queues = self.next_queues()
        if not queues:
            return
        names = [queue for _ in self.priority_steps for queue in queues]
        keys = [self._pma_key(self.queue_key(queue, pri)) for pri in self.priority_steps for queue in queues]
        connection = self.client.connection
        self.polling = connection
        if not self._atomic_take():
            self._pma_sent = _BRPOP_CMD
            connection.send_command(_BRPOP_CMD, *keys, timeout or 0)
            return
        self._pma_sent = self._pma_next
        if self._pma_sent == _TAKE_CMD:
            connection.send_command(
                _TAKE_CMD,
                deadletter.TAKE,
                len(keys),
                *keys,
                self._pma_key(self.unacked_key),
                self._pma_key(self.unacked_index_key),
                time(),
                self.dead_letter_max,
                deadletter.hostname(),
                self.global_keyprefix or "",
                *names,
                *self._pma_acks,
            )
            self._pma_acks = []
        else:
            # Wait, without taking, until the first queue has a message; the
            # other lists (priorities, more queues) are looked at after at
            # most `timeout` seconds.
            connection.send_command(_WAIT_CMD, keys[0], keys[0], "RIGHT", "RIGHT", timeout or 0)

    def pma_ack_with_take(self, delivery_tag: str, ack: str | None = None) -> bool:
        """Acknowledge a message in the take script its freed slot sends now: one round trip for both.

        kombu acknowledges with a ``MULTI``/``EXEC`` it waits for, then the
        freed slot sends the next take: the event loop waits for Redis twice
        per task. Here the acknowledgement is written with the take and its
        reply read with the take's, in the event loop's poll. Only on the
        event loop's thread (prefork, solo; not a thread pool's worker
        threads), when the next take is the take script and none is pending;
        returns False, having done nothing, otherwise. An acknowledgement
        that could not go with a take (no queue to take from, say) is sent
        on its own before this returns.
        """
        if not self._pma_atomic or self._pma_next != _TAKE_CMD or self.polling:
            return False
        if threading.get_ident() != self._pma_loop_thread:
            return False
        virtual.QoS.ack(self.qos, delivery_tag)  # the slot is free here
        # The take script reads "<tag>" or "<tag>\n<done key>\n<seconds>\n<message tag>" (see pma_mark_done).
        self._pma_acks.append(ack or delivery_tag)
        try:
            self.wake_poller()
        finally:
            if self._pma_acks:
                tags, self._pma_acks = self._pma_acks, []
                self.pma_forget_unacked(tags)
        return True

    def pma_forget_unacked(self, acks: list[str]) -> None:
        """Remove messages from Redis's record of unacknowledged ones (kombu's ack, for several).

        :param acks: delivery tags, each followed by ``\n<done key>\n<seconds>\n<message tag>`` for a task
            that succeeded.
        """
        index, unacked = self._pma_key(self.unacked_index_key), self._pma_key(self.unacked_key)
        commands: list[tuple[str, tuple[Any, ...]]] = []
        for ack in acks:
            tag, _, done = ack.partition("\n")
            commands += [("zrem", (index, tag)), ("hdel", (unacked, tag))]
            if done:
                key, _, rest = done.partition("\n")
                seconds, _, sent = rest.partition("\n")
                commands.append(("set", (key, sent or "1", "EX", int(seconds))))
        self._pma_send(commands, replicated=False)

    def take_read(self, **options: Any) -> Any:
        sent = self._pma_sent
        self._pma_loop_thread = threading.get_ident()
        try:
            try:
                reply = self.client.parse_response(self.client.connection, sent, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except self.ResponseError as exc:
                if _not_master(exc):
                    # A failover made this server a replica: reconnect,
                    # through the Sentinels when there are.
                    self.client.connection.disconnect()
                    raise redis_py.ConnectionError(f"the broker is not a writable master: {one_line(exc)}") from exc
                if sent == _BRPOP_CMD:
                    raise
                # No Lua or no BLMOVE on this server after all: kombu's way.
                log.warning("Taking messages atomically failed (%s); using BRPOP", one_line(exc))
                self._pma_atomic = False
                raise Empty() from None
        finally:
            self.polling = None
            self.after_take_read()
        if sent == _WAIT_CMD or not reply:
            self._pma_next = _TAKE_CMD if sent == _WAIT_CMD else _WAIT_CMD
            raise Empty()
        self._pma_next = _TAKE_CMD
        lengths = (2,) if sent == _BRPOP_CMD else (3, 4, 5)
        if not isinstance(reply, (list, tuple)) or len(reply) not in lengths:
            # Not what the command returns: the connection is out of step.
            self._pma_resync(f"unexpected reply to {sent} ({type(reply).__name__})")
            raise Empty()
        key = bytes_to_str(reply[0])
        if self.global_keyprefix and key.startswith(self.global_keyprefix):
            key = key[len(self.global_keyprefix) :]
        queue = self._pma_queue(key)
        self.rotate(queue)
        item = reply[1]
        tag = bytes_to_str(reply[2]) if len(reply) > 2 and reply[2] else None
        envelope, problem = _read(item, self.max_item_bytes)
        if len(reply) == 5:
            # The take script dead-lettered it already: log the exact reason.
            description = {"queue": queue, "reason": problem or "not a message envelope", "kind": deadletter.REFUSED}
            deadletter.stored(description, bytes_to_str(reply[3]), int(reply[4]), self.dead_letter_max)
            raise Empty()
        if problem is not None:
            if tag is not None:
                self._pma_keys[tag] = key
                self.pma_dead_letter(tag, problem)
            else:
                self._pma_dead_item(key, item if isinstance(item, bytes) else item.encode(), problem)
            raise Empty()
        if tag is not None:
            self._pma_recorded.add(tag)
            self._pma_keys[tag] = key
            if len(reply) == 4:
                self._pma_replays.add(tag)
        elif not self._pma_no_ack.get(queue, True):
            self._pma_keys[envelope["properties"]["delivery_tag"]] = key
        self.connection._pma_checked = envelope
        self.deliver(envelope, queue)
        return True

    def get_one(self, queue: str) -> Any:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                key = self.queue_key(queue, pri)
                item = client.rpop(key)
                if not item:
                    continue
                envelope, problem = _read(item, self.max_item_bytes)
                if problem is None:
                    return envelope
                self._pma_dead_item(key, item, problem)
        raise Empty()

    def close(self) -> None:
        if self.polling and self._pma_sent == _TAKE_CMD and not self.closed:
            # A message taken for a consumer that is going away goes back to
            # the front of its queue now, not after the visibility timeout.
            try:
                reply = self.client.parse_response(self.client.connection, _TAKE_CMD)
            except Exception as exc:  # closing: what was taken waits in Redis for the visibility timeout
                log.debug("Could not read the last message taken (%s)", one_line(exc))
                reply = None
            self.polling = None
            if reply and len(reply) == 3 and reply[2]:
                self.qos.restore_by_tag(bytes_to_str(reply[2]))
        super().close()

    def _pma_resync(self, reason: str) -> None:
        """Drop the connection so the next read starts on a fresh one, in step with Redis."""
        log.error("Reconnecting to the broker: %s", reason)
        connection = getattr(self.client, "connection", None)
        if connection is not None:
            connection.disconnect()

    def receive_fanout(self, c: Any) -> Any:
        # Fanout (pub/sub) items: the workers' remote control. Nothing to keep:
        # a bad one is logged and skipped.
        transport = self.connection
        transport._pma_delivering = False
        try:
            return self.kombu_receive_fanout(c)
        except Exception as exc:
            # Past delivery the message belongs to the consumer, and broker
            # errors must reach kombu's reconnection logic.
            if transport._pma_delivering or isinstance(exc, broker_errors(transport)):
                raise
            log.error("Rejected an item published to the workers: not a readable message envelope (%s)", one_line(exc))
            return None


def _not_master(exc: BaseException) -> bool:
    """Whether a Redis error reply means the server is not a master now (redis-py strips known codes)."""
    return isinstance(exc, redis_py.ReadOnlyError) or str(exc).startswith(_NOT_MASTER)


def _merged(commands: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, tuple[Any, ...]]]:
    """``commands`` with the ``LPUSH`` es of each list merged into one, where the list first appears."""
    merged: list[tuple[str, list[Any]]] = []
    pushes: dict[Any, list[Any]] = {}
    for name, command_args in commands:
        if name != "lpush":
            merged.append((name, list(command_args)))
            continue
        push = pushes.get(command_args[0])
        if push is None:
            push = pushes[command_args[0]] = [command_args[0]]
            merged.append((name, push))
        push.extend(command_args[1:])
    return [(name, tuple(command_args)) for name, command_args in merged]


class JSONText(str):
    """A value for :meth:`Channel.pma_put_like` that is already the JSON text of a string, quotes included (ASCII)."""

    __slots__ = ()


class Template(NamedTuple):
    """A collected message that others of a batch are copies of (see :meth:`Channel.pma_template`)."""

    #: The Redis lists it went to.
    keys: list[str]
    #: The message, decoded.
    message: dict[str, Any]
    #: Its encoded text, cut where a copy's own values go: body, header slots, correlation id, delivery tag.
    pieces: tuple[str, ...]


def _frame(message: dict[str, Any], header_slots: tuple[str, ...]) -> tuple[str, ...]:
    """The text of ``message`` as kombu encodes it, cut around the values a copy changes."""
    marks = [f"\0pma-slot-{i}\0" for i in range(len(header_slots) + 3)]
    body_mark, *header_marks, correlation_mark, tag_mark = marks
    marked = {
        **message,
        "body": body_mark,
        "headers": {**message["headers"], **dict(zip(header_slots, header_marks))},
        "properties": {**message["properties"], "correlation_id": correlation_mark, "delivery_tag": tag_mark},
    }
    text = dumps(marked)
    pieces: list[str] = []
    for mark in marks:
        before, found, text = text.partition(json.dumps(mark))
        if not found:
            raise ValueError(f"kombu encoded {mark!r} otherwise than json.dumps")
        pieces.append(before)
    return (*pieces, text)


def _read(item: Any, max_bytes: int) -> tuple[Any, str | None]:
    """A queue item decoded as a message envelope, and why kombu could not use it (None when it can).

    An item over ``max_bytes`` is not parsed at all.
    """
    if item is not None and len(item) > max_bytes:
        return None, f"the item takes {len(item)} bytes, over the {max_bytes} a message may take"
    try:
        envelope = loads(bytes_to_str(item))
    except Exception as exc:  # whatever kombu's JSON decoder raises on garbage
        return None, f"not a readable message envelope ({one_line(exc)})"
    return envelope, envelope_problem(envelope)


def _due(message: Any) -> float | None:
    """When a message to publish is due (its ``eta`` header), as Unix time; None when it has none."""
    headers = message.get("headers") if isinstance(message, dict) else None
    eta = headers.get("eta") if isinstance(headers, dict) else None
    if not isinstance(eta, str):
        return None
    try:
        when = datetime.fromisoformat(eta)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None  # Celery decides what a naive time means
    return when.timestamp()


class Transport(KombuRedisTransport):
    """kombu's Redis transport with :class:`Channel`, moving due delayed messages every second in the worker."""

    Channel = Channel
    _pma_delivering = False
    _pma_checked: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pma_channels: weakref.WeakSet[Channel] = weakref.WeakSet()

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        previous = _MOVERS.pop(loop, None)
        if previous is not None:  # registered again after a reconnection
            previous.cancel()
        _MOVERS[loop] = loop.call_repeatedly(1.0, self._pma_move_due)

    def _pma_move_due(self) -> None:
        for channel in list(self._pma_channels):
            if channel.closed:
                continue
            try:
                moved = channel.pma_move_due()
            except Exception as exc:  # the broker is away: the next second tries again
                log.debug("Could not move due delayed messages: %s", one_line(exc))
                continue
            if moved:
                log.debug("Moved %d delayed message(s) onto their queue", moved)

    def deliver_one(self, message: Any, queue: str | None) -> None:
        self._pma_delivering = True
        checked, self._pma_checked = self._pma_checked, None
        problem = None if checked is not None and message is checked else envelope_problem(message)
        if problem is not None:
            log.error("Rejected an item from queue %r: %s", queue, problem)
            return
        self.kombu_deliver(message, queue)


class SentinelChannel(Channel, redis.SentinelChannel):
    """:class:`Channel` on a Redis found through Sentinel: kombu's Sentinel-managed pool, the rest is :class:`Channel`.

    The broker URL names the Sentinels (``sentinel://host:26379;sentinel://...``),
    the ``master_name`` transport option the master they watch.
    """

    from_transport_options = tuple(
        dict.fromkeys((*Channel.from_transport_options, *redis.SentinelChannel.from_transport_options))
    )
    # redis-py's Sentinel-managed connections (they reconnect on READONLY themselves).
    connection_class = redis.SentinelChannel.connection_class
    connection_class_ssl = redis.SentinelChannel.connection_class_ssl

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pma_sentinels: list[Any] = []
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            # kombu checks the connection in its constructor: no master, no channel to close later.
            self._pma_close_sentinels()
            raise

    def make_pool(self, asynchronous: bool = False) -> Any:
        pool = self.kombu_make_pool(asynchronous)
        manager = getattr(pool, "sentinel_manager", None)
        if manager is not None:
            self._pma_sentinels.append(manager)
        return pool

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._pma_close_sentinels()

    def _pma_close_sentinels(self) -> None:
        """Close the connections to the Sentinels of every pool this channel made.

        kombu before 5.7 leaves them open (celery/kombu#1108): each attempt
        to connect while no master answers would leave a socket behind.
        """
        managers, self._pma_sentinels = self._pma_sentinels, []
        for manager in managers:
            for client in manager.sentinels:
                client.connection_pool.disconnect()


class SentinelTransport(Transport):
    """:class:`Transport` for ``sentinel://`` broker URLs."""

    Channel = SentinelChannel
    default_port = 26379


# The delayed-message mover of each event loop (one per worker, whatever the reconnections).
_MOVERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
