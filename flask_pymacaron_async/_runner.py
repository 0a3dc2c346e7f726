"""Running a task body in its rebuilt context: signals, and failures logged with who and where.

The worker's pool process, inline mode and ``captured_tasks.run()`` all run a
task through :func:`run_in_context`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from werkzeug.wsgi import get_current_url

from . import _context as context
from . import signals
from ._shown import shown_text, shown_url
from .errors import CONTROL_FLOW

if TYPE_CHECKING:
    from ._state import AsyncState
    from ._task import ContextTask


def run_in_context(
    state: AsyncState,
    task: ContextTask,
    snapshot: dict[str, Any],
    args: Any,
    kwargs: Any,
    task_id: str | None,
) -> Any:
    """Run the task body inside the context rebuilt from ``snapshot``, with signals and failure logging."""
    with context.pushed(state, snapshot):
        signals.task_started.send(state.app, task_name=task.name, task_id=task_id)
        try:
            call = task.pma_base_call
            value = task.run(*args, **kwargs) if call is None else call(task, *args, **kwargs)
        except CONTROL_FLOW:
            raise
        except Exception as exc:
            report_failure(state, task.name, task_id, exc, snapshot)
            raise
        signals.task_succeeded.send(state.app, task_name=task.name, task_id=task_id, result=value)
        return value


def report_failure(
    state: AsyncState, task_name: str, task_id: str | None, exc: BaseException, snapshot: dict[str, Any]
) -> None:
    """Log a failed task on the app's logger (id, name, URL, user; never a token) and send ``task_failed``.

    What a client controls (the URL, the user, the request id, an exception
    message quoting them) is logged as ``_shown`` shows it: masked, escaped
    and cut, one line per failure. No traceback here: Celery logs it in the
    worker, and inline the exception reaches the caller.
    """
    state.app.logger.error(
        "Task %s[%s] failed: %s (url=%s, user=%s, request_id=%s)",
        task_name,
        _shown_or_none(task_id),
        # Text, not the exception: a handler that pickles records (Celery's
        # test worker, a queue handler) must not meet an unpicklable one.
        shown_text(repr(exc)),
        shown_url(snapshot_url(snapshot)),
        state.users.shown(snapshot.get("user")),
        _shown_or_none(snapshot.get("rid")),
    )
    signals.task_failed.send(state.app, task_name=task_name, task_id=task_id, exception=exc)


def snapshot_url(snapshot: dict[str, Any]) -> str | None:
    """The URL of the request a snapshot was taken in (``None`` outside a request)."""
    env = snapshot.get("env")
    if not env:
        return None
    return str(get_current_url(env))


def _shown_or_none(value: Any) -> str | None:
    return None if value is None else shown_text(value, 200)
