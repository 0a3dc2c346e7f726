"""The :class:`PymacaronAsync` extension."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ContextManager, TypeVar

from celery import states as celery_states
from celery.backends.base import BaseKeyValueStoreBackend
from celery.result import EagerResult
from flask import Flask

from . import _dashboard as dashboard
from . import _deadletter as deadletter
from . import _publish as publish
from . import _state as state
from ._publish import Publisher
from ._task import DECLARED, OWNER_KEY, AsyncTask, declare
from ._users import UserHooks
from .config import load_settings
from .errors import ConfigError

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult
    from flask import Blueprint

F = TypeVar("F", bound=Callable[..., Any])

#: The longest task id :meth:`PymacaronAsync.result_for` looks up (Celery's are 36 characters).
_MAX_TASK_ID = 255

# Imported by the worker only (Celery's `imports`): it registers a remote-control command.
_WORKER_IMPORT = "flask_pymacaron_async._control"


class PymacaronAsync:
    """Background tasks that run in a Celery worker inside the caller's context.

    .. code-block:: python

        app = Flask(__name__)
        ext = PymacaronAsync(app)      # or PymacaronAsync() then ext.init_app(app)
        celery = ext.celery            # celery -A myapp:celery worker

    :param app: the Flask app, or ``None`` to call :meth:`init_app` later.
    """

    #: Key of the per-app state in ``app.extensions``.
    extension_name = state.EXTENSION_KEY

    def __init__(self, app: Flask | None = None) -> None:
        #: The user hooks (:meth:`user_dumper`, :meth:`user_loader`).
        self.users = UserHooks()
        #: The tasks declared with :meth:`task`, by name.
        self.declared: dict[str, AsyncTask[Any]] = {}
        #: Returns the SQLAlchemy session of ``publish="after_commit"`` (:meth:`sqlalchemy_session`).
        self.session_getter: Callable[[], Any] | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read and validate the config, create the app's Celery app, register the tasks.

        :raises RuntimeError: when the extension is already registered on ``app``.
        :raises ~flask_pymacaron_async.errors.ConfigError: on a wrong config value.
        """
        if self.extension_name in app.extensions:
            raise RuntimeError(
                "A 'PymacaronAsync' instance has already been registered on this Flask app. "
                "Import and use that instance instead."
            )
        app_state = state.AsyncState(self, app, load_settings(app.config), self.users)
        app_state.publisher = Publisher(app_state)
        for task in (*DECLARED.values(), *self.declared.values()):
            app_state.register(task)
        # The worker imports it at start: it registers the command that lists
        # the running tasks with who queued them (the dashboard, `flask async status`).
        imports = tuple(app_state.celery.conf.imports or ())
        if _WORKER_IMPORT not in imports:
            app_state.celery.conf.imports = (*imports, _WORKER_IMPORT)
        state.add(app, app_state)

    @staticmethod
    def state_for(app: Flask) -> state.AsyncState:
        """The per-app state of ``app`` (``app.extensions["pymacaron_async"]``).

        :raises RuntimeError: when ``app`` has no extension.
        """
        return state.state_for(app)

    @property
    def celery(self) -> Celery:
        """The Celery app of the current Flask app (or of the only app initialized)."""
        return state.for_extension(self).celery

    def result_for(self, task_id: str) -> AsyncResult | None:
        """The result of task ``task_id`` when the current user queued it, else None.

        .. code-block:: python

            @app.route("/results/<task_id>")
            def result(task_id):
                found = ext.result_for(task_id)
                if found is None:
                    abort(404)
                return {"state": found.state, "value": found.result if found.successful() else None}

        Where ``celery.result.AsyncResult(task_id)`` gives anyone who holds
        an id the task's result, this gives it to the user who queued the
        task. The worker records that user when it starts running the task,
        before the body: a digest of what :meth:`user_dumper` returned
        (keyed from the signing key, never the value itself), in the result
        backend next to the result, expiring as results do
        (``result_expires``). Then, for the current user (the dumper's
        value in this request, which must be the same in each request of a
        user: an id, not a token):

        - recorded owner is the current user: the task's ``AsyncResult``;
        - recorded owner is someone else: None;
        - no owner recorded: the ``AsyncResult`` while Celery says
          ``PENDING`` (a task queued and not started yet, or an id Celery
          does not know: Celery cannot tell them apart, so this tells no one
          anything), as a result that stays ``PENDING`` (call ``result_for``
          again to poll), else None. A task queued without a user, or with
          ``ignore_result``, has no owner: its result is given to no one;
        - no current user (anonymous): None, always;
        - an id that is empty, longer than 255 characters or not printable
          (control characters): None.

        Call it in a request (or an app context) of the app, where the user
        dumper answers. See :ref:`result-owners` for the window this leaves.

        :param task_id: the id a call returned (``send_email(...).id``).
        :raises TypeError: when ``task_id`` is not a string.
        :raises ~flask_pymacaron_async.errors.ConfigError: when the app has no
            result backend, or one that is not a key-value store (Redis,
            Memcached, ...) that can hold the owners.
        """
        if not isinstance(task_id, str):
            raise TypeError(f"result_for() takes a task id string, not {type(task_id).__name__}")
        app_state = state.for_extension(self)
        celery = app_state.celery
        if not celery.conf.result_backend:
            raise ConfigError(
                "result_for() needs a result backend: set PYMACARON_ASYNC_RESULT_BACKEND "
                "(e.g. 'redis://localhost:6379/1')"
            )
        backend = celery.backend
        if not isinstance(backend, BaseKeyValueStoreBackend):
            raise ConfigError(
                f"result_for() needs a key-value store result backend (Redis, Memcached, ...) to keep who "
                f"queued each task; the app's result backend is a {type(backend).__name__}: set "
                "PYMACARON_ASYNC_RESULT_BACKEND to a Redis URL"
            )
        if not task_id or len(task_id) > _MAX_TASK_ID or not task_id.isprintable():
            return None
        user = app_state.dump_user()
        if user is None:
            return None
        key = backend.get_key_for_task(task_id, key=OWNER_KEY)
        owner = backend.get(key)
        result = celery.AsyncResult(task_id)
        if owner is None:
            if result.state == celery_states.PENDING:
                # Frozen: a result object that read the backend again later would show whoever holds it what
                # the task stores once it runs. Poll by calling result_for again.
                return EagerResult(task_id, None, celery_states.PENDING)
            # Started since the owner was read? Its owner is recorded before its body stores a state.
            owner = backend.get(key)
            if owner is None:
                return None
        return result if app_state.is_owner(user, owner) else None

    def task(self, func: F | None = None, /, **options: Any) -> Any:
        """Like :func:`~flask_pymacaron_async.asynctask`, for this extension's apps only."""
        if func is not None:
            return declare(func, options, self)
        return lambda f: declare(f, dict(options), self)

    def user_dumper(self, func: F) -> F:
        """Register the function that returns what identifies the current user.

        Called once per request in the caller, when the first task is queued;
        its JSON-able return value is given to :meth:`user_loader` in the
        worker. Without a dumper, Flask-Login's ``current_user.get_id()`` is
        used when Flask-Login is set up on the app.
        """
        self.users.dumper = func
        return func

    def user_loader(self, func: F) -> F:
        """Register the function that restores the user in the worker.

        Called with the dumped value inside the rebuilt request context
        (``g`` and ``request`` are available), only when that value is not None.
        """
        self.users.loader = func
        return func

    def user_display(self, func: F) -> F:
        """Register the function that says how logs and the dashboard show a user.

        It is given what :meth:`user_dumper` returned and returns a short
        text (escaped and cut when shown; a JWT in it is masked), or ``None``
        for the default: an id or a string as it is, a mapping by its first
        naming field (``sub``, ``id``, ``username``, ``email``...), never a token.
        """
        self.users.display = func
        return func

    def batch(self) -> ContextManager[None]:
        """Hold the tasks queued in the ``with`` block and publish them in one round trip at its end.

        .. code-block:: python

            with ext.batch():
                for follower in followers:
                    notify(follower.id)   # returns its AsyncResult at once

        Usable anywhere (requests, scripts, CLI commands, tasks fanning out);
        nested blocks join the outer one, and in a request published
        ``after_response`` the block's tasks join the request's. When the
        block raises, nothing is published. See :func:`flask_pymacaron_async._publish.batch`.
        """
        return publish.batch()

    def sqlalchemy_session(self, func: F) -> F:
        """Register the function that returns the SQLAlchemy session ``publish="after_commit"`` follows.

        Not needed with Flask-SQLAlchemy (its ``db.session`` is used). The
        function is called in the caller's context when a task is queued; it
        may return a ``Session`` or a ``scoped_session``.
        """
        self.session_getter = func
        return func

    # -- dead letters ----------------------------------------------------------

    def _queues(self, queue: str | None) -> list[str]:
        from .broker import queue_names

        return [queue] if queue else queue_names(self.celery)

    def dead_letters(self, queue: str | None = None) -> list[deadletter.DeadLetter]:
        """The dead letters of the app's queues (or of ``queue``), newest first.

        What the worker refused (with the reason) and the tasks that failed
        for good; see :doc:`reliability`.
        """
        return deadletter.list_dead(self.celery, self._queues(queue))

    def requeue_dead_letters(
        self, ids: list[str] | None = None, queue: str | None = None
    ) -> list[deadletter.DeadLetter]:
        """Put dead letters back on their queue: those with these ids (or task ids), or all when ``ids`` is None.

        The worker checks them again: a message refused for its signature is
        refused again.

        :returns: the dead letters requeued.
        """
        return deadletter.requeue(self.celery, self._queues(queue), ids)

    def purge_dead_letters(self, queue: str | None = None) -> int:
        """Delete the dead letters of the app's queues (or of ``queue``); how many there were. There is no undo."""
        return sum(deadletter.purge(self.celery, self._queues(queue)).values())

    # -- operations page -----------------------------------------------------------

    def dashboard_blueprint(self, allow: Callable[[], Any] | None = None, name: str = dashboard.NAME) -> Blueprint:
        """A blueprint of the operations page: broker, queues, workers and their running tasks, failures, dead letters.

        .. code-block:: python

            app.register_blueprint(ext.dashboard_blueprint(allow=is_admin), url_prefix="/ops")

        Its actions (requeue, purge dead letters, revoke a task) are POSTs
        behind a confirmation and a CSRF check, logged with the acting user.
        ``<prefix>/status.json`` serves what ``flask async status --json`` prints.
        See :doc:`dashboard`.

        :param allow: called in each request to the page; a false answer refuses it
            (Flask-Login's ``unauthorized()`` for an anonymous user when Flask-Login is
            set up, else 403). Without it, only an app in debug mode shows the page.
        :param name: the blueprint's name (for ``url_for``; two dashboards on one app need two names).
        """
        return dashboard.blueprint(allow, name)
