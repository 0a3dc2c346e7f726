"""PYMACARON_ASYNC_PUBLISH = "after_response": tasks go out after the response, in one batch."""

from __future__ import annotations

import pytest
from flask import abort

from flask_pymacaron_async import signals
from tests.apps import basic
from tests.apps.basic import create_app


@pytest.fixture
def app():
    app = create_app(PYMACARON_ASYNC_PUBLISH="after_response")
    app.config["PROPAGATE_EXCEPTIONS"] = False
    return app


@pytest.fixture
def queued():
    names = []

    def receiver(sender, task_name, **extra):
        names.append(task_name)

    with signals.task_queued.connected_to(receiver):
        yield names


def test_published_after_the_response_with_context(app, module_worker, reports, unique, queued):
    @app.route("/held/<key>")
    def held(key):
        basic.record_context(key)
        basic.record_value.delay("second", f"{key}-2")
        return {"queued_in_view": len(queued)}

    response = app.test_client().get(f"/held/{unique}?x=1")
    assert response.json == {"queued_in_view": 0}
    response.close()
    assert queued == [basic.record_context.name, basic.record_value.name]
    assert reports.one(unique)["url"] == f"http://localhost/held/{unique}?x=1"
    assert reports.one(f"{unique}-2")["value"] == "second"


def test_result_id_known_before_publishing(app, module_worker, unique):
    @app.route("/add")
    def add():
        return {"id": basic.add.delay(20, 22).id}

    response = app.test_client().get("/add")
    response.close()
    assert basic.add.celery_task.AsyncResult(response.json["id"]).get(timeout=15) == 42


@pytest.mark.parametrize("how", ["500", "raise"])
def test_dropped_when_the_view_fails(app, module_worker, reports, unique, queued, how):
    @app.route("/fails")
    def fails():
        basic.record_value("never", unique)
        if how == "raise":
            raise RuntimeError("view failed")
        abort(503)

    response = app.test_client().get("/fails")
    assert response.status_code in (500, 503)
    response.close()
    assert queued == []
    assert reports.none(unique, wait=1.0)


def test_per_task_immediate_override(app, module_worker, reports, unique, queued):
    @app.route("/urgent")
    def view():
        basic.urgent(unique)
        return {"queued_in_view": list(queued)}

    response = app.test_client().get("/urgent")
    assert response.json == {"queued_in_view": [basic.urgent.name]}
    response.close()
    assert reports.one(unique) == "urgent"


def test_outside_a_request_publishes_immediately(module_worker, reports, unique, queued):
    # not the `app` fixture: pytest-flask pushes a request context for it
    app = create_app(PYMACARON_ASYNC_PUBLISH="after_response")
    with app.app_context():
        basic.record_value("now", unique)
        assert queued == [basic.record_value.name]
    assert reports.one(unique)["value"] == "now"


def test_broker_failure_after_response_never_reaches_client(unique, reports):
    app = create_app(PYMACARON_ASYNC_PUBLISH="after_response", PYMACARON_ASYNC_BROKER_URL="redis://127.0.0.1:1/0")
    app.config["PYMACARON_ASYNC_RESULT_BACKEND"] = None
    failed = []

    @app.route("/down")
    def down():
        basic.record_value("lost", unique)
        return {"ok": True}

    def receiver(sender, task_name, exception, **extra):
        failed.append((task_name, type(exception).__name__))

    with signals.task_failed.connected_to(receiver):
        response = app.test_client().get("/down")
        assert response.status_code == 200
        response.close()
    assert failed == [(basic.record_value.name, "AsyncUnavailable")]


def test_broker_failure_after_response_falls_back_inline(unique, reports):
    app = create_app(
        PYMACARON_ASYNC_PUBLISH="after_response",
        PYMACARON_ASYNC_BROKER_URL="redis://127.0.0.1:1/0",
        PYMACARON_ASYNC_FALLBACK="inline",
        PMA_TEST_BROKER_URL_FOR_REPORTS=basic.app.config["PYMACARON_ASYNC_BROKER_URL"],
    )

    @app.route("/down")
    def down():
        basic.record_context(unique)
        return {"ok": True}

    response = app.test_client().get("/down?via=inline", headers={"X-User": "z"})
    assert response.status_code == 200
    response.close()
    seen = reports.one(unique, timeout=2)
    assert seen["url"] == "http://localhost/down?via=inline"


def test_held_in_a_request_without_response_is_published_at_teardown(module_worker, reports, unique, queued):
    app = create_app(PYMACARON_ASYNC_PUBLISH="after_response")
    with app.test_request_context("/no-response"):
        basic.record_value("torn", unique)
        assert queued == []
    assert queued == [basic.record_value.name]
    assert reports.one(unique)["value"] == "torn"


def test_the_teardown_receiver_waits_for_the_first_held_call(unique, queued):
    """Requests of an app that never holds a call (immediate mode, rebuilt ones in the worker) skip it."""
    from flask import request_tearing_down

    def connected(app):
        teardown = app.extensions["pymacaron_async"].publisher.teardown
        return teardown in list(request_tearing_down.receivers_for(app))

    app = create_app(PYMACARON_ASYNC_PUBLISH="after_response")
    with app.test_request_context("/nothing-held"):
        pass
    assert not connected(app)
    with app.test_request_context("/held"):
        basic.record_value("torn", unique)
        assert connected(app) and queued == []
    assert queued == [basic.record_value.name]


def test_held_in_a_request_that_raised_is_dropped(unique, queued):
    app = create_app(PYMACARON_ASYNC_PUBLISH="after_response")
    with pytest.raises(RuntimeError):
        with app.test_request_context("/raises"):
            basic.record_value("never", unique)
            raise RuntimeError("view failed")
    assert queued == []


def test_task_queued_from_a_task_in_after_response_mode(app, start_worker, reports, unique):
    queue = f"{basic.celery.conf.task_default_queue}-{unique}"
    start_worker(env={"PMA_TEST_PUBLISH": "after_response"}, queue=f"{queue},{basic.celery.conf.task_default_queue}")
    with app.test_request_context("/outer?from=task"):
        basic.nested.apply_async((unique,), queue=queue)
    assert reports.one(unique)["url"] == "http://localhost/outer?from=task"
