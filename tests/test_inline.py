"""PYMACARON_ASYNC_ENABLED = False: tasks run inline, through the worker's path."""

from __future__ import annotations

import datetime

import pytest
from celery.result import EagerResult
from flask import Flask, g, has_app_context, has_request_context, request, url_for
from werkzeug.exceptions import NotFound
from werkzeug.routing import BaseConverter

from flask_pymacaron_async import PymacaronAsync
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


# -- the route of a rebuilt request ------------------------------------------------------

ROUTED = PymacaronAsync()
SEEN_ROUTES: list = []
CONVERSIONS: list = []


@ROUTED.task
def record_route():
    SEEN_ROUTES.append((request.endpoint, dict(request.view_args or {}), url_for("user", uid=5)))
    if request.view_args:
        request.view_args["uid"] = "changed by a task"  # never seen by the next one


class _CountingConverter(BaseConverter):
    """A converter with a side effect (say, a database lookup): its match is never kept."""

    def to_python(self, value):
        CONVERSIONS.append(value)
        return value.upper()


def _routed_app():
    app = Flask("routes_kept")
    app.config.update(PYMACARON_ASYNC_ENABLED=False, SECRET_KEY="k")
    app.url_map.converters["counted"] = _CountingConverter
    app.add_url_rule("/users/<int:uid>", "user", lambda uid: "")
    app.add_url_rule("/tags/<counted:name>", "tag", lambda name: "")
    ROUTED.init_app(app)
    return app


def _rebuilt(app, path):
    SEEN_ROUTES.clear()
    with app.test_request_context(path):
        record_route.delay()
    return SEEN_ROUTES[-1]


def test_a_rebuilt_request_matches_its_route_as_flask_does_each_time():
    app = _routed_app()
    for _ in range(3):  # matched once, then kept: the same answer, a fresh view_args each time
        assert _rebuilt(app, "/users/7") == ("user", {"uid": 7}, "/users/5")
    assert _rebuilt(app, "/users/8") == ("user", {"uid": 8}, "/users/5")
    # A route added later is seen (the URL map has more rules).
    app.add_url_rule("/users/7", "seven", lambda: "")
    assert _rebuilt(app, "/users/7")[0] == "seven"
    # No route: Flask's own 404, each time.
    assert _rebuilt(app, "/nowhere")[:2] == (None, {})
    with app.test_request_context("/nowhere"):
        record_route.delay()
        assert isinstance(request.routing_exception, NotFound)


def test_a_route_with_a_converter_of_the_apps_own_is_converted_each_time():
    app = _routed_app()
    CONVERSIONS.clear()
    for _ in range(2):
        assert _rebuilt(app, "/tags/news")[:2] == ("tag", {"name": "NEWS"})
    # Once per request in the endpoint and once per rebuilt one: nothing kept.
    assert CONVERSIONS == ["news"] * 4


# -- a user loader that fails --------------------------------------------------------------

FAILING_LOADER = PymacaronAsync()
LOADER_RAN: list = []


@FAILING_LOADER.user_dumper
def _dump_user():
    return "someone"


@FAILING_LOADER.user_loader
def _load_user(value):
    g.half_loaded = value  # in the rebuilt context's g, never the caller's
    raise LookupError(f"no user {value!r}")


@FAILING_LOADER.task
def never_runs():
    LOADER_RAN.append(True)


def test_a_user_loader_that_raises_pops_the_rebuilt_contexts():
    """The loader's error reaches the caller; the rebuilt request and app contexts are gone, the caller's are intact."""
    app = Flask("loader_fails")
    app.config.update(PYMACARON_ASYNC_ENABLED=False, SECRET_KEY="k")
    FAILING_LOADER.init_app(app)
    LOADER_RAN.clear()
    with app.test_request_context("/page?n=1"):
        g.mine = "caller"
        with pytest.raises(LookupError, match="no user 'someone'"):
            never_runs.delay()
        assert request.path == "/page" and g.mine == "caller" and "half_loaded" not in g
    assert not has_request_context() and not has_app_context()
    # Outside a request (no env): only an app context is pushed, and popped again.
    with pytest.raises(LookupError), app.app_context():
        g.mine = "caller"
        try:
            never_runs.delay()
        finally:
            assert g.mine == "caller" and "half_loaded" not in g
    assert not has_app_context()
    assert LOADER_RAN == []
