"""The Flask docs' "Background Tasks with Celery" example, with its Celery set-up replaced by the extension.

Everything else is the example's shape: an app factory reading its Celery
settings from ``app.config["CELERY"]``, a blueprint of views, ``@shared_task``
tasks (one with ``bind=True`` reporting progress with ``update_state``), and
results polled with ``AsyncResult(id)``. The lines that changed carry a
"changed" comment; docs/migrating.rst shows the same diff.
"""

from __future__ import annotations

import os

from flask import Flask

from flask_pymacaron_async import PymacaronAsync  # changed: was celery_init_app, defined in the app


def create_app() -> Flask:
    app = Flask(__name__)
    broker = os.environ.get("PMA_TEST_BROKER_URL", "redis://localhost")
    app.config.from_mapping(
        SECRET_KEY="recipe-secret",  # changed: the context sent to the worker is signed
        CELERY=dict(
            broker_url=broker,
            result_backend=broker,
            task_ignore_result=True,
            task_default_queue=os.environ.get("PMA_TEST_QUEUE", "celery"),
            result_expires=600,
        ),
    )
    PymacaronAsync(app)  # changed: was celery_init_app(app)

    from . import views

    app.register_blueprint(views.bp)
    return app
