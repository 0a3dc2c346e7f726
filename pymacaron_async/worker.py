"""Celery entry point of a pymacaron service: ``celery -A pymacaron_async.worker:celery worker``.

Reading the ``celery`` attribute loads the service (see
:mod:`pymacaron_async.loader`) named by ``PYMACARON_ASYNC_PYM_CONFIG``, or the
nearest pym-config.yaml, and returns the Celery app of its Flask app. Importing
the module alone does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from flask_pymacaron_async import PymacaronAsync, process

from . import config

log = logging.getLogger(__name__)

_celery: Any = None
_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    if name == "celery":
        return get_celery()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_celery() -> Any:
    """Load the service (once) and return its Celery app."""
    global _celery
    with _lock:
        if _celery is None:
            from .loader import load_service

            app = load_service()
            _celery = PymacaronAsync.state_for(app).celery
            _watch_parent()
    return _celery


def _watch_parent() -> None:
    """Stop this worker when the server that started it is gone (killed without cleaning up)."""
    expected = os.environ.get(config.ENV_PARENT_PID)
    if not expected or not expected.isdigit() or int(expected) != os.getppid():
        return
    process.watch_parent(int(expected), interval=1.0)
