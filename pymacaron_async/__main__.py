"""``python -m pymacaron_async`` / ``pymacaron-async``: run a worker for a pymacaron service.

For containers, next to gunicorn (the old ``pymasync``): it finds the
service's pym-config.yaml, checks it can sign tasks like the server, then
becomes ``celery -A pymacaron_async.worker:celery worker`` (same pid). It
starts no Redis and no supervisord: run it under the container's process
manager. Options it does not know are passed to ``celery worker``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from flask_pymacaron_async.errors import ConfigError

from . import config
from .process import worker_argv


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pymacaron-async",
        description="Run a Celery worker for the pymacaron service of the nearest pym-config.yaml. "
        "Other options are passed to `celery worker`.",
    )
    parser.add_argument("--config", metavar="PATH", help="the service's folder or pym-config file")
    parser.add_argument(
        "--concurrency", "-c", type=int, help="worker processes (default: worker_count in pym-config.yaml)"
    )
    parser.add_argument("--loglevel", "-l", default="info", help="Celery's log level (default: info)")
    parser.add_argument("--port", help="passed to the service's start() (default: $PORT, else 80)")
    parser.add_argument("--debug", action="store_true", help="passed to the service's start()")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Resolve the service, then exec the Celery worker; returns only on a configuration error."""
    args, celery_args = _parser().parse_known_args(argv)
    try:
        config_path = config.find_pym_config(args.config)
        config.pym_config().load_pym_config(path=str(config_path.parent))
        if not config.secret_key():
            raise ConfigError(
                "no key to verify tasks with: set jwt_secret in pym-config.yaml or PYMACARON_ASYNC_SECRET_KEY "
                "(the same as the server's)"
            )
        concurrency = args.concurrency or config.worker_count()
    except ConfigError as exc:
        print(f"pymacaron-async: {exc}", file=sys.stderr)
        return 2
    if not config.async_enabled():
        print(
            "pymacaron-async: warning: with_async is not true in pym-config.yaml: the server runs tasks inline",
            file=sys.stderr,
        )
    env = dict(os.environ)
    env[config.ENV_PYM_CONFIG] = str(config_path)
    if args.port:
        env[config.ENV_PORT] = str(args.port)
    env[config.ENV_DEBUG] = "1" if args.debug else ""
    command = worker_argv(concurrency, args.loglevel, celery_args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
    return 0  # pragma: no cover - execve does not return


if __name__ == "__main__":
    sys.exit(main())
