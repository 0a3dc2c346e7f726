"""What the extension keeps for one Flask app, in ``app.extensions["pymacaron_async"]``.

:func:`state_for` is the way to reach it (``PymacaronAsync.state_for(app)``
says the same); nothing else reads ``app.extensions`` by hand.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

from celery import Celery
from celery import signals as celery_signals
from flask import Flask, appcontext_popped, appcontext_pushed, current_app, has_app_context

from . import _compat, serialization
from . import _context as context
from . import _limits as limits
from . import _transport as transport
from ._context import ContextSigner
from ._shown import USER_FIELDS
from ._users import UserHooks
from .config import PUBLISH_MODES, Settings

if TYPE_CHECKING:
    from ._publish import Publisher
    from ._task import AsyncTask, ContextTask

#: Key of the per-app state in ``app.extensions``.
EXTENSION_KEY = "pymacaron_async"

#: Live per-app states, so tasks declared after ``init_app`` reach every app.
_STATES: weakref.WeakSet[AsyncState] = weakref.WeakSet()

# Per thread, the Celery apps that were current before each app context pushed.
_PREVIOUS = threading.local()


def _previous_celery() -> list[Any]:
    stack: list[Any] | None = getattr(_PREVIOUS, "stack", None)
    if stack is None:
        stack = _PREVIOUS.stack = []
    return stack


#: Called with ``(app, state)`` at the end of every ``init_app`` (the development server's hook).
_INIT_HOOKS: list[Callable[[Flask, AsyncState], None]] = []


#: Fields that identify a user in a dumped mapping (:meth:`AsyncState.owner_digest`), in this order:
#: the fields that name a user in logs, but a display name.
IDENTITY_FIELDS = tuple(field for field in USER_FIELDS if field != "name")


class AsyncState:
    """Everything the extension keeps for one Flask app.

    :param ext: the :class:`~flask_pymacaron_async.PymacaronAsync` that set it up.
    :param app: the Flask app.
    :param settings: its validated configuration.
    :param users: the owner's user hooks.
    """

    def __init__(self, ext: Any, app: Flask, settings: Settings, users: UserHooks) -> None:
        #: The :class:`~flask_pymacaron_async.PymacaronAsync` that set it up.
        self.ext = ext
        self.app = app
        self.settings = settings
        self.users = users
        self.import_name = app.import_name
        secret = settings.secret_key or os.urandom(32)
        self.signer = ContextSigner(secret, settings.secret_key_fallbacks)
        # Keys of the owner digests of results (owner_digest), derived apart from the signing keys.
        self._owner_keys = tuple(_owner_key(key) for key in (secret, *settings.secret_key_fallbacks))
        self.header_keys = tuple(context.environ_key(h) for h in settings.context_headers)
        # Proof, inside the worker's processes, that the consumer verified a
        # message's signature (the task body runs in a pool process, without the body).
        self._verified_key = secrets.token_bytes(32)
        #: How calls are published (set by ``init_app``).
        self.publisher: Publisher
        #: The app's Celery app.
        self.celery = make_celery(self)

    def __repr__(self) -> str:
        return f"<AsyncState of {self.import_name!r}>"

    # -- the consumer's verification mark --------------------------------------------

    def mark(self, token: str) -> str:
        """The mark the consumer gives a message whose context ``token`` it verified."""
        return hmac.new(self._verified_key, token.encode("utf-8", "surrogateescape"), "sha256").hexdigest()

    def is_verified(self, mark: Any, token: Any) -> bool:
        """Whether ``mark`` is this worker's mark for ``token``."""
        if not isinstance(mark, str) or not isinstance(token, str):
            return False
        return hmac.compare_digest(mark, self.mark(token))

    # -- users -------------------------------------------------------------------------

    def dump_user(self) -> Any:
        """What identifies the current user, as sent to the worker."""
        return self.users.dump(self.app)

    def load_user(self, value: Any) -> None:
        """Restore the user in the worker's rebuilt context."""
        self.users.load(self.app, value)

    def owner_digest(self, user: Any, key: int = 0) -> str:
        """The digest that names ``user`` (a value of :meth:`dump_user`) as the owner of a task's result.

        An HMAC-SHA256 of the user's identity as canonical JSON (sorted keys,
        compact), keyed from the signing key (``key``: 0 for the current one,
        then its fallbacks) with a label of its own: the result backend holds
        the digest, never the user value. The identity of a mapping that has
        an identifying field (:data:`IDENTITY_FIELDS`, the first found) is
        that field alone, so that a value that also carries a token fresh in
        each request (pymacaron's ``{"sub": ..., "jwt": ...}``) names the
        same owner in each; any other value is its own identity.
        """
        if isinstance(user, dict):
            field = next((name for name in IDENTITY_FIELDS if user.get(name) is not None), None)
            if field is not None:
                user = {field: user[field]}
        text = json.dumps(user, sort_keys=True, separators=(",", ":"))
        return hmac.new(self._owner_keys[key], text.encode("utf-8"), "sha256").hexdigest()

    def is_owner(self, user: Any, digest: Any) -> bool:
        """Whether ``digest`` (as read from the result backend: bytes or text) names ``user``.

        Any signing key counts, the fallbacks too: a digest recorded before a
        key rotation still names its owner.
        """
        if isinstance(digest, str):
            digest = digest.encode("utf-8", "replace")
        if not isinstance(digest, bytes):
            return False
        return any(
            hmac.compare_digest(digest, self.owner_digest(user, key).encode("ascii"))
            for key in range(len(self._owner_keys))
        )

    # -- Celery's current app ---------------------------------------------------------------

    def celery_current(self, sender: Flask, **extra: Any) -> None:
        """Make the app's Celery app Celery's current one while an app context is pushed."""
        _previous_celery().append(_compat.current_celery_app())
        self.celery.set_current()

    def celery_restore(self, sender: Flask, **extra: Any) -> None:
        """Give Celery back the current app it had before the app context was pushed."""
        previous = _previous_celery()
        if previous:
            previous.pop().set_current()

    def worker_init(self, sender: Any = None, **extra: Any) -> None:
        """In a worker of this app's Celery app, stop following the app's contexts (Celery's ``worker_init``).

        The worker makes its Celery app Celery's current and default one for
        the whole process, every thread: :meth:`celery_current` and
        :meth:`celery_restore` would only push and pop it again, ~4 µs of
        every task's context rebuild. Disconnected for every sender (they
        were connected for this app only): a receiver disconnected for one
        sender stays in blinker's list, and each signal sent looks it up
        (~1.4 µs per rebuild).
        """
        if getattr(sender, "app", None) is self.celery:
            appcontext_pushed.disconnect(self.celery_current)
            appcontext_popped.disconnect(self.celery_restore)

    # -- tasks -------------------------------------------------------------------------

    def register(self, task: AsyncTask[Any]) -> ContextTask:
        """The Celery task for ``task`` in this app, registered on first use."""
        registered = self.celery.tasks.get(task.name)
        if registered is not None:
            return registered  # type: ignore[no-any-return]
        options = dict(task.options)
        delay = options.pop("delay", None)
        # Celery deprecates the task `queue` attribute: route per call instead.
        queue = options.pop("queue", None)
        publish = options.pop("publish", None)
        if publish not in (None, *PUBLISH_MODES):
            raise ValueError(f"@asynctask(publish=...) must be one of {PUBLISH_MODES}, got {publish!r}")
        return self.celery.task(  # type: ignore[no-any-return]
            task.run,
            name=task.name,
            shared=False,
            pma_delay=delay,
            pma_queue=queue,
            pma_publish=publish,
            **options,
        )


def _owner_key(secret_key: str | bytes) -> bytes:
    """The key of :meth:`AsyncState.owner_digest` derived from a signing key (the context's has another label)."""
    if isinstance(secret_key, str):
        secret_key = secret_key.encode("utf-8")
    return hashlib.sha256(b"flask-pymacaron-async.owner\0" + secret_key).digest()


#: Bounded retries everywhere a call can touch the broker or the result
#: backend: Celery's defaults retry for tens of seconds.
_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def make_celery(state: AsyncState) -> Celery:
    """The Celery app of ``state``'s Flask app: the extension's defaults, then the app's ``CELERY`` setting."""
    s = state.settings
    celery = _compat.CombiningCelery(
        state.import_name,
        set_as_current=False,
        task_cls="flask_pymacaron_async._task:ContextTask",
        amqp="flask_pymacaron_async._amqp:AMQP",
    )
    timeout = s.publish_timeout
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
            "min_replicas": s.broker_min_replicas,
            "max_item_bytes": limits.item_bytes(s.max_message_bytes),
            "socket_connect_timeout": timeout,
            # A broker that accepts connections and never answers (paused,
            # half-open TCP) must fail a publish too, not hang it.
            "socket_timeout": timeout,
            **_RETRY_POLICY,
        },
        result_backend_transport_options={"retry_policy": _RETRY_POLICY},
        redis_socket_connect_timeout=timeout,
        task_publish_retry=False,
    )
    defaults = dict(celery.conf.broker_transport_options)
    celery.conf.update(s.celery)
    if "broker_transport_options" in s.celery:
        # The app's options (a Sentinel's master_name, ...) add to the
        # extension's timeouts instead of dropping them.
        celery.conf.broker_transport_options = {**defaults, **(s.celery["broker_transport_options"] or {})}
    transport.configure(celery, s.celery)
    celery.pma_state = state
    return celery


def add(app: Flask, state: AsyncState) -> None:
    """Keep ``state`` as ``app``'s, make its Celery app Celery's current one in its contexts, run the init hooks.

    Celery's own API then finds the app's Celery app: ``celery.current_app``,
    ``AsyncResult(id)`` without ``app=`` and ``@shared_task`` tasks, inside
    the app's contexts; outside them, the Celery app of the first Flask app
    set up in the process is Celery's default app (as the Flask docs' recipe
    makes it). ``app.extensions["celery"]`` is the Celery app too, as the
    recipe has it, unless something else is there already.
    """
    app.extensions[EXTENSION_KEY] = state
    app.extensions.setdefault("celery", state.celery)
    first = not states()
    _STATES.add(state)
    if first:
        state.celery.set_default()
    appcontext_pushed.connect(state.celery_current, app)
    appcontext_popped.connect(state.celery_restore, app)
    for hook in list(_INIT_HOOKS):
        hook(app, state)


def _worker_init(sender: Any = None, **extra: Any) -> None:
    """Celery's ``worker_init``, for every app's state.

    One receiver for all: Celery 5.1 tells bound methods apart by their function only.
    """
    for state in list(states()):
        state.worker_init(sender)


celery_signals.worker_init.connect(_worker_init, weak=False)


def on_init_app(hook: Callable[[Flask, AsyncState], None]) -> Callable[[Flask, AsyncState], None]:
    """Call ``hook(app, state)`` at the end of every ``init_app`` (a decorator)."""
    _INIT_HOOKS.append(hook)
    return hook


def state_for(app: Flask) -> AsyncState:
    """The state of ``app``.

    :raises RuntimeError: when ``app`` has no extension.
    """
    state = app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise RuntimeError(
            f"The app {app.name!r} has no PymacaronAsync extension: did you call PymacaronAsync.init_app(app)?"
        )
    return state  # type: ignore[no-any-return]


def for_extension(owner: Any) -> AsyncState:
    """The state ``owner`` (a ``PymacaronAsync``) keeps for the current app, else for the only app it has.

    :raises RuntimeError: when neither tells.
    """
    if has_app_context():
        state = current_app.extensions.get(EXTENSION_KEY)
        if state is not None and state.ext is owner:
            return state  # type: ignore[no-any-return]
    candidates = states(owner)
    if len(candidates) == 1:
        return candidates[0]
    raise RuntimeError(
        "The current Flask app is not registered with this 'PymacaronAsync' instance. "
        "Did you forget to call 'init_app', or do you have multiple instances?"
    )


def for_call(owner: Any, name: str) -> AsyncState:
    """The state of the app that should run task ``name``: the current app's, else the only app's.

    :param owner: the ``PymacaronAsync`` the task was declared on, or None (``@asynctask``).
    :raises RuntimeError: when the current app has no extension, or several apps could be meant.
    """
    if has_app_context():
        return state_for(current_app)  # the proxy: state_for only reads the app's attributes
    candidates = states(owner)
    if len(candidates) != 1:
        raise RuntimeError(
            f"Cannot tell which Flask app should run {name} ({len(candidates)} apps have the extension): "
            "call it inside an app context, or did you call PymacaronAsync.init_app(app)?"
        )
    return candidates[0]


def states(owner: Any = None) -> list[AsyncState]:
    """The live states (of ``owner``, when given)."""
    return [s for s in _STATES if owner is None or s.ext is owner]
