"""The :class:`PymacaronAsync` extension and the per-app state behind it."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from celery import Celery
from celery.result import AsyncResult, EagerResult
from flask import (
    Flask,
    Response,
    after_this_request,
    current_app,
    has_app_context,
    has_request_context,
    request,
    request_tearing_down,
)

from . import context, deadletter, serialization, signals, transport
from .config import Settings, load_settings
from .context import ContextSigner
from .errors import AsyncUnavailable, MessageTooLarge
from .task import _CONTROL_FLOW, _DECLARED, AsyncTask, ContextTask, _declare

if TYPE_CHECKING:
    from celery.canvas import Signature  # noqa: F401

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Where the calls held until after the response wait, per request.
_HELD_KEY = "pymacaron_async.held"

#: Live per-app states, so tasks declared after ``init_app`` reach every app.
_STATES: weakref.WeakSet[_State] = weakref.WeakSet()


class PymacaronAsync:
    """Background tasks that run in a Celery worker inside the caller's context.

    .. code-block:: python

        app = Flask(__name__)
        ext = PymacaronAsync(app)      # or PymacaronAsync() then ext.init_app(app)
        celery = ext.celery            # celery -A myapp:celery worker

    :param app: the Flask app, or ``None`` to call :meth:`init_app` later.
    """

    #: Key of the per-app state in ``app.extensions``.
    extension_name = "pymacaron_async"

    def __init__(self, app: Flask | None = None) -> None:
        self._user_dumper: Callable[[], Any] | None = None
        self._user_loader: Callable[[Any], Any] | None = None
        self._declared: dict[str, AsyncTask[Any]] = {}
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
        settings = load_settings(app.config)
        state = _State(self, app, settings)
        app.extensions[self.extension_name] = state
        _STATES.add(state)
        # A signal, not app.teardown_request: pymacaron services set the
        # extension up lazily, after the first request.
        request_tearing_down.connect(state._teardown, app)
        for task in (*_DECLARED.values(), *self._declared.values()):
            state.register(task)
        from . import spawn  # the development server's worker and embedded broker

        spawn.init_app(app, state)

    def _state(self) -> _State:
        if has_app_context():
            state = current_app.extensions.get(self.extension_name)
            if state is not None and state.ext is self:
                return state  # type: ignore[no-any-return]
        states = [s for s in _STATES if s.ext is self]
        if len(states) == 1:
            return states[0]
        raise RuntimeError(
            "The current Flask app is not registered with this 'PymacaronAsync' instance. "
            "Did you forget to call 'init_app', or do you have multiple instances?"
        )

    @property
    def celery(self) -> Celery:
        """The Celery app of the current Flask app (or of the only app initialized)."""
        return self._state().celery

    def task(self, func: F | None = None, /, **options: Any) -> Any:
        """Like :func:`~flask_pymacaron_async.asynctask`, for this extension's apps only."""
        if func is not None:
            return _declare(func, options, self)
        return lambda f: _declare(f, dict(options), self)

    def user_dumper(self, func: F) -> F:
        """Register the function that returns what identifies the current user.

        Called once per request in the caller, when the first task is queued;
        its JSON-able return value is given to :meth:`user_loader` in the
        worker. Without a dumper, Flask-Login's ``current_user.get_id()`` is
        used when Flask-Login is set up on the app.
        """
        self._user_dumper = func
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

    def user_loader(self, func: F) -> F:
        """Register the function that restores the user in the worker.

        Called with the dumped value inside the rebuilt request context
        (``g`` and ``request`` are available), only when that value is not None.
        """
        self._user_loader = func
        return func


class _State:
    """Everything the extension keeps for one Flask app (``app.extensions["pymacaron_async"]``)."""

    def __init__(self, ext: PymacaronAsync, app: Flask, settings: Settings) -> None:
        self.ext = ext
        self.app = app
        self.settings = settings
        self.import_name = app.import_name
        self.signer = ContextSigner(settings.secret_key or os.urandom(32), settings.secret_key_fallbacks)
        # Proof, inside the worker's processes, that the consumer verified a
        # message's signature (the task body runs in a pool process, without the body).
        self._verified_key = secrets.token_bytes(32)
        self.header_keys = tuple(context.environ_key(h) for h in settings.context_headers)
        self.celery = self._make_celery()

    def _make_celery(self) -> Celery:
        s = self.settings
        celery = Celery(
            self.import_name, set_as_current=False, task_cls=ContextTask, amqp="flask_pymacaron_async.amqp:AMQP"
        )
        timeout = s.publish_timeout
        # Bounded retries everywhere a call can touch the broker or the result
        # backend: Celery's defaults retry for tens of seconds.
        retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
        celery.conf.update(
            broker_url=s.broker_url,
            result_backend=s.result_backend,
            task_ignore_result=s.result_backend is None,
            task_serializer=serialization.SERIALIZER,
            result_serializer="json",
            accept_content=[serialization.SERIALIZER, "json"],
            result_accept_content=["json"],
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
            broker_connection_timeout=timeout,
            broker_connection_retry_on_startup=True,
            broker_transport_options={
                "visibility_timeout": s.visibility_timeout,
                "dead_letter_max": s.dead_letter_max,
                "socket_connect_timeout": timeout,
                # A broker that accepts connections and never answers (paused,
                # half-open TCP) must fail a publish too, not hang it.
                "socket_timeout": timeout,
                **retry_policy,
            },
            result_backend_transport_options={"retry_policy": retry_policy},
            redis_socket_connect_timeout=timeout,
            task_publish_retry=False,
        )
        celery.conf.update(s.celery)
        transport.configure(celery, s.celery)
        celery.pma_state = self  # type: ignore[attr-defined]
        return celery

    # -- verification mark ---------------------------------------------------

    def mark(self, token: str) -> str:
        """The mark the consumer gives a message whose context ``token`` it verified."""
        return hmac.new(self._verified_key, token.encode("utf-8", "surrogateescape"), "sha256").hexdigest()

    def is_verified(self, mark: Any, token: Any) -> bool:
        """Whether ``mark`` is this worker's mark for ``token``."""
        if not isinstance(mark, str) or not isinstance(token, str):
            return False
        return hmac.compare_digest(mark, self.mark(token))

    # -- tasks ---------------------------------------------------------------

    def register(self, task: AsyncTask[Any]) -> ContextTask:
        """The Celery task for ``task`` in this app, registered on first use."""
        registered = self.celery.tasks.get(task.name)
        if registered is not None:
            return registered  # type: ignore[return-value]
        options = dict(task.options)
        delay = options.pop("delay", None)
        # Celery deprecates the task `queue` attribute: route per call instead.
        queue = options.pop("queue", None)
        publish = options.pop("publish", None)
        if publish not in (None, "immediate", "after_response"):
            raise ValueError(f"@asynctask(publish=...) must be 'immediate' or 'after_response', got {publish!r}")
        return self.celery.task(  # type: ignore[no-any-return]
            task.run,
            name=task.name,
            shared=False,
            pma_delay=delay,
            pma_queue=queue,
            pma_publish=publish,
            **options,
        )

    # -- users ---------------------------------------------------------------

    def dump_user(self) -> Any:
        dumper = self.ext._user_dumper
        if dumper is not None:
            return dumper()
        if has_request_context() and hasattr(self.app, "login_manager"):
            from flask_login import current_user

            if current_user.is_authenticated:
                return current_user.get_id()
        return None

    def load_user(self, value: Any) -> None:
        if value is None:
            return
        loader = self.ext._user_loader
        if loader is not None:
            loader(value)
            return
        manager = getattr(self.app, "login_manager", None)
        if manager is not None:
            user = manager._user_callback(value) if manager._user_callback else None
            if user is not None:
                _login(manager, user)

    # -- publishing ----------------------------------------------------------

    def publish(self, task: ContextTask, args: Any, kwargs: Any, options: dict[str, Any]) -> AsyncResult:
        """Check, snapshot and queue one call of ``task``: now, after the response, or inline."""
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        encoded = serialization.check_arguments(task.name, task.run, args, kwargs)
        if len(encoded) > self.settings.max_message_bytes:
            raise MessageTooLarge(
                f"{task.name}(): arguments take {len(encoded)} bytes, over "
                f"PYMACARON_ASYNC_MAX_MESSAGE_BYTES={self.settings.max_message_bytes}"
            )
        if not self.settings.enabled:
            return self.run_inline(task, context.take(self), encoded, args, kwargs)
        if task.pma_delay and "countdown" not in options and "eta" not in options:
            options["countdown"] = task.pma_delay
        if task.pma_queue and "queue" not in options:
            options["queue"] = task.pma_queue
        options.setdefault("retry", False)
        if (task.pma_publish or self.settings.publish) == "after_response" and has_request_context():
            return self._hold(task, args, kwargs, options)
        return self._send(task, context.take(self), args, kwargs, options, encoded)

    def _send(
        self,
        task: ContextTask,
        payload: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: dict[str, Any],
        encoded: str | None = None,
    ) -> AsyncResult:
        """Hand one call to Celery; :class:`~flask_pymacaron_async.amqp.AMQP` signs its context for the message."""
        headers = dict(options.pop("headers", None) or {})
        headers[context.HEADER] = context.Unsigned(payload)
        try:
            result = task._publish(args, kwargs, headers=headers, **options)
        except Exception as exc:
            if not _is_connection_error(exc):
                raise
            if self.settings.fallback == "inline":
                log.warning("Broker unavailable (%s); running %s inline", exc, task.name)
                if encoded is None:
                    encoded = serialization.dumps([args, kwargs])
                return self.run_inline(task, payload, encoded, args, kwargs)
            reason = " ".join(str(exc).split())
            raise AsyncUnavailable(f"could not queue {task.name}: the broker is unavailable ({reason})") from exc
        signals.task_queued.send(self.app, task_name=task.name, task_id=result.id)
        return result

    # -- after_response publishing -------------------------------------------

    def _hold(
        self, task: ContextTask, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> AsyncResult:
        """Keep a call until the response has been sent; its id is known now.

        Only the snapshot is taken before the response: its payload is
        written once per request, after it, and signed per message.
        """
        environ = request.environ
        held = environ.get(_HELD_KEY)
        if held is None:
            held = environ[_HELD_KEY] = []
            after_this_request(self._after_response)
        task_id = options.setdefault("task_id", str(uuid.uuid4()))
        context.request_snapshot(self)  # taken now, as an immediate call would
        held.append((task, args, kwargs, options))
        return task.AsyncResult(task_id)

    def _after_response(self, response: Response) -> Response:
        held = request.environ.pop(_HELD_KEY, [])
        if response.status_code >= 500:
            log.debug("Response %s: dropping %d held task(s)", response.status_code, len(held))
        elif held:
            snapshot = context.request_snapshot(self)
            response.call_on_close(lambda: self._publish_held(snapshot, held))
        return response

    def _teardown(self, sender: Flask, exc: BaseException | None = None, **extra: Any) -> None:
        """Calls still held here never saw a response (a rebuilt or test request, or a raised view)."""
        held = request.environ.pop(_HELD_KEY, None)
        if not held:
            return
        if exc is not None:
            log.debug("Request failed (%r): dropping %d held task(s)", exc, len(held))
        else:
            self._publish_held(context.request_snapshot(self), held)

    def _publish_held(self, snapshot: dict[str, Any], held: list[tuple[Any, ...]]) -> None:
        """Publish the tasks of one request on one producer; failures cannot reach the client any more."""
        payload = ContextSigner.payload(snapshot)
        with self.celery.producer_or_acquire() as producer:
            for task, args, kwargs, options in held:
                try:
                    self._send(task, payload, args, kwargs, {**options, "producer": producer})
                except Exception as exc:
                    log.error("Task %s[%s] not published after the response: %s", task.name, options["task_id"], exc)
                    signals.task_failed.send(self.app, task_name=task.name, task_id=options["task_id"], exception=exc)

    def run_inline(
        self, task: ContextTask, payload: str, encoded: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> EagerResult:
        """Run a call in this process, through the same path as in the worker (signed, checked, decoded)."""
        task_id = str(uuid.uuid4())
        token = self.signer.sign(payload, task.name, task_id, encoded)
        snapshot = self.signer.verify(token, task.name, task_id, encoded)
        args, kwargs = serialization.loads(encoded)
        signals.task_queued.send(self.app, task_name=task.name, task_id=task_id)
        value = self.run_in_context(task, snapshot, args, kwargs, task_id)
        return EagerResult(task_id, value, "SUCCESS")

    def run_in_context(
        self,
        task: ContextTask,
        snapshot: dict[str, Any],
        args: Any,
        kwargs: Any,
        task_id: str | None,
    ) -> Any:
        """Run the task body inside the rebuilt context, with signals and failure logging."""
        with context.pushed(self, snapshot):
            signals.task_started.send(self.app, task_name=task.name, task_id=task_id)
            try:
                value = task.run(*args, **kwargs)
            except _CONTROL_FLOW:
                raise
            except Exception as exc:
                self.report_failure(task.name, task_id, exc, snapshot)
                raise
            signals.task_succeeded.send(self.app, task_name=task.name, task_id=task_id, result=value)
            return value

    def report_failure(self, task_name: str, task_id: str | None, exc: BaseException, snapshot: dict[str, Any]) -> None:
        """Log a failed task on the app's logger (id, name, URL, user; never a token) and send ``task_failed``.

        No traceback here: Celery logs it in the worker, and inline the
        exception reaches the caller.
        """
        self.app.logger.error(
            "Task %s[%s] failed: %r (url=%s, user=%s, request_id=%s)",
            task_name,
            task_id,
            exc,
            _url(snapshot.get("env") or {}),
            snapshot.get("user"),
            snapshot.get("rid"),
        )
        signals.task_failed.send(self.app, task_name=task_name, task_id=task_id, exception=exc)


def _login(manager: Any, user: Any) -> None:
    """Make Flask-Login's ``current_user`` answer ``user`` (0.6+ and 0.5)."""
    update = getattr(manager, "_update_request_context_with_user", None)
    if update is not None:
        update(user)
    else:  # Flask-Login 0.5, on Flask 1.x
        from flask import _request_ctx_stack

        _request_ctx_stack.top.user = user


def _url(env: dict[str, Any]) -> str | None:
    if not env:
        return None
    query = env.get("QUERY_STRING")
    return (
        f"{env.get('wsgi.url_scheme', 'http')}://{env.get('HTTP_HOST', env.get('SERVER_NAME', ''))}"
        f"{env.get('SCRIPT_NAME', '')}{env.get('PATH_INFO', '')}{'?' + query if query else ''}"
    )


def _is_connection_error(exc: BaseException) -> bool:
    from kombu.exceptions import OperationalError

    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - redis is a dependency
        RedisConnectionError = RedisTimeoutError = OSError  # type: ignore[assignment,misc]  # noqa: N806
    kinds = (OperationalError, RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
    # Celery's result backend wraps the connection error in a RuntimeError.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kinds):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
