"""PYMACARON_ASYNC_ENABLED = False: tasks run inline, through the worker's path."""

from __future__ import annotations

import datetime

import pytest
from celery.result import EagerResult
from flask import g

from tests.apps import basic
from tests.apps.basic import create_app


@pytest.fixture
def app():
    return create_app(PYMACARON_ASYNC_ENABLED=False)


def test_runs_inline_in_rebuilt_context(app, reports, unique, redis_client):
    queue = basic.celery.conf.task_default_queue
    before = redis_client.llen(queue)
    with app.test_request_context(f"/items/3?key={unique}", method="POST", headers={"X-Tenant": "t1"}):
        g.user = "bob"
        result = basic.record_context(unique)
        assert g.user == "bob"  # the caller's g is untouched
    assert isinstance(result, EagerResult)
    seen = reports.one(unique, timeout=1)
    assert seen["url"] == f"http://localhost/items/3?key={unique}"
    assert seen["user"] == "bob" and seen["method"] == "POST"
    assert seen["headers"]["X-Tenant"] == "t1"
    assert redis_client.llen(queue) == before


def test_inline_returns_value_and_roundtrips_arguments(app):
    with app.app_context():
        assert basic.add(2, 2).get() == 4
        assert basic.add.delay(datetime.timedelta(0).days, 1).get() == 1


def test_inline_bad_argument_fails_as_in_production(app):
    with app.app_context():
        with pytest.raises(TypeError, match="argument 'y' of type object"):
            basic.add(1, object())


def test_inline_exception_reaches_caller(app, unique):
    with app.app_context():
        with pytest.raises(ValueError, match="boom"):
            basic.fail(unique)
