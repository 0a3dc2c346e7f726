"""A test app with Flask-Login and no user hooks: current_user travels by itself."""

from __future__ import annotations

import json
import os

import redis
from flask import Flask, current_app, request
from flask_login import LoginManager, current_user

from flask_pymacaron_async import PymacaronAsync
from tests.apps import users

ext = PymacaronAsync()
login_manager = LoginManager()


login_manager.user_loader(users.load_user)
login_manager.request_loader(users.load_from_header)


def create_app():
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="login-secret",
        PYMACARON_ASYNC_BROKER_URL=os.environ.get("PMA_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
        CELERY={"task_default_queue": os.environ.get("PMA_TEST_QUEUE", "pma-test") + "-login"},
    )
    login_manager.init_app(app)
    ext.init_app(app)

    @app.route("/whoami")
    def whoami():
        who.delay(request.args["key"])
        return {"user": current_user.get_id()}

    return app


@ext.task
def who(key):
    seen = {
        "authenticated": current_user.is_authenticated,
        "id": current_user.get_id(),
        "cls": type(current_user._get_current_object()).__name__,
    }
    with redis.Redis.from_url(current_app.config["PYMACARON_ASYNC_BROKER_URL"]) as client:
        client.rpush(f"{os.environ.get('PMA_TEST_PREFIX', 'pma-test')}:{key}", json.dumps(seen))


app = create_app()
celery = ext.celery
