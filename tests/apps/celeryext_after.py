"""A Flask-CeleryExt app after moving to the extension (docs/migrating.rst, "From Flask-CeleryExt").

Before: ``FlaskCeleryExt(app)``, ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND``,
``@celery.task(base=RequestContextTask)`` for the tasks that need a request.
After: the lines with a "changed" comment; the tasks keep ``@celery.task`` and
every one of them gets the request context, the base class goes.
"""

from __future__ import annotations

import os

from flask import Flask, request

from flask_pymacaron_async import PymacaronAsync  # changed: was from flask_celeryext import FlaskCeleryExt

app = Flask(__name__)
# fmt: off
app.config.update(
    SECRET_KEY="celeryext-secret",  # changed: the context sent to the worker is signed
    PYMACARON_ASYNC_BROKER_URL=os.environ.get("PMA_TEST_BROKER_URL", "redis://localhost:6379/0"),  # changed: was CELERY_BROKER_URL  # noqa: E501
    PYMACARON_ASYNC_RESULT_BACKEND=os.environ.get("PMA_TEST_BROKER_URL", "redis://localhost:6379/0"),  # changed: was CELERY_RESULT_BACKEND  # noqa: E501
    CELERY={"task_default_queue": os.environ.get("PMA_TEST_QUEUE", "celery"), "result_expires": 600},
)
# fmt: on
ext = PymacaronAsync(app)  # changed: was FlaskCeleryExt(app)
celery = ext.celery


@celery.task  # changed: was @celery.task(base=RequestContextTask)
def remember(value):
    return {"value": value, "url": request.url, "agent": request.headers.get("User-Agent")}


@celery.task
def add(x, y):
    return x + y


@app.route("/remember/<value>", methods=["POST"])
def remember_view(value):
    return {"id": remember.delay(value).id}
