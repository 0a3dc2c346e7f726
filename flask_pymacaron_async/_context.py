"""The context snapshot: taken in the caller, signed, rebuilt in the worker.

A snapshot is a small dict::

    {"app": import name, "rid": request id, "user": what user_dumper returned,
     "env": the WSGI environ keys needed to rebuild the request, or None,
     "ts": when it was signed (Unix time, added by ContextSigner.payload)}

It travels in the message header :data:`HEADER`, signed for that message
(:class:`ContextSigner`): the signature covers the task name, the task id, the
encoded body and the headers that change when, whether or how the task runs
or is shown (:data:`BOUND_HEADERS`, :func:`bound_headers`) too. What travels is compact (:meth:`ContextSigner.payload`):
no ``app`` (the worker has its own), no usual values, short names. In the
worker, :func:`pushed` pushes a fresh app context and a request context built
from ``env`` (no ``test_request_context``: the environ is a plain dict copy).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import sys
import time
from typing import TYPE_CHECKING, Any, ContextManager, Iterable, Iterator, Protocol

from flask import g, has_app_context, has_request_context, request
from flask.sessions import SecureCookieSession

from . import _compat, tracing
from . import _ids as ids
from .errors import ContextError

if TYPE_CHECKING:
    from flask import Flask


class Owner(Protocol):
    """What this module needs of the per-app state (:class:`~flask_pymacaron_async._state.AsyncState`)."""

    app: Flask
    import_name: str
    header_keys: tuple[str, ...]

    def dump_user(self) -> Any: ...

    def load_user(self, value: Any) -> None: ...

    def is_verified(self, mark: Any, token: Any) -> bool: ...


#: Name of the Celery message header that carries the signed snapshot.
HEADER = "pymacaron_async_context"
#: Header the worker's consumer sets on a message whose snapshot it verified
#: (a secret of the worker's processes: a value sent by anyone else never matches).
VERIFIED = "pymacaron_async_verified"

#: Headers the signature covers, with the message's content type: when the
#: task may run (``eta``, ``expires``), how (``retries``, ``timelimit``,
#: ``compression``) and how it is shown (``shadow``, ``argsrepr``,
#: ``kwargsrepr``). Others (the deferral count, a trace context) may change on the way.
BOUND_HEADERS = ("eta", "expires", "retries", "timelimit", "shadow", "argsrepr", "kwargsrepr", "compression")

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
    """Signs a snapshot for one message, and checks it there.

    A token is ``<payload>.<signature>``: the payload is the snapshot as JSON
    (with ``ts``, the signing time), the signature an HMAC-SHA256 of the
    payload, the task name, the task id and a SHA-256 digest of the message
    body exactly as encoded (arguments, callbacks, chain). A token copied onto
    another message, or a body changed under its token, does not verify.

    Signing uses the first key; verifying tries every key, so a worker keeps
    accepting messages signed with the keys in ``SECRET_KEY_FALLBACKS`` /
    ``PYMACARON_ASYNC_SECRET_KEY_FALLBACKS`` during a key rotation.

    :param secret_key: the current key.
    :param fallbacks: older keys still accepted.
    """

    def __init__(self, secret_key: str | bytes, fallbacks: Iterable[str | bytes] = ()) -> None:
        self._keys = [_derive(key) for key in (secret_key, *fallbacks)]
        # The last payload signed, and the HMAC that has read it (see sign).
        self._last: tuple[str, Any] = ("", None)

    def __repr__(self) -> str:
        return f"<ContextSigner with {len(self._keys)} key(s)>"

    @staticmethod
    def payload(snapshot: dict[str, Any]) -> str:
        """The snapshot as the text a token carries, stamped with the signing time.

        Environ values that are the usual ones, and the request id written
        twice, are left out, headers go by their lower-case names
        (``accept_language`` for ``HTTP_ACCEPT_LANGUAGE``), and the JSON text
        has its two quote characters exchanged (``{'user':7}``), so that it
        sits in the message's JSON envelope without an escape before every
        quote. :func:`_load` reads it back as taken, and reads the plain JSON
        of older senders too.
        """
        text = json.dumps({**_compact(snapshot), "ts": int(time.time())}, separators=(",", ":"))
        return text.translate(_SWAP_QUOTES)

    def sign(self, payload: str, task_name: str, task_id: str, body: bytes | str, bound: str | None = None) -> str:
        """A token binding ``payload`` (see :meth:`payload`) to the message ``task_name[task_id]`` with ``body``.

        The messages of a request or a batch share their payload: the HMAC
        that has read it is kept and copied for the next message, which then
        hashes only its own part (the same signature as :func:`_mac`'s).

        :param bound: the message's :func:`bound_headers`; None for a call
            that never leaves this process (eager, inline). With it, the
            signature starts with a nonce of its own (:func:`nonce`), so
            that no two messages sent carry the same one, even two sends of
            one frozen signature: a replay is told from a new send by it.
        """
        if bound is None:
            return f"{payload}.{self.tag(payload, task_name, task_id, body)}"
        fresh = nonce()
        return f"{payload}.{fresh}{self.tag(payload, task_name, task_id, body, bound, fresh)}"

    def tag(
        self,
        payload: str,
        task_name: str,
        task_id: str,
        body: bytes | str,
        bound: str | None = None,
        nonce: str = "",
    ) -> str:
        """The signature :meth:`sign` puts after the payload, a dot and the nonce (base64url, no padding)."""
        last, mac = self._last
        if last != payload or mac is None:
            mac = hmac.new(self._keys[0], _head(payload), "sha256")
            self._last = (payload, mac)
        mac = mac.copy()
        mac.update(_tail(task_name, task_id, body, bound, nonce))
        return _encoded(mac.digest()[:_TAG_BYTES])

    def verify(
        self,
        token: Any,
        task_name: str,
        task_id: str,
        body: bytes | str,
        max_age: float | None = None,
        bound: str | None = None,
    ) -> dict[str, Any]:
        """The snapshot in ``token``; :class:`ContextError` if it is missing, forged, moved, or too old.

        :param task_name: the ``task`` header of the message the token came with.
        :param task_id: its ``id`` header.
        :param body: its body, as encoded (after decompression).
        :param bound: its :func:`bound_headers` (None: a call signed without, in this process).
        :param max_age: seconds since signing after which the snapshot is refused
            (``PYMACARON_ASYNC_CONTEXT_MAX_AGE``); None accepts any age.
        """
        payload, signature = _split(token)
        # The nonce first, when the headers are bound. Tokens of earlier
        # senders carry the whole HMAC; a shorter one is its first 128 bits.
        fresh = ""
        if bound is not None and len(signature) == _NONCE_CHARS + _TAG_CHARS:
            fresh, signature = signature[:_NONCE_CHARS], signature[_NONCE_CHARS:]
        size = None if len(signature) > _TAG_CHARS else _TAG_BYTES
        if not any(
            hmac.compare_digest(signature, _encoded(_mac(key, payload, task_name, task_id, body, bound, fresh)[:size]))
            for key in self._keys
        ):
            raise ContextError(
                "the context snapshot's signature does not match this message (tampered, moved from another "
                "message, or signed with a key this worker does not have: see SECRET_KEY_FALLBACKS)"
            )
        snapshot = _load(payload)
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

    def signed_unbound(self, token: Any, task_name: str, task_id: str, body: bytes | str) -> bool:
        """Whether ``token`` is a valid signature that does not cover the headers (a sender before 0.3)."""
        try:
            self.verify(token, task_name, task_id, body)
        except ContextError:
            return False
        return True

    @staticmethod
    def decode(token: Any) -> dict[str, Any]:
        """The snapshot in a token, **without checking its signature**.

        Only for a token already verified (by the worker's consumer) or for
        logging; :class:`ContextError` when it is not a token at all.
        """
        return _load(_split(token)[0])


def _derive(secret_key: str | bytes) -> bytes:
    if isinstance(secret_key, str):
        secret_key = secret_key.encode("utf-8")
    return hashlib.sha256(b"flask-pymacaron-async.context\0" + secret_key).digest()


# A token's signature is the HMAC-SHA256 truncated to 128 bits (RFC 2104's
# rule: at least half the hash's length), 22 characters of base64.
_TAG_BYTES = 16
_TAG_CHARS = 22
# A message's nonce: 8 hexadecimal digits before its signature.
_NONCE_CHARS = 8
#: Characters of :func:`message_tag`: the end of a token.
MESSAGE_TAG_CHARS = _TAG_CHARS


def nonce() -> str:
    """A nonce for one message: 32 random bits, from the pool of task ids (no system call of its own)."""
    return ids.uuid4()[:_NONCE_CHARS]


def message_tag(token: Any) -> str | None:
    """What tells one sent message from another (its signature, which covers its nonce); None without one."""
    return token[-_TAG_CHARS:] if isinstance(token, str) and len(token) > _TAG_CHARS else None


# Task names and ids that json.dumps writes as they are: no quote, backslash or control character.
_PLAIN_NAME = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]*")


def _mac(
    key: bytes,
    payload: str,
    task_name: str,
    task_id: str,
    body: bytes | str,
    bound: str | None = None,
    nonce: str = "",
) -> bytes:
    """HMAC-SHA256 of the payload, the task's name and id, its body's digest and its bound headers.

    Newline-separated: JSON text never holds a raw newline, so no two
    messages give the same input; the body digest has a fixed length.
    """
    return hmac.digest(key, _head(payload) + _tail(task_name, task_id, body, bound, nonce), "sha256")


def _head(payload: str) -> bytes:
    """The first line of what :func:`_mac` signs."""
    return payload.encode("utf-8", "surrogateescape") + b"\n"


def _tail(task_name: str, task_id: str, body: bytes | str, bound: str | None = None, nonce: str = "") -> bytes:
    """The rest of what :func:`_mac` signs, after :func:`_head`."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if _PLAIN_NAME.fullmatch(task_name) and _PLAIN_NAME.fullmatch(task_id):
        names = f'["{task_name}", "{task_id}"]\n'  # what json.dumps writes, without its cost
    else:
        names = json.dumps([task_name, task_id]) + "\n"
    tail = names.encode("utf-8", "surrogateescape") + hashlib.sha256(body).digest()
    if bound is None:
        return tail
    return tail + b"\n" + bound.encode("utf-8", "surrogateescape") + b"\n" + nonce.encode("ascii", "replace")


def bound_headers(headers: Any, content_type: Any) -> str:
    """The part of a message the signature covers besides its name, id and body, as one line of JSON.

    The content type and :data:`BOUND_HEADERS`, written alike whoever reads
    them: a missing ``retries`` is 0, numbers are floats (an AMQP table or
    JSON may give back ``1`` for ``1.0``), a ``timelimit`` of no limits is none.
    """
    get = headers.get if isinstance(headers, dict) else {}.get
    values = [content_type if isinstance(content_type, str) else None]
    for key in BOUND_HEADERS:
        value = get(key)
        if key == "retries":
            value = value or 0
        elif key == "timelimit" and isinstance(value, (list, tuple)):
            value = None if all(v is None for v in value) else [_number(v) for v in value]
        values.append(_number(value))
    return json.dumps(values, separators=(",", ":"), default=repr)


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _encoded(tag: bytes) -> str:
    return base64.urlsafe_b64encode(tag).rstrip(b"=").decode("ascii")


def _split(token: Any) -> tuple[str, str]:
    if not isinstance(token, str):
        raise ContextError(
            f"no context snapshot in header {HEADER!r} (sent by a process without this extension, "
            "e.g. plain Celery's send_task from another service?)"
        )
    payload, sep, signature = token.rpartition(".")
    if not sep or not payload:
        raise ContextError("the context snapshot's signature does not match this message (not a signed snapshot)")
    return payload, signature


def _load(payload: str) -> dict[str, Any]:
    if payload[1:2] == "'":  # written by ContextSigner.payload: the quotes exchanged
        payload = payload.translate(_SWAP_QUOTES)
    try:
        snapshot = json.loads(payload)
    except ValueError as exc:
        raise ContextError(f"the context snapshot is not JSON: {exc}") from None
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("env"), (dict, type(None))):
        raise ContextError("the context snapshot is not a snapshot")
    return _expand(snapshot)


# The WSGI values a payload leaves out when they are these: every message of a
# plain GET over HTTP/1.1 carried ~200 bytes of them.
_USUAL = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "QUERY_STRING": "",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "wsgi.url_scheme": "http",
}
_MISSING = object()
_SWAP_QUOTES = str.maketrans({'"': "'", "'": '"'})
# In a payload, the WSGI keys go by HTTP/2's pseudo-header names (no header
# name holds a colon), the headers by their lower-case names
# (``HTTP_USER_AGENT`` as ``user_agent``), anything else as it is.
_URL_SCHEME = "wsgi.url_scheme"
_PSEUDO = {
    "REQUEST_METHOD": ":method",
    "SCRIPT_NAME": ":script",
    "PATH_INFO": ":path",
    "QUERY_STRING": ":query",
    "SERVER_NAME": ":server",
    "SERVER_PORT": ":port",
    "SERVER_PROTOCOL": ":protocol",
    "REMOTE_ADDR": ":remote",
    _URL_SCHEME: ":scheme",
}
_FROM_PSEUDO = {short: key for key, short in _PSEUDO.items()}


def _host_name(host: Any) -> str | None:
    """The name part of a ``Host`` header (``[::1]:8080`` -> ``[::1]``)."""
    if not isinstance(host, str):
        return None
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


def _default_port(env: dict[str, Any]) -> str:
    return "443" if env.get("wsgi.url_scheme", "http") == "https" else "80"


def _short_key(key: str) -> str:
    """The name of an environ key in a payload: ``:path``, ``accept_language``, or the key itself."""
    pseudo = _PSEUDO.get(key)
    if pseudo is not None:
        return pseudo
    if not key.startswith("HTTP_"):
        return key
    short = key[5:].lower()
    return short if short != key[5:] and short != _URL_SCHEME else key


def _long_key(key: str) -> str:
    """The environ key of a name in a payload (see :func:`_short_key`); whole payloads' keys are kept."""
    environ_key = _FROM_PSEUDO.get(key)
    if environ_key is not None:
        return environ_key
    return key if key == key.upper() or key == _URL_SCHEME else f"HTTP_{key.upper()}"


def _compact(snapshot: dict[str, Any]) -> dict[str, Any]:
    """``snapshot`` without what :func:`_expand` can put back exactly."""
    snapshot = {k: v for k, v in snapshot.items() if k != "app"}  # the worker has its own
    env = snapshot.get("env")
    if not env:
        return snapshot
    short = {k: v for k, v in env.items() if _USUAL.get(k, _MISSING) != v}
    if "SERVER_NAME" in short and short["SERVER_NAME"] == _host_name(env.get("HTTP_HOST")):
        del short["SERVER_NAME"]
    if short.get("SERVER_PORT") == _default_port(env):
        del short["SERVER_PORT"]
    compact = {**snapshot, "env": {_short_key(k): v for k, v in short.items()}}
    if "rid" in compact and compact["rid"] == env.get(_REQUEST_ID):
        del compact["rid"]
    return compact


def _expand(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as taken, from its payload (compact or, from older senders, whole)."""
    env = snapshot.get("env")
    if not env:
        return snapshot
    full = {**_USUAL, **{_long_key(k): v for k, v in env.items()}}
    full.setdefault("SERVER_PORT", _default_port(full))
    full.setdefault("SERVER_NAME", _host_name(full.get("HTTP_HOST")) or "localhost")
    expanded = {**snapshot, "env": full}
    expanded.setdefault("rid", full.get(_REQUEST_ID))
    return expanded


class Unsigned(str):
    """A snapshot payload waiting for its signature.

    The publisher puts one in the :data:`HEADER` header; the Celery app's
    :class:`~flask_pymacaron_async._amqp.AMQP` replaces it with the token
    signed for the message, once the message's id and body are final.
    """

    __slots__ = ()


def take(state: Owner) -> str:
    """The snapshot payload of the current context (see :meth:`ContextSigner.payload`).

    Taken at most once per request (and once per app context outside a
    request); in the worker, the snapshot of the running task is carried on.
    """
    if has_request_context():
        environ = request.environ
        payload = environ.get(_ENVIRON_KEY)
        if payload is None:
            payload = environ[_ENVIRON_KEY] = ContextSigner.payload(request_snapshot(state))
        return str(payload)
    if has_app_context():
        payload = g.get(_G_KEY)
        if payload is None:
            carried = g.get(_CARRIED_G_KEY)
            payload = ContextSigner.payload(carried if carried is not None else _snapshot(state, None))
            setattr(g, _G_KEY, payload)
        return str(payload)
    # Outside any app context: a chain or callback sent by the worker after a
    # task returned carries that task's context on; anything else (a script)
    # gets a snapshot without a request.
    carried = worker_snapshot(state)
    if carried is not None:
        return ContextSigner.payload(carried)
    with state.app.app_context():
        return ContextSigner.payload(_snapshot(state, None))


def request_snapshot(state: Owner) -> dict[str, Any]:
    """The unsigned snapshot of the current request, taken at most once per request."""
    environ = request.environ
    snapshot = environ.get(_CARRIED_ENVIRON_KEY) or environ.get(_SNAPSHOT_KEY)
    if snapshot is None:
        snapshot = environ[_SNAPSHOT_KEY] = _snapshot(state, environ)
    return dict(snapshot) if not isinstance(snapshot, dict) else snapshot


def header(request: Any, name: str) -> Any:
    """A custom header of a Celery task request (Celery 5.1 shows them only as attributes)."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def worker_snapshot(state: Owner) -> dict[str, Any] | None:
    """The snapshot of the task the worker is running, when the worker's consumer verified it."""
    from celery import current_task

    if not current_task:
        return None
    task_request = current_task.request
    token = header(task_request, HEADER)
    if not state.is_verified(header(task_request, VERIFIED), token):
        return None
    try:
        return ContextSigner.decode(token)
    except ContextError:
        return None


def _snapshot(state: Owner, environ: dict[str, Any] | None) -> dict[str, Any]:
    env = None
    request_id = None
    if environ is not None:
        env = {key: environ[key] for key in _WSGI_KEYS if key in environ}
        for key in state.header_keys:
            if key in environ:
                env[key] = environ[key]
        request_id = tracing.request_id_of(environ)
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


def pushed(state: Owner, snapshot: dict[str, Any]) -> ContextManager[None]:
    """Run the body inside a fresh app context and the request rebuilt from ``snapshot``.

    The app context is always a fresh one: reusing the caller's (inline mode)
    would let the user loader overwrite the caller's ``g``.
    """
    return _Pushed(state, snapshot)


class _Pushed:
    """What :func:`pushed` returns (a class: a generator's context manager costs ~1.5 µs of each task)."""

    __slots__ = ("_state", "_snapshot", "_outer", "_inner")

    def __init__(self, state: Owner, snapshot: dict[str, Any]) -> None:
        self._state = state
        self._snapshot = snapshot
        self._outer: Any = None
        self._inner: Any = None

    def __enter__(self) -> None:
        app = self._state.app
        snapshot = self._snapshot
        env = snapshot.get("env")
        if env is None:
            self._inner = app.app_context()
        else:
            environ = dict(env)
            environ.update(_WSGI_CONSTANTS)
            environ[_CARRIED_ENVIRON_KEY] = snapshot
            # The caller's cookies never travel, so opening the session could only
            # make a new empty one: skip the session interface (17 us of 38 here).
            session_class = getattr(app.session_interface, "session_class", SecureCookieSession)
            self._inner = _compat.request_context(app, environ, session_class())
            # Without an app context, pushing a request context (before Flask 3.2)
            # pushes a fresh one; Flask 3.2's is a fresh app context itself.
            if not _compat.MERGED_CONTEXTS and has_app_context():
                self._outer = app.app_context()
                self._outer.__enter__()
        try:
            self._inner.__enter__()
            try:
                if env is None:
                    setattr(g, _CARRIED_G_KEY, snapshot)
                self._state.load_user(snapshot.get("user"))
            except BaseException:
                self._inner.__exit__(*sys.exc_info())
                raise
        except BaseException:
            if self._outer is not None:
                self._outer.__exit__(*sys.exc_info())
            raise

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._inner.__exit__(*exc_info)
        finally:
            if self._outer is not None:
                self._outer.__exit__(*exc_info)


class _EmptyInput:
    """The body of a rebuilt request: tasks never see the caller's body."""

    def read(self, *args: Any) -> bytes:
        return b""

    def readline(self, *args: Any) -> bytes:
        return b""

    def __iter__(self) -> Iterator[bytes]:
        return iter(())


_WSGI_CONSTANTS = {
    "wsgi.input": _EmptyInput(),  # it holds nothing: one for every rebuilt request
    "wsgi.version": (1, 0),
    "wsgi.errors": sys.stderr,
    "wsgi.multithread": False,
    "wsgi.multiprocess": True,
    "wsgi.run_once": False,
    "CONTENT_LENGTH": "0",
}
