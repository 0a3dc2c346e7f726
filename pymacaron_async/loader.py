"""Load a pymacaron service in a Celery worker, the way pymacaron does.

Find the service's pym-config.yaml and load it, put its folder on
``sys.path``, load its ``server.py`` and call ``start(port=..., debug=...)``.
pymacaron's ``API.start()`` then loads the swagger APIs and the endpoint
modules (hence every ``@asynctask()``) and returns without serving, because
``celery`` is in ``sys.argv[0]``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

from flask import Flask

from flask_pymacaron_async.errors import ConfigError

from . import config
from .extension import init_app
from .serialization import register_pickling

log = logging.getLogger(__name__)


def load_service(path: str | os.PathLike[str] | None = None) -> Flask:
    """Load the service whose pym-config.yaml is at ``path`` (see :func:`~pymacaron_async.config.find_pym_config`).

    Returns its Flask app, with the extension set up (tasks enabled).

    :raises RuntimeError: outside a Celery worker (``API.start()`` would serve HTTP).
    :raises ~flask_pymacaron_async.errors.ConfigError: when the service cannot be found or has no Flask app.
    """
    if "celery" not in sys.argv[0].lower():
        raise RuntimeError(
            f"pymacaron_async loads a service only in a Celery worker ('celery' in sys.argv[0], here "
            f"{sys.argv[0]!r}), else pymacaron's API.start() serves HTTP: run `python -m pymacaron_async`"
        )
    config_path = config.find_pym_config(path)
    folder = config_path.parent
    conf = config.pym_config()
    conf.load_pym_config(path=str(folder))
    if Path(conf.config_path).resolve() != config_path:
        log.warning("pymacaron loaded %s instead of %s (it looks in /pym first)", conf.config_path, config_path)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

    server = _load_server(folder / "server.py")
    port = os.environ.get(config.ENV_PORT) or _default_port()
    debug = bool(os.environ.get(config.ENV_DEBUG))
    log.info("Loading pymacaron service %s (port %s, debug %s)", folder, port, debug)
    server.start(port=port, debug=debug)
    app = _find_app(server)
    register_pickling()
    init_app(app, worker=True)
    return app


def _default_port() -> str:
    from pymacaron import get_port

    return str(get_port())


def _load_server(path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"no server.py next to {config.CONFIG_NAME} in {path.parent}")
    existing = sys.modules.get("server")
    if existing is not None and getattr(existing, "__file__", None) == str(path):
        return existing
    spec = importlib.util.spec_from_file_location("server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["server"] = module
    spec.loader.exec_module(module)
    return module


def _find_app(server: ModuleType) -> Flask:
    apps = {id(v): v for v in vars(server).values() if isinstance(v, Flask)}
    if len(apps) == 1:
        return next(iter(apps.values()))
    app = getattr(server, "app", None)
    if isinstance(app, Flask):
        return app
    raise ConfigError(
        f"{server.__file__} must create its Flask app at module level (app = Flask(__name__)), "
        f"found {len(apps)} Flask apps there"
    )
