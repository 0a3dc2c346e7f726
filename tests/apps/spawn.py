"""The app the dev-server tests run with `flask run` / `app.run()` in a subprocess.

Its task reports, to the test Redis, which process ran it and on which
broker. Environment:

- PMA_SPAWN_DEFAULT_BROKER: replaces the extension's default broker URL and
  leaves PYMACARON_ASYNC_BROKER_URL unset (the "nothing answers at the
  default URL" case); else the test broker is configured.
- PMA_SPAWN_EMBEDDED: PYMACARON_ASYNC_EMBEDDED_BROKER ("true", "false", "auto").
- PMA_SPAWN_WORKER: PYMACARON_ASYNC_SPAWN_WORKER ("true", "false").
"""

from __future__ import annotations

import json
import os
import time

import redis
from flask import Flask, current_app, g, request

from flask_pymacaron_async import PymacaronAsync, asynctask
from flask_pymacaron_async.config import DEFAULTS
from tests.apps import carry_g_user

_FLAGS = {"true": True, "false": False, "auto": "auto"}

ext = PymacaronAsync()


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="spawn-secret",
        CELERY={"task_default_queue": os.environ["PMA_TEST_QUEUE"] + "-spawn"},
    )
    if os.environ.get("PMA_SPAWN_DEFAULT_BROKER"):
        DEFAULTS["PYMACARON_ASYNC_BROKER_URL"] = os.environ["PMA_SPAWN_DEFAULT_BROKER"]
    else:
        app.config["PYMACARON_ASYNC_BROKER_URL"] = os.environ["PMA_TEST_BROKER_URL"]
    for key, env in (
        ("PYMACARON_ASYNC_EMBEDDED_BROKER", "PMA_SPAWN_EMBEDDED"),
        ("PYMACARON_ASYNC_SPAWN_WORKER", "PMA_SPAWN_WORKER"),
    ):
        if env in os.environ:
            app.config[key] = _FLAGS[os.environ[env]]
    ext.init_app(app)

    @app.route("/health")
    def health():
        return {"pid": os.getpid()}

    @app.route("/report", methods=["POST"])
    def queue_report():
        g.user = request.headers.get("X-User")
        where.delay(request.args["key"])
        return {"queued": True}

    return app


carry_g_user(ext)


@asynctask(queue=os.environ.get("PMA_TEST_QUEUE", "pma-test") + "-spawn-extra")
def where(key):
    """Report the process that runs the task, its parent, and the broker it uses."""
    state = current_app.extensions["pymacaron_async"]
    with state.celery.connection_for_read() as conn:
        broker_pid = conn.default_channel.client.info("server")["process_id"]
    seen = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "url": request.url,
        "user": g.get("user"),
        "broker_url": state.celery.conf.broker_url,
        "broker_pid": broker_pid,
        "time": time.time(),
    }
    with redis.Redis.from_url(os.environ["PMA_TEST_BROKER_URL"]) as client:
        client.rpush(f"{os.environ['PMA_TEST_PREFIX']}:{key}", json.dumps(seen))


app = create_app()
