"""@asynctask() in the caller's process: inline mode, direct calls, crash handling (no worker needed)."""

from __future__ import annotations

import logging

import pytest
from flask import Flask, request
from pymacaron import crash
from pymacaron.auth import authenticate_http_request, get_user_token, get_userid
from pymacaron.exceptions import UnhandledServerError

from pymacaron_async import PymacaronTask, TaskCrashed, asynctask, is_celery_task
from pymacaron_async import task as task_module

from .conftest import make_token

seen: list[dict] = []


@asynctask()
def record(pet, pets, who=None):
    seen.append(
        {
            "user": get_userid(),
            "token": get_user_token(),
            "url": request.url,
            "pet": pet,
            "pets": pets,
            "who": who,
        }
    )


@asynctask(delay=5)
def later():
    pass


@asynctask
def double(x):
    return 2 * x


@asynctask()
def explode(key):
    raise ValueError(f"boom {key}")


@asynctask()
def pymacaron_error():
    raise UnhandledServerError("no way")


@pytest.fixture
def app(jwt_conf):
    seen.clear()
    return Flask("task-test")  # with_async absent: inline


@pytest.fixture
def reported(jwt_conf, monkeypatch):
    titles: list[str] = []
    monkeypatch.setattr(crash, "error_reporter", lambda title=None, data=None, **kw: titles.append(title))
    return titles


def test_inline_runs_in_the_rebuilt_request_with_the_user(app, pets):
    token = make_token("user-8")
    owner = pets.Owner(id="user-8")
    pet = pets.Pet(name="Rex", owner=owner)
    with app.test_request_context("/v1/pets?key=1", headers={"Authorization": f"Bearer {token}"}):
        authenticate_http_request()
        record(pet, [pet], who=owner)
    (call,) = seen
    assert call["user"] == "user-8" and call["token"] == token
    assert call["url"] == "http://localhost/v1/pets?key=1"
    # Round-tripped like in a worker: equal models of the service's classes, not the same objects.
    assert type(call["pet"]) is pets.Pet and call["pet"] == pet and call["pet"] is not pet
    assert call["pets"] == [pet] and type(call["who"]) is pets.Owner


def test_inline_crash_is_reported_and_not_raised(app, reported):
    with app.test_request_context("/v1/crash"):
        explode("k1")
    assert reported == [f"{__name__}.explode(): boom k1"]


def test_outside_any_app_the_function_runs_at_once(reported):
    assert double(21) == 42
    assert explode("k2") is None
    assert reported == [f"{__name__}.explode(): boom k2"]


def test_celery_calls_outside_an_app_say_what_to_do():
    for call in (double.delay, double.s, lambda x: double.apply_async((x,))):
        with pytest.raises(RuntimeError, match="need the service's Flask app"):
            call(1)


def test_is_celery_task(monkeypatch):
    assert not is_celery_task()
    monkeypatch.setattr("sys.argv", ["/venv/lib/python3.11/site-packages/celery/__main__.py", "-A", "x", "worker"])
    assert is_celery_task()


def test_a_failing_error_reporter_is_logged(app, monkeypatch, caplog):
    monkeypatch.setattr(crash, "error_reporter", None)  # what API.start() sets without error_reporter=
    with app.test_request_context("/v1/crash"):
        explode("k3")
    assert "pymacaron's crash handler failed while reporting" in caplog.text


def test_in_a_worker_exceptions_fail_the_task(app, reported, monkeypatch):
    monkeypatch.setattr(task_module, "_in_worker", lambda: True)
    with app.test_request_context("/v1/crash"):
        with pytest.raises(ValueError, match="boom k4"):
            explode.body("k4")
        # pymacaron's exceptions are BaseExceptions: Celery would let them kill the pool process.
        with pytest.raises(TaskCrashed, match="no way") as info:
            pymacaron_error.body()
    assert isinstance(info.value.__cause__, UnhandledServerError)
    assert len(reported) == 2


def test_decorator_forms(app):
    assert isinstance(record, PymacaronTask) and isinstance(double, PymacaronTask)
    assert record.name == f"{__name__}.record" and record.__name__ == "record"
    with pytest.raises(TypeError, match="keyword arguments only"):
        asynctask(5)
    app.config.update(PYMACARON_ASYNC_ENABLED=True, PYMACARON_ASYNC_SECRET_KEY="k")
    with app.app_context():
        later.s()  # sets the extension up
        assert later.task.celery_task.pma_delay == 5
        assert record.task.celery_task.pma_delay is None


def test_logs_never_show_the_token(app, caplog):
    caplog.set_level(logging.DEBUG)
    token = make_token("user-9")
    with app.test_request_context("/v1/crash", headers={"Authorization": f"Bearer {token}"}):
        authenticate_http_request()
        caplog.clear()  # pymacaron itself logs the Authorization header it validates
        explode("k5")
    assert "boom k5" in caplog.text and token not in caplog.text
