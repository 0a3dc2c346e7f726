"""The context snapshot: taken in the caller, signed, rebuilt in the worker.

A snapshot is a small dict::

    {"app": import name, "rid": request id, "user": what user_dumper returned,
     "env": the WSGI environ keys needed to rebuild the request, or None,
     "ts": when it was signed (Unix time, added by ContextSigner.sign)}

It travels signed in the message header :data:`HEADER`. In the worker,
:func:`pushed` pushes a fresh app context and a request context built from
``env`` (no ``test_request_context``: the environ is a plain dict copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterator

from flask import g, has_app_context, has_request_context, request
from flask.ctx import RequestContext
from flask.sessions import SecureCookieSession
from itsdangerous import BadSignature, Signer

from .errors import ContextError

if TYPE_CHECKING:
    from .extension import _State

#: Name of the Celery message header that carries the signed snapshot.
HEADER = "pymacaron_async_context"

# Where the signed snapshot of the current request is kept, so it is taken at
# most once per request and carried on by tasks queued from inside a task.
_ENVIRON_KEY = "pymacaron_async.context"
_G_KEY = "_pymacaron_async_context"
_SNAPSHOT_KEY = "pymacaron_async.snapshot"
# In the worker, the snapshot a task runs with: tasks it queues carry it on,
# signed again so its age counts from this hop, not from the first request.
_CARRIED_ENVIRON_KEY = "pymacaron_async.carried"
_CARRIED_G_KEY = "_pymacaron_async_carried"

# WSGI keys copied from the caller's environ, besides the allowlisted headers.
_WSGI_KEYS = (
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "REMOTE_ADDR",
    "HTTP_HOST",
    "wsgi.url_scheme",
)
_REQUEST_ID = "HTTP_X_REQUEST_ID"


def environ_key(header: str) -> str:
    """The WSGI environ key of an HTTP header name."""
    key = header.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"


class ContextSigner:
    """Signs and verifies snapshots with a key derived once, not per task."""

    def __init__(self, secret_key: str | bytes) -> None:
        if isinstance(secret_key, str):
            secret_key = secret_key.encode("utf-8")
        key = hashlib.sha256(b"flask-pymacaron-async.context\0" + secret_key).digest()
        self._signer = Signer(key, key_derivation="none", digest_method=hashlib.sha256)

    def sign(self, snapshot: dict[str, Any]) -> str:
        data = json.dumps({**snapshot, "ts": int(time.time())}, separators=(",", ":")).encode("utf-8")
        return self._signer.sign(data).decode("ascii")

    def verify(self, token: Any, max_age: float | None = None) -> dict[str, Any]:
        """The snapshot in ``token``; :class:`ContextError` if it is missing, tampered or too old.

        :param max_age: seconds since signing after which the snapshot is refused
            (``PYMACARON_ASYNC_CONTEXT_MAX_AGE``); None accepts any age.
        """
        if not isinstance(token, str):
            raise ContextError(f"no context snapshot in header {HEADER!r}")
        try:
            data = self._signer.unsign(token.encode("utf-8", "surrogateescape"))
        except BadSignature:
            raise ContextError(
                "the context snapshot's signature does not match (tampered, or another SECRET_KEY)"
            ) from None
        try:
            snapshot = json.loads(data)
        except ValueError as exc:
            raise ContextError(f"the context snapshot is not JSON: {exc}") from None
        if not isinstance(snapshot, dict) or not isinstance(snapshot.get("env"), (dict, type(None))):
            raise ContextError("the context snapshot is not a snapshot")
        if max_age is not None:
            signed = snapshot.get("ts")
            if not isinstance(signed, (int, float)) or isinstance(signed, bool):
                raise ContextError("the context snapshot has no signing time")
            # A clock running behind the caller's is not an expiry.
            age = time.time() - signed
            if age > max_age:
                raise ContextError(
                    f"the context snapshot expired: signed {age:.0f}s ago, over "
                    f"PYMACARON_ASYNC_CONTEXT_MAX_AGE={max_age:g}"
                )
        return snapshot


def take(state: _State) -> str:
    """The signed snapshot of the current context, taken at most once per request."""
    if has_request_context():
        environ = request.environ
        token = environ.get(_ENVIRON_KEY)
        if token is None:
            token = environ[_ENVIRON_KEY] = state.signer.sign(request_snapshot(state))
        return token
    if has_app_context():
        token = g.get(_G_KEY)
        if token is None:
            carried = g.get(_CARRIED_G_KEY)
            token = state.signer.sign(carried if carried is not None else _snapshot(state, None))
            setattr(g, _G_KEY, token)
        return token
    # Outside any app context: a chain or callback sent by the worker after a
    # task returned carries that task's context on; anything else (a script)
    # gets a snapshot without a request.
    token = worker_token()
    if token is not None:
        return token
    with state.app.app_context():
        return state.signer.sign(_snapshot(state, None))


def request_snapshot(state: _State) -> dict[str, Any]:
    """The unsigned snapshot of the current request, taken at most once per request."""
    environ = request.environ
    snapshot = environ.get(_CARRIED_ENVIRON_KEY) or environ.get(_SNAPSHOT_KEY)
    if snapshot is None:
        snapshot = environ[_SNAPSHOT_KEY] = _snapshot(state, environ)
    return snapshot  # type: ignore[no-any-return]


def worker_token() -> str | None:
    """The signed snapshot of the task the worker is running, if any."""
    from celery import current_task

    if not current_task:
        return None
    request = current_task.request
    # Celery 5.1 exposes custom headers only as request attributes.
    token = getattr(request, HEADER, None) or (request.headers or {}).get(HEADER)
    return token if isinstance(token, str) else None


def _snapshot(state: _State, environ: dict[str, Any] | None) -> dict[str, Any]:
    env = None
    request_id = None
    if environ is not None:
        env = {key: environ[key] for key in _WSGI_KEYS if key in environ}
        for key in state.header_keys:
            if key in environ:
                env[key] = environ[key]
        request_id = environ.get(_REQUEST_ID) or uuid.uuid4().hex
        env[_REQUEST_ID] = request_id
    return {
        "app": state.import_name,
        "rid": request_id,
        "user": state.dump_user(),
        "env": env,
    }


def request_id() -> str | None:
    """The id of the request a task was queued from (``X-Request-Id`` or generated)."""
    if has_request_context():
        return request.environ.get(_REQUEST_ID)
    return None


@contextlib.contextmanager
def pushed(state: _State, snapshot: dict[str, Any]) -> Iterator[None]:
    """Run the body inside a fresh app context and the request rebuilt from ``snapshot``.

    The app context is always a fresh one: reusing the caller's (inline mode)
    would let the user loader overwrite the caller's ``g``.
    """
    app = state.app
    env = snapshot.get("env")
    if env is None:
        with app.app_context():
            setattr(g, _CARRIED_G_KEY, snapshot)
            state.load_user(snapshot.get("user"))
            yield
        return
    environ = dict(env)
    environ.update(_WSGI_CONSTANTS)
    environ["wsgi.input"] = _EmptyInput()
    environ[_CARRIED_ENVIRON_KEY] = snapshot
    # The caller's cookies never travel, so opening the session could only
    # make a new empty one: skip the session interface (17 us of 38 here).
    session_class = getattr(app.session_interface, "session_class", SecureCookieSession)
    request_context = RequestContext(app, environ, session=session_class())
    # Without an app context, pushing the request context pushes a fresh one.
    app_context = app.app_context() if has_app_context() else contextlib.nullcontext()
    with app_context, request_context:
        state.load_user(snapshot.get("user"))
        yield


class _EmptyInput:
    """The body of a rebuilt request: tasks never see the caller's body."""

    def read(self, *args: Any) -> bytes:
        return b""

    def readline(self, *args: Any) -> bytes:
        return b""

    def __iter__(self) -> Iterator[bytes]:
        return iter(())


_WSGI_CONSTANTS = {
    "wsgi.version": (1, 0),
    "wsgi.errors": sys.stderr,
    "wsgi.multithread": False,
    "wsgi.multiprocess": True,
    "wsgi.run_once": False,
    "CONTENT_LENGTH": "0",
}
