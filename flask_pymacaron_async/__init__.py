"""Background tasks for Flask on Celery + Redis, run inside the caller's request and user context."""

from __future__ import annotations

from . import _devserver  # noqa: F401  (hooks the app into `flask run` / `app.run()`)
from ._deadletter import DeadLetter
from ._extension import PymacaronAsync
from ._state import AsyncState
from ._task import AsyncTask, ContextTask, asynctask
from .errors import AsyncError, AsyncUnavailable, ConfigError, ContextError, MessageTooLarge

__version__ = "0.3.0"

__all__ = [
    "AsyncError",
    "AsyncState",
    "AsyncTask",
    "AsyncUnavailable",
    "ConfigError",
    "ContextError",
    "ContextTask",
    "DeadLetter",
    "MessageTooLarge",
    "PymacaronAsync",
    "asynctask",
]
