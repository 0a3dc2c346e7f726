"""Tasks: the ``asynctask`` decorator and the Celery base class that carries the context.

On publish, :class:`ContextTask` takes the caller's signed context snapshot and
puts it in the message headers. In the worker it verifies the snapshot,
rebuilds the app and request context, loads the user, then runs the body.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Generic, TypeVar, overload

from celery import Task
from celery.backends.base import BaseKeyValueStoreBackend
from celery.exceptions import Reject
from flask import has_app_context

from . import _context as context
from . import _runner as runner
from . import _state as states
from . import tracing
from .errors import ContextError, one_line

if TYPE_CHECKING:
    from celery.canvas import Signature
    from celery.result import AsyncResult, EagerResult

    from ._state import AsyncState

R = TypeVar("R")

log = logging.getLogger(__name__)

#: What follows a task's result key in the key of its owner's digest
#: (``celery-task-meta-<id>.pma-owner`` on Redis): see :func:`record_owner`.
OWNER_KEY = ".pma-owner"


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
    #: Reports a hard time limit like a failure (see :class:`flask_pymacaron_async._consumer.Request`).
    Request = "flask_pymacaron_async._consumer:Request"

    @property
    def pma_state(self) -> AsyncState:
        """The state of the Flask app this task belongs to."""
        state: AsyncState = self.app.pma_state
        return state

    #: The ``__call__`` of a user's base class this class was combined with
    #: (:meth:`with_base`): the body runs through it, inside the rebuilt context.
    pma_base_call: Callable[..., Any] | None = None

    @classmethod
    def with_base(cls, base: Any) -> type[ContextTask]:
        """This class combined with ``base``, a user's ``celery.Task`` subclass (``@asynctask(base=...)``).

        The combined class is ``(cls, base)``: calls go through the extension
        first (argument check, context), then through ``base``'s own
        ``apply_async`` / ``apply``; in the worker, ``base``'s ``__call__``
        (if it has one) runs inside the rebuilt context, and its handlers
        (``on_failure``, ``on_retry``, ``after_return``, ...) run as Celery
        runs them. A ``base`` that is already a :class:`ContextTask` is kept.

        :raises TypeError: when ``base`` is not a ``celery.Task`` subclass, or
            cannot be combined with this class.
        """
        if isinstance(base, type) and issubclass(base, ContextTask):
            return base
        if not (isinstance(base, type) and issubclass(base, Task)):
            raise TypeError(
                f"base={base!r} must be a celery.Task subclass (the extension combines it with "
                "ContextTask so that the task keeps its caller's context)"
            )
        made = _COMBINED.setdefault(cls, {})
        combined = made.get(base)
        if combined is not None:
            return combined
        attributes: dict[str, Any] = {"__module__": base.__module__, "__qualname__": base.__qualname__}
        if base.__call__ is not Task.__call__:
            attributes["pma_base_call"] = staticmethod(base.__call__)
        for name in _HANDLERS:
            handler = getattr(base, name)
            if handler is not getattr(Task, name):
                attributes[name] = _in_context(handler)
        theirs: Any = getattr(base, "Request", Task.Request)
        if theirs != Task.Request:
            from celery.utils.imports import symbol_by_name

            from ._consumer import Request as OwnRequest

            theirs = symbol_by_name(theirs)
            if not issubclass(theirs, OwnRequest):
                attributes["Request"] = type(theirs.__name__, (OwnRequest, theirs), {"__module__": theirs.__module__})
        try:
            combined = type(base.__name__, (cls, base), attributes)
        except TypeError as exc:
            raise TypeError(
                f"base={base.__qualname__} cannot be combined with ContextTask ({exc}): make it a subclass "
                "of flask_pymacaron_async.ContextTask, or drop base="
            ) from None
        made[base] = combined
        return combined

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        return self.pma_state.publisher.publish(self, args, kwargs, options)

    def celery_apply_async(self, args: Any, kwargs: Any, **options: Any) -> AsyncResult:
        """Celery's own ``apply_async``: hand the message to the broker."""
        return super().apply_async(args, kwargs, **options)

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> EagerResult:
        """Run the task here and now, as Celery's ``apply`` does, inside the caller's context rebuilt.

        As in inline mode (``PYMACARON_ASYNC_ENABLED = False``): the
        arguments are checked and round-tripped through the serializer, the
        context is the caller's snapshot, rebuilt, with the user loaded.
        Returns Celery's ``EagerResult`` (an exception is in it, as Celery
        keeps it, unless ``throw=True`` or ``task_eager_propagates``).
        """
        return self.pma_state.publisher.apply(self, args, kwargs, options)

    def celery_apply(self, args: Any, kwargs: Any, **options: Any) -> EagerResult:
        """Celery's own ``apply``: run the task's tracer here."""
        return super().apply(args, kwargs, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            return self._pma_direct(args, kwargs)
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
            user = snapshot.get("user")
            if user is not None and not (self.ignore_result or request.ignore_result):
                record_owner(self, state, request, user)
            return runner.run_in_context(state, self, snapshot, args, kwargs, request.id)

    def _pma_direct(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A direct call, as Celery's ``Task.__call__``, in the caller's context.

        Celery calls an errback of the ``(request, exc, traceback)`` kind
        directly, after the failing task's context is popped: it runs in
        that task's context rebuilt (see :meth:`pma_running_context`).
        """
        with self.pma_running_context():
            return super().__call__(*args, **kwargs)

    def pma_running_context(self) -> ContextManager[None]:
        """Outside any app context, inside a task the worker verified: that task's context, rebuilt.

        Celery runs errbacks and a task's handlers (``on_failure``,
        ``on_retry``, ...) after the task's body returned, its context
        popped; they see it again through this. Elsewhere (a view, a task's
        body) the context is already there: nothing is pushed.
        """
        if not has_app_context():
            snapshot = context.worker_snapshot(self.pma_state)
            if snapshot is not None:
                return context.pushed(self.pma_state, snapshot)
        return contextlib.nullcontext()


def record_owner(task: ContextTask, state: AsyncState, request: Any, user: Any) -> None:
    """Record ``user`` (the snapshot's) as the owner of the result of the running task, before its body.

    Only on a key-value store result backend (Redis, ...): under the
    result's key followed by :data:`OWNER_KEY`, the digest
    :meth:`~flask_pymacaron_async.AsyncState.owner_digest`, written with the
    backend's ``set``, which gives it the results' expiry (``result_expires``).
    :meth:`~flask_pymacaron_async.PymacaronAsync.result_for` reads it. A
    write that fails is logged and the task runs: its result then has no
    owner, and ``result_for`` gives it to no one.
    """
    if request.is_eager and not task.store_eager_result:
        return
    backend = task.backend
    if not isinstance(backend, BaseKeyValueStoreBackend):
        return
    try:
        backend.set(backend.get_key_for_task(request.id, key=OWNER_KEY), state.owner_digest(user))
    except Exception as exc:
        log.warning(
            "Could not record the owner of %s[%s]: %s (its result will be readable by no one through result_for)",
            task.name,
            request.id,
            one_line(exc),
        )


# The handlers Celery calls after a task's body: a user's base class's run in the task's context.
_HANDLERS = ("on_failure", "on_retry", "on_success", "after_return")


def _in_context(handler: Callable[..., Any]) -> Callable[..., Any]:
    """``handler`` (a task method), run in the task's context (:meth:`ContextTask.pma_running_context`)."""

    @functools.wraps(handler)
    def in_context(self: ContextTask, *args: Any, **kwargs: Any) -> Any:
        with self.pma_running_context():
            return handler(self, *args, **kwargs)

    return in_context


# The classes made by ContextTask.with_base, by class (each app has its own) and base.
_COMBINED: weakref.WeakKeyDictionary[type[ContextTask], dict[type[Any], type[ContextTask]]] = (
    weakref.WeakKeyDictionary()
)


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

    # -- the rest of Celery's Task API, on the task of the app in use -------------

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> EagerResult:
        """Run the task here, in the caller's context rebuilt (see :meth:`ContextTask.apply`)."""
        return self.celery_task.apply(args, kwargs, **options)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> AsyncResult:  # noqa: N802 (Celery's name)
        """The result of a call of this task, by id (``task.AsyncResult(id)``, as in Celery)."""
        return self.celery_task.AsyncResult(task_id, **kwargs)

    def map(self, it: Any) -> Signature:
        """Celery's ``xmap`` signature of this task over ``it``."""
        return self.celery_task.map(it)

    def starmap(self, it: Any) -> Signature:
        """Celery's ``xstarmap`` signature of this task over ``it``."""
        return self.celery_task.starmap(it)

    def chunks(self, it: Any, n: int) -> Signature:
        """Celery's ``chunks`` signature: ``it`` in parts of ``n``, one task each."""
        return self.celery_task.chunks(it, n)

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's ``Task.retry`` (in the body of a bound task, ``self.retry`` is the same)."""
        return self.celery_task.retry(*args, **kwargs)

    def update_state(
        self, task_id: str | None = None, state: str | None = None, meta: Any = None, **kwargs: Any
    ) -> None:
        """Celery's ``Task.update_state`` (progress of the running task, by default)."""
        self.celery_task.update_state(task_id, state, meta, **kwargs)

    @property
    def request(self) -> Any:
        """The request of the running call of this task (Celery's ``Task.request``)."""
        return self.celery_task.request

    @property
    def backend(self) -> Any:
        """The task's result backend."""
        return self.celery_task.backend

    @property
    def app(self) -> Any:
        """The Celery app of the app in use."""
        return self.celery_task.app

    def __getattr__(self, name: str) -> Any:
        # Any other public attribute of Celery's Task (`ignore_result`,
        # `max_retries`, `subtask`, `on_failure`...): the registered task's.
        if name.startswith("_") or name in ("run", "name", "options"):
            raise AttributeError(name)
        return getattr(self.celery_task, name)


#: Every task declared with the module-level :func:`asynctask`, by name.
DECLARED: dict[str, AsyncTask[Any]] = {}


def declare(func: Callable[..., R], options: dict[str, Any], owner: Any) -> AsyncTask[R]:
    """Declare ``func`` as a task (of ``owner``'s apps, or of every app when ``owner`` is None)."""
    task = AsyncTask(func, options, owner)
    # Registered first: a task refused by an app (a wrong base=, say) is not kept for the next ones.
    for state in states.states(owner):
        state.register(task)
    if owner is None:
        DECLARED[task.name] = task
    else:
        owner.declared[task.name] = task
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
