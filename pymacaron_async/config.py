"""Where the compatibility module finds its settings: the environment, then pym-config.yaml.

- broker: ``PYMACARON_ASYNC_BROKER_URL``, else ``async_broker_url``, else
  ``redis://localhost:6379/0``;
- queue: ``PYMACARON_ASYNC_QUEUE``, else ``async_queue``, else Celery's default;
- signing key: ``PYMACARON_ASYNC_SECRET_KEY``, else ``async_secret_key``, else
  ``jwt_secret``, else a key made by ``start_celery`` for the worker it spawns;
  older keys still accepted while rotating: ``PYMACARON_ASYNC_SECRET_KEY_FALLBACKS``
  (comma-separated), else ``async_secret_key_fallbacks`` (a list);
- ``with_async`` (false: tasks run inline) and ``worker_count`` (default 2 x CPUs).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flask_pymacaron_async.config import DEFAULT_BROKER_URL
from flask_pymacaron_async.errors import ConfigError

#: Environment variables read by the module (set them in the server and the worker alike).
ENV_BROKER_URL = "PYMACARON_ASYNC_BROKER_URL"
ENV_QUEUE = "PYMACARON_ASYNC_QUEUE"
ENV_SECRET_KEY = "PYMACARON_ASYNC_SECRET_KEY"
ENV_SECRET_KEY_FALLBACKS = "PYMACARON_ASYNC_SECRET_KEY_FALLBACKS"
ENV_SPAWN_WORKER = "PYMACARON_ASYNC_SPAWN_WORKER"

# Set by start_celery / the command line for the worker they start.
ENV_PYM_CONFIG = "PYMACARON_ASYNC_PYM_CONFIG"
ENV_PORT = "PYMACARON_ASYNC_PORT"
ENV_DEBUG = "PYMACARON_ASYNC_DEBUG"
ENV_PARENT_PID = "PYMACARON_ASYNC_PARENT_PID"
# Set by a server that owns a worker, for its reloader children.
ENV_OWNER_PID = "PYMACARON_ASYNC_OWNER_PID"

CONFIG_NAME = "pym-config.yaml"

log = logging.getLogger(__name__)


def pym_config() -> Any:
    """pymacaron's config object (``pymacaron.config.get_config()``)."""
    from pymacaron.config import get_config

    return get_config()


def ensure_loaded() -> Any:
    """pymacaron's config, loaded from the nearest pym-config.yaml if nothing loaded it yet.

    ``letsgo`` loads it before serving; under gunicorn nothing may have.
    """
    conf = pym_config()
    if getattr(conf, "config_path", None) is None:
        try:
            path = find_pym_config()
        except ConfigError as exc:
            log.warning("%s: with_async is off, tasks run inline", exc)
            return conf
        log.info("Loading %s (pymacaron has not loaded a pym-config yet)", path)
        conf.load_pym_config(path=str(path.parent))
    return conf


def _setting(env_name: str, key: str) -> Any:
    value = os.environ.get(env_name)
    if value:
        return value
    value = getattr(pym_config(), key, None)
    return value if value not in (None, "") else None


def async_enabled() -> bool:
    """``with_async`` in pym-config.yaml: when false, tasks run inline in the caller."""
    return bool(getattr(pym_config(), "with_async", False))


def broker_url() -> str:
    """The Celery broker of the service."""
    return str(_setting(ENV_BROKER_URL, "async_broker_url") or DEFAULT_BROKER_URL)


def queue() -> str | None:
    """The queue tasks go to and the worker reads, or None for Celery's default."""
    value = _setting(ENV_QUEUE, "async_queue")
    return str(value) if value else None


def secret_key() -> str | None:
    """The key that signs (and encrypts the user's token in) every task message.

    ``PYMACARON_ASYNC_SECRET_KEY``, else ``async_secret_key``, else pymacaron's
    ``jwt_secret``. Not Flask's ``SECRET_KEY``: pymacaron's ``API.start()``
    sets it to random bytes in every process.
    """
    value = _setting(ENV_SECRET_KEY, "async_secret_key") or getattr(pym_config(), "jwt_secret", None)
    return str(value) if value else None


def secret_key_fallbacks() -> list[str]:
    """Older signing keys the worker still accepts during a key rotation (signing uses :func:`secret_key`).

    ``PYMACARON_ASYNC_SECRET_KEY_FALLBACKS`` (comma-separated), else
    ``async_secret_key_fallbacks`` in pym-config.yaml (a list, or a comma-separated string).
    """
    value = _setting(ENV_SECRET_KEY_FALLBACKS, "async_secret_key_fallbacks")
    if not value:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"async_secret_key_fallbacks in pym-config.yaml must be a list of keys, got {type(value)}")
    return [str(key).strip() for key in value if str(key).strip()]


def worker_count() -> int:
    """``worker_count`` in pym-config.yaml, else pymacaron's default (2 x CPUs)."""
    from pymacaron.resources import get_celery_worker_count

    count = get_celery_worker_count()
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise ConfigError(f"worker_count in pym-config.yaml must be a positive integer, got {count!r}") from None
    if count < 1:
        raise ConfigError(f"worker_count in pym-config.yaml must be a positive integer, got {count!r}")
    return count


def spawn_enabled() -> bool:
    """False when ``PYMACARON_ASYNC_SPAWN_WORKER`` is 0/false/no: workers run elsewhere."""
    return os.environ.get(ENV_SPAWN_WORKER, "").strip().lower() not in ("0", "false", "no", "off")


def _candidates(folder: Path) -> list[Path]:
    names = [CONFIG_NAME]
    env = os.environ.get("PYM_ENV")
    if env:
        names.insert(0, f"pym-config.{env}.yaml")
    return [folder / name for name in names]


def find_pym_config(path: str | os.PathLike[str] | None = None) -> Path:
    """The pym-config file of the service to run.

    ``path`` (a file or the folder holding it), else ``PYMACARON_ASYNC_PYM_CONFIG``,
    else the nearest one from the working directory upwards, else ``/pym``.
    ``pym-config.<PYM_ENV>.yaml`` is preferred to ``pym-config.yaml`` in a folder.

    :raises ~flask_pymacaron_async.errors.ConfigError: when there is none.
    """
    given = path or os.environ.get(ENV_PYM_CONFIG)
    if given:
        given_path = Path(given).expanduser().resolve()
        if given_path.is_file():
            return given_path
        for candidate in _candidates(given_path):
            if candidate.is_file():
                return candidate
        raise ConfigError(f"no {CONFIG_NAME} at {given_path}: give the service's folder or its pym-config file")
    here = Path.cwd().resolve()
    for folder in (here, *here.parents, Path("/pym")):
        for candidate in _candidates(folder):
            if candidate.is_file():
                return candidate
    raise ConfigError(
        f"no {CONFIG_NAME} in {here}, its parents or /pym: run from the service's folder or pass --config PATH"
    )
