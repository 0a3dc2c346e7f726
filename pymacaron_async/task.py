"""``@asynctask()``: the decorator pymacaron services use, on top of the core's tasks.

Calling a decorated function from an endpoint queues it and returns at once
(with ``with_async: true``) or runs it inline in the caller (without). In both
cases the body runs inside a request context rebuilt from the caller's, with
the caller's JWT loaded, and an exception goes through pymacaron's crash
handling (``pymacaron.crash.postmortem``) as it would in an endpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from typing import Any, Callable, Iterator, TypeVar, overload

from celery import current_task
from flask import Flask, current_app, has_app_context, has_request_context

from flask_pymacaron_async import AsyncTask
from flask_pymacaron_async.errors import CONTROL_FLOW

from .extension import ext, init_app

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class TaskCrashed(Exception):  # noqa: N818  (named after what happened, like Celery's Reject)
    """A task raised a pymacaron exception (a ``BaseException``), re-raised as an ``Exception``.

    Celery lets a ``BaseException`` escape its task tracer; wrapping it keeps
    the worker running and the task recorded as failed. The original is the
    ``__cause__``.
    """


class PymacaronTask:
    """What ``@asynctask()`` returns: call it to queue the function (or run it inline).

    Outside any Flask app context (a script, a shell), calling it runs the
    function at once in the caller, as the old ``pymacaron-async`` did.
    ``delay()``, ``apply_async()``, ``s()`` and ``si()`` work as on a Celery task.
    """

    def __init__(self, func: Callable[..., Any], delay: float | None, options: dict[str, Any]) -> None:
        functools.update_wrapper(self, func)
        self.func = func
        self.delay_seconds = delay
        self.body = _crash_handled(func)
        #: The core task behind it (``flask_pymacaron_async.AsyncTask``).
        self.task: AsyncTask[Any] = ext.task(self.body, delay=delay or None, **options)

    @property
    def name(self) -> str:
        """The Celery task name: ``module.function``."""
        return self.task.name

    def __repr__(self) -> str:
        return f"<pymacaron asynctask {self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not has_app_context():
            return self.body(*args, **kwargs)
        return self._bound()(*args, **kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """Queue the task, like calling it."""
        return self._bound().delay(*args, **kwargs)

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Queue with Celery options (``countdown``, ``eta``, ``queue``, ...)."""
        return self._bound().apply_async(args, kwargs, **options)

    def s(self, *args: Any, **kwargs: Any) -> Any:
        """A Celery signature, for chains and groups."""
        return self._bound().s(*args, **kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Any:
        """An immutable Celery signature."""
        return self._bound().si(*args, **kwargs)

    def _bound(self) -> AsyncTask[Any]:
        if not has_app_context():
            raise RuntimeError(
                f"{self.name}: Celery calls need the service's Flask app: make them from an endpoint, "
                "a task, or inside app.app_context() (calling the task itself outside an app runs it at once)"
            )
        init_app(current_app)
        return self.task


def is_celery_task() -> bool:
    """Whether this process is a Celery worker (as in the old ``pymacaron-async``)."""
    return "celery" in sys.argv[0].lower() and "worker" in sys.argv[1:]


@overload
def asynctask(func: F, /) -> PymacaronTask: ...
@overload
def asynctask(*, delay: float = 0, **options: Any) -> Callable[[F], PymacaronTask]: ...


def asynctask(func: Callable[..., Any] | None = None, /, *, delay: float = 0, **options: Any) -> Any:
    """Declare a function of a pymacaron service as a background task.

    ``@asynctask()`` or ``@asynctask(delay=N)`` (start N seconds later); other
    options go to Celery's ``app.task`` (``autoretry_for``, ``time_limit``,
    ...). ``@asynctask`` without parentheses works too.

    Arguments may be JSON values, datetimes and pymacaron models, alone or in
    lists and dicts; the task receives the same model classes.
    """
    if func is not None:
        if not callable(func):
            raise TypeError(f"@asynctask(...) takes keyword arguments only (delay=N), got {func!r}")
        return PymacaronTask(func, delay, options)
    return lambda f: PymacaronTask(f, delay, options)


def _crash_handled(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with pymacaron's crash handling, as its endpoints have."""
    from pymacaron.exceptions import PyMacaronException
    from pymacaron.utils import timenow

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        t0 = timenow()
        try:
            return func(*args, **kwargs)
        except CONTROL_FLOW:
            raise
        except (Exception, PyMacaronException) as exc:
            _report(func, t0, exc)
            if not _in_worker():
                # Inline, the old module logged and reported the crash but did
                # not fail the endpoint that called the task.
                return None
            if isinstance(exc, Exception):
                raise
            raise TaskCrashed(f"{func.__module__}.{func.__qualname__}: {exc}") from exc

    return run


def _in_worker() -> bool:
    task = current_task
    return bool(task) and not task.request.called_directly


def _report(func: Callable[..., Any], t0: Any, exc: BaseException) -> None:
    """Hand the exception being handled to pymacaron's crash handler."""
    from pymacaron.crash import postmortem
    from pymacaron.utils import timenow

    try:
        with _request_context():
            postmortem(f=func, t0=t0, t1=timenow(), exception=exc)
    except Exception:
        # Typically API(error_reporter=None): pymacaron then calls None.
        log.exception("pymacaron's crash handler failed while reporting %s.%s", func.__module__, func.__qualname__)


_fallback_app: Flask | None = None


@contextlib.contextmanager
def _request_context() -> Iterator[None]:
    # postmortem reads flask.request: give it one when the task has none.
    global _fallback_app
    if has_request_context():
        yield
        return
    if has_app_context():
        app = current_app  # the proxy: test_request_context is a method of the app it stands for
    else:
        if _fallback_app is None:
            _fallback_app = Flask("pymacaron_async")
        app = _fallback_app
    with app.test_request_context():
        yield
