"""PymacaronAsync: app factory, per-app state, Celery app configuration."""

from __future__ import annotations

import pytest
from celery import Celery
from flask import Flask

from flask_pymacaron_async import PymacaronAsync, asynctask
from flask_pymacaron_async.serialization import SERIALIZER


def make_app(name: str = "a", **config) -> Flask:
    app = Flask(name)
    app.config.update(SECRET_KEY="s", **config)
    return app


def test_init_in_constructor_and_factory():
    app1, app2 = make_app("one"), make_app("two")
    direct = PymacaronAsync(app1)
    late = PymacaronAsync()
    late.init_app(app2)
    assert app1.extensions["pymacaron_async"].ext is direct
    assert app2.extensions["pymacaron_async"].ext is late
    assert isinstance(direct.celery, Celery)
    assert direct.celery is not late.celery


def test_init_app_twice_raises():
    app = make_app()
    ext = PymacaronAsync(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        ext.init_app(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        PymacaronAsync(app)


def test_two_apps_one_extension_have_their_own_celery_and_config():
    ext = PymacaronAsync()
    app1 = make_app("one", PYMACARON_ASYNC_BROKER_URL="redis://127.0.0.1:6379/3")
    app2 = make_app("two", PYMACARON_ASYNC_BROKER_URL="redis://127.0.0.1:6379/4")
    ext.init_app(app1)
    ext.init_app(app2)
    with app1.app_context():
        c1 = ext.celery
    with app2.app_context():
        c2 = ext.celery
    assert c1 is not c2
    assert c1.conf.broker_url.endswith("/3") and c2.conf.broker_url.endswith("/4")
    with pytest.raises(RuntimeError, match="init_app"):
        _ = ext.celery  # outside an app context, two apps: ambiguous


def test_nothing_created_at_import_time():
    from flask_pymacaron_async import _state as state

    ext = PymacaronAsync()
    assert not state.states(ext)
    with pytest.raises(RuntimeError, match="init_app"):
        _ = ext.celery


def test_celery_configuration():
    app = make_app(
        PYMACARON_ASYNC_BROKER_URL="redis://127.0.0.1:6379/5",
        PYMACARON_ASYNC_RESULT_BACKEND="redis://127.0.0.1:6379/6",
        CELERY={"task_default_queue": "mine", "worker_prefetch_multiplier": 4},
    )
    celery = PymacaronAsync(app).celery
    conf = celery.conf
    assert conf.broker_url == "redis://127.0.0.1:6379/5"
    assert conf.result_backend == "redis://127.0.0.1:6379/6"
    assert conf.task_default_queue == "mine"
    assert conf.worker_prefetch_multiplier == 4  # CELERY is applied last
    assert conf.task_serializer == SERIALIZER
    assert "pickle" not in conf.accept_content and "application/x-python-serialize" not in conf.accept_content
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert celery.main == app.import_name


def test_results_off_unless_configured():
    celery = PymacaronAsync(make_app()).celery
    assert celery.conf.result_backend is None
    assert celery.conf.task_ignore_result is True


def test_tasks_declared_before_and_after_init_are_registered():
    @asynctask
    def declared_before():
        pass

    app = make_app()
    ext = PymacaronAsync(app)

    @asynctask(queue="mail", max_retries=7)
    def declared_after():
        pass

    @ext.task(delay=3)
    def on_ext():
        pass

    tasks = ext.celery.tasks
    assert declared_before.name in tasks
    assert tasks[declared_after.name].pma_queue == "mail"
    assert tasks[declared_after.name].max_retries == 7
    assert tasks[on_ext.name].pma_delay == 3
    other = PymacaronAsync(make_app("other"))
    assert on_ext.name not in other.celery.tasks  # ext.task belongs to its extension
    assert declared_before.name in other.celery.tasks


def test_task_without_extension_says_init_app():
    @asynctask
    def lonely():
        pass

    app = make_app("bare")
    with app.app_context():
        with pytest.raises(RuntimeError, match="init_app"):
            lonely()


def test_task_decorator_forms_keep_the_function():
    @asynctask
    def bare(x):
        """Doc."""
        return x

    @asynctask()
    def called(x):
        return x

    assert bare.__name__ == "bare" and bare.__doc__ == "Doc."
    assert bare.run(1) == 1 and called.run(2) == 2
    assert bare.name.endswith("test_task_decorator_forms_keep_the_function.<locals>.bare")
