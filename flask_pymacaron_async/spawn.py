"""Starting a worker for an app as a child process: its command line, its environment, and the process.

:func:`start_worker` runs ``flask async worker`` for an app, in a child
process this one owns (:class:`WorkerProcess`): the development server uses
it (see :mod:`~flask_pymacaron_async._devserver`), and so does the pytest
plugin's ``async_worker``.

The worker learns its parent's pid and broker URL from the environment
variable :data:`ENV_SPAWNED`: it never starts a worker of its own, exits when
its parent disappears, and uses the embedded Redis its parent started (see
:class:`~flask_pymacaron_async.broker.EmbeddedRedis`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from . import process
from ._state import state_for
from .process import popen_tied, watch_parent

if TYPE_CHECKING:
    from flask import Flask

__all__ = [
    "DEV_WORKER_OPTIONS",
    "ENV_SPAWNED",
    "WorkerProcess",
    "app_import_path",
    "popen_tied",
    "spawned_by",
    "start_worker",
    "watch_parent",
]

log = logging.getLogger(__name__)

#: Environment variable set for a spawned worker: JSON with the parent's pid
#: and the import name and broker URLs of the app it serves.
ENV_SPAWNED = "PYMACARON_ASYNC_SPAWNED"

#: Celery options of the workers started with the development server and by the pytest plugin.
DEV_WORKER_OPTIONS = ("--pool=solo", "--loglevel=INFO", "--without-gossip", "--without-mingle")


class WorkerProcess(process.OwnedProcess):
    """A ``flask async worker`` child process, owned by the process that started it.

    :param argv: the command line.
    :param env: the environment (the current one when ``None``).
    :param cwd: its working directory.
    :param log_path: where its output goes; inherited from this process when ``None``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(argv, env=env, cwd=cwd, log_path=log_path, name="worker")

    def start(self, **popen: Any) -> WorkerProcess:
        """Start the process, in its own session so a Ctrl-C reaches only the server."""
        super().start(**popen)
        return self

    def wait_ready(self, timeout: float = 60.0) -> WorkerProcess:
        """Wait until Celery says the worker is ready (needs a ``log_path``).

        :raises RuntimeError: when it exits or is not ready in time, with its output.
        """
        self.wait_for_output(" ready.", timeout)
        return self

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the worker: SIGTERM (Celery's warm shutdown), SIGKILL after ``grace`` seconds, then wait.

        :returns: its exit code, or ``None`` when it was never started.
        """
        return super().stop(grace)


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
    settings = state_for(app).settings
    env = process.child_env(
        {
            ENV_SPAWNED: json.dumps(
                {
                    "parent": os.getpid(),
                    "app": app.import_name,
                    "broker_url": settings.broker_url,
                    "result_backend": settings.result_backend,
                }
            )
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
