"""pytest plugin: Celery's integration suite on an app made by ``PymacaronAsync(flask_app)``.

Loaded with ``-p tests.conformance.plugin`` (``python -m tests.conformance.run`` does it for the extension's side).

Celery's suite gets every Celery app from two fixtures of ``celery.contrib.pytest``: ``celery_session_app`` (the
app of the session worker) and ``celery_app`` (a new app per test, through which the tests publish; the suite's
``app`` fixture). Both build it with the module function ``_create_app(enable_logging, use_trap, parameters,
**config)``, looked up at call time, which wraps Celery's ``TestApp`` in ``setup_default_app``. Replacing that
one function is the smallest set-up change that puts the extension's app under *both* fixtures, so the worker, the
apps the tests publish through and the suite's own fixtures (``manager``, the queue check) stay Celery's, and no
file of the suite is edited or copied. Each app is a new ``Flask`` app with ``PymacaronAsync``; its config comes
from the suite's ``celery_config`` (``TEST_BROKER``, ``TEST_BACKEND``, ...) plus what ``TestApp`` adds (no root
logger hijack, no broker heartbeat, UTC), except ``accept_content``: the extension keeps its serializer and what
its worker accepts. All apps share one ``SECRET_KEY``, since the session worker verifies what per-test apps sign.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import celery.contrib.pytest as celery_pytest
import pytest
from celery import Celery
from celery.contrib.testing import tasks as _testing_tasks  # noqa: F401  (celery.ping, which TestApp imports too)
from celery.contrib.testing.app import DEFAULT_TEST_CONFIG, setup_default_app
from flask import Flask

from flask_pymacaron_async import PymacaronAsync

#: Shared by the session app (its worker verifies signatures) and every per-test app (they sign).
SECRET_KEY = "celery-conformance-suite"

#: TestApp's defaults the extension's app does not take: it keeps its own serializer and accepted content, and
#: its broker and backend come from the suite's config.
_NOT_TAKEN = ("accept_content", "broker_url", "result_backend")


def flask_app_for(config: dict[str, Any]) -> Flask:
    """A Flask app whose extension's Celery app has the suite's Celery ``config``."""
    celery_config = {k: v for k, v in DEFAULT_TEST_CONFIG.items() if k not in _NOT_TAKEN}
    celery_config.update(config)
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        PYMACARON_ASYNC_BROKER_URL=celery_config.pop("broker_url"),
        PYMACARON_ASYNC_RESULT_BACKEND=celery_config.pop("result_backend"),
        CELERY=celery_config,
    )
    PymacaronAsync(app)
    return app


@contextmanager
def create_app(
    enable_logging: bool = False, use_trap: bool = False, parameters: dict[str, Any] | None = None, **config: Any
) -> Iterator[Celery]:
    """``celery.contrib.pytest._create_app``, making the extension's app instead of Celery's ``TestApp``.

    ``enable_logging`` is True in the integration suite (Celery's own logging, as the extension's app has).
    """
    if parameters:
        raise pytest.UsageError(f"celery_parameters {parameters!r}: the extension makes its Celery app itself")
    celery = PymacaronAsync.state_for(flask_app_for(config)).celery
    with setup_default_app(celery, use_trap=use_trap):
        yield celery


_original = celery_pytest._create_app


def pytest_configure(config: pytest.Config) -> None:
    celery_pytest._create_app = create_app


def pytest_unconfigure(config: pytest.Config) -> None:
    celery_pytest._create_app = _original
