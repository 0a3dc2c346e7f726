"""What ``flask async status --json`` prints and the dashboard shows: broker, queues, workers, dead letters.

One function, :func:`collect_status`, builds it as a JSON-able dict; the CLI
and the dashboard's JSON endpoint print the same structure::

    {"time": now (Unix time),
     "broker": {"url": masked URL, "ok": bool, "error": str | None},
     "queues": {queue: tasks waiting}, "oldest": {queue: age in seconds of the oldest, or None},
     "delayed": {queue: tasks in its delayed set}, "dead_letters": {queue: count},
     "workers": {worker: [{"id", "name", "args", "kwargs", "started", "queued", "user", "url"}]},
     "other_workers": how many workers of other queues answered,
     "dead": [the newest dead letters (DeadLetter.describe())], "failures": [the newest of kind "failed"],
     "args_shown": whether "args" and "kwargs" are filled in}
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from werkzeug.wsgi import get_current_url

from . import _deadletter as deadletter
from . import broker
from ._context import HEADER, ContextSigner
from ._shown import shown_url, shown_user
from .errors import ContextError, one_line

if TYPE_CHECKING:
    from celery import Celery

    from ._state import AsyncState

#: How many dead letters, and failures among them, a status lists (the counts cover them all).
DEAD_SHOWN = 100
FAILURES_SHOWN = 20
#: The remote-control command :mod:`flask_pymacaron_async._control` registers in the worker.
RUNNING_COMMAND = "pma_running"

log = logging.getLogger(__name__)

#: How a status shows a dumped user (an app's user display hook, or :func:`._shown.shown_user`).
ShowUser = Callable[[Any], "str | None"]


def collect_status(
    state: AsyncState,
    queues: list[str] | None = None,
    timeout: float = 1.0,
    *,
    show_args: bool = True,
) -> dict[str, Any]:
    """Broker, queues, live workers with their running tasks, dead letters and recent failures, as a dict.

    :param queues: the queues to look at; default: the app's.
    :param timeout: seconds to wait for the broker and for the workers' replies.
    :param show_args: fill in the running tasks' arguments (else ``None``: they may hold personal data).
    """
    celery = state.celery
    url = celery.conf.broker_url
    names = queues or broker.queue_names(celery)
    status: dict[str, Any] = {
        "time": time.time(),
        "broker": {"url": broker.describe(url), "ok": False, "error": None},
        "queues": {},
        "oldest": {},
        "delayed": {},
        "dead_letters": {},
        "workers": {},
        "other_workers": 0,
        "dead": [],
        "failures": [],
        "args_shown": show_args,
    }
    error = broker.check(url, timeout, dict(celery.conf.broker_transport_options or {}))
    if error is not None:
        status["broker"]["error"] = error
        return status
    status["broker"]["ok"] = True
    try:
        status["queues"] = broker.queue_sizes(celery, names)
        status["oldest"] = oldest_ages(celery, names)
        status["delayed"] = broker.delayed_sizes(celery, names)
        status["dead_letters"] = deadletter.counts(celery, names)
        letters = deadletter.list_dead(celery, names)
    except Exception as exc:  # the broker went away between the calls
        status["broker"].update(ok=False, error=one_line(exc, 500, kind=False))
        return status
    status["dead"] = [letter.describe() for letter in letters[:DEAD_SHOWN]]
    status["failures"] = [letter.describe() for letter in letters if letter.kind == deadletter.FAILED][:FAILURES_SHOWN]
    status["workers"], status["other_workers"] = _workers(celery, names, timeout, show_args, state.users.shown)
    return status


def _workers(
    celery: Celery, names: list[str], timeout: float, show_args: bool, show_user: ShowUser
) -> tuple[dict[str, Any], int]:
    # A broker may serve other apps' workers: list those consuming these queues.
    consuming = celery.control.inspect(timeout=timeout).active_queues() or {}
    ours = sorted(w for w, qs in consuming.items() if {q.get("name") for q in qs or ()} & set(names))
    running: dict[str, Any] = {}
    if ours:
        replies = celery.control.broadcast(
            RUNNING_COMMAND, reply=True, timeout=timeout, destination=ours, limit=len(ours)
        )
        for reply in replies or ():
            for worker, tasks in reply.items():
                if isinstance(tasks, list):
                    running[worker] = [_running_task(task, show_user) for task in tasks if isinstance(task, dict)]
    # Workers without the command (another version of the extension): Celery's own list, without who and where.
    older = [w for w in ours if not isinstance(running.get(w), list)]
    if older:
        active = celery.control.inspect(timeout=timeout, destination=older).active() or {}
        for worker in older:
            running[worker] = [
                {
                    "id": task.get("id"),
                    "name": task.get("name"),
                    "args": task.get("args"),
                    "kwargs": task.get("kwargs"),
                    "started": None,
                    "queued": None,
                    "user": None,
                    "url": None,
                }
                for task in active.get(worker) or ()
            ]
    workers: dict[str, Any] = {}
    for worker in ours:
        tasks = sorted(running.get(worker) or (), key=lambda t: t.get("started") or 0)
        if not show_args:
            tasks = [{**task, "args": None, "kwargs": None} for task in tasks]
        workers[worker] = tasks
    return workers, len(consuming) - len(ours)


def oldest_ages(celery: Celery, queues: Iterable[str]) -> dict[str, float | None]:
    """Seconds since the oldest waiting task of each queue was queued (from its context's signing time).

    ``None`` for an empty queue, a task without a context, or a broker whose
    queues cannot be read without taking (RabbitMQ).
    """
    names = list(queues)
    ages: dict[str, float | None] = dict.fromkeys(names)
    with celery.connection_for_read() as connection:
        connection.ensure_connection(max_retries=0)
        if connection.transport.driver_type != "redis":
            return ages
        import redis as redis_py

        channel = connection.default_channel
        client = redis_py.Redis(connection_pool=channel.pool)
        prefix = getattr(channel, "global_keyprefix", "") or ""
        now = time.time()
        for name in names:
            # kombu LPUSHes and takes from the right: the oldest is the last item.
            queued = _queued_at(client.lindex(f"{prefix}{name}", -1))
            ages[name] = None if queued is None else round(max(0.0, now - queued), 1)
    return ages


def _queued_at(item: bytes | str | None) -> float | None:
    """When the message ``item`` was queued; None for an item that is not a readable message.

    Anything a broker item may hold (not JSON, nested thousands deep, headers
    of the wrong type) leaves the status readable: the worker dead-letters
    such an item when it takes it.
    """
    if item is None or len(item) > _MOST_READ:
        return None
    try:
        headers = json.loads(item).get("headers")
        queued = who_and_where(headers.get(HEADER))["queued"]
    except Exception as exc:  # any malformed item: never the status's failure
        log.debug("A queue item is not a readable message: %s", one_line(exc))
        return None
    return queued if isinstance(queued, float) else None


# The largest queue item read for its queuing time (a larger one is a message the worker refuses).
_MOST_READ = 4 * 1024 * 1024


def _running_task(task: dict[str, Any], show_user: ShowUser) -> dict[str, Any]:
    shown = {key: task.get(key) for key in ("id", "name", "args", "kwargs", "started")}
    return {**shown, **who_and_where(task.get("context"), show_user)}


def who_and_where(token: Any, show_user: ShowUser = shown_user) -> dict[str, Any]:
    """The user, URL and queuing time of a signed context, for display (its signature is not checked here).

    The user and URL as ``_shown`` shows them: by a naming field (or
    ``show_user``, the app's user display), with secrets masked.

    :returns: ``{"user": ..., "url": ..., "queued": Unix time}``, each None when unknown.
    """
    try:
        snapshot = ContextSigner.decode(token)
    except ContextError:
        return {"user": None, "url": None, "queued": None}
    env = snapshot.get("env")
    queued = snapshot.get("ts")
    try:
        url = shown_url(str(get_current_url(env))) if isinstance(env, dict) and env else None
    except Exception as exc:  # an environ nobody could have sent: a forged context
        log.debug("A context's URL is unreadable: %s", one_line(exc))
        url = "(unreadable)"
    return {
        "user": show_user(snapshot.get("user")),
        "url": url,
        "queued": float(queued) if isinstance(queued, (int, float)) and not isinstance(queued, bool) else None,
    }
