"""Tasks: the ``asynctask`` decorator and the Celery base class that carries the context.

On publish, :class:`ContextTask` takes the caller's signed context snapshot and
puts it in the message headers. In the worker it verifies the snapshot,
rebuilds the app and request context, loads the user, then runs the body.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar, overload

from celery import Task
from celery.exceptions import Reject

from . import context, runner, tracing
from . import state as states
from .errors import ContextError

if TYPE_CHECKING:
    from celery.canvas import Signature
    from celery.result import AsyncResult

    from .state import AsyncState

R = TypeVar("R")


class ContextTask(Task):
    """Base class of every task registered by the extension.

    ``apply_async`` (hence ``delay``, calls and canvas signatures) goes through
    the extension: arguments checked, context snapshot in the headers,
    immediate / after-response / inline publishing. In the worker, ``__call__``
    runs the body inside the rebuilt context.
    """

    #: Default countdown in seconds (``@asynctask(delay=...)``).
    pma_delay: float | None = None
    #: Queue of the task (``@asynctask(queue=...)``), unless a call says otherwise.
    pma_queue: str | None = None
    #: Per-task override of ``PYMACARON_ASYNC_PUBLISH``.
    pma_publish: str | None = None
    #: Reports a hard time limit like a failure (see :class:`flask_pymacaron_async.consumer.Request`).
    Request = "flask_pymacaron_async.consumer:Request"

    @property
    def pma_state(self) -> AsyncState:
        """The state of the Flask app this task belongs to."""
        state: AsyncState = self.app.pma_state
        return state

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        return self.pma_state.publisher.publish(self, args, kwargs, options)

    def celery_apply_async(self, args: Any, kwargs: Any, **options: Any) -> AsyncResult:
        """Celery's own ``apply_async``: hand the message to the broker."""
        return super().apply_async(args, kwargs, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            return self.run(*args, **kwargs)
        state = self.pma_state
        token = context.header(request, context.HEADER)
        try:
            if not state.is_verified(context.header(request, context.VERIFIED), token):
                raise ContextError(
                    "its context was not checked by the worker's consumer (is Celery's worker_consumer "
                    "setting overridden?)"
                )
            snapshot = context.ContextSigner.decode(token)
        except ContextError as exc:
            raise Reject(str(exc), requeue=False) from None
        carrier = {name: context.header(request, name) for name in tracing.TRACE_HEADERS}
        with tracing.task_span(self.name, request.id, carrier):
            return runner.run_in_context(state, self, snapshot, args, kwargs, request.id)


class AsyncTask(Generic[R]):
    """What ``@asynctask`` returns: call it to queue the task.

    It is bound to an app only when called, so it can be declared at import
    time, before any app exists. The Celery task behind it is
    ``task.celery_task`` (for the app in use).
    """

    def __init__(self, func: Callable[..., R], options: dict[str, Any], owner: Any) -> None:
        functools.update_wrapper(self, func)
        self.run = func
        self.name: str = options.pop("name", None) or f"{func.__module__}.{func.__qualname__}"
        self.options = options
        self._owner = weakref.ref(owner) if owner is not None else None

    def __repr__(self) -> str:
        return f"<AsyncTask {self.name}>"

    @property
    def celery_task(self) -> ContextTask:
        """The Celery task registered for this function in the app in use."""
        owner = self._owner() if self._owner is not None else None
        return states.for_call(owner, self.name).register(self)

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Queue the task (or run it inline when ``PYMACARON_ASYNC_ENABLED`` is False)."""
        return self.celery_task.apply_async(args, kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Same as calling the task, as in Celery."""
        return self.celery_task.apply_async(args, kwargs)

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        """Queue with Celery options (``countdown``, ``eta``, ``queue``, ...)."""
        return self.celery_task.apply_async(args, kwargs, **options)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A Celery signature, for chains, groups and chords."""
        return self.celery_task.s(*args, **kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable Celery signature."""
        return self.celery_task.si(*args, **kwargs)

    def signature(self, *args: Any, **kwargs: Any) -> Signature:
        """``celery_task.signature(...)``."""
        return self.celery_task.signature(*args, **kwargs)


#: Every task declared with the module-level :func:`asynctask`, by name.
DECLARED: dict[str, AsyncTask[Any]] = {}


def declare(func: Callable[..., R], options: dict[str, Any], owner: Any) -> AsyncTask[R]:
    """Declare ``func`` as a task (of ``owner``'s apps, or of every app when ``owner`` is None)."""
    task = AsyncTask(func, options, owner)
    if owner is None:
        DECLARED[task.name] = task
    else:
        owner.declared[task.name] = task
    for state in states.states(owner):
        state.register(task)
    return task


@overload
def asynctask(func: Callable[..., R], /) -> AsyncTask[R]: ...
@overload
def asynctask(
    *, delay: float | None = None, queue: str | None = None, publish: str | None = None, **celery_options: Any
) -> Callable[[Callable[..., R]], AsyncTask[R]]: ...


def asynctask(func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Declare a function as a background task of whichever app calls it.

    ``@asynctask``, ``@asynctask()`` and ``@asynctask(delay=5, queue="mail",
    publish="immediate", **celery_options)``: ``delay`` is the default
    countdown in seconds, ``publish`` overrides ``PYMACARON_ASYNC_PUBLISH`` for
    this task, and any other option goes to Celery's ``app.task`` (``name``,
    ``autoretry_for``, ``retry_backoff``, ``time_limit``, ...).

    Calling the decorated function queues it and returns a Celery
    ``AsyncResult``; ``.delay()``, ``.apply_async()``, ``.s()``, ``.si()`` work
    as on a Celery task.
    """
    if func is not None:
        return declare(func, options, None)
    return lambda f: declare(f, dict(options), None)
