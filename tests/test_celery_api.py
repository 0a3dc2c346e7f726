"""Celery's own API finds the Flask app's Celery app: ``current_app``, ``AsyncResult(id)``, ``@shared_task``.

The Flask docs' "Background Tasks with Celery" example (tests/apps/recipe)
runs against a real worker with only its Celery set-up lines changed.
"""

from __future__ import annotations

import time

import celery
import pytest
from celery.result import AsyncResult
from flask import Flask

from flask_pymacaron_async import PymacaronAsync
from tests.apps.recipe import create_app, tasks


@pytest.fixture
def recipe(start_worker):
    start_worker("tests.apps.recipe.make_celery")
    return create_app()


def _poll(client, result_id: str, timeout: float = 20) -> list[dict]:
    """Every answer of the example's result view until the task is ready."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get(f"/tasks/result/{result_id}")
        assert answer.status_code == 200, answer.text
        seen.append(answer.json)
        if answer.json["ready"]:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"task {result_id} not ready after {timeout}s: {seen[-1:]}")


def test_the_flask_docs_example_runs_with_the_extension(recipe):
    client = recipe.test_client()
    added = client.post("/tasks/add", data={"a": 1, "b": 2}).json["result_id"]
    assert _poll(client, added)[-1] == {"ready": True, "successful": True, "value": 3, "state": "SUCCESS"}

    processed = client.post("/tasks/process", data={"total": 4}).json["result_id"]
    answers = _poll(client, processed)
    # The view reads the backend once per field (as the example does): a
    # state of PROGRESS can come with the value read just before it (None).
    progress = [a["value"] for a in answers if not a["ready"] and a["value"] is not None]
    assert progress and all(p["total"] == 4 for p in progress), answers
    assert answers[-1]["value"] == {"current": 4, "total": 4}


def test_a_shared_task_runs_in_the_request_that_queued_it(recipe):
    client = recipe.test_client()
    queued = client.post("/tasks/where?from=test", headers={"User-Agent": "recipe-test"}).json["result_id"]
    value = _poll(client, queued)[-1]["value"]
    assert value["url"] == "http://localhost/tasks/where?from=test" and value["agent"] == "recipe-test"


def _app(name: str) -> Flask:
    app = Flask(name)
    app.config.update(SECRET_KEY="s", PYMACARON_ASYNC_RESULT_BACKEND="redis://127.0.0.1:6379/0")
    PymacaronAsync(app)
    return app


def test_each_app_context_has_its_own_celery_app():
    one, two = _app("one"), _app("two")
    first, second = (PymacaronAsync.state_for(a).celery for a in (one, two))
    with one.app_context():
        assert celery.current_app._get_current_object() is first
        assert AsyncResult("some-id").app is first
        assert tasks.add.app is first and tasks.add.name in first.tasks
        with two.app_context():
            assert celery.current_app._get_current_object() is second
            assert tasks.add.app is second
        assert celery.current_app._get_current_object() is first
    with two.test_request_context("/"):
        assert celery.current_app._get_current_object() is second
    assert one.extensions["celery"] is first and two.extensions["celery"] is second


def test_a_worker_of_the_app_stops_following_its_contexts():
    """In the app's worker Celery made its app current for the process: no receivers run per task context."""
    from celery import signals
    from flask import appcontext_popped, appcontext_pushed

    one, two = _app("worker_one"), _app("worker_two")
    first, second = (PymacaronAsync.state_for(a) for a in (one, two))

    class Worker:  # what Celery's worker sends: itself, with its Celery app
        app = first.celery

    signals.worker_init.send(sender=Worker())
    assert first.celery_current not in list(appcontext_pushed.receivers_for(one))
    assert first.celery_restore not in list(appcontext_popped.receivers_for(one))
    # Gone from the signals altogether (blinker keys a method by its function and object):
    # a signal that still lists a receiver looks it up on every send.
    assert (id(type(first).celery_current), id(first)) not in appcontext_pushed.receivers
    assert (id(type(first).celery_restore), id(first)) not in appcontext_popped.receivers
    # Another app's contexts still make its Celery app current.
    assert second.celery_current in list(appcontext_pushed.receivers_for(two))
    with two.app_context():
        assert celery.current_app._get_current_object() is second.celery


def test_shared_tasks_carry_the_context_like_asynctask(recipe):
    """A shared task is a task of the app's Celery app: the extension's task class, its checks."""
    with recipe.app_context():
        task = tasks.add._get_current_object()
        assert task.app is PymacaronAsync.state_for(recipe).celery
        assert hasattr(task, "pma_state")
        with pytest.raises(TypeError, match="argument 'a' of type object cannot be sent"):
            tasks.add.delay(object(), 1)
