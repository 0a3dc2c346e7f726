"""Configuration: defaults, and wrong values named at init_app."""

from __future__ import annotations

import pytest
from flask import Flask

from flask_pymacaron_async import ConfigError, PymacaronAsync
from flask_pymacaron_async.config import DEFAULTS


def init(**config):
    app = Flask("cfg")
    app.config.update(config)
    PymacaronAsync(app)
    return app


def test_defaults_are_filled_in():
    app = init(SECRET_KEY="s")
    for key in DEFAULTS:
        assert key in app.config
    assert app.config["PYMACARON_ASYNC_PUBLISH"] == "immediate"
    assert "Authorization" not in app.config["PYMACARON_ASYNC_CONTEXT_HEADERS"]
    assert "Cookie" not in app.config["PYMACARON_ASYNC_CONTEXT_HEADERS"]


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({}, "SECRET_KEY"),
        ({"SECRET_KEY": "s", "PYMACARON_ASYNC_PUBLISH": "later"}, "PYMACARON_ASYNC_PUBLISH"),
        ({"SECRET_KEY": "s", "PYMACARON_ASYNC_CONTEXT_HEADERS": "User-Agent"}, "PYMACARON_ASYNC_CONTEXT_HEADERS"),
        ({"SECRET_KEY": "s", "PYMACARON_ASYNC_CONTEXT_HEADERS": ["ok", 3]}, "PYMACARON_ASYNC_CONTEXT_HEADERS"),
        ({"SECRET_KEY": "s", "PYMACARON_ASYNC_FALLBACK": "drop"}, "PYMACARON_ASYNC_FALLBACK"),
        ({"SECRET_KEY": "s", "PYMACARON_ASYNC_PUBLISH_TIMEOUT": 0}, "PYMACARON_ASYNC_PUBLISH_TIMEOUT"),
        ({"SECRET_KEY": "s", "PYMACARON_ASYNC_BROKER_URL": "localhost"}, "PYMACARON_ASYNC_BROKER_URL"),
        ({"SECRET_KEY": "s", "PYMACARON_ASYNC_ENABLED": "yes"}, "PYMACARON_ASYNC_ENABLED"),
        ({"SECRET_KEY": "s", "PYMACARON_ASYNC_MAX_MESSAGE_BYTES": -1}, "PYMACARON_ASYNC_MAX_MESSAGE_BYTES"),
        ({"SECRET_KEY": "s", "CELERY": ["task_acks_late"]}, "CELERY"),
        ({"SECRET_KEY": "s", "PYMACARON_ASYNC_EMBEDDED_BROKER": "sometimes"}, "PYMACARON_ASYNC_EMBEDDED_BROKER"),
    ],
)
def test_bad_config_names_the_key(config, key):
    with pytest.raises(ConfigError, match=key):
        init(**config)


def test_secret_key_not_needed_when_disabled():
    app = init(PYMACARON_ASYNC_ENABLED=False)
    assert app.extensions["pymacaron_async"].settings.enabled is False


def test_own_secret_key_is_enough():
    init(PYMACARON_ASYNC_SECRET_KEY="only-for-async")
