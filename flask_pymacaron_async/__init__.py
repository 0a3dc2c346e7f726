"""Background tasks for Flask on Celery + Redis, run inside the caller's request and user context."""

from __future__ import annotations

from . import devserver as _devserver  # noqa: F401  (hooks the app into `flask run` / `app.run()`)
from .errors import AsyncError, AsyncUnavailable, ConfigError, ContextError, MessageTooLarge
from .extension import PymacaronAsync
from .task import AsyncTask, ContextTask, asynctask

__version__ = "0.2.0"

__all__ = [
    "AsyncError",
    "AsyncTask",
    "AsyncUnavailable",
    "ConfigError",
    "ContextError",
    "ContextTask",
    "MessageTooLarge",
    "PymacaronAsync",
    "asynctask",
]
