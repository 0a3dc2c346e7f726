"""A small accounts service: signup with a welcome mail, avatars with thumbnails, an audit log.

The slow parts run in a Celery worker, inside the request and user context of
the call that queued them. ``create_app`` is the app factory; the worker
builds its own app with it (``flask --app accounts async worker``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flask import Flask
from flask_login import LoginManager

from flask_pymacaron_async import PymacaronAsync

ext = PymacaronAsync()
login_manager = LoginManager()

#: Where the service writes by default: examples/outbox, examples/media, examples/audit.log.
EXAMPLES_DIR = Path(__file__).resolve().parent.parent


def create_app(**config: Any) -> Flask:
    """Build the app: defaults, then ``FLASK_*`` environment variables, then ``config``."""
    app = Flask(__name__)
    app.config.update(
        # Signs the context sent to the worker: the worker must have the same key.
        SECRET_KEY="example-accounts-dev-key",
        DATA_DIR=str(EXAMPLES_DIR),
        MAIL_SENDER="welcome@accounts.example.com",
        THUMBNAIL_SIZE=128,
        # Its own queue names: a shared Redis may serve other apps' workers.
        CELERY={"task_default_queue": "accounts"},
    )
    _config_from_env(app)
    app.config.update(config)

    from . import auth, views

    auth.init_app(app, login_manager)
    ext.init_app(app)
    app.register_blueprint(views.bp)
    return app


def data_path(app: Flask, *parts: str) -> Path:
    """A path under DATA_DIR, its directory created."""
    path = Path(app.config["DATA_DIR"], *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _config_from_env(app: Flask) -> None:
    """``FLASK_SECRET_KEY=...``, ``FLASK_DATA_DIR=...``: Flask's ``from_prefixed_env()``, on any Flask."""
    if hasattr(app.config, "from_prefixed_env"):
        app.config.from_prefixed_env()
        return
    for name, value in os.environ.items():  # Flask < 2.1
        if name.startswith("FLASK_"):
            try:
                app.config[name[6:]] = json.loads(value)
            except ValueError:
                app.config[name[6:]] = value
