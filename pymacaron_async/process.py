"""The worker a pymacaron server starts for itself: ``start_celery``.

The worker is an owned child process (:mod:`flask_pymacaron_async.process`):
started with ``Popen`` (no shell) tied to the server, stopped by pid when the
server exits, restarted when the server reloads its code, and watching its
parent so that it also stops when the server is killed without a chance to
clean up.

pymacaron's ``letsgo`` runs the dev server with Werkzeug's reloader, which
calls ``start_celery`` twice: in the reloader (the top process, which lives as
long as the server) and in each child that serves requests (with
``WERKZEUG_RUN_MAIN=true``). The top process owns the one worker; each
reloaded child asks it, with ``SIGUSR1``, to restart the worker so that it
runs the new code.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

from flask_pymacaron_async import process

from . import config

log = logging.getLogger(__name__)

#: The signal a reloaded server child sends to the process that owns the worker.
RESTART_SIGNAL = getattr(signal, "SIGUSR1", None)

#: Celery entry point of a pymacaron service.
CELERY_APP = "pymacaron_async.worker:celery"

_worker: WorkerProcess | None = None


def worker_argv(concurrency: int, loglevel: str = "info", extra: Sequence[str] = ()) -> list[str]:
    """The command line of a worker for the service named by ``PYMACARON_ASYNC_PYM_CONFIG``.

    ``python -m celery`` keeps ``celery`` in ``sys.argv[0]``, which tells
    pymacaron's ``API.start()`` not to serve HTTP in the worker.
    """
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        CELERY_APP,
        "worker",
        f"--loglevel={loglevel}",
        f"--concurrency={concurrency}",
        *extra,
    ]


class WorkerProcess:
    """A Celery worker owned by this process: started, watched, restarted and stopped by pid.

    :param argv: the worker's command line (no shell).
    :param env: its environment.
    :param cwd: its working directory.
    :param keep_alive: start it again when it exits on its own.
    :param stop_timeout: seconds a warm shutdown may take before the worker is killed.
    """

    #: Seconds between a worker exiting on its own and its restart (with keep_alive).
    restart_delay = 5.0

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: str | os.PathLike[str] | None = None,
        *,
        keep_alive: bool = False,
        stop_timeout: float = 10.0,
    ) -> None:
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.keep_alive = keep_alive
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        # Set from a signal handler: a plain attribute, no lock.
        self._restart_requested = False
        self._first_request_pending = True
        self._monitor: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the current worker process, if any."""
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the worker process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the worker and the thread that watches it."""
        self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="pymacaron-async-worker", daemon=True)
        self._monitor.start()

    def request_restart(self, *_signal_args: object) -> None:
        """Ask for a restart (safe in a signal handler).

        The first request after :meth:`start` comes from the reloader's first
        child, whose code the worker already runs: it is ignored.
        """
        if self._first_request_pending:
            self._first_request_pending = False
            return
        self._restart_requested = True

    def stop(self) -> None:
        """Stop the worker: warm shutdown, then kill after ``stop_timeout``; wait for it."""
        self._stopping.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join()
        self._terminate()

    def _spawn(self) -> None:
        # Its own session: a Ctrl-C in the terminal reaches the server, which
        # then stops the worker in order, instead of both racing.
        self.proc = process.popen_tied(self.argv, env=self.env, cwd=self.cwd)
        log.info("Started Celery worker (pid %s)", self.proc.pid)

    def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        log.info("Stopping Celery worker (pid %s)", proc.pid)
        # The worker leads its own process group: killed, its pool processes go with it.
        process.stop(proc, self.stop_timeout, group=True, name="Celery worker")

    def _watch(self) -> None:
        while not self._stopping.wait(0.25):
            if self._restart_requested:
                self._restart_requested = False
                log.info("Server reloaded: restarting the Celery worker")
                self._terminate()
                if not self._stopping.is_set():
                    self._spawn()
                continue
            proc = self.proc
            if proc is None or proc.poll() is None:
                continue
            if not self.keep_alive:
                log.error(
                    "Celery worker (pid %s) exited with code %s; tasks wait in the queue until it runs again",
                    proc.pid,
                    proc.returncode,
                )
                self.proc = None
                continue
            log.warning("Celery worker exited with code %s: restarting it in %ss", proc.returncode, self.restart_delay)
            if self._stopping.wait(self.restart_delay):
                return
            self._spawn()


def start_celery(port: int | str, debug: bool, concurrency: int | None = None, keep_alive: bool = False) -> None:
    """Start a Celery worker for this pymacaron service, owned by this process.

    pymacaron's ``letsgo`` calls it when pym-config.yaml has ``with_async:
    true``. The worker loads the service as pymacaron does (its server.py, its
    swagger APIs and endpoints) and runs its ``@asynctask()`` functions. It is
    stopped when the server exits, restarted when the dev server reloads, and
    stops by itself if the server dies.

    :param port: the server's port, passed on to the service's ``start()`` in the worker.
    :param debug: the server's debug flag, passed on likewise.
    :param concurrency: worker processes; default ``worker_count`` from pym-config.yaml, else 2 x CPUs.
    :param keep_alive: start the worker again (after 5 s) when it exits on its own.

    Does nothing when ``PYMACARON_ASYNC_SPAWN_WORKER`` is ``0``/``false`` (the
    worker runs elsewhere: ``python -m pymacaron_async``).
    """
    global _worker
    if not config.spawn_enabled():
        log.info("%s is off: not starting a Celery worker", config.ENV_SPAWN_WORKER)
        return
    if os.environ.get("WERKZEUG_RUN_MAIN") == "true" and os.environ.get(config.ENV_OWNER_PID) == str(os.getppid()):
        # A reloader child: the reloader owns the worker.
        if RESTART_SIGNAL is not None:
            os.kill(os.getppid(), RESTART_SIGNAL)
        return
    if _worker is not None:
        _worker.stop()
        _worker = None

    config_path = _config_path()
    if not config.secret_key():
        # No shared key configured: make one for this server and the worker it starts.
        os.environ[config.ENV_SECRET_KEY] = secrets.token_urlsafe(32)
    env = {
        **os.environ,
        config.ENV_PYM_CONFIG: str(config_path),
        config.ENV_PORT: str(port),
        config.ENV_DEBUG: "1" if debug else "",
        config.ENV_PARENT_PID: str(os.getpid()),
    }
    for name in (config.ENV_OWNER_PID, *process.SERVER_ONLY_ENV):
        env.pop(name, None)
    name = getattr(config.pym_config(), "name", None) or config_path.parent.name
    argv = worker_argv(
        concurrency or config.worker_count(),
        extra=["-n", f"{name}-{os.getpid()}@%h", "--without-gossip", "--without-mingle"],
    )
    worker = WorkerProcess(argv, env, cwd=config_path.parent, keep_alive=keep_alive)
    worker.start()
    atexit.register(worker.stop)
    _worker = worker
    if RESTART_SIGNAL is not None and threading.current_thread() is threading.main_thread():
        signal.signal(RESTART_SIGNAL, worker.request_restart)
        os.environ[config.ENV_OWNER_PID] = str(os.getpid())


def _config_path() -> Path:
    path = getattr(config.pym_config(), "config_path", None)
    return Path(path).resolve() if path else config.find_pym_config()
