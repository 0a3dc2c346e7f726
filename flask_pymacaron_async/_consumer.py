"""The worker's task consumer: every message is checked before Celery sees it, and nothing refused is lost.

Celery's own consumer stops the worker ("Unrecoverable error") on some
malformed task messages (headers of the wrong type, a body that is not
``[args, kwargs, embed]``, a missing task id), sends others through reconnect
loops, logs the rest on many lines with the full body, and discards what it
refuses. :class:`Consumer` checks each message first: its headers, task name,
content type, size, body, arguments against the task's signature, and the
context snapshot signed for this very message. A message that fails is
logged on one line with the reason and moved into the dead letters of its
queue (:mod:`flask_pymacaron_async._deadletter`); the worker goes on.

Two refusals are often a deploy in progress rather than a bad message: a
task this worker does not know, and arguments that do not match this
worker's version of the task. Such a message goes back to its queue, a few
seconds later each time, for ``PYMACARON_ASYNC_DEPLOY_GRACE`` seconds from
the first refusal (a worker that knows it may take it meanwhile); then to
the dead letters.

:func:`flask_pymacaron_async._transport.configure` selects it through
Celery's ``worker_consumer`` setting.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import threading
import time
import weakref
from typing import Any, Callable, NamedTuple

from celery import signals as celery_signals
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded, WorkerLostError
from celery.utils.time import maybe_iso8601
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request as CeleryRequest

from . import _compat, serialization, signals
from . import _context as context
from . import _deadletter as deadletter
from . import _limits as limits
from . import _runner as runner
from ._shown import shown_text
from ._transport import broker_errors
from .config import DEFAULTS
from .errors import ContextError, one_line

log = logging.getLogger(__name__)

_OPTIONAL_STR = ("root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr", "origin", "lang")

# Seconds before a deferred message comes back: doubling, up to the cap.
_DEFER_FIRST, _DEFER_MAX = 1.0, 30.0


class Problem(NamedTuple):
    """Why the worker will not run a message now."""

    #: One line, for the log and the dead letter.
    reason: str
    #: A newer (or older) worker may run it: send it back for the deploy grace period first.
    deferrable: bool = False


class Consumer(CeleryConsumer):
    """Celery's worker consumer, checking each task message before it is handled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        deadletter.set_hostname(self.hostname)
        state = getattr(self.app, "pma_state", None)
        if state is not None:
            flask_app = state.app

            def notify(description: dict[str, Any], stored_id: str) -> None:
                signals.message_dead_lettered.send(
                    flask_app,
                    task_name=description.get("task"),
                    task_id=description.get("task_id"),
                    reason=description.get("reason"),
                    dead_letter_id=stored_id,
                )

            deadletter.on_stored(self.app, notify)
        state = getattr(self.app, "pma_state", None)
        limit = state.settings.max_message_bytes if state is not None else DEFAULTS["PYMACARON_ASYNC_MAX_MESSAGE_BYTES"]
        # kombu inflates a compressed body as it makes the message, before this consumer sees it.
        limits.bound_decompression(limits.body_bytes(limit))

    def on_ready(self) -> None:
        super().on_ready()
        self._pma_declare_dead_letters()

    def _pma_declare_dead_letters(self) -> None:
        """Declare the dead letters of each quorum queue consumed: RabbitMQ routes what it dead-letters there."""
        consumer = getattr(self, "task_consumer", None)
        if consumer is None or not _is_amqp(consumer.channel):
            return
        for queue in consumer.queues:
            arguments = queue.queue_arguments or {}
            target = arguments.get("x-dead-letter-routing-key")
            if arguments.get("x-queue-type") != "quorum" or target != queue.name + deadletter.SUFFIX:
                continue
            try:
                _amqp_store(self.app).declare(
                    target, deadletter.amqp_arguments(_dead_letter_max(self.app), quorum=True)
                )
            except Exception as exc:  # the broker went away: the next start declares it
                log.error(
                    "Could not declare the dead letters %r of quorum queue %r: %s", target, queue.name, one_line(exc)
                )

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        signatures: dict[str, inspect.Signature | None] = {}

        def on_task_received(message: Any) -> Any:
            problem = check_message(self.app, message, signatures)
            if problem is not None:
                return self._pma_refuse(message, problem)
            try:
                return handle(message)
            except Exception as exc:
                if isinstance(exc, self._pma_broker_errors()):
                    raise
                return self._pma_refuse(message, Problem(f"Celery could not handle it: {one_line(exc)}"), exc)

        return on_task_received

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        """A body kombu could not inflate or decode: a dead letter as it came, logged on one line.

        Celery's own logs the message's headers (the context token) and body, then acknowledges it.
        """
        self._pma_refuse(message, Problem(f"its body cannot be decoded: {one_line(exc)}"), exc)

    def _pma_broker_errors(self) -> tuple[type[BaseException], ...]:
        return broker_errors(self)

    def _pma_refuse(self, message: Any, problem: Problem, exc: BaseException | None = None) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        headers.pop(context.VERIFIED, None)
        name, task_id = headers.get("task"), headers.get("id")
        reason = " ".join(problem.reason.split())[:500]
        if not message.acknowledged:
            if problem.deferrable:
                deferred = _deferral(headers, _grace(self.app))
                if deferred is not None:
                    first, count, delay = deferred
                    if defer(self.app, message, [first, count + 1], delay):
                        log.warning(
                            "Deferred task %s[%s]: %s; back on its queue in %gs (refused for %.0fs of "
                            "PYMACARON_ASYNC_DEPLOY_GRACE=%gs, then dead-lettered)",
                            _label(name),
                            _label(task_id),
                            reason,
                            delay,
                            time.time() - first,
                            _grace(self.app),
                        )
                        return
                elif _grace(self.app) > 0:
                    reason += f" (no worker took it within PYMACARON_ASYNC_DEPLOY_GRACE={_grace(self.app):g}s)"
            dead_letter(self.app, message, reason, task=name, task_id=task_id)
        celery_signals.task_rejected.send(sender=self, message=message, exc=exc)


class Request(CeleryRequest):
    """A task message in the worker's main process (``ContextTask.Request``).

    A task past its hard ``time_limit`` is killed by Celery without running
    any of its code: this reports it like a task that raised, with its id,
    name, URL and user in the log and ``task_failed`` sent. A task that
    failed for good (no retry asked, or none left) is kept in the dead letters
    unless ``PYMACARON_ASYNC_DEAD_LETTER_FAILED`` is False.
    """

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        state = getattr(self.task, "pma_state", None)
        if soft or state is None:
            return  # a soft limit raises in the task, which reports it
        exc = TimeLimitExceeded(timeout)
        try:
            # The consumer verified it before the task started.
            snapshot = context.ContextSigner.decode(self.request_dict.get(context.HEADER))
        except ContextError:
            snapshot = {}
        with state.app.app_context():
            runner.report_failure(state, self.name, self.id, exc, snapshot)

    #: Set when the task raised (or retried, or was rejected): its acknowledgement is not a success.
    _pma_failed = False

    def acknowledge(self) -> None:
        # Celery makes each task's Request class with an on_success of its
        # own (create_request_cls): a success is seen here, as the
        # acknowledgement of a late-acknowledged task that ran and did not fail.
        if (
            not self.acknowledged
            and not self._pma_failed
            and self.time_start is not None
            and self.task.acks_late
            and self.id not in worker_state.revoked
        ):
            self._pma_done()
        super().acknowledge()

    def _pma_done(self) -> None:
        """Remember that this task id succeeded (``PYMACARON_ASYNC_DONE_TTL``), and with which message.

        A requeue will not run the id again, nor a worker this very message
        again (a replay); another message of the id (a frozen signature
        applied again) runs. Recorded by the acknowledgement itself, in the
        same command (Redis brokers): no round trip of its own.
        """
        state = getattr(self.task, "pma_state", None)
        channel: Any = getattr(self.message, "channel", None)
        if state is not None and state.settings.done_ttl and hasattr(channel, "pma_mark_done"):
            sent = context.message_tag(self.request_dict.get(context.HEADER)) or "1"
            channel.pma_mark_done(self.message.delivery_tag, self.id, state.settings.done_ttl, sent)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        self._pma_failed = True
        exc = exc_info.exception
        if type(exc).__name__ == "ExceptionWithTraceback":
            # Only billiard's wrapper (billiard >= 4; none before): Celery's
            # Retry has an ``exc`` of its own (None, or the error retried).
            exc = exc.exc
        state = getattr(self.task, "pma_state", None)
        if state is not None and not self.acknowledged and _final(self.task, exc):
            if isinstance(exc, Reject):
                reason = f"the task rejected it: {one_line(exc)}"
            else:
                reason = f"failed: {one_line(exc)}"
            if isinstance(exc, Reject) or state.settings.dead_letter_failed:
                try:
                    dead_letter(
                        self.task.app,
                        self.message,
                        reason,
                        task=self.name,
                        task_id=self.id,
                        kind=deadletter.REFUSED if isinstance(exc, Reject) else deadletter.FAILED,
                        exception=type(exc).__name__,
                        attempts=_attempts(self.request_dict),
                        acknowledge=False,
                    )
                except Exception as error:  # the broker is away: kombu's and py-amqp's errors
                    # Back on its queue (or, on Redis, after the visibility
                    # timeout): it runs again rather than being lost.
                    log.warning(
                        "Could not dead-letter task %s[%s] (%s): it goes back to its queue and will run again",
                        self.name,
                        _label(self.id),
                        one_line(error),
                    )
                    self.reject(requeue=True)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def _attempts(request: dict[str, Any]) -> int:
    """How many times the task of ``request`` has run: its retries, plus this run."""
    retries = request.get("retries")
    return (retries if isinstance(retries, int) and retries > 0 else 0) + 1


def _final(task: Any, exc: BaseException) -> bool:
    """Whether Celery is about to drop the message of a task that raised ``exc`` (it will not run again)."""
    if isinstance(exc, Reject):
        return not exc.requeue
    if isinstance(exc, (Retry, Ignore, WorkerLostError, MemoryError, SystemExit, KeyboardInterrupt)):
        return False
    if type(exc).__name__ == "Terminated":  # revoked with terminate=True
        return False
    if isinstance(exc, TimeLimitExceeded):
        return bool(getattr(task, "acks_on_failure_or_timeout", True)) and bool(getattr(task, "acks_on_timeout", True))
    return True


# -- refusing: dead letters and deferrals -----------------------------------------------


def dead_letter(
    celery: Any,
    message: Any,
    reason: str,
    *,
    task: Any = None,
    task_id: Any = None,
    kind: str = deadletter.REFUSED,
    exception: str | None = None,
    attempts: int | None = None,
    acknowledge: bool = True,
) -> str | None:
    """Move a received message into the dead letters of its queue, then acknowledge it.

    Redis: in one atomic step with its removal from the unacknowledged set.
    RabbitMQ: published to the dead-letter queue, confirmed, then acknowledged.
    Another broker: rejected without requeue (it has no dead letters here).

    :param acknowledge: False when Celery acknowledges the message itself afterwards.
    :returns: the dead letter's id, or None when nothing was stored.
    """
    channel = message.channel
    errors = _errors(channel)
    fields: dict[str, Any] = {
        "task": task if isinstance(task, str) else None,
        "task_id": task_id if isinstance(task_id, str) else None,
        "kind": kind,
        "exception": exception,
        "attempts": attempts,
    }
    stored: str | None = None
    if hasattr(channel, "pma_dead_letter"):
        stored = channel.pma_dead_letter(message.delivery_tag, reason, **fields)
    elif _is_amqp(channel):
        queue = (message.delivery_info or {}).get("routing_key") or "?"
        body, headers, properties = deadletter.amqp_copy(message)
        description = deadletter.entry(queue, reason, raw=body, **fields)
        headers[deadletter.AMQP_HEADER] = json.dumps(description)
        max_entries = _dead_letter_max(celery)
        try:
            _amqp_store(celery).publish(
                queue + deadletter.SUFFIX, body, headers, properties, deadletter.amqp_arguments(max_entries)
            )
        except Exception as exc:
            if not acknowledge:
                raise
            # Not stored: the message goes back to its queue rather than nowhere.
            log.error(
                "Could not dead-letter %s[%s]: %s; it goes back to its queue",
                _label(task),
                _label(task_id),
                one_line(exc),
            )
            if not message.acknowledged:
                message.reject_log_error(log, errors, requeue=True)
            return None
        stored = description["id"]
        deadletter.stored(description, stored, 0, max_entries)
    else:
        log.error(
            "Rejected task %s[%s]: %s (this broker has no dead letters: the message is dropped)",
            _label(task),
            _label(task_id),
            reason,
        )
        if acknowledge and not message.acknowledged:
            message.reject_log_error(log, errors, requeue=False)
        return None
    if acknowledge and not message.acknowledged:
        message.ack_log_error(log, errors)
    return stored


def defer(celery: Any, message: Any, deferred: list[float], delay: float) -> bool:
    """Send a received message back to its queue in ``delay`` seconds, counting the deferral in its headers."""
    channel = message.channel
    errors = _errors(channel)
    if hasattr(channel, "pma_defer"):
        envelope = dict(_compat.envelope(message))
        headers = {k: v for k, v in (envelope.get("headers") or {}).items() if k != context.VERIFIED}
        headers[deadletter.DEFERRED] = deferred
        envelope["headers"] = headers
        if not channel.pma_defer(message.delivery_tag, envelope, delay):
            return True  # back on its queue already (visibility timeout)
    elif _is_amqp(channel):
        queue = (message.delivery_info or {}).get("routing_key") or "?"
        body, headers, properties = deadletter.amqp_copy(message)
        headers[deadletter.DEFERRED] = deferred
        # Waits in a queue nobody consumes; expired, RabbitMQ routes it back to its queue.
        arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}
        try:
            _amqp_store(celery).publish(
                queue + deadletter.DEFERRED_SUFFIX, body, headers, properties, arguments, expiration=delay
            )
        except Exception as exc:
            log.error("Could not defer %s: %s", message.delivery_info, one_line(exc))
            return False
    else:
        return False
    if not message.acknowledged:
        message.ack_log_error(log, errors)
    return True


def _deferral(headers: dict[str, Any], grace: float) -> tuple[float, int, float] | None:
    """(first refusal, deferrals so far, next delay) for a message, or None once its grace period is over."""
    now = time.time()
    first, count = now, 0
    seen = headers.get(deadletter.DEFERRED)
    if (
        isinstance(seen, (list, tuple))
        and len(seen) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seen)
    ):
        first, count = min(float(seen[0]), now), int(seen[1])
    if now - first >= grace:
        return None
    delay = min(_DEFER_FIRST * 2 ** min(count, 10), _DEFER_MAX, max(grace - (now - first), 0.1))
    # Jitter: which worker gets the message when it is back depends on when
    # it comes back; without it the same worker could win every time.
    return first, count, round(delay * random.uniform(0.8, 1.2), 1)


def _dead_letter_max(celery: Any) -> int:
    state = getattr(celery, "pma_state", None)
    return int(state.settings.dead_letter_max if state is not None else DEFAULTS["PYMACARON_ASYNC_DEAD_LETTER_MAX"])


def _grace(celery: Any) -> float:
    state = getattr(celery, "pma_state", None)
    if state is None:
        return float(DEFAULTS["PYMACARON_ASYNC_DEPLOY_GRACE"])
    return float(state.settings.deploy_grace)


def _is_amqp(channel: Any) -> bool:
    return getattr(_kombu_connection(channel).transport, "driver_type", None) == "amqp"


def _kombu_connection(channel: Any) -> Any:
    """The kombu ``Connection`` of a channel (virtual transports and py-amqp both keep it as ``client``)."""
    return channel.connection.client


def _errors(channel: Any) -> tuple[type[BaseException], ...]:
    return broker_errors(_kombu_connection(channel))


_AMQP_STORES: weakref.WeakKeyDictionary[Any, deadletter.AmqpStore] = weakref.WeakKeyDictionary()
_AMQP_LOCK = threading.Lock()


def _amqp_store(celery: Any) -> deadletter.AmqpStore:
    with _AMQP_LOCK:
        store = _AMQP_STORES.get(celery)
        if store is None:
            store = _AMQP_STORES[celery] = deadletter.AmqpStore(celery)
        return store


def _label(value: Any) -> str:
    """A task name or id from a message, as a log line may show it (escaped, cut)."""
    return shown_text(value, 200) if isinstance(value, str) and value else "?"


# -- checking ----------------------------------------------------------------------


def check_message(
    app: Any, message: Any, signatures: dict[str, inspect.Signature | None] | None = None
) -> Problem | None:
    """Why the worker of ``app`` must not run ``message`` now, or None when it may.

    A message that passes and carries a context is marked verified (header
    :data:`~flask_pymacaron_async._context.VERIFIED`) for the task that runs it.

    :param app: the Celery app of the worker.
    :param message: a kombu message whose envelope was readable.
    :param signatures: a cache of the tasks' call signatures, by task name.
    """
    headers = message.headers
    if not isinstance(headers, dict):
        return Problem("its headers are not a mapping")
    # Only this consumer sets it, after checking the signature below.
    headers.pop(context.VERIFIED, None)
    name = headers.get("task")
    if not isinstance(name, str) or not name:
        return Problem("its 'task' header is missing or not a task name: not a Celery task message (protocol 2)")
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return Problem("its 'id' header is missing or not a string")
    replayed = getattr(message.channel, "pma_replayed", None)
    if replayed is not None and replayed(message.delivery_tag):
        return Problem(
            "it succeeded already (a replayed message: successes are remembered for PYMACARON_ASYNC_DONE_TTL)"
        )
    problem = _header_problem(headers) or limits.headers_problem(headers, context.HEADER)
    if problem is not None:
        return Problem(problem)

    state = getattr(app, "pma_state", None)
    limit = state.settings.max_message_bytes if state is not None else DEFAULTS["PYMACARON_ASYNC_MAX_MESSAGE_BYTES"]
    body = message.body
    if body is not None and len(body) > limits.body_bytes(limit):
        return Problem(f"its body takes {len(body)} bytes, over PYMACARON_ASYNC_MAX_MESSAGE_BYTES={limit}")
    task = app.tasks.get(name)
    if task is None:
        unknown = f"unknown task {name!r} (is the module that declares it imported by the worker?)"
        if state is None:
            return Problem(unknown, True)
        # Deferred (for a newer worker) only when this app signed it: a forged one is not handled again and again.
        refused = _signature_problem(state, message, headers, name, task_id, body)
        return Problem(f"{unknown}; {refused.reason}") if refused is not None else Problem(unknown, True)
    accept = getattr(message, "accept", None)
    if accept is not None and message.content_type not in accept:
        return Problem(
            f"its content type {message.content_type!r} is not accepted "
            f"(the worker takes {', '.join(sorted(accept))}; never pickle)"
        )
    try:
        payload = message.decode()
    except Exception as exc:
        return Problem(f"its body cannot be decoded as {message.content_type!r}: {one_line(exc.__cause__ or exc)}")
    if not (
        isinstance(payload, (list, tuple))
        and len(payload) == 3
        and isinstance(payload[0], (list, tuple))
        and isinstance(payload[1], dict)
        and isinstance(payload[2], (dict, type(None)))
    ):
        return Problem("its body is not [args, kwargs, embed]")
    args, kwargs = payload[0], payload[1]
    if body is not None and len(body) > limit:
        size = len(serialization.dumps([args, kwargs]))
        if size > limit:
            return Problem(f"its arguments take {size} bytes, over PYMACARON_ASYNC_MAX_MESSAGE_BYTES={limit}")

    signed = state is not None and hasattr(task, "pma_state")
    if signed:
        # Before the arguments: only what the app signed is deferred for a newer worker.
        refused = _signature_problem(state, message, headers, name, task_id, body)
        if refused is not None:
            return refused
    problem = _arguments_problem(task, args, kwargs, signatures if signatures is not None else {})
    if problem is not None:
        return Problem(problem, True)
    if signed and state is not None:
        headers[context.VERIFIED] = state.mark(headers.get(context.HEADER))
    return None


def _signature_problem(
    state: Any, message: Any, headers: dict[str, Any], name: str, task_id: str, body: bytes | None
) -> Problem | None:
    """Why the context token of ``message`` does not prove that this app sent it as it is, or None."""
    token = headers.get(context.HEADER)
    bound = context.bound_headers(headers, message.content_type)
    try:
        state.signer.verify(token, name, task_id, body or b"", state.settings.context_max_age, bound)
    except ContextError as exc:
        if state.signer.signed_unbound(token, name, task_id, body or b""):
            # Signed by an older sender: a worker of its version may take it during a deploy.
            return Problem("its signature does not cover its headers (sent by flask-pymacaron-async before 0.3)", True)
        return Problem(str(exc))
    return None


def _header_problem(headers: dict[str, Any]) -> str | None:
    for key in _OPTIONAL_STR:
        if not isinstance(headers.get(key), (str, type(None))):
            return f"its {key!r} header is not a string"
    for key in ("eta", "expires"):
        value = headers.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            return f"its {key!r} header is not an ISO 8601 date"
        try:
            maybe_iso8601(value)
        except (ValueError, TypeError, OverflowError):
            return f"its {key!r} header is not an ISO 8601 date"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, (list, tuple))
        and len(limits) == 2
        and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0) for v in limits)
    ):
        return "its 'timelimit' header is not [hard, soft] seconds"
    retries = headers.get("retries")
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool) or retries < 0):
        return "its 'retries' header is not a count"
    return None


def _arguments_problem(task: Any, args: Any, kwargs: dict[str, Any], signatures: dict[str, Any]) -> str | None:
    if not getattr(task, "typing", True):
        return None
    if task.name not in signatures:
        try:
            signatures[task.name] = inspect.signature(task.run)
        except (TypeError, ValueError):  # a callable without a signature: nothing to check
            signatures[task.name] = None
    signature = signatures[task.name]
    if signature is None:
        return None
    if not all(isinstance(key, str) for key in kwargs):
        return "its keyword argument names are not strings"
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        return f"its arguments do not match {task.name}{signature}: {exc}"
    return None
