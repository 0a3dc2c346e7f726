"""A test app with Flask-Login and the operations page at /ops, for admins only.

``/login?user=NAME`` logs a user in (a session cookie); a request with
``X-Login: NAME`` is that user too. ``admin`` is the only admin. Its tasks
report to Redis keys under the run's prefix.
"""

from __future__ import annotations

import json
import os
import time

import redis
from flask import Flask, current_app, redirect, request, url_for
from flask_login import LoginManager, current_user, login_user

from flask_pymacaron_async import PymacaronAsync
from tests.apps import users

ext = PymacaronAsync()
login_manager = LoginManager()
QUEUE = os.environ.get("PMA_TEST_QUEUE", "pma-test") + "-ops"
PREFIX = os.environ.get("PMA_TEST_PREFIX", "pma-test")


login_manager.user_loader(users.load_user)
login_manager.request_loader(users.load_from_header)


def is_admin():
    return current_user.is_authenticated and current_user.get_id() == "admin"


def create_app(**config):
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="ops-secret",
        PYMACARON_ASYNC_BROKER_URL=os.environ.get("PMA_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
        CELERY={"task_default_queue": QUEUE},
    )
    app.config.update(config)
    login_manager.init_app(app)
    login_manager.login_view = "login"
    login_manager.login_message = None  # no flash on the page the login leads back to
    ext.init_app(app)
    app.register_blueprint(ext.dashboard_blueprint(allow=is_admin), url_prefix="/ops")

    @app.route("/login")
    def login():
        user = request.args.get("user")
        if not user:
            return "Who are you? /login?user=NAME", 401
        login_user(users.User(user))
        return redirect(request.args.get("next") or url_for("pymacaron_async_dashboard.index"))

    return app


def report(key, value):
    with redis.Redis.from_url(current_app.config["PYMACARON_ASYNC_BROKER_URL"]) as client:
        client.rpush(f"{PREFIX}:{key}", json.dumps(value))


@ext.task
def slow(key, seconds):
    time.sleep(seconds)
    report(key, "done")


@ext.task
def flaky(key):
    """Fails the first time it runs for ``key``, then reports."""
    with redis.Redis.from_url(current_app.config["PYMACARON_ASYNC_BROKER_URL"]) as client:
        runs = client.incr(f"{PREFIX}:runs:{key}")
    if runs == 1:
        raise ValueError(f"first run of {key} fails")
    report(key, runs)


app = create_app()
celery = ext.celery
