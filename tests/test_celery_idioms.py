"""Celery's everyday idioms keep the caller's context: retries, errbacks, ``base=``, eager calls, the Task API.

Celery's documentation is the spec; the worker tests run a real `celery
worker` of tests/apps/idioms.py on a queue of its own, and read what its
tasks saw from Redis. Eager calls run in this process, as Celery runs them.
"""

from __future__ import annotations

import datetime
import logging
import uuid

import pytest
from celery import Task
from celery.result import EagerResult
from flask import g

from flask_pymacaron_async import AsyncTask, ContextTask, signals
from tests.apps import idioms
from tests.faults import wait_for

URL = "http://shop.test/orders/7?step=pay"
PATH, BASE = "/orders/7?step=pay", "http://shop.test"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from tests.conftest import Worker

    worker = Worker("tests.apps.idioms:celery", tmp_path_factory.mktemp("idioms"), queue=idioms.QUEUE).wait_ready()
    yield worker
    worker.stop()


@pytest.fixture
def app():
    return idioms.app


def queued(app, task, *args, user="alice", **options):
    """Queue ``task`` from a request to URL made by ``user``; the call's result."""
    with app.test_request_context(PATH, base_url=BASE):
        g.user = user
        return task.apply_async(args, **options)


def dead_for(task_id: str) -> list:
    return [d for d in idioms.ext.dead_letters(idioms.QUEUE) if d.task_id == task_id]


def test_a_retry_is_not_a_failure(app, worker, reports, unique):
    result = queued(app, idioms.retries_once, unique)
    first, second = reports.get(unique, 2)
    assert [first["retries"], second["retries"]] == [0, 1]
    for attempt in (first, second):
        assert attempt["url"] == URL and attempt["user"] == "alice" and attempt["app"] == "tests.apps.idioms"
    assert result.get(timeout=15) == "done"
    assert dead_for(result.id) == []
    assert reports.none(f"failed:{result.id}", wait=0.5)


def test_autoretry_keeps_the_context_and_leaves_no_dead_letter(app, worker, reports, unique):
    result = queued(app, idioms.flaky, unique, user="bob")
    attempts = reports.get(unique, 3)
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert {(a["url"], a["user"]) for a in attempts} == {(URL, "bob")}
    assert result.get(timeout=15) == 3
    assert dead_for(result.id) == []
    assert reports.none(f"failed:{result.id}", wait=0.5)


def test_retries_used_up_leave_one_dead_letter_and_one_failure(app, worker, reports, unique):
    result = queued(app, idioms.always_fails, unique)
    assert [a["retries"] for a in reports.get(unique, 3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="attempt 3 failed"):
        result.get(timeout=15)
    (dead,) = wait_for(lambda: dead_for(result.id), 10, what="the dead letter")
    assert dead.kind == "failed" and dead.attempts == 3 and dead.exception == "ValueError"
    assert reports.get(f"failed:{result.id}") == ["tests.apps.idioms.always_fails"]
    assert len(reports.client.lrange(reports.key(f"failed:{result.id}"), 0, -1)) == 1
    idioms.ext.purge_dead_letters(idioms.QUEUE)


def test_requeue_never_runs_a_task_id_that_has_since_succeeded(app, worker, reports, unique):
    failed = queued(app, idioms.audited, unique, True)
    wait_for(lambda: dead_for(failed.id), 10, what="the dead letter")
    # The same task id runs again, and succeeds this time (a duplicate delivery, a resend).
    queued(app, idioms.audited, unique, False, task_id=failed.id)
    assert len(reports.get(unique, 2)) == 2
    with app.app_context():
        wait_for(lambda: idioms.ext.celery.AsyncResult(failed.id).state == "SUCCESS", 10, what="the success")
    assert idioms.ext.requeue_dead_letters([failed.id], queue=idioms.QUEUE) == []
    assert len(dead_for(failed.id)) == 1  # kept, not run
    assert reports.none(unique + ":third", wait=1.0)
    assert len(reports.client.lrange(reports.key(unique), 0, -1)) == 2
    idioms.ext.purge_dead_letters(idioms.QUEUE)


def test_an_errback_of_the_new_signature_runs_in_the_failing_tasks_context(app, worker, reports, unique):
    result = queued(app, idioms.fails, unique, user="carol", link_error=idioms.on_error.s())
    seen = reports.one(unique)
    assert seen["failed_id"] == result.id
    assert (seen["url"], seen["user"], seen["app"]) == (URL, "carol", "tests.apps.idioms")
    assert "for the errback" in seen["exc"]
    idioms.ext.purge_dead_letters(idioms.QUEUE)


def test_an_errback_of_the_old_signature_is_queued_with_the_context(app, worker, reports, unique):
    result = queued(app, idioms.fails, unique, user="dave", link_error=idioms.on_error_old.s())
    seen = reports.one(f"errback:{result.id}")
    assert (seen["failed_id"], seen["url"], seen["user"]) == (result.id, URL, "dave")
    idioms.ext.purge_dead_letters(idioms.QUEUE)


def test_a_plain_celery_base_class_keeps_the_context_and_its_handlers(app, worker, reports, unique):
    queued(app, idioms.audited, unique, user="erin")
    assert reports.one(unique)["user"] == "erin"
    assert reports.one(unique + ":base_call") == {"app": "tests.apps.idioms", "user": "erin", "url": URL}
    failed = queued(app, idioms.audited, unique + "f", True, user="erin")
    on_failure = reports.one(unique + "f:on_failure")
    assert (on_failure["url"], on_failure["user"]) == (URL, "erin") and "audited failure" in on_failure["exc"]
    wait_for(lambda: dead_for(failed.id), 10, what="the dead letter")
    idioms.ext.purge_dead_letters(idioms.QUEUE)


def _key(key):
    return key


def test_base_classes_are_combined_with_the_extensions(app):
    task = idioms.audited.celery_task
    assert isinstance(task, ContextTask) and isinstance(task, idioms.Audited)
    with app.test_request_context(PATH, base_url=BASE), pytest.raises(TypeError, match="'fail'.*set"):
        idioms.audited.delay("k", {1, 2})
    celery_task = idioms.ext.celery.task(base=idioms.Audited, name=f"adhoc.{uuid.uuid4().hex}", shared=False)(_key)
    assert isinstance(celery_task, ContextTask) and isinstance(celery_task, idioms.Audited)


def test_a_base_that_is_not_a_celery_task_fails_at_decoration(app):
    class NotATask:
        pass

    # The app exists: registered (and refused) at once.
    with pytest.raises(TypeError, match="must be a celery.Task subclass"):
        idioms.ext.task(base=NotATask, name=f"adhoc.{uuid.uuid4().hex}")(_key)
    assert not [name for name in idioms.ext.declared if name.startswith("adhoc.")]
    with pytest.raises(TypeError, match="must be a celery.Task subclass"):
        idioms.ext.celery.task(base=NotATask, name=f"adhoc.{uuid.uuid4().hex}", shared=False)(_key)


# -- eager calls, in this process ---------------------------------------------------------


def test_apply_runs_in_the_callers_context_with_arguments_round_tripped(app):
    when = datetime.datetime(2026, 12, 7, 12, 30)
    with app.test_request_context(PATH, base_url=BASE):
        g.user = "frank"
        result = idioms.eager_echo.apply(("k",), {"value": when})
        assert g.user == "frank"
    assert isinstance(result, EagerResult) and result.successful()
    assert result.get() == {
        "app": "tests.apps.idioms",
        "user": "frank",
        "url": URL,
        "value": when,
        "type": "datetime",
    }


def test_apply_checks_its_arguments_at_the_call(app):
    with app.test_request_context(PATH, base_url=BASE), pytest.raises(TypeError, match="'value' of type set"):
        idioms.eager_echo.apply(("k",), {"value": {1}})


def test_apply_of_a_failing_task_returns_the_failure_as_celery_does(app, monkeypatch):
    # Celery 5.1's error log cannot format a traceback on Python 3.11 (billiard's
    # code stand-ins lack co_positions): logging reports it, pytest's capture raises it.
    monkeypatch.setattr(logging.getLogger("celery.app.trace"), "propagate", False)
    failed = []
    signals.task_failed.connect(lambda sender, **extra: failed.append(extra["task_id"]), weak=False)
    with app.test_request_context(PATH, base_url=BASE):
        result = idioms.fails.apply(("k",))
    assert result.failed() and isinstance(result.result, ValueError)
    with pytest.raises(ValueError):
        result.get()
    assert result.id in failed


def test_apply_of_a_celery_decorated_task_runs_its_body(app):
    @idioms.ext.celery.task(name=f"adhoc.{uuid.uuid4().hex}", shared=False)
    def plain(x):
        return {"x": x, "user": g.get("user")}

    with app.test_request_context(PATH, base_url=BASE):
        g.user = "gina"
        result = plain.apply((2,))
    assert result.state == "SUCCESS" and result.get() == {"x": 2, "user": "gina"}


def test_task_always_eager_runs_calls_in_the_callers_context(app):
    celery = idioms.ext.celery
    celery.conf.task_always_eager = True
    try:
        with app.test_request_context(PATH, base_url=BASE):
            g.user = "hank"
            result = idioms.eager_echo.delay("k", value=uuid.UUID(int=5))
    finally:
        celery.conf.task_always_eager = False
    assert isinstance(result, EagerResult)
    assert result.get() == {
        "app": "tests.apps.idioms",
        "user": "hank",
        "url": URL,
        "value": uuid.UUID(int=5),
        "type": "UUID",
    }


def test_an_eager_retry_counts_up_in_the_context(app, reports, unique):
    with app.test_request_context(PATH, base_url=BASE):
        g.user = "ivy"
        result = idioms.retries_once.apply((unique,))
    assert result.get() == "done"
    assert [(r["retries"], r["user"], r["url"]) for r in reports.get(unique, 2)] == [(0, "ivy", URL), (1, "ivy", URL)]


# -- the Task API --------------------------------------------------------------------------


def test_the_task_objects_answer_celerys_task_api(app):
    public = [name for name in dir(Task) if not name.startswith("_")]
    with app.app_context():
        missing = [name for name in public if not hasattr(idioms.eager_echo, name)]
        assert missing == []
        assert isinstance(idioms.eager_echo, AsyncTask)
        assert idioms.eager_echo.name == "tests.apps.idioms.eager_echo"
        assert idioms.eager_echo.AsyncResult("x").id == "x"
        assert idioms.eager_echo.backend is idioms.ext.celery.backend
        assert idioms.eager_echo.app is idioms.ext.celery
        assert idioms.eager_echo.request.id is None  # not running
        assert idioms.eager_echo.max_retries == idioms.eager_echo.celery_task.max_retries
        assert idioms.eager_echo.chunks([("a",), ("b",)], 1).task == "celery.chunks"


class _NeedsBar(Exception):
    """An exception pickle cannot rebuild (its __init__ wants an argument its args lack), as Celery's suite has."""

    def __init__(self, bar):
        super().__init__("needs bar")
        self.bar = bar


def test_a_failure_log_record_survives_a_handler_that_pickles_it(app, monkeypatch):
    """Log records cross processes pickled (Celery's test worker, queue handlers): a failure's must load again."""
    import pickle

    monkeypatch.setattr(logging.getLogger("celery.app.trace"), "propagate", False)  # see above: Celery 5.1

    problems = []

    class Pickling(logging.Handler):
        def emit(self, record):
            try:
                pickle.loads(pickle.dumps(record.args))
            except Exception as exc:  # what a log-forwarding thread would die of
                problems.append(exc)

    @idioms.ext.task(name=f"adhoc.{uuid.uuid4().hex}")
    def raises():
        raise _NeedsBar(1)

    handler = Pickling()
    app.logger.addHandler(handler)
    try:
        with app.test_request_context(PATH, base_url=BASE):
            result = raises.apply()
    finally:
        app.logger.removeHandler(handler)
    assert isinstance(result.result, _NeedsBar)
    assert problems == []
