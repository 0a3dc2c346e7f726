"""The remote-control command a worker answers for the dashboard and ``flask async status``.

Celery's ``inspect active`` gives each running task's id, name and
arguments, but not the message headers, where the context snapshot travels,
and its start time is the worker's monotonic clock. :data:`COMMAND` answers
with each running task's signed context (the web side reads the user and URL
from it, never showing a token) and a wall-clock start time.

Only the worker imports this module, at start: the extension adds it to
Celery's ``imports`` setting, and importing it registers the command with
Celery's public ``inspect_command``.
"""

from __future__ import annotations

import time
from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from ._context import HEADER

#: Name of the remote-control command (``celery.control.broadcast(COMMAND, reply=True)``).
COMMAND = "pma_running"


def _started(time_start: Any) -> float | None:
    if not isinstance(time_start, (int, float)):
        return None
    # Celery stamps a task's start with time.monotonic(); the epoch is for humans.
    if time_start > 1e9:
        return float(time_start)
    return time.time() - (time.monotonic() - time_start)


def running() -> list[dict[str, Any]]:
    """The tasks this worker is running: id, name, argument reprs, start time and signed context."""
    tasks = []
    for request in list(worker_state.active_requests):
        headers = getattr(request, "request_dict", None) or {}
        tasks.append(
            {
                "id": request.id,
                "name": request.name,
                "args": getattr(request, "argsrepr", None),
                "kwargs": getattr(request, "kwargsrepr", None),
                "started": _started(getattr(request, "time_start", None)),
                "context": headers.get(HEADER),
            }
        )
    return tasks


@inspect_command(name=COMMAND)  # type: ignore[untyped-decorator]
def _running_command(state: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The running tasks of this worker, with the context of the request that queued each."""
    return running()
