"""The caller's JWT: encrypted for the trip, loaded with pymacaron.auth in the task."""

from __future__ import annotations

import json

import pytest
from flask import Flask
from pymacaron.auth import authenticate_http_request, get_user_token, get_userid

from flask_pymacaron_async.errors import ContextError
from pymacaron_async import auth
from pymacaron_async.extension import init_app

from .conftest import make_token


def make_app(name: str, key: str) -> Flask:
    app = Flask(name)
    app.config.update(PYMACARON_ASYNC_ENABLED=False, PYMACARON_ASYNC_SECRET_KEY=key)
    init_app(app)
    return app


def test_the_token_travels_encrypted_and_loads_as_in_the_endpoint(jwt_conf):
    app = make_app("auth-a", "key-a")
    token = make_token("user-5")
    with app.test_request_context("/v1/pets", headers={"Authorization": f"Bearer {token}"}):
        authenticate_http_request()
        dumped = auth.dump_user()
    assert dumped["sub"] == "user-5"
    text = json.dumps(dumped)
    assert token not in text and token.split(".")[1] not in text

    with app.test_request_context("/elsewhere"):
        assert get_userid() == ""
        auth.load_user(dumped)
        assert get_userid() == "user-5" and get_user_token() == token


def test_a_token_encrypted_with_another_key_is_refused(jwt_conf):
    a, b = make_app("auth-b1", "key-1"), make_app("auth-b2", "key-2")
    with a.app_context():
        encrypted = auth.encrypt_token(make_token())
    with b.test_request_context("/"), pytest.raises(ContextError, match="different"):
        auth.load_user({"sub": "user-42", "jwt": encrypted})


def test_anonymous_callers_send_no_user(jwt_conf):
    app = make_app("auth-c", "key-c")
    with app.test_request_context("/"):
        assert auth.dump_user() is None


@pytest.mark.parametrize("value", ["user-42", {"sub": "user-42"}, {"jwt": 3}])
def test_a_user_that_is_not_an_encrypted_token_is_refused(jwt_conf, value):
    app = make_app("auth-d", "key-d")
    with app.test_request_context("/"), pytest.raises(ContextError, match="not a pymacaron user"):
        auth.load_user(value)
