"""Child processes this process owns: started tied to it, stopped with grace, waited for.

Every process the extension starts goes through this module: the worker of
the development server and of the pytest plugin (:class:`~flask_pymacaron_async.spawn.WorkerProcess`),
the embedded Redis (:class:`~flask_pymacaron_async.broker.EmbeddedRedis`), the
worker of a pymacaron service, and the processes of the test suite. Nothing
is found by name (``ps | grep``) and nothing goes through a shell: the
``Popen`` is kept, the process is stopped by its pid, and waited for.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Sequence

log = logging.getLogger(__name__)

#: Environment of a development server that must not reach the processes it starts.
SERVER_ONLY_ENV = ("WERKZEUG_RUN_MAIN", "WERKZEUG_SERVER_FD")


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


def _pdeathsig_prctl() -> Callable[[], Any] | None:
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


def stop(proc: subprocess.Popen[Any], grace: float = 10.0, *, group: bool = False, name: str = "process") -> int:
    """Stop ``proc``: SIGTERM, SIGKILL after ``grace`` seconds, then wait for it.

    :param group: kill its whole process group with SIGKILL (a worker's pool
        processes), when it did not stop in time; it leads its own session.
    :returns: its exit code.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("The %s (pid %s) did not stop in %gs: killing it", name, proc.pid, grace)
            if group:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            else:
                proc.kill()
            proc.wait()
    return proc.returncode


def watch_parent(parent: int, interval: float = 0.5, grace: float = 30.0) -> threading.Thread:
    """Stop this process (SIGTERM, then exit after ``grace``) once ``parent`` is no longer its parent.

    A parent stops its children itself; this covers a parent killed with SIGKILL.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.warning("The process that started this one (pid %s) is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    thread = threading.Thread(target=watch, name="pymacaron-async-parent-watch", daemon=True)
    thread.start()
    return thread


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child, without what only a development server must see."""
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ONLY_ENV}
    env.update(extra or {})
    return env


class OwnedProcess:
    """A child process owned by the process that started it.

    :param argv: the command line (no shell).
    :param env: its environment (this process's when ``None``).
    :param cwd: its working directory.
    :param log_path: where its output goes (appended); inherited from this process when ``None``.
    :param name: what log lines call it.
    :param group: when it must be killed, kill its whole process group.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        *,
        name: str = "process",
        group: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.log_path = Path(log_path) if log_path is not None else None
        self.name = name
        self.group = group
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Its process id once started."""
        return self.proc.pid if self.proc is not None else None

    def start(self, **popen: Any) -> OwnedProcess:
        """Start it, tied to this process (see :func:`popen_tied`).

        :param popen: more ``Popen`` arguments (``stdout``, ...).
        """
        if self.proc is not None:
            raise RuntimeError(f"This {self.name} is already started")
        if self.log_path is not None and "stdout" not in popen:
            self._log_file = open(self.log_path, "ab")
            popen.update(stdout=self._log_file, stderr=subprocess.STDOUT)
        popen.setdefault("stdin", subprocess.DEVNULL)
        self.proc = popen_tied(self.argv, env=self.env, cwd=self.cwd, **popen)
        return self

    def alive(self) -> bool:
        """Whether it is still running."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """What it wrote so far (only with a ``log_path``)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, marker: str, timeout: float) -> OwnedProcess:
        """Wait until its output (``log_path``) has ``marker``.

        :raises RuntimeError: when it exits first or the marker does not show in time, with its output.
        """
        if self.log_path is None:
            raise RuntimeError(f"Waiting for the {self.name}'s output needs a log_path")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log():
                return self
            if self.proc is None or self.proc.poll() is not None:
                code = self.proc.returncode if self.proc is not None else None
                raise RuntimeError(f"The {self.name} exited with code {code} first:\n{self.log()}")
            time.sleep(0.1)
        raise RuntimeError(f"The {self.name} did not say {marker.strip()!r} within {timeout:g}s:\n{self.log()}")

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop it (SIGTERM, SIGKILL after ``grace`` seconds) and wait for it.

        :returns: its exit code, or ``None`` when it was never started.
        """
        proc = self.proc
        if proc is None:
            return None
        code = stop(proc, grace, group=self.group, name=self.name)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code
