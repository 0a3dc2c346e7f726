"""Publishing one call of a task: now, after the response, or inline.

Every call (``task(...)``, ``.delay()``, ``.apply_async()``, a canvas
signature) reaches :meth:`Publisher.publish`: its arguments are checked and
encoded (a ``TypeError`` naming the argument that cannot be sent), then

- ``PYMACARON_ASYNC_ENABLED = False``: run here, through the worker's path
  (signed, verified, decoded, context rebuilt);
- ``after_response`` (in a request): held until the response is sent, then
  published on one producer; dropped when the view failed;
- ``after_commit`` (the app's SQLAlchemy session in a transaction): held
  until the transaction commits, dropped when it rolls back
  (:mod:`~flask_pymacaron_async._commit`);
- otherwise: published now, with the context snapshot in the message
  headers (signed for the message by :class:`~flask_pymacaron_async._amqp.AMQP`):
  on Redis, as a copy of the thread's template for the task once Celery
  has built one (:class:`_Copier`), else through Celery's ``apply_async``.

A broker that does not answer raises
:class:`~flask_pymacaron_async.errors.AsyncUnavailable` (or runs the call
inline with ``PYMACARON_ASYNC_FALLBACK = "inline"``).

:func:`captured` is the seam the pytest plugin's ``captured_tasks`` uses:
while it is active, calls are handed to a recorder instead of Celery.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from celery.result import AsyncResult, EagerResult
from flask import Response, after_this_request, has_app_context, has_request_context, request, request_tearing_down
from kombu.serialization import dumps, loads

from . import _commit as commit
from . import _compat, serialization, signals, tracing
from . import _context as context
from . import _ids as ids
from . import _runner as runner
from . import _transport as transport
from ._context import ContextSigner
from .errors import AsyncUnavailable, MessageTooLarge, one_line

if TYPE_CHECKING:
    from flask import Flask

    from ._state import AsyncState
    from ._task import ContextTask

log = logging.getLogger(__name__)

#: A stand-in for Celery's publish: ``sender(task, payload, args, kwargs, options) -> AsyncResult``.
Sender = Callable[["ContextTask", str, "tuple[Any, ...]", "dict[str, Any]", "dict[str, Any]"], AsyncResult]

# Where the calls held until after the response wait, per request.
_HELD_KEY = "pymacaron_async.held"

# The senders of active `captured()` blocks, innermost last.
_CAPTURING: list[Sender] = []

#: A call held for later: (publisher, task, snapshot payload, args, kwargs, options,
#: ``[args, kwargs]`` as the serializer encoded them).
Call = tuple["Publisher", "ContextTask", str, "tuple[Any, ...]", "dict[str, Any]", "dict[str, Any]", str]

# Per thread, the calls of the active `batch()` block.
_BATCH = threading.local()

# Held while a publisher connects its teardown receiver.
_CONNECTING = threading.Lock()


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Hold the calls made in the block, and publish them in one round trip when it exits cleanly.

    Each call returns its ``AsyncResult`` at once, and an argument that
    cannot be sent still raises ``TypeError`` at the call. When the block
    raises, nothing of it is published (a debug log says how much was
    dropped). Nested blocks join the outer one; in a request published
    ``after_response``, the calls join the request's (same batch). A broker
    that does not answer raises :class:`~flask_pymacaron_async.errors.AsyncUnavailable`
    at the exit (or runs the calls inline with ``PYMACARON_ASYNC_FALLBACK = "inline"``).
    """
    if getattr(_BATCH, "calls", None) is not None:
        yield
        return
    calls: list[Call] = []
    _BATCH.calls = calls
    # In a request published after the response, the block's calls join the
    # request's held ones: a block that raises takes its own back out.
    environ = request.environ if has_request_context() else None
    mark = len(environ.get(_HELD_KEY) or ()) if environ is not None else 0
    try:
        yield
    except BaseException:
        held = environ.get(_HELD_KEY) if environ is not None else None
        dropped = len(calls) + (len(held) - mark if held else 0)
        if held:
            del held[mark:]
        log.debug("The batch block raised: dropping %d held call(s)", dropped)
        raise
    finally:
        _BATCH.calls = None
    by_publisher: dict[int, list[Call]] = {}
    for call in calls:
        by_publisher.setdefault(id(call[0]), []).append(call)
    for group in by_publisher.values():
        group[0][0].send_many(group, raising=True)


@contextlib.contextmanager
def captured(sender: Sender) -> Iterator[None]:
    """Hand every call published in the block to ``sender`` instead of Celery (every app, every extension).

    Everything else happens as usual: argument checks, the snapshot, the
    signals, after_response holding.
    """
    _CAPTURING.append(sender)
    try:
        yield
    finally:
        _CAPTURING.remove(sender)


class Publisher:
    """How the calls of one app are published."""

    def __init__(self, state: AsyncState) -> None:
        self.state = state
        # Whether teardown is connected (see _connect_teardown).
        self._tearing_down = False
        # Per thread: the templates of this process's messages (see _Copier).
        self._local = threading.local()

    def templates(self) -> dict[Any, Any]:
        """The message templates of this thread and process, by call shape (see :class:`_Copier`).

        Per thread and per process: a message names the thread's reply queue
        and the process that sent it.
        """
        local = self._local
        pid = os.getpid()
        if getattr(local, "pid", None) != pid:
            local.pid, local.templates = pid, {}
        templates: dict[Any, Any] = local.templates
        return templates

    def result(self, task: ContextTask, task_id: str) -> AsyncResult:
        """``task.AsyncResult(task_id)``, with the result class and backend looked up once per thread.

        Celery reaches both through kombu's cached properties, which take a
        lock each time: ~1.4 µs of each call.
        """
        made: dict[str, tuple[Any, ...]] | None = getattr(self._local, "results", None)
        if made is None:
            made = self._local.results = {}
        found = made.get(task.name)
        if found is None or found[0] is not task:
            found = made[task.name] = (task, task.app.AsyncResult, task.backend)
        result: AsyncResult = found[1](task_id, backend=found[2])
        return result

    def forget_templates(self) -> None:
        """Build this thread's next messages through Celery again (after changing Celery's settings, say)."""
        self._local.pid = None

    def publish(self, task: ContextTask, args: Any, kwargs: Any, options: dict[str, Any]) -> AsyncResult:
        """Check, snapshot and queue one call of ``task``: now, after the response, or inline."""
        settings = self.state.settings
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        encoded = serialization.check_arguments(task.name, task.run, args, kwargs)
        if len(encoded) > settings.max_message_bytes:
            raise MessageTooLarge(
                f"{task.name}(): arguments take {len(encoded)} bytes, over "
                f"PYMACARON_ASYNC_MAX_MESSAGE_BYTES={settings.max_message_bytes}"
            )
        if not settings.enabled:
            return self.run_inline(task, context.take(self.state), encoded, args, kwargs)
        if task.app.conf.task_always_eager:
            return self._apply(task, encoded, options)
        if task.pma_delay and "countdown" not in options and "eta" not in options:
            options["countdown"] = task.pma_delay
        if task.pma_queue and "queue" not in options:
            options["queue"] = task.pma_queue
        options.setdefault("retry", False)
        trace = tracing.trace_headers()
        if trace:
            options["headers"] = {**(options.get("headers") or {}), **trace}
        mode = task.pma_publish or settings.publish
        if mode == "after_response" and has_request_context():
            return self._hold(task, args, kwargs, options, encoded)
        if mode == "after_commit":
            held = self._hold_for_commit(task, args, kwargs, options)
            if held is not None:
                return held
        pending: list[Call] | None = getattr(_BATCH, "calls", None)
        if pending is not None:
            task_id = options.setdefault("task_id", ids.uuid4())
            pending.append((self, task, context.take(self.state), args, kwargs, options, encoded))
            return self.result(task, task_id)
        return self.send(task, context.take(self.state), args, kwargs, options, encoded)

    def send(
        self,
        task: ContextTask,
        payload: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: dict[str, Any],
        encoded: str | None = None,
        *,
        batched: bool = False,
    ) -> AsyncResult:
        """Hand one call to Celery; :class:`~flask_pymacaron_async._amqp.AMQP` signs its context for the message.

        :param batched: part of :meth:`send_many`: no signal, and a broker
            error is left to it.
        """
        try:
            if _CAPTURING or batched or not self._copying(task):
                result = self._send_one(task, payload, args, kwargs, options)
            else:
                # On Redis, a copy of the task's message template (the first
                # call of each shape in this thread goes through Celery).
                options.setdefault("task_id", ids.uuid4())
                call = (self, task, payload, args, kwargs, options, encoded or serialization.dumps([args, kwargs]))
                (sent,) = self._publish_together([call])
                result = self.result(task, sent) if isinstance(sent, str) else sent
        except Exception as exc:
            if batched or not is_connection_error(exc):
                raise
            if self.state.settings.fallback == "inline":
                log.warning("Broker unavailable (%s); running %s inline", one_line(exc), task.name)
                if encoded is None:
                    encoded = serialization.dumps([args, kwargs])
                return self.run_inline(task, payload, encoded, args, kwargs)
            reason = one_line(exc, 500, kind=False)
            raise AsyncUnavailable(f"could not queue {task.name}: the broker is unavailable ({reason})") from exc
        if not batched:
            signals.task_queued.send(self.state.app, task_name=task.name, task_id=result.id)
        return result

    def _copying(self, task: ContextTask) -> bool:
        """Whether a call published now may copy its template: results ignored, Redis, outside a task."""
        celery = self.state.celery
        return (
            task.ignore_result
            and celery.conf.broker_transport in _COPYING_TRANSPORTS
            and celery.current_worker_task is None
        )

    def _send_one(
        self, task: ContextTask, payload: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> AsyncResult:
        """Hand one call to Celery (or to the active ``captured()`` block's sender)."""
        headers = dict(options.pop("headers", None) or {})
        headers[context.HEADER] = context.Unsigned(payload)
        if _CAPTURING:
            options.pop("producer", None)
            return _CAPTURING[-1](task, payload, args, kwargs, {**options, "headers": headers})
        return task.celery_apply_async(args, kwargs, headers=headers, **options)

    def send_many(self, calls: list[Call], *, raising: bool) -> None:
        """Publish held calls together: on Redis, in one round trip (one ``MULTI``/``EXEC``).

        All are published, or none is: on a broker error, each call is run
        inline (``PYMACARON_ASYNC_FALLBACK = "inline"``), else reported: when
        ``raising``, by :class:`~flask_pymacaron_async.errors.AsyncUnavailable`
        (its ``task_ids`` say which), otherwise by a log line with the task's
        id and ``task_failed``.
        """
        if not calls:
            return
        try:
            if _CAPTURING:
                ids = [
                    self.send(task, payload, a, kw, dict(options), batched=True).id
                    for _, task, payload, a, kw, options, _encoded in calls
                ]
            else:
                ids = [sent if isinstance(sent, str) else sent.id for sent in self._publish_together(calls)]
        except Exception as exc:
            self._not_sent(calls, exc, raising)
            return
        for (_, task, *_rest), task_id in zip(calls, ids):
            signals.task_queued.send(self.state.app, task_name=task.name, task_id=task_id)

    def _publish_together(self, calls: list[Call]) -> list[AsyncResult | str]:
        """Publish ``calls`` in one round trip (see :meth:`_together`). Raises what the broker raised.

        :returns: per call, the id of a copy, or Celery's result for a call it published.
        """
        ids: list[AsyncResult | str] = []
        with self.state.celery.producer_or_acquire() as pooled, self._together(pooled) as producer:
            copier = _Copier.for_channel(self, producer.channel)
            for _, task, payload, args, kwargs, options, encoded in calls:
                copied = copier.send(task, payload, args, kwargs, options, encoded) if copier else None
                if copied is not None:
                    ids.append(copied)
                    continue
                mark = copier.mark() if copier else 0
                sent = {**options, "producer": producer}
                ids.append(self.send(task, payload, args, kwargs, sent, batched=True))
                if copier:
                    copier.learn(task, options, mark)
        return ids

    @contextlib.contextmanager
    def _together(self, producer: Any) -> Iterator[Any]:
        """The producer that sends what is published in the block in one round trip, at its end.

        Redis: the channel collects the commands into one ``MULTI``/``EXEC``.
        RabbitMQ with publisher confirms: the messages go out on a channel of
        the batch and the confirms are awaited once. RabbitMQ without confirms
        needs nothing: publishes are written without waiting for an answer.
        """
        collecting = getattr(producer.channel, "pma_collecting", None)
        if collecting is not None:
            with collecting():
                yield producer
        elif _compat.confirms_publishes(producer):
            confirmed = _compat.ConfirmedBatch.of(producer)
            first = confirmed.published + 1
            yield self.state.celery.amqp.Producer(confirmed.channel, auto_declare=False)
            confirmed.wait(first, self.state.settings.publish_timeout)
        else:
            yield producer

    def _not_sent(self, calls: list[Call], exc: Exception, raising: bool) -> None:
        unavailable = is_connection_error(exc)
        if raising and not unavailable:
            raise exc
        if unavailable and self.state.settings.fallback == "inline":
            log.warning("Broker unavailable (%s); running %d task(s) inline", one_line(exc), len(calls))
            for _, task, payload, args, kwargs, _options, encoded in calls:
                self.run_inline(task, payload, encoded, args, kwargs)
            return
        reason = one_line(exc, 500, kind=False)
        if raising:
            unsent = AsyncUnavailable(f"could not queue {len(calls)} task(s): the broker is unavailable ({reason})")
            unsent.task_ids = [call[5].get("task_id") for call in calls]
            raise unsent from exc
        for _, task, _payload, _args, _kwargs, options, _encoded in calls:
            error: Exception = exc
            if unavailable:
                error = AsyncUnavailable(f"could not queue {task.name}: the broker is unavailable ({reason})")
                error.__cause__ = exc
            log.error("Task %s[%s] not published: %s", task.name, options.get("task_id"), one_line(error))
            signals.task_failed.send(
                self.state.app, task_name=task.name, task_id=options.get("task_id"), exception=error
            )

    def send_later(
        self, task: ContextTask, payload: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> None:
        """:meth:`send` for a call the caller cannot hear about any more: a failure is logged and signalled."""
        try:
            self.send(task, payload, args, kwargs, options)
        except Exception as exc:
            task_id = options.get("task_id")
            log.error("Task %s[%s] not published: %s", task.name, task_id, one_line(exc))
            signals.task_failed.send(self.state.app, task_name=task.name, task_id=task_id, exception=exc)

    # -- after the commit --------------------------------------------------------------

    def _hold_for_commit(
        self, task: ContextTask, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> AsyncResult | None:
        """Hold a call until the app's SQLAlchemy transaction commits; None when there is no transaction."""
        if not has_app_context():
            return None
        session = commit.current_session(self.state.app, getattr(self.state.ext, "session_getter", None))
        task_id = options.setdefault("task_id", ids.uuid4())
        payload = context.take(self.state)
        if not commit.hold(session, lambda: self.send_later(task, payload, args, kwargs, options)):
            return None
        return task.AsyncResult(task_id)

    # -- after the response ----------------------------------------------------------

    def _hold(
        self, task: ContextTask, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any], encoded: str
    ) -> AsyncResult:
        """Keep a call until the response has been sent; its id is known now.

        Only the snapshot is taken before the response: its payload is
        written once per request, after it, and signed per message.
        """
        environ = request.environ
        held = environ.get(_HELD_KEY)
        if held is None:
            held = environ[_HELD_KEY] = []
            after_this_request(self._after_response)
            if not self._tearing_down:
                self._connect_teardown()
        task_id = options.setdefault("task_id", ids.uuid4())
        context.request_snapshot(self.state)  # taken now, as an immediate call would
        held.append((task, args, kwargs, options, encoded))
        return self.result(task, task_id)

    def _after_response(self, response: Response) -> Response:
        held = request.environ.pop(_HELD_KEY, [])
        if response.status_code >= 500:
            log.debug("Response %s: dropping %d held task(s)", response.status_code, len(held))
        elif held:
            snapshot = context.request_snapshot(self.state)
            response.call_on_close(lambda: self._publish_held(snapshot, held))
        return response

    def _connect_teardown(self) -> None:
        """Connect :meth:`teardown`, when the app first holds a call: requests of an app that never does skip it."""
        with _CONNECTING:
            if not self._tearing_down:
                request_tearing_down.connect(self.teardown, self.state.app)
                self._tearing_down = True

    def teardown(self, sender: Flask, exc: BaseException | None = None, **extra: Any) -> None:
        """Publish the calls still held at teardown: they never saw a response (a rebuilt or test request).

        Connected to ``request_tearing_down`` when the app first holds a call
        (a signal, not ``app.teardown_request``: pymacaron services set the
        extension up after their first request; and the requests, rebuilt
        ones included, of an app that never holds a call skip it). Dropped
        when the view raised.
        """
        held = request.environ.pop(_HELD_KEY, None)
        if not held:
            return
        if exc is not None:
            log.debug("Request failed (%s): dropping %d held task(s)", one_line(exc), len(held))
        else:
            self._publish_held(context.request_snapshot(self.state), held)

    def _publish_held(self, snapshot: dict[str, Any], held: list[tuple[Any, ...]]) -> None:
        """Publish the tasks of one request together; failures cannot reach the client any more."""
        payload = ContextSigner.payload(snapshot)
        calls = [(self, task, payload, args, kwargs, options, encoded) for task, args, kwargs, options, encoded in held]
        self.send_many(calls, raising=False)

    # -- inline -------------------------------------------------------------------------

    def apply(self, task: ContextTask, args: Any, kwargs: Any, options: dict[str, Any]) -> EagerResult:
        """Celery's eager ``apply`` of one call, in the caller's context rebuilt (see :meth:`ContextTask.apply`)."""
        encoded = serialization.check_arguments(task.name, task.run, tuple(args or ()), dict(kwargs or {}))
        return self._apply(task, encoded, options)

    def _apply(self, task: ContextTask, encoded: str, options: dict[str, Any]) -> EagerResult:
        """Run ``encoded`` (``[args, kwargs]``) through Celery's tracer here, its context signed and marked verified."""
        state = self.state
        options = dict(options)
        task_id = options.pop("task_id", None) or ids.uuid4()
        token = state.signer.sign(context.take(state), task.name, task_id, encoded)
        headers = {k: v for k, v in (options.pop("headers", None) or {}).items() if k not in _OWN_HEADERS}
        headers[context.HEADER] = token
        headers[context.VERIFIED] = state.mark(token)
        args, kwargs = serialization.loads(encoded)
        signals.task_queued.send(state.app, task_name=task.name, task_id=task_id)
        return task.celery_apply(args, kwargs, task_id=task_id, headers=headers, **options)

    def run_inline(
        self, task: ContextTask, payload: str, encoded: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> EagerResult:
        """Run a call in this process, through the same path as in the worker (signed, checked, decoded)."""
        state = self.state
        task_id = ids.uuid4()
        token = state.signer.sign(payload, task.name, task_id, encoded)
        snapshot = state.signer.verify(token, task.name, task_id, encoded)
        args, kwargs = serialization.loads(encoded)
        signals.task_queued.send(state.app, task_name=task.name, task_id=task_id)
        value = runner.run_in_context(state, task, snapshot, args, kwargs, task_id)
        return EagerResult(task_id, value, "SUCCESS")


# Headers only the extension sets on an eager call.
_OWN_HEADERS = (context.HEADER, context.VERIFIED)

# The transports whose channels make messages from templates (pma_template, pma_put_like).
_COPYING_TRANSPORTS = (transport.TRANSPORT, transport.SENTINEL_TRANSPORT)

#: The options a call of a batch may have and still be published as a copy of another's message.
_COPYABLE_OPTIONS = frozenset(
    {"task_id", "retry", "headers", "queue", "routing_key", "exchange", "priority", "producer"}
)


# The shape's part for the only option of a plain .delay() (see _Copier._shape).
_NO_RETRY = ("retry", repr(False))

# The most templates a thread keeps (one per task and options, usually a few).
_MOST_TEMPLATES = 64

# The headers of a batch copy that are its own (the rest are its template's).
_HEADER_SLOTS = ("id", "root_id", "argsrepr", "kwargsrepr", context.HEADER)


class _Copier:
    """Builds Redis messages from the first one of each task, instead of through Celery each time.

    Celery's ``apply_async`` costs far more per message than the round trip
    (routing, the protocol-2 message, kombu's envelope, declaring the
    queue). The messages of one task with the same options, sent from one
    thread of one process, differ only in the task id, the arguments (body,
    ``argsrepr``, ``kwargsrepr``), the context signature and kombu's
    delivery tag: the first call goes through Celery and its message, as
    the transport collected it, is the template of the next ones, in
    batches and immediate calls alike (:meth:`Publisher.templates`; inside
    a running task, only within one batch: its messages name it as their
    parent).

    A call is copied only when nothing else could differ: no countdown,
    ETA, expiry, callbacks or other options; results ignored (a result
    backend subscribes per call); the app's serializer, no compression,
    protocol 2; nothing connected to Celery's ``before_task_publish`` /
    ``after_task_publish`` (OpenTelemetry's instrumentation, say), no
    ``task-sent`` events, no router in ``task_routes`` (a router may route
    calls of one task by their arguments; routes by task name are fine).
    tests/test_batch.py checks that a copy is the
    message Celery builds for the same call.
    """

    def __init__(self, publisher: Publisher, channel: Any) -> None:
        self.publisher = publisher
        self.channel = channel
        celery = publisher.state.celery
        self.amqp = celery.amqp
        self.serializer = celery.conf.task_serializer
        self.content_type = dumps(None, serializer=self.serializer)[0]
        # The task running this batch, if any: each call joins its trail, as Celery's send_task does.
        self.parent = celery.current_worker_task
        # A task's messages name it as their parent: its templates are its own.
        self.templates: dict[Any, tuple[Any, Any, bool]] = publisher.templates() if self.parent is None else {}
        # Context payloads as JSON text without the closing quote (a batch's calls share theirs).
        self.escaped: dict[str, str] = {}

    @classmethod
    def for_channel(cls, publisher: Publisher, channel: Any) -> _Copier | None:
        celery = publisher.state.celery
        conf = celery.conf
        if not hasattr(channel, "pma_template") or conf.task_send_sent_event:
            return None
        if conf.task_compression or conf.task_protocol != 2:
            return None
        if _compat.publish_signals_connected() or not _routes_by_name(conf.task_routes):
            return None
        return cls(publisher, channel)

    def _shape(self, task: ContextTask, options: dict[str, Any]) -> Any:
        if not task.ignore_result or task.serializer != self.serializer:
            return None
        if len(options) == 2 and options.get("retry") is False and "task_id" in options:
            return (task.name, _NO_RETRY)  # .delay(): what the general case below gives, sooner
        if not options.keys() <= _COPYABLE_OPTIONS:
            return None
        return (task.name, *sorted((k, repr(v)) for k, v in options.items() if k not in ("task_id", "producer")))

    def mark(self) -> int:
        return int(self.channel.pma_mark())

    def learn(self, task: ContextTask, options: dict[str, Any], mark: int) -> None:
        """Keep the message just published as the template of its shape, when it can be one."""
        shape = self._shape(task, options)
        if shape is None or shape in self.templates:
            return
        found = self.channel.pma_template(mark, _HEADER_SLOTS)
        if found is None:
            return
        message = found.message
        headers = message["headers"]
        if headers.get("eta") or headers.get("expires") or headers.get("group") or headers.get("chord"):
            return
        if headers.get("compression") or message.get("content-type") != self.content_type:
            return
        _, _, embed = loads(
            base64.b64decode(message["body"]),
            message["content-type"],
            message["content-encoding"],
            accept=[message["content-type"]],
        )
        if any(embed.get(k) for k in ("callbacks", "errbacks", "chain", "chord")):
            return
        embedded = (embed, serialization.dumps(embed)) if self.serializer == serialization.SERIALIZER else (embed, "")
        if len(self.templates) >= _MOST_TEMPLATES:
            # Calls with headers of their own (a trace context, say) each have
            # a shape of their own: a thread's templates stay few all the same.
            self.templates.clear()
        self.templates[shape] = (found, embedded, headers.get("root_id") == headers.get("id"))

    def send(
        self,
        task: ContextTask,
        payload: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: dict[str, Any],
        encoded: str,
    ) -> str | None:
        """The id of the call, published as a copy of its shape's template; None when it has none (yet).

        :param encoded: ``[args, kwargs]`` as :func:`~flask_pymacaron_async.serialization.dumps`
            wrote them: with this extension's serializer, the body is that
            text with the template's (encoded) embed added.
        """
        shape = self._shape(task, options)
        template = self.templates.get(shape) if shape is not None else None
        if template is None:
            return None
        found, (embed, embed_text), root_is_id = template
        task_id = options["task_id"]
        if self.serializer == serialization.SERIALIZER:
            # JSON is written piece by piece: [args,kwargs,embed] is [args,kwargs] with ",embed" before its "]".
            body_bytes = f"{encoded[:-1]},{embed_text}]".encode()
        else:
            _, _, body = dumps((args, kwargs, embed), serializer=self.serializer)
            body_bytes = body.encode("utf-8") if isinstance(body, str) else body
        argsrepr, kwargsrepr = _compat.task_reprs(self.amqp, args, kwargs)
        root_id = task_id if root_is_id else found.message["headers"]["root_id"]
        # The token as JSON text: the payload's escaped once per batch (the signature needs no escape).
        escaped = self.escaped.get(payload)
        if escaped is None:
            escaped = self.escaped[payload] = encode_basestring_ascii(payload)[:-1]
        headers = found.message["headers"]
        bound = context.bound_headers(
            {**headers, "argsrepr": argsrepr, "kwargsrepr": kwargsrepr}, found.message.get("content-type")
        )
        fresh = context.nonce()
        tag = self.publisher.state.signer.tag(payload, task.name, task_id, body_bytes, bound, fresh)
        signed = transport.JSONText(f'{escaped}.{fresh}{tag}"')
        # In the order of _HEADER_SLOTS.
        self.channel.pma_put_like(found, body_bytes, (task_id, root_id, argsrepr, kwargsrepr, signed), task_id)
        if self.parent:
            result = task.AsyncResult(task_id)
            result.ignored = True
            self.parent.add_trail(result)
        return str(task_id)


def _routes_by_name(routes: Any) -> bool:
    """Whether Celery's ``task_routes`` route a call by its task's name alone (mappings), not by a router.

    A router (a function, or the name of one) may send calls of one task
    with other arguments to other queues: a copy would go where its template went.
    """
    if not routes or isinstance(routes, Mapping):
        return True
    return isinstance(routes, (list, tuple)) and all(isinstance(route, Mapping) for route in routes)


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means the broker or the result backend did not answer."""
    from kombu.exceptions import OperationalError

    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - redis is a dependency
        RedisConnectionError = RedisTimeoutError = OSError  # type: ignore[assignment,misc]  # noqa: N806
    kinds = (OperationalError, RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
    # Celery's result backend wraps the connection error in a RuntimeError.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kinds):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
