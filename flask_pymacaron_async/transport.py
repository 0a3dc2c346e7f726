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
  "Unrecoverable error". Here such an item is logged on one line and dropped,
  and the worker goes on with the next one. What is inside a readable
  envelope (headers, body, signature) is checked by
  :class:`flask_pymacaron_async.consumer.Consumer`.

:func:`configure` makes a Celery app use both; :class:`PymacaronAsync` calls
it for the Celery app of every Flask app.
"""

from __future__ import annotations

import base64
import binascii
import logging
from queue import Empty
from time import monotonic, time
from typing import Any, Callable, Mapping

from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

log = logging.getLogger(__name__)

#: ``broker_transport`` value that selects :class:`Transport`.
TRANSPORT = "flask_pymacaron_async.transport:Transport"
#: ``worker_consumer`` value that selects :class:`~flask_pymacaron_async.consumer.Consumer`.
CONSUMER = "flask_pymacaron_async.consumer:Consumer"

# Broker URL schemes served by kombu's plain Redis transport.
_REDIS_SCHEMES = ("redis", "rediss")
# Takes the first item of KEYS and, when it is an envelope kombu can
# acknowledge, records it as unacknowledged (kombu's unacked hash and index)
# in the same atomic step. ARGV: unacked hash, unacked index, the time.
# Returns {key, item, delivery tag or false}, or false when every list is empty.
_TAKE = """
for i = 1, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, envelope = pcall(cjson.decode, item)
    if ok and type(envelope) == 'table' and type(envelope['properties']) == 'table' then
      local properties = envelope['properties']
      local tag, info = properties['delivery_tag'], properties['delivery_info']
      if type(tag) == 'string' and tag ~= '' and type(info) == 'table'
          and type(info['exchange']) == 'string' and type(info['routing_key']) == 'string' then
        redis.call('ZADD', ARGV[2], ARGV[3], tag)
        redis.call('HSET', ARGV[1], tag,
          '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
        return {KEYS[i], item, tag}
      end
    end
    return {KEYS[i], item, false}
  end
end
return false
"""
_TAKE_CMD, _WAIT_CMD, _BRPOP_CMD = "EVAL", "BLMOVE", "BRPOP"

_JSON_KINDS = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array"}


def configure(celery: Any, overrides: Mapping[str, Any]) -> None:
    """Make ``celery`` reject bad messages instead of dying on them.

    Sets ``worker_consumer`` (any broker) and, for a ``redis://`` or
    ``rediss://`` broker, ``broker_transport``, unless ``overrides`` (the
    app's ``CELERY`` setting) sets them itself.
    """
    conf = celery.conf
    if "worker_consumer" not in overrides:
        conf.worker_consumer = CONSUMER
    url = conf.broker_url
    if "broker_transport" in overrides or not isinstance(url, str) or ";" in url:
        return
    scheme = url.partition("://")[0]
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


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


class QoS(redis.QoS):
    """kombu's Redis QoS, looking for abandoned messages at every sweep."""

    def append(self, message: Any, delivery_tag: str) -> None:
        recorded = self.channel._pma_recorded
        if delivery_tag in recorded:
            # The take script already recorded it in Redis.
            recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        super().ack(delivery_tag)
        self._take_next()

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().reject(delivery_tag, requeue=requeue)
        self._take_next()

    def _take_next(self) -> None:
        # Celery acknowledges from a callback that runs after the event
        # loop's "poll start" hook and before it polls: without this the
        # freed slot waits for the poll to time out (up to 2 s) first.
        channel = self.channel
        cycle = getattr(channel.connection, "cycle", None)
        if cycle is None or channel._in_poll or not channel.active_queues or not self.can_consume():
            return
        if getattr(cycle, "poller", None) is None or channel not in cycle._channels:
            return
        cycle._register_BRPOP(channel)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        # kombu scans for messages a dead worker left unacknowledged on one
        # sweep in ten (every ~100 s); a sweep is one small Redis query, so a
        # message comes back within the visibility timeout plus ~10 s.
        super().restore_visible(start=start, num=num, interval=self.channel.unacked_restore_throttle)


class Channel(redis.Channel):
    """kombu's Redis channel; an item it cannot decode is logged and dropped."""

    QoS = QoS
    #: Scan on every sweep (``broker_transport_options`` may set it).
    unacked_restore_throttle = 1
    from_transport_options = (*redis.Channel.from_transport_options, "unacked_restore_throttle")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pma_recorded: set[str] = set()
        self._pma_no_ack: dict[str, bool] = {}
        self._pma_sent = _BRPOP_CMD
        self._pma_next = _TAKE_CMD
        self._pma_atomic: bool | None = None
        super().__init__(*args, **kwargs)

    def _create_client(self, asynchronous: bool = False) -> Any:
        # kombu builds a new redis-py client for every command it sends (~60 us
        # each with redis-py 8); one client per pool serves them all.
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        cached = self.__dict__.get("_pma_client")
        if cached is None or cached[0] is not pool:
            cached = self._pma_client = (pool, super()._create_client())
        return cached[1]

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        self._pma_no_ack[queue] = bool(no_ack)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _atomic_take(self) -> bool:
        """Whether this channel takes messages with the take script."""
        if self._pma_atomic is None:
            try:
                version = str(self.client.info("server").get("redis_version", "0"))
                major, minor = (int(part) for part in version.split(".")[:2])
            except (ValueError, TypeError, self.ResponseError):  # INFO disabled or unreadable
                major = minor = 0
            self._pma_atomic = (major, minor) >= (6, 2) and not getattr(self, "global_keyprefix", None)
        return self._pma_atomic and not any(self._pma_no_ack.get(q, True) for q in self.active_queues)

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._atomic_take():
            self._pma_sent = _BRPOP_CMD
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = getattr(self, "brpop_timeout", 1)  # kombu 5.2: always 1
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        self._pma_sent = self._pma_next
        if self._pma_sent == _TAKE_CMD:
            connection.send_command(
                _TAKE_CMD, _TAKE, len(keys), *keys, self.unacked_key, self.unacked_index_key, time()
            )
        else:
            # Wait, without taking, until the first queue has a message; the
            # other lists (priorities, more queues) are looked at after at
            # most `timeout` seconds.
            connection.send_command(_WAIT_CMD, keys[0], keys[0], "RIGHT", "RIGHT", timeout or 0)

    def _brpop_read(self, **options: Any) -> Any:
        sent = self._pma_sent
        if sent == _BRPOP_CMD:
            return self._guarded(super()._brpop_read, resync=True, **options)
        try:
            try:
                reply = self.client.parse_response(self.client.connection, sent, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except self.ResponseError as exc:
                # No Lua or no BLMOVE on this server after all: kombu's way.
                log.warning("Taking messages atomically failed (%s); using BRPOP", _short(exc))
                self._pma_atomic = False
                raise Empty() from None
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()
        if sent == _WAIT_CMD or not reply:
            self._pma_next = _TAKE_CMD if sent == _WAIT_CMD else _WAIT_CMD
            raise Empty()
        self._pma_next = _TAKE_CMD
        if not (isinstance(reply, (list, tuple)) and len(reply) == 3):
            # Not what the script returns: the connection is out of step.
            self._pma_resync(f"unexpected reply to the take script ({type(reply).__name__})")
            raise Empty()
        key, item, tag = reply
        queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        tag = bytes_to_str(tag) if tag else None
        try:
            envelope = loads(bytes_to_str(item))
        except Exception as exc:  # whatever kombu's JSON decoder raises on garbage
            self._pma_drop(
                tag, f"Rejected an item from queue {queue!r}: not a readable message envelope ({_short(exc)})"
            )
            raise Empty() from None
        problem = envelope_problem(envelope)
        if problem is not None:
            self._pma_drop(tag, f"Rejected an item from queue {queue!r}: {problem}")
            raise Empty()
        if tag is not None:
            self._pma_recorded.add(tag)
        self.connection._pma_checked = envelope
        self.connection._deliver(envelope, queue)
        return True

    def close(self) -> None:
        if self._in_poll and self._pma_sent == _TAKE_CMD and not self.closed:
            # A message taken for a consumer that is going away goes back to
            # the front of its queue now, not after the visibility timeout.
            try:
                reply = self.client.parse_response(self.client.connection, _TAKE_CMD)
            except Exception as exc:  # closing: what was taken waits in Redis for the visibility timeout
                log.debug("Could not read the last message taken (%s)", _short(exc))
                reply = None
            self._in_poll = None
            if reply and reply[2]:
                self.qos.restore_by_tag(bytes_to_str(reply[2]))
        super().close()

    def _pma_drop(self, tag: str | None, reason: str) -> None:
        log.error("%s", reason)
        if tag is not None:
            self.qos._remove_from_indices(tag).execute()

    def _pma_resync(self, reason: str) -> None:
        """Drop the connection so the next read starts on a fresh one, in step with Redis."""
        log.error("Reconnecting to the broker: %s", reason)
        connection = getattr(self.client, "connection", None)
        if connection is not None:
            connection.disconnect()

    def _guarded(self, read: Callable[..., Any], *args: Any, resync: bool = False, **kwargs: Any) -> Any:
        transport = self.connection
        transport._pma_delivering = False
        try:
            return read(*args, **kwargs)
        except Empty:
            raise
        except Exception as exc:
            # Past `_deliver` the message belongs to the consumer, and broker
            # errors must reach kombu's reconnection logic.
            if transport._pma_delivering or isinstance(exc, broker_errors(transport)):
                raise
            log.error("Rejected an item popped from the broker: not a readable message envelope (%s)", _short(exc))
            if resync and not isinstance(exc, (UnicodeDecodeError, ValueError)) or _is_reply_shape_error(exc):
                # A reply of the wrong shape means the connection is out of
                # step, not that the item is bad: every later read would fail.
                self._pma_resync(_short(exc))
            raise Empty() from None

    def _receive_one(self, c: Any) -> Any:
        try:
            return self._guarded(super()._receive_one, c)
        except Empty:
            return None

    def _get(self, queue: str) -> Any:
        envelope = self._guarded(super()._get, queue)
        problem = envelope_problem(envelope)
        if problem is not None:
            log.error("Rejected an item from queue %r: %s", queue, problem)
            raise Empty()
        return envelope


def _is_reply_shape_error(exc: BaseException) -> bool:
    """kombu unpacking a BRPOP reply that is not ``[queue, item]``."""
    return isinstance(exc, (ValueError, TypeError)) and "unpack" in str(exc)


class Transport(redis.Transport):
    """kombu's Redis transport with :class:`Channel`; a malformed envelope is logged and dropped."""

    Channel = Channel
    _pma_delivering = False
    _pma_checked: Any = None

    def _deliver(self, message: Any, queue: str | None) -> None:
        self._pma_delivering = True
        checked, self._pma_checked = self._pma_checked, None
        problem = None if checked is not None and message is checked else envelope_problem(message)
        if problem is not None:
            log.error("Rejected an item from queue %r: %s", queue, problem)
            return
        super()._deliver(message, queue)
