"""The caller's JWT, carried to the worker encrypted and loaded there with pymacaron.

The user dumper runs in the endpoint: it returns the user id in clear (for the
logs) and the token encrypted with a key derived from the signing key, so the
token never sits readable in the broker. The user loader runs in the worker,
inside the rebuilt request context: it decrypts the token and hands it to
``pymacaron.auth.load_auth_token``, after which ``get_userid()``,
``get_user_token()`` and downstream calls behave as in the endpoint.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from typing import Any

from flask import current_app, has_app_context

from flask_pymacaron_async import PymacaronAsync
from flask_pymacaron_async.errors import ContextError

# Used only when the app has no signing key at all (inline mode outside API.start()).
_PROCESS_KEY = os.urandom(32)


@functools.lru_cache(maxsize=8)
def _fernet(secret: bytes) -> Any:
    try:
        from cryptography.fernet import Fernet
    except ImportError:  # pragma: no cover - cryptography is in the [pymacaron] extra
        raise ImportError(
            "pymacaron_async encrypts the user's token with 'cryptography': "
            "pip install 'flask-pymacaron-async[pymacaron]'"
        ) from None
    key = hashlib.sha256(b"pymacaron-async.jwt\0" + secret).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def _secrets() -> list[bytes]:
    """The signing key, then the older keys still accepted (``PYMACARON_ASYNC_SECRET_KEY_FALLBACKS``)."""
    keys: list[Any] = []
    if has_app_context():
        try:
            state = PymacaronAsync.state_for(current_app)
        except RuntimeError:  # not set up on this app (yet)
            state = None
        if state is not None and state.settings.secret_key:
            keys = [state.settings.secret_key, *state.settings.secret_key_fallbacks]
    if not keys:
        return [_PROCESS_KEY]
    return [key if isinstance(key, bytes) else str(key).encode("utf-8") for key in keys]


def encrypt_token(token: str) -> str:
    """``token`` encrypted and authenticated with the app's signing key."""
    encrypted: bytes = _fernet(_secrets()[0]).encrypt(token.encode("utf-8"))
    return encrypted.decode("ascii")


def decrypt_token(value: str) -> str:
    """The token :func:`encrypt_token` encrypted, with the signing key or one of its fallbacks.

    :raises ~flask_pymacaron_async.errors.ContextError: when it was encrypted with another key.
    """
    from cryptography.fernet import InvalidToken, MultiFernet

    try:
        fernet = MultiFernet([_fernet(secret) for secret in _secrets()])
        return fernet.decrypt(value.encode("ascii")).decode("utf-8")
    except (InvalidToken, UnicodeError, ValueError):
        raise ContextError(
            "the caller's token cannot be decrypted: the server and the worker use different "
            "PYMACARON_ASYNC_SECRET_KEY / jwt_secret (see PYMACARON_ASYNC_SECRET_KEY_FALLBACKS)"
        ) from None


def dump_user() -> dict[str, Any] | None:
    """The current pymacaron user, as sent to the worker (None when anonymous)."""
    from pymacaron.auth import get_user_token, get_userid

    token = get_user_token()
    if not token:
        return None
    return {"sub": get_userid() or None, "jwt": encrypt_token(token)}


def load_user(value: Any) -> None:
    """Load the caller's token in the worker, as ``pymacaron.auth`` does for a request."""
    from pymacaron.auth import load_auth_token

    if not isinstance(value, dict) or not isinstance(value.get("jwt"), str):
        raise ContextError("the task's user is not a pymacaron user (expected an encrypted JWT)")
    load_auth_token(decrypt_token(value["jwt"]))
