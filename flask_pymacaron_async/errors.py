"""Exceptions raised by flask-pymacaron-async."""

from __future__ import annotations

from celery.exceptions import Ignore, Reject, Retry

from ._shown import escaped

#: Celery's control flow, raised through a task on purpose: not failures.
CONTROL_FLOW = (Retry, Ignore, Reject)


class AsyncError(Exception):
    """Base class of every error this extension raises on purpose."""


class ConfigError(AsyncError, ValueError):
    """A configuration key has a wrong value; the message names the key."""


class AsyncUnavailable(AsyncError):
    """The broker could not take the task within ``PYMACARON_ASYNC_PUBLISH_TIMEOUT``.

    Nothing was queued. Set ``PYMACARON_ASYNC_FALLBACK = "inline"`` to run the
    task in the caller instead. With ``PYMACARON_ASYNC_BROKER_MIN_REPLICAS``,
    it is also raised when the master took the task but too few replicas
    confirmed it in time: the message says so, and the task may still run.
    """

    #: For a batch (:meth:`PymacaronAsync.batch <flask_pymacaron_async.PymacaronAsync.batch>`): the ids of its tasks.
    task_ids: list[str | None] = []


class ContextError(AsyncError):
    """A task message carries a missing, tampered or unreadable context snapshot.

    The worker rejects such a message (it is not run and not requeued).
    """


class MessageTooLarge(AsyncError, ValueError):
    """The task's arguments exceed ``PYMACARON_ASYNC_MAX_MESSAGE_BYTES``."""


def one_line(exc: BaseException, limit: int = 200, *, kind: bool = True) -> str:
    """``exc`` on one line, as ``Type: message`` (only the message without ``kind``), cut at ``limit``.

    Fit for a log line: whitespace runs are one space, other control
    characters escaped, JWT-shaped runs masked (``_shown.escaped``).
    """
    text = escaped(" ".join(str(exc).split())[: limit * 4])[:limit]
    return f"{type(exc).__name__}: {text}" if kind else text
