"""Dead letters: what a worker refused, and tasks that failed for good, kept on the broker with the reason.

Nothing the worker takes off a queue is deleted because it was refused. A
message it will not run (garbage, an unknown task, a bad or expired
signature, arguments that do not match, too big, a wrong content type) and a
task that raised with no retries left are *dead-lettered*: moved, with their
reason, into a store on the same broker, where ``flask async dead`` lists
them and ``flask async requeue`` puts them back on their queue (the worker
checks them again there).

- **Redis**: per queue ``<queue>``, a list of entry ids ``<queue>.pma.dead``
  (newest first) and two hashes, ``<queue>.pma.dead.meta`` (what the entry is,
  as JSON) and ``<queue>.pma.dead.raw`` (the message as it was on the
  broker). Entries are written by Lua scripts in the same atomic step that
  takes the message off its queue or out of kombu's unacknowledged hash, so a
  worker killed at any moment leaves the message in one place or the other.
  The store keeps the newest :data:`PYMACARON_ASYNC_DEAD_LETTER_MAX` entries.
- **RabbitMQ**: a durable queue ``<queue>.pma.dead`` (``x-max-length``, the
  oldest dropped first). The message is published there (with publisher
  confirms) before the original is acknowledged: a worker killed in between
  leaves a copy in both, never in neither.

The same module holds what reads them (:func:`list_dead`, :func:`requeue`,
:func:`purge`, :func:`counts`), used by the CLI and by
:meth:`PymacaronAsync.dead_letters <flask_pymacaron_async.PymacaronAsync.dead_letters>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import socket
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from ._context import HEADER as CONTEXT_HEADER
from ._context import MESSAGE_TAG_CHARS
from ._shown import escaped, shown_text

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

#: Suffix of the dead-letter store of a queue (a Redis list, a RabbitMQ queue).
SUFFIX = ".pma.dead"
#: Suffix of the sorted set holding a queue's delayed messages (Redis).
SCHEDULED_SUFFIX = ".pma.scheduled"
#: Suffix of the RabbitMQ queue where deferred messages wait (see :data:`DEFERRED`).
DEFERRED_SUFFIX = ".pma.deferred"
#: Message header of a deferred message: ``[first refusal (Unix time), count]``.
DEFERRED = "pymacaron_async_deferred"
#: Key prefix of the task ids that succeeded (Redis brokers, ``PYMACARON_ASYNC_DONE_TTL``).
DONE_PREFIX = "pma.done."
#: Message header (RabbitMQ) holding a dead letter's description, as JSON.
AMQP_HEADER = "x-pma-dead"

#: Kinds of dead letters.
REFUSED, FAILED = "refused", "failed"

# The worker's node name, for the entries it writes (set by its consumer).
_hostname: str = socket.gethostname()


def set_hostname(name: str) -> None:
    """Name the entries this process writes after the worker's node name."""
    global _hostname
    _hostname = name


def hostname() -> str:
    """The name written in this process's entries."""
    return _hostname


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One dead letter: a refused message or a task that failed for good."""

    #: Its id in the store (the task id when there is one).
    id: str
    #: The queue it was taken from, and goes back to when requeued.
    queue: str
    #: Why: the worker's reason for refusing it, or the task's exception.
    reason: str
    #: When it was dead-lettered (Unix time).
    time: float
    #: ``"refused"`` or ``"failed"``.
    kind: str = REFUSED
    #: The node name of the worker that dead-lettered it.
    hostname: str | None = None
    #: The task name, when the message had one.
    task: str | None = None
    #: The task id, when the message had one.
    task_id: str | None = None
    #: The exception type of a failed task.
    exception: str | None = None
    #: How many times a failed task ran (its retries, plus one).
    attempts: int | None = None
    #: The message as it was on the broker (not shown in ``repr``).
    raw: bytes = dataclasses.field(default=b"", repr=False)
    #: Where the message sat exactly (a Redis list key), and how ``raw`` is stored.
    key: str | None = dataclasses.field(default=None, repr=False)
    format: str = dataclasses.field(default="item", repr=False)

    @property
    def age(self) -> float:
        """Seconds since it was dead-lettered."""
        return max(0.0, time.time() - self.time)

    def describe(self) -> dict[str, Any]:
        """What ``flask async dead --json`` prints of it (never the raw message)."""
        return {
            "id": self.id,
            "queue": self.queue,
            "kind": self.kind,
            "task": self.task,
            "task_id": self.task_id,
            "reason": self.reason,
            "exception": self.exception,
            "attempts": self.attempts,
            "time": self.time,
            "age": round(self.age, 1),
            "hostname": self.hostname,
        }

    @classmethod
    def _from_meta(cls, meta: dict[str, Any], raw: bytes = b"") -> DeadLetter:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in meta.items() if k in fields and k != "raw"}
        values.setdefault("id", "?")
        values.setdefault("queue", "?")
        values.setdefault("reason", "?")
        values.setdefault("time", 0.0)
        return cls(raw=raw, **values)


def entry(
    queue: str,
    reason: str,
    *,
    kind: str = REFUSED,
    task: Any = None,
    task_id: Any = None,
    exception: str | None = None,
    attempts: int | None = None,
    key: str | None = None,
    format: str = "item",
    raw: bytes = b"",
) -> dict[str, Any]:
    """The description of a new dead letter (its ``id`` is the task id, else a digest of ``raw``)."""
    task = task if isinstance(task, str) else None
    task_id = task_id if isinstance(task_id, str) and task_id else None
    return {
        "id": task_id or f"item-{hashlib.sha1(raw).hexdigest()[:12]}",
        "queue": queue,
        "key": key or queue,
        "reason": escaped(" ".join(reason.split()))[:1000],
        "time": time.time(),
        "kind": kind,
        "hostname": _hostname,
        "task": task,
        "task_id": task_id,
        "exception": exception,
        "attempts": attempts,
        "format": format,
    }


#: Called in the worker for each dead letter stored: ``listener(description, id)``.
_listeners: dict[int, Callable[[dict[str, Any], str], None]] = {}


def on_stored(key: Any, listener: Callable[[dict[str, Any], str], None]) -> None:
    """Call ``listener`` for every dead letter this process stores (one listener per ``key``)."""
    _listeners[id(key)] = listener


def stored(description: dict[str, Any], stored_id: str | None, dropped: int, max_entries: int) -> None:
    """Log a message dead-lettered in the worker (one line) and tell the listeners."""
    if stored_id is None:
        return
    task, task_id = description.get("task"), description.get("task_id")
    what = f"task {shown_text(task or '?', 200)}[{shown_text(task_id or '?', 200)}]" if task or task_id else "an item"
    log.error(
        "%s %s from queue %r: %s; kept as dead letter %s (flask async dead)",
        "Failed" if description.get("kind") == FAILED else "Rejected",
        what,
        description.get("queue"),
        description.get("reason"),
        stored_id,
    )
    if dropped:
        _warn_full(description.get("queue") or "?", dropped, max_entries)
    for listener in list(_listeners.values()):
        try:
            listener(description, stored_id)
        except Exception:  # a receiver of the signal failed: the dead letter is stored all the same
            log.exception("A dead-letter listener failed")


_full_warned: dict[str, float] = {}


def _warn_full(queue: str, dropped: int, max_entries: int) -> None:
    # Once a minute per queue: a flood would otherwise log a line per item.
    now = time.monotonic()
    if now - _full_warned.get(queue, -60.0) >= 60.0:
        _full_warned[queue] = now
        log.warning(
            "The dead letters of queue %r are full (PYMACARON_ASYNC_DEAD_LETTER_MAX=%d): dropped the oldest %d",
            queue,
            max_entries,
            dropped,
        )


# -- Redis ---------------------------------------------------------------------

# Stores an entry: key prefix, queue name, entry id, description (JSON), raw message, bound.
# Returns {id, dropped}. Keys are named from the queue: kombu's Redis
# transport is not for Redis Cluster.
_STORE = """
local function store(prefix, queue, entry_id, meta_json, raw, max)
  local list = prefix .. queue .. '.pma.dead'
  local metas, raws = list .. '.meta', list .. '.raw'
  local id = entry_id
  if redis.call('HEXISTS', metas, id) == 1 then
    id = id .. '.' .. redis.call('INCR', list .. '.seq')
  end
  local meta = cjson.decode(meta_json)
  meta['id'] = id
  redis.call('LPUSH', list, id)
  redis.call('HSET', metas, id, cjson.encode(meta))
  redis.call('HSET', raws, id, raw)
  local dropped = 0
  while redis.call('LLEN', list) > max do
    local old = redis.call('RPOP', list)
    redis.call('HDEL', metas, old)
    redis.call('HDEL', raws, old)
    dropped = dropped + 1
  end
  return {id, dropped}
end
"""

#: Moves an unacknowledged message (kombu's unacked hash and index) into the
#: dead letters. KEYS: unacked hash, unacked index. ARGV: delivery tag,
#: key prefix, queue, entry id, description, bound. Returns {id, dropped}, or false when
#: the message is no longer unacknowledged (restored to its queue meanwhile).
DEAD_FROM_UNACKED = (
    _STORE
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return store(ARGV[2], ARGV[3], ARGV[4], ARGV[5], raw, tonumber(ARGV[6]))
"""
)

#: Stores an item already off its queue. ARGV: key prefix, queue, entry id,
#: description, raw item, bound. Returns {id, dropped}.
DEAD_ITEM = (
    _STORE
    + """
return store(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]))
"""
)

#: Takes the first item of KEYS (queue lists, by priority) and, when it is an
#: envelope kombu can acknowledge, records it as unacknowledged (kombu's
#: unacked hash and index) in the same atomic step; anything else goes to the
#: dead letters of its queue in that step. ARGV: unacked hash, unacked index,
#: the time, the dead-letter bound, the worker's name, the key prefix, then
#: the queue name of each key, then the delivery tags of messages to
#: acknowledge first (removed from the unacked hash and index, as kombu's
#: ack does). Returns {key, item, delivery tag} for a message (and 'done'
#: after it when this very message succeeded already: a replay),
#: {key, item, false, dead-letter id, dropped} for a dead letter, or false
#: when every list is empty.
TAKE = (
    _STORE
    + """
for j = 7 + #KEYS, #ARGV do
  local tag = ARGV[j]
  local sep = string.find(tag, '\\n', 1, true)
  if sep then
    -- "<tag>\\n<done key>\\n<seconds>\\n<message tag>": the task succeeded, its id is kept as done.
    local done = string.sub(tag, sep + 1)
    tag = string.sub(tag, 1, sep - 1)
    local sep2 = string.find(done, '\\n', 1, true)
    local sep3 = string.find(done, '\\n', sep2 + 1, true)
    redis.call('SET', string.sub(done, 1, sep2 - 1), string.sub(done, sep3 + 1), 'EX',
      tonumber(string.sub(done, sep2 + 1, sep3 - 1)))
  end
  redis.call('ZREM', ARGV[2], tag)
  redis.call('HDEL', ARGV[1], tag)
end
for i = 1, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, envelope = pcall(cjson.decode, item)
    local reason = 'not a readable message envelope'
    if ok and type(envelope) == 'table' and type(envelope['properties']) == 'table' then
      local properties = envelope['properties']
      local tag, info = properties['delivery_tag'], properties['delivery_info']
      if type(tag) == 'string' and tag ~= '' and type(info) == 'table'
          and type(info['exchange']) == 'string' and type(info['routing_key']) == 'string' then
        redis.call('ZADD', ARGV[2], ARGV[3], tag)
        redis.call('HSET', ARGV[1], tag,
          '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
        local headers = envelope['headers']
        if type(headers) == 'table' and type(headers['id']) == 'string'
            and type(headers['"""
    + CONTEXT_HEADER
    + """']) == 'string' then
          -- This very message ran to success already (a replay): the worker refuses it.
          local sent = redis.call('GET', ARGV[6] .. '"""
    + DONE_PREFIX
    + """' .. headers['id'])
          if sent and sent == string.sub(headers['"""
    + CONTEXT_HEADER
    + """'], -"""
    + str(MESSAGE_TAG_CHARS)
    + """) then
            return {KEYS[i], item, tag, 'done'}
          end
        end
        return {KEYS[i], item, tag}
      end
      reason = 'not a message envelope kombu can read'
    elseif ok then
      reason = 'not a message envelope'
    end
    local queue = ARGV[6 + i]
    local meta = cjson.encode({queue = queue, key = string.sub(KEYS[i], #ARGV[6] + 1), reason = reason,
      time = tonumber(ARGV[3]), kind = 'refused', hostname = ARGV[5], format = 'item'})
    local id = 'item-' .. string.sub(redis.sha1hex(item), 1, 12)
    local stored = store(ARGV[6], queue, id, meta, item, tonumber(ARGV[4]))
    return {KEYS[i], item, false, stored[1], stored[2]}
  end
end
return false
"""
)

#: Moves an unacknowledged message into a queue's delayed set, as ``member``
#: due at ``score``. KEYS: unacked hash, unacked index, delayed set. ARGV:
#: delivery tag, score, member. Returns 1, or 0 when the message is no longer
#: unacknowledged.
DEFER_FROM_UNACKED = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return 1
"""

#: Moves every due member of the delayed sets KEYS onto its queue (a member
#: is ``<list key>\\n<item>``). ARGV: due time, most members per set.
#: Returns how many moved.
MOVE_DUE = """
local moved = 0
for i = 1, #KEYS do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
  for _, member in ipairs(due) do
    local sep = string.find(member, '\\n', 1, true)
    if sep then
      redis.call('LPUSH', string.sub(member, 1, sep - 1), string.sub(member, sep + 1))
    end
    redis.call('ZREM', KEYS[i], member)
    moved = moved + 1
  end
end
return moved
"""

#: Puts a dead letter back on its queue, unless another requeue took it
#: first. KEYS: entry list, description hash, raw hash, target list. ARGV:
#: entry id, item to push. Returns 1 when requeued.
_REQUEUE = """
if redis.call('LREM', KEYS[1], 0, ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('LPUSH', KEYS[4], ARGV[2])
return 1
"""


def member(key: str, item: str | bytes) -> bytes:
    """A delayed-set member for ``item`` going to the list ``key``."""
    data = item.encode("utf-8") if isinstance(item, str) else item
    return key.encode("utf-8") + b"\n" + data


def _redis_keys(prefix: str, queue: str) -> tuple[str, str, str]:
    name = f"{prefix}{queue}{SUFFIX}"
    return name, f"{name}.meta", f"{name}.raw"


def _redis_list(client: Any, prefix: str, queue: str) -> list[DeadLetter]:
    ids_key, meta_key, raw_key = _redis_keys(prefix, queue)
    ids = [_text(i) for i in client.lrange(ids_key, 0, -1)]
    if not ids:
        return []
    metas = client.hmget(meta_key, ids)
    letters = []
    for entry_id, meta in zip(ids, metas):
        if meta is None:
            continue
        try:
            description = json.loads(meta)
        except ValueError:
            description = {"id": entry_id, "queue": queue, "reason": "(unreadable description)"}
        description.setdefault("queue", queue)
        letters.append(DeadLetter._from_meta(description))
    return letters


def _redis_item(letter: DeadLetter, raw: bytes) -> bytes:
    """The queue item that puts ``letter`` back: its envelope, without the deferral count."""
    item = raw
    if letter.format == "unacked":
        # kombu's unacked value: [envelope, exchange, routing key].
        try:
            text = raw.decode("utf-8")
            _, end = json.JSONDecoder().raw_decode(text, 1)
            item = text[1:end].encode("utf-8")
        except (UnicodeDecodeError, ValueError, IndexError):
            return raw
    try:
        envelope = json.loads(item)
    except (UnicodeDecodeError, ValueError):
        return item  # garbage goes back as it was: the worker refuses it again
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    if isinstance(headers, dict) and DEFERRED in headers:
        headers.pop(DEFERRED)
        return json.dumps(envelope).encode("utf-8")
    return item


def done_key(task_id: str) -> str:
    """The Redis key (before kombu's key prefix) that says task ``task_id`` succeeded."""
    return DONE_PREFIX + task_id


def _redis_requeue(client: Any, prefix: str, queue: str, wanted: set[str] | None) -> list[DeadLetter]:
    ids_key, meta_key, raw_key = _redis_keys(prefix, queue)
    requeued = []
    script = client.register_script(_REQUEUE)
    for letter in _redis_list(client, prefix, queue):
        if wanted is not None and letter.id not in wanted and letter.task_id not in wanted:
            continue
        if letter.task_id and client.exists(prefix + done_key(letter.task_id)):
            log.warning(
                "Dead letter %s not requeued: task %s[%s] has succeeded since (PYMACARON_ASYNC_DONE_TTL)",
                letter.id,
                shown_text(str(letter.task), 200),
                shown_text(str(letter.task_id), 200),
            )
            continue
        raw = client.hget(raw_key, letter.id)
        if raw is None:
            continue
        target = prefix + (letter.key or queue)
        if script(keys=[ids_key, meta_key, raw_key, target], args=[letter.id, _redis_item(letter, raw)]):
            requeued.append(letter)
    return requeued


def _redis_purge(client: Any, prefix: str, queue: str) -> int:
    ids_key, meta_key, raw_key = _redis_keys(prefix, queue)
    count = client.llen(ids_key)
    client.delete(ids_key, meta_key, raw_key, f"{ids_key}.seq")
    return int(count)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# -- RabbitMQ ------------------------------------------------------------------


class AmqpStore:
    """Publishes dead letters and deferred messages to RabbitMQ with publisher confirms.

    One connection per process, opened on first use, apart from the worker's
    consumer connection (waiting for a confirm there would run the event loop).
    """

    def __init__(self, celery: Celery) -> None:
        self.celery = celery
        self._connection: Any = None
        self._declared: set[str] = set()
        self._lock = threading.Lock()

    def _conn(self) -> Any:
        if self._connection is None:
            from kombu import Connection

            conf = self.celery.conf
            options = {**(conf.broker_transport_options or {}), "confirm_publish": True}
            self._connection = Connection(
                conf.broker_write_url or conf.broker_url,
                transport_options=options,
                connect_timeout=conf.broker_connection_timeout,
            )
        return self._connection

    def publish(
        self,
        queue: str,
        body: bytes,
        headers: dict[str, Any],
        properties: dict[str, Any],
        arguments: dict[str, Any],
        expiration: float | None = None,
    ) -> None:
        """Publish a copy of a message to ``queue`` (declared with ``arguments``) and wait for the broker's confirm."""
        from kombu import Producer

        with self._lock:
            for attempt in (1, 2):
                connection = self._conn()
                try:
                    if queue not in self._declared:
                        _declare(connection, queue, arguments)
                        self._declared.add(queue)
                    Producer(connection.default_channel).publish(
                        body,
                        exchange="",
                        routing_key=queue,
                        headers=headers,
                        content_type=properties.get("content_type"),
                        content_encoding=properties.get("content_encoding"),
                        priority=properties.get("priority"),
                        delivery_mode=2,
                        expiration=expiration,
                        retry=False,
                    )
                    return
                except connection.connection_errors + connection.channel_errors:
                    self._declared.clear()
                    connection.release()
                    self._connection = None
                    if attempt == 2:
                        raise

    def declare(self, queue: str, arguments: dict[str, Any]) -> None:
        """Declare ``queue`` with ``arguments`` unless it exists (RabbitMQ drops what it dead-letters to no queue)."""
        with self._lock:
            if queue in self._declared:
                return
            connection = self._conn()
            try:
                _declare(connection, queue, arguments)
            except connection.connection_errors + connection.channel_errors:
                connection.release()
                self._connection = None
                self._declared.clear()
                raise
            self._declared.add(queue)

    def close(self) -> None:
        """Close the connection (a new one opens on next use)."""
        with self._lock:
            if self._connection is not None:
                self._connection.release()
                self._connection = None
                self._declared.clear()


def _declare(connection: Any, queue: str, arguments: dict[str, Any]) -> None:
    """Declare ``queue``, or use it as it is when it exists (its arguments may differ from ours)."""
    from kombu.exceptions import ChannelError

    channel = connection.channel()
    try:
        channel.queue_declare(queue=queue, passive=True)
        return
    except ChannelError:
        # Not there: the broker closed that channel.
        channel = connection.channel()
        channel.queue_declare(queue=queue, durable=True, auto_delete=False, arguments=arguments)
    finally:
        _close(channel)


def amqp_arguments(max_entries: int, quorum: bool = False) -> dict[str, Any]:
    """Arguments of a dead-letter queue on RabbitMQ: bounded, the oldest dropped first.

    :param quorum: a quorum queue, as the queue whose dead letters it keeps.
    """
    arguments: dict[str, Any] = {"x-max-length": max_entries, "x-overflow": "drop-head"}
    if quorum:
        arguments["x-queue-type"] = "quorum"
    return arguments


def amqp_copy(message: Any) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """Body, headers and properties to publish a copy of a received message."""
    from ._context import VERIFIED

    headers = dict(message.headers or {})
    # The body is already decompressed; the worker's marker must never leave the worker.
    for name in ("compression", VERIFIED, AMQP_HEADER):
        headers.pop(name, None)
    properties = {
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "priority": (message.properties or {}).get("priority"),
    }
    body = message.body if isinstance(message.body, bytes) else str(message.body or "").encode("utf-8")
    return body, headers, properties


def _amqp_entries(channel: Any, queue: str) -> Iterator[tuple[Any, DeadLetter]]:
    """Each message of ``queue``'s dead-letter queue, taken without acknowledgement."""
    from kombu.exceptions import ChannelError

    name = queue + SUFFIX
    try:
        count = channel.queue_declare(queue=name, passive=True).message_count
    except ChannelError:
        return
    for _ in range(count):
        raw = channel.basic_get(name, no_ack=False)
        if raw is None:
            return
        message = channel.message_to_python(raw)
        headers = message.headers or {}
        try:
            description = json.loads(headers.get(AMQP_HEADER) or "{}")
        except (TypeError, ValueError):
            description = {}
        if not description and headers.get("x-death"):
            description = _rabbitmq_dead(headers)
        description.setdefault("queue", queue)
        description.setdefault("id", headers.get("id") or "?")
        yield message, DeadLetter._from_meta(description, raw=message.body or b"")


_RABBITMQ_DEATH = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


def _rabbitmq_dead(headers: dict[str, Any]) -> dict[str, Any]:
    """The description of a message RabbitMQ dead-lettered itself (a quorum queue's delivery limit, a reject)."""
    death = headers["x-death"][0] if isinstance(headers["x-death"], list) and headers["x-death"] else {}
    why = _text(death.get("reason") or "?") if isinstance(death, dict) else "?"
    reason = f"dead-lettered by RabbitMQ ({why})"
    if why == "delivery_limit":
        reason = "delivered too many times (the quorum queue's x-delivery-limit): each delivery ended without an ack"
    when = death.get("time") if isinstance(death, dict) else None
    return {
        "reason": reason,
        "kind": REFUSED,
        "task": headers.get("task"),
        "task_id": headers.get("id"),
        "time": when.timestamp() if isinstance(when, datetime) else time.time(),
    }


# -- what the CLI and the extension use ----------------------------------------------


def _is_amqp(connection: Any) -> bool:
    return bool(connection.transport.driver_type == "amqp")


def _prefix(channel: Any) -> str:
    return str(getattr(channel, "global_keyprefix", "") or "")


def _plain(channel: Any) -> Any:
    """A redis-py client on the channel's pool that adds no key prefix by itself (we add it)."""
    import redis as redis_py

    return redis_py.Redis(connection_pool=channel.pool)


def counts(celery: Celery, queues: Iterable[str]) -> dict[str, int]:
    """How many dead letters each queue has."""
    found: dict[str, int] = {}
    with celery.connection_for_read() as connection:
        connection.ensure_connection(max_retries=0)
        if _is_amqp(connection):
            found.update(
                _per_amqp_queue(connection, queues, lambda ch, q: ch.queue_declare(queue=q, passive=True).message_count)
            )
        else:
            channel = connection.default_channel
            client = _plain(channel)
            for queue in queues:
                found[queue] = int(client.llen(_redis_keys(_prefix(channel), queue)[0]))
    return found


def list_dead(celery: Celery, queues: Iterable[str]) -> list[DeadLetter]:
    """The dead letters of ``queues``, newest first."""
    letters: list[DeadLetter] = []
    with celery.connection_for_read() as connection:
        connection.ensure_connection(max_retries=0)
        if _is_amqp(connection):
            for queue in queues:
                channel = connection.channel()
                try:
                    letters += [letter for _, letter in _amqp_entries(channel, queue)]
                finally:
                    _close(channel)  # what was taken goes back, in order
        else:
            channel = connection.default_channel
            client = _plain(channel)
            for queue in queues:
                letters += _redis_list(client, _prefix(channel), queue)
    return sorted(letters, key=lambda letter: letter.time, reverse=True)


def requeue(celery: Celery, queues: Iterable[str], ids: Iterable[str] | None = None) -> list[DeadLetter]:
    """Put dead letters back on their queue: those whose id or task id is in ``ids``, or all when ``ids`` is None.

    :returns: the dead letters requeued.
    """
    wanted = set(ids) if ids is not None else None
    requeued: list[DeadLetter] = []
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=0)
        if _is_amqp(connection):
            store = AmqpStore(celery)
            try:
                for queue in queues:
                    channel = connection.channel()
                    try:
                        for message, letter in _amqp_entries(channel, queue):
                            if wanted is not None and letter.id not in wanted and letter.task_id not in wanted:
                                continue
                            body, headers, properties = amqp_copy(message)
                            headers.pop(DEFERRED, None)
                            # RabbitMQ's own record of a dead-lettering: the message starts afresh.
                            for name in [h for h in headers if h.startswith(_RABBITMQ_DEATH)]:
                                headers.pop(name)
                            # Confirmed on the queue before it leaves the dead letters.
                            store.publish(queue, body, headers, properties, {})
                            message.ack()
                            requeued.append(letter)
                    finally:
                        _close(channel)
            finally:
                store.close()
        else:
            channel = connection.default_channel
            client = _plain(channel)
            for queue in queues:
                requeued += _redis_requeue(client, _prefix(channel), queue, wanted)
    return requeued


def purge(celery: Celery, queues: Iterable[str]) -> dict[str, int]:
    """Delete the dead letters of ``queues``; how many each had."""
    purged: dict[str, int] = {}
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=0)
        if _is_amqp(connection):
            purged.update(_per_amqp_queue(connection, queues, lambda ch, q: ch.queue_purge(q) or 0))
        else:
            channel = connection.default_channel
            client = _plain(channel)
            for queue in queues:
                purged[queue] = _redis_purge(client, _prefix(channel), queue)
    return purged


def _per_amqp_queue(connection: Any, queues: Iterable[str], op: Callable[[Any, str], int]) -> dict[str, int]:
    """``op(channel, dead-letter queue)`` for each of ``queues``, on a channel each; 0 where it does not exist."""
    from kombu.exceptions import ChannelError

    found: dict[str, int] = {}
    for queue in queues:
        channel = connection.channel()
        try:
            found[queue] = op(channel, queue + SUFFIX)
        except ChannelError:  # never declared: the broker closed the channel
            found[queue] = 0
        finally:
            _close(channel)
    return found


def _close(channel: Any) -> None:
    try:
        channel.close()
    except Exception as exc:  # the broker may have closed it already
        log.debug("Closing a channel failed: %s", exc)
