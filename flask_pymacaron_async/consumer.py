"""The worker's task consumer: every message is checked before Celery sees it.

Celery's own consumer stops the worker ("Unrecoverable error") on some
malformed task messages (headers of the wrong type, a body that is not
``[args, kwargs, embed]``, a missing task id), sends others through reconnect
loops, and logs the rest on many lines with the full body. :class:`Consumer`
checks each message first: its headers, task name, content type, size, body,
arguments against the task's signature, and the signed context snapshot. A
message that fails is logged on one line with the reason, rejected without
requeue, and never runs; the worker goes on. Anything that still goes wrong
while Celery handles a message rejects that message, not the worker.

:func:`flask_pymacaron_async.transport.configure` selects it through
Celery's ``worker_consumer`` setting.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

from celery import signals
from celery.exceptions import TimeLimitExceeded
from celery.utils.time import maybe_iso8601
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request as CeleryRequest

from . import context, serialization
from .config import DEFAULTS
from .errors import ContextError
from .transport import broker_errors

log = logging.getLogger(__name__)

# Room for Celery's own part of the body (callbacks, errbacks, chain).
_EMBED_ROOM = 64 * 1024

_OPTIONAL_STR = ("root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr", "origin", "lang")


class Consumer(CeleryConsumer):
    """Celery's worker consumer, checking each task message before it is handled."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        signatures: dict[str, inspect.Signature | None] = {}

        def on_task_received(message: Any) -> Any:
            problem = check_message(self.app, message, signatures)
            if problem is not None:
                return self._pma_reject(message, problem)
            try:
                return handle(message)
            except Exception as exc:
                if isinstance(exc, self._pma_broker_errors()):
                    raise
                return self._pma_reject(message, f"Celery could not handle it: {_short(exc)}", exc)

        return on_task_received

    def _pma_broker_errors(self) -> tuple[type[BaseException], ...]:
        return broker_errors(self)

    def _pma_reject(self, message: Any, reason: str, exc: BaseException | None = None) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        name, task_id = headers.get("task"), headers.get("id")
        log.error(
            "Rejected task %s[%s]: %s",
            name if isinstance(name, str) else "?",
            task_id if isinstance(task_id, str) else "?",
            " ".join(reason.split())[:500],
        )
        if not message.acknowledged:
            message.reject_log_error(log, self._pma_broker_errors(), requeue=False)
        signals.task_rejected.send(sender=self, message=message, exc=exc)


class Request(CeleryRequest):
    """A task message in the worker's main process (``ContextTask.Request``).

    A task past its hard ``time_limit`` is killed by Celery without running
    any of its code: this reports it like a task that raised, with its id,
    name, URL and user in the log and ``task_failed`` sent.
    """

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        state = getattr(self.task, "pma_state", None)
        if soft or state is None:
            return  # a soft limit raises in the task, which reports it
        exc = TimeLimitExceeded(timeout)
        try:
            snapshot = state.signer.verify(self._request_dict.get(context.HEADER))
        except ContextError:
            snapshot = {}
        with state.app.app_context():
            state.report_failure(self.name, self.id, exc, snapshot)


def check_message(app: Any, message: Any, signatures: dict[str, inspect.Signature | None] | None = None) -> str | None:
    """Why the worker of ``app`` must not run ``message``, or None when it may.

    :param app: the Celery app of the worker.
    :param message: a kombu message whose envelope was readable.
    :param signatures: a cache of the tasks' call signatures, by task name.
    """
    headers = message.headers
    if not isinstance(headers, dict):
        return "its headers are not a mapping"
    name = headers.get("task")
    if not isinstance(name, str) or not name:
        return "its 'task' header is missing or not a task name: not a Celery task message (protocol 2)"
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "its 'id' header is missing or not a string"
    task = app.tasks.get(name)
    if task is None:
        return f"unknown task {name!r} (is the module that declares it imported by the worker?)"
    problem = _header_problem(headers)
    if problem is not None:
        return problem

    state = getattr(app, "pma_state", None)
    limit = state.settings.max_message_bytes if state is not None else DEFAULTS["PYMACARON_ASYNC_MAX_MESSAGE_BYTES"]
    body = message.body
    if body is not None and len(body) > limit + _EMBED_ROOM:
        return f"its body takes {len(body)} bytes, over PYMACARON_ASYNC_MAX_MESSAGE_BYTES={limit}"
    accept = getattr(message, "accept", None)
    if accept is not None and message.content_type not in accept:
        return (
            f"its content type {message.content_type!r} is not accepted "
            f"(the worker takes {', '.join(sorted(accept))}; never pickle)"
        )
    try:
        payload = message.decode()
    except Exception as exc:
        return f"its body cannot be decoded as {message.content_type!r}: {_short(exc.__cause__ or exc)}"
    if not (
        isinstance(payload, (list, tuple))
        and len(payload) == 3
        and isinstance(payload[0], (list, tuple))
        and isinstance(payload[1], dict)
        and isinstance(payload[2], (dict, type(None)))
    ):
        return "its body is not [args, kwargs, embed]"
    args, kwargs = payload[0], payload[1]
    if body is not None and len(body) > limit:
        size = len(serialization.dumps([args, kwargs]))
        if size > limit:
            return f"its arguments take {size} bytes, over PYMACARON_ASYNC_MAX_MESSAGE_BYTES={limit}"

    problem = _arguments_problem(task, args, kwargs, signatures if signatures is not None else {})
    if problem is not None:
        return problem
    if state is not None and hasattr(task, "pma_state"):
        try:
            state.signer.verify(headers.get(context.HEADER), max_age=state.settings.context_max_age)
        except ContextError as exc:
            return str(exc)
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


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"
