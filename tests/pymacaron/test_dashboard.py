"""The operations page behind pymacaron's JWT user, with the access rule docs/dashboard.rst shows."""

from __future__ import annotations

import os

from flask import Flask
from pymacaron.auth import authenticate_http_request
from pymacaron.exceptions import PyMacaronException

from flask_pymacaron_async import PymacaronAsync
from flask_pymacaron_async._status import shown_user
from pymacaron_async import auth
from pymacaron_async.extension import init_app

from .conftest import make_token

ADMINS = {"admin-1"}


def is_admin():
    try:
        claims = authenticate_http_request()  # loads the JWT, as pymacaron's endpoints do
    except PyMacaronException:  # no token, expired, invalid (a BaseException, not an Exception)
        return False
    return claims.get("sub") in ADMINS


def test_the_documented_jwt_rule_lets_only_admins_in(jwt_conf):
    app = Flask("ops-pymacaron")
    app.config.update(
        PYMACARON_ASYNC_ENABLED=False,
        PYMACARON_ASYNC_SECRET_KEY="key-ops",
        PYMACARON_ASYNC_BROKER_URL=os.environ["PMA_TEST_BROKER_URL"],
    )
    init_app(app)
    app.register_blueprint(PymacaronAsync().dashboard_blueprint(allow=is_admin), url_prefix="/ops")
    client = app.test_client()

    assert client.get("/ops/status.json").status_code == 403
    user = {"Authorization": f"Bearer {make_token('user-5')}"}
    assert client.get("/ops/status.json", headers=user).status_code == 403
    assert client.get("/ops/status.json", headers={"Authorization": "Bearer forged"}).status_code == 403
    admin = {"Authorization": f"Bearer {make_token('admin-1')}"}
    response = client.get("/ops/status.json", headers=admin)
    assert response.status_code == 200 and response.get_json()["broker"]["ok"]


def test_a_running_tasks_pymacaron_user_shows_its_id_never_its_token(jwt_conf):
    app = Flask("ops-pymacaron-user")
    app.config.update(PYMACARON_ASYNC_ENABLED=False, PYMACARON_ASYNC_SECRET_KEY="key-user")
    init_app(app)
    token = make_token("user-7")
    with app.test_request_context("/v1/pets", headers={"Authorization": f"Bearer {token}"}):
        authenticate_http_request()
        dumped = auth.dump_user()
    assert dumped["jwt"] and shown_user(dumped) == "user-7"
    assert shown_user({"jwt": dumped["jwt"], "token": token, "tenant": "t1"}) == "<dict>"
