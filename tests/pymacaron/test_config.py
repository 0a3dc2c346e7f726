"""Settings from the environment and pym-config.yaml, and the extension on pymacaron's app."""

from __future__ import annotations

import pytest
from flask import Flask

from flask_pymacaron_async import PymacaronAsync
from flask_pymacaron_async.errors import ConfigError
from pymacaron_async import config
from pymacaron_async.extension import ext, init_app

from .conftest import JWT_SECRET, copy_service


def test_signing_key_precedence(conf, monkeypatch):
    assert config.secret_key() is None
    monkeypatch.setattr(conf, "jwt_secret", "from-jwt")
    assert config.secret_key() == "from-jwt"
    monkeypatch.setattr(conf, "async_secret_key", "from-config", raising=False)
    assert config.secret_key() == "from-config"
    monkeypatch.setenv("PYMACARON_ASYNC_SECRET_KEY", "from-env")
    assert config.secret_key() == "from-env"


def test_broker_queue_and_worker_count(conf, monkeypatch):
    assert config.broker_url() == "redis://localhost:6379/0" and config.queue() is None
    monkeypatch.setattr(conf, "async_broker_url", "redis://cache:6379/2", raising=False)
    assert config.broker_url() == "redis://cache:6379/2"
    monkeypatch.setenv("PYMACARON_ASYNC_BROKER_URL", "amqp://rabbit//")
    monkeypatch.setenv("PYMACARON_ASYNC_QUEUE", "petshop")
    assert config.broker_url() == "amqp://rabbit//" and config.queue() == "petshop"
    monkeypatch.setattr(conf, "worker_count", 3, raising=False)
    assert config.worker_count() == 3
    monkeypatch.setattr(conf, "worker_count", "many", raising=False)
    with pytest.raises(ConfigError, match="worker_count"):
        config.worker_count()


@pytest.mark.parametrize(("value", "enabled"), [(None, True), ("1", True), ("0", False), ("false", False)])
def test_spawn_switch(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("PYMACARON_ASYNC_SPAWN_WORKER", raising=False)
    else:
        monkeypatch.setenv("PYMACARON_ASYNC_SPAWN_WORKER", value)
    assert config.spawn_enabled() is enabled


def test_find_pym_config(tmp_path, monkeypatch):
    monkeypatch.delenv("PYMACARON_ASYNC_PYM_CONFIG", raising=False)
    monkeypatch.delenv("PYM_ENV", raising=False)
    service = tmp_path / "service"
    (service / "deep" / "er").mkdir(parents=True)
    (service / "pym-config.yaml").write_text("name: x\n")
    (service / "pym-config.live.yaml").write_text("name: x\n")

    assert config.find_pym_config(service) == service / "pym-config.yaml"
    assert config.find_pym_config(service / "pym-config.live.yaml") == service / "pym-config.live.yaml"
    monkeypatch.chdir(service / "deep" / "er")
    assert config.find_pym_config() == service / "pym-config.yaml"  # the nearest, upwards
    monkeypatch.setenv("PYM_ENV", "live")
    assert config.find_pym_config() == service / "pym-config.live.yaml"
    monkeypatch.setenv("PYMACARON_ASYNC_PYM_CONFIG", str(service))
    monkeypatch.chdir(tmp_path)
    assert config.find_pym_config() == service / "pym-config.live.yaml"
    with pytest.raises(ConfigError, match="no pym-config.yaml at"):
        config.find_pym_config(tmp_path / "missing")


def test_init_app_reads_pym_config(conf, monkeypatch):
    monkeypatch.setattr(conf, "with_async", True, raising=False)
    monkeypatch.setattr(conf, "jwt_secret", "jwt-key")
    monkeypatch.setenv("PYMACARON_ASYNC_QUEUE", "petshop-q")
    app = Flask("config-test")
    app.secret_key = b"random per process, as API.start() makes it"
    state = init_app(app)
    assert init_app(app) is state and state.ext is ext
    assert state.settings.enabled and state.settings.secret_key == "jwt-key"
    assert state.celery.conf.task_default_queue == "petshop-q"
    assert app.config["PYMACARON_ASYNC_SPAWN_WORKER"] is False


def test_init_app_without_with_async_runs_inline(conf):
    app = Flask("inline-test")
    assert init_app(app).settings.enabled is False


def test_init_app_needs_a_shared_key_when_enabled(conf, monkeypatch):
    monkeypatch.setattr(conf, "with_async", True, raising=False)
    app = Flask("no-key-test")
    app.secret_key = b"not shared with the worker"
    with pytest.raises(ConfigError, match="PYMACARON_ASYNC_SECRET_KEY is not set"):
        init_app(app)


def test_init_app_loads_the_nearest_pym_config_when_nothing_did(conf, tmp_path, monkeypatch):
    folder = copy_service(tmp_path / "service")
    monkeypatch.chdir(folder / "petshop")
    app = Flask("gunicorn-like")
    state = init_app(app)
    assert conf.config_path == str(folder / "pym-config.yaml")
    assert state.settings.enabled and state.settings.secret_key == JWT_SECRET


def test_init_app_refuses_another_extension(conf):
    app = Flask("other-test")
    app.config["PYMACARON_ASYNC_ENABLED"] = False
    PymacaronAsync(app)
    with pytest.raises(RuntimeError, match="another PymacaronAsync"):
        init_app(app)
