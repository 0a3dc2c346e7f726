"""flask-pymacaron-async on pymacaron's Flask app, set up from pym-config.yaml.

pymacaron services never call ``init_app`` themselves: the web process sets
the extension up on the app of the request that queues the first task, and the
worker on the app ``server.py`` created, once the service is loaded.
"""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask

from flask_pymacaron_async import PymacaronAsync
from flask_pymacaron_async.errors import ConfigError

from . import auth, config
from . import serialization as _serialization  # noqa: F401  (registers pymacaron models)

#: The extension of pymacaron services; tasks declared with
#: :func:`pymacaron_async.asynctask` belong to it.
ext = PymacaronAsync()
ext.user_dumper(auth.dump_user)
ext.user_loader(auth.load_user)

_lock = threading.Lock()


def init_app(app: Flask, *, worker: bool = False) -> Any:
    """Set the extension up on pymacaron's Flask ``app`` (once; later calls return the same state).

    Settings come from :mod:`pymacaron_async.config`; values already in
    ``app.config`` win. In a worker, tasks are always enabled.

    :raises ~flask_pymacaron_async.errors.ConfigError: when tasks are enabled and there is no key to sign them.
    """
    state = app.extensions.get(PymacaronAsync.extension_name)
    if state is None:
        with _lock:
            state = app.extensions.get(PymacaronAsync.extension_name)
            if state is None:
                state = _init(app, worker)
    if state.ext is not ext:
        raise RuntimeError(
            "This Flask app already has another PymacaronAsync extension: pymacaron_async sets its own up "
            "on pymacaron's app. Remove the other one, or declare tasks with flask_pymacaron_async instead."
        )
    return state


def _init(app: Flask, worker: bool) -> Any:
    config.ensure_loaded()
    enabled = True if worker else config.async_enabled()
    app.config.setdefault("PYMACARON_ASYNC_ENABLED", enabled)
    app.config.setdefault("PYMACARON_ASYNC_BROKER_URL", config.broker_url())
    # pymacaron starts its worker itself (start_celery): the core must not spawn another.
    app.config.setdefault("PYMACARON_ASYNC_SPAWN_WORKER", False)
    queue = config.queue()
    if queue:
        app.config.setdefault("CELERY", {})
        app.config["CELERY"].setdefault("task_default_queue", queue)
    if not app.config.get("PYMACARON_ASYNC_SECRET_KEY"):
        app.config["PYMACARON_ASYNC_SECRET_KEY"] = config.secret_key()
    if not app.config.get("PYMACARON_ASYNC_SECRET_KEY_FALLBACKS"):
        app.config["PYMACARON_ASYNC_SECRET_KEY_FALLBACKS"] = config.secret_key_fallbacks()
    if app.config["PYMACARON_ASYNC_ENABLED"] and not app.config["PYMACARON_ASYNC_SECRET_KEY"]:
        # Flask's SECRET_KEY is no fallback here: API.start() makes it random in every process.
        raise ConfigError(
            "PYMACARON_ASYNC_SECRET_KEY is not set and pym-config.yaml has no jwt_secret: tasks are signed "
            "with it. Set one of them, the same in the server and the worker."
        )
    ext.init_app(app)
    return PymacaronAsync.state_for(app)
