"""The Flask app the reliability and fault tests run real workers for.

Configured from the environment, so each test points its worker at its own
Redis and queue: PMA_REL_BROKER_URL, PMA_REL_QUEUE, PMA_REL_VISIBILITY
(seconds), PMA_REL_TRANSPORT_OPTIONS (JSON broker_transport_options),
PMA_REL_CELERY and PMA_REL_CONFIG (JSON: more Celery settings, more app config) and
PMA_REL_PREFIX (where tasks write their reports), falling back
to the test run's PMA_TEST_* values. Tasks write what they did to Redis keys
``<prefix>:<run>:<what>``, in the broker's Redis unless PMA_REL_REPORT_URL
names another one (a test that stops the broker's Redis needs its tasks to
go on recording).
"""

from __future__ import annotations

import json
import os
import time

import redis
from flask import Flask, current_app, g, request, session

from flask_pymacaron_async import PymacaronAsync
from flask_pymacaron_async.signals import message_dead_lettered, task_failed
from tests.apps import carry_g_user

ext = PymacaronAsync()

#: Calls of :func:`note` that ran in this process (the inline fallback).
NOTES: list[str] = []

_CLIENTS: dict[str, redis.Redis] = {}


def settings_from_env() -> dict:
    return {
        "broker": os.environ.get("PMA_REL_BROKER_URL")
        or os.environ.get("PMA_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
        "queue": os.environ.get("PMA_REL_QUEUE") or os.environ.get("PMA_TEST_QUEUE", "pma-test"),
        "visibility": float(os.environ.get("PMA_REL_VISIBILITY", "3600")),
        "prefix": os.environ.get("PMA_REL_PREFIX") or os.environ.get("PMA_TEST_PREFIX", "pma-test"),
        "grace": float(os.environ.get("PMA_REL_GRACE", "600")),
        "secret": os.environ.get("PMA_REL_SECRET", "reliable-secret"),
        "fallbacks": [k for k in os.environ.get("PMA_REL_FALLBACKS", "").split(",") if k],
        "dead_max": int(os.environ.get("PMA_REL_DEAD_MAX", "10000")),
        "keep_failed": os.environ.get("PMA_REL_KEEP_FAILED", "1") == "1",
        # Where tasks write their reports (the broker itself when it is Redis).
        "reports": os.environ.get("PMA_REL_REPORT_URL"),
        # broker_transport_options, as JSON (a Sentinel's master_name).
        "transport_options": json.loads(os.environ.get("PMA_REL_TRANSPORT_OPTIONS") or "{}"),
        # More Celery settings, and more app config, as JSON.
        "celery": json.loads(os.environ.get("PMA_REL_CELERY") or "{}"),
        "config": json.loads(os.environ.get("PMA_REL_CONFIG") or "{}"),
        # Sign with Flask's SECRET_KEY and SECRET_KEY_FALLBACKS instead of the extension's own key.
        "flask_keys": os.environ.get("PMA_REL_FLASK_KEYS") == "1",
    }


def create_app(
    broker=None,
    queue=None,
    visibility=None,
    prefix=None,
    grace=None,
    reports=None,
    transport_options=None,
    celery=None,
    **config,
):
    env = settings_from_env()
    options = env["transport_options"] if transport_options is None else transport_options
    app = Flask(__name__)
    app.config.update(
        PYMACARON_ASYNC_SECRET_KEY=env["secret"],
        PYMACARON_ASYNC_SECRET_KEY_FALLBACKS=env["fallbacks"],
        PYMACARON_ASYNC_DEAD_LETTER_MAX=env["dead_max"],
        PYMACARON_ASYNC_DEAD_LETTER_FAILED=env["keep_failed"],
        SECRET_KEY="flask-session-key",
        PYMACARON_ASYNC_BROKER_URL=broker or env["broker"],
        PYMACARON_ASYNC_VISIBILITY_TIMEOUT=visibility or env["visibility"],
        PYMACARON_ASYNC_DEPLOY_GRACE=env["grace"] if grace is None else grace,
        CELERY={
            "task_default_queue": queue or env["queue"],
            **({"broker_transport_options": options} if options else {}),
        },
        REPORT_PREFIX=prefix or env["prefix"],
        REPORT_URL=reports or env["reports"] or broker or env["broker"],
    )
    if env["flask_keys"]:
        app.config.update(
            PYMACARON_ASYNC_SECRET_KEY=None,
            PYMACARON_ASYNC_SECRET_KEY_FALLBACKS=[],
            SECRET_KEY=env["secret"],
            SECRET_KEY_FALLBACKS=env["fallbacks"],
        )
    app.config["CELERY"].update(env["celery"] if celery is None else celery)
    app.config.update(env["config"])
    app.config.update(config)
    ext.init_app(app)

    @app.route("/queue/<run>/<int:n>", methods=["POST"])
    def queue_one(run, n):
        count.delay(run, n)
        return {"queued": n}

    @app.route("/signup/<run>", methods=["POST"])
    def signup(run):
        # What a real endpoint holds and must not leak: the bearer token, the
        # session cookie and the password field.
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        password = request.form["password"]
        assert token and password and request.cookies.get("session")
        session.get("anything")
        g.user = "user-42"
        whoami.delay(run)
        fail_as_user.delay(run)
        return {"ok": True}

    return app


carry_g_user(ext)


def client() -> redis.Redis:
    url = current_app.config["REPORT_URL"]
    if url not in _CLIENTS:
        _CLIENTS[url] = redis.Redis.from_url(url)
    return _CLIENTS[url]


def key(run: str, what: str) -> str:
    return f"{current_app.config['REPORT_PREFIX']}:{run}:{what}"


@ext.task
def work(run, n, ms):
    """A task that takes ``ms`` milliseconds and records that ``n`` ran."""
    c = client()
    c.rpush(key(run, "started"), json.dumps([n, os.getpid()]))
    if ms:
        time.sleep(ms / 1000)
    with c.pipeline() as pipe:
        pipe.sadd(key(run, "done"), n)
        pipe.rpush(key(run, "runs"), n)
        pipe.execute()


@ext.task
def count(run, n):
    """Record that ``n`` ran, in one round trip."""
    with client().pipeline(transaction=False) as pipe:
        pipe.sadd(key(run, "done"), n)
        pipe.rpush(key(run, "runs"), n)
        pipe.execute()


@ext.task
def long(run, seconds):
    client().rpush(key(run, "started"), os.getpid())
    time.sleep(seconds)
    client().rpush(key(run, "done"), os.getpid())


@ext.task
def fail(run):
    client().rpush(key(run, "runs"), time.time())
    raise ValueError("boom")


@ext.task(autoretry_for=(ValueError,), max_retries=2, retry_backoff=1, retry_backoff_max=1, retry_jitter=False)
def flaky(run):
    client().rpush(key(run, "runs"), time.time())
    raise ValueError("flaky")


@ext.task(soft_time_limit=0.5, time_limit=10)
def soft_limited(run):
    client().rpush(key(run, "started"), time.time())
    time.sleep(5)
    client().rpush(key(run, "done"), time.time())


@ext.task(time_limit=0.5)
def hard_limited(run):
    client().rpush(key(run, "started"), time.time())
    time.sleep(5)
    client().rpush(key(run, "done"), time.time())


@ext.task
def whoami(run):
    client().rpush(key(run, "whoami"), json.dumps({"user": g.get("user"), "url": request.url}))


@ext.task
def who(run, n):
    """Record ``n`` with the user and URL it ran with."""
    client().rpush(key(run, "who"), json.dumps([n, g.get("user"), request.url]))


@ext.task
def fail_as_user(run):
    raise RuntimeError(f"failed for {g.get('user')}")


@ext.task
def note(run):
    NOTES.append(run)


@ext.task
def fails_until_allowed(run):
    """Fails until the key ``<prefix>:<run>:allow`` exists; each run is recorded."""
    c = client()
    c.rpush(key(run, "runs"), time.time())
    if not c.exists(key(run, "allow")):
        raise RuntimeError("not allowed yet")
    c.sadd(key(run, "done"), 1)


@ext.task
def crash(run):
    """Kills the process that runs it (a poison message): recorded first, never done."""
    import signal

    client().rpush(key(run, "runs"), os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


@ext.task
def fail_after(run, seconds):
    """Records its run, waits, then fails (a test stops the broker meanwhile)."""
    client().rpush(key(run, "runs"), time.time())
    time.sleep(seconds)
    raise RuntimeError("failed late")


# A rolling deploy: workers started with PMA_REL_VERSION=1 run the previous
# release, which lacks `added_in_v2` and takes one argument less in `changed`.
VERSION = os.environ.get("PMA_REL_VERSION", "2")

if VERSION == "2":

    @ext.task
    def added_in_v2(run, n):
        count(run, n)  # called directly: runs here

    @ext.task
    def changed(run, n, extra):
        count(run, n)

else:

    @ext.task
    def changed(run, n):  # type: ignore[no-redef]
        count(run, n)


app = create_app()
celery = ext.celery


@message_dead_lettered.connect
def _report_dead_letter(sender, task_name, task_id, reason, dead_letter_id, **extra):
    """Worker side: record ``message_dead_lettered`` where the tests can see it."""
    if "REPORT_PREFIX" in sender.config:
        with sender.app_context():
            client().rpush(
                f"{sender.config['REPORT_PREFIX']}:dead",
                json.dumps({"id": dead_letter_id, "task": task_name, "task_id": task_id, "reason": reason}),
            )


@task_failed.connect
def _report_failure(sender, task_name, task_id, exception, **extra):
    """Worker side: record ``task_failed`` where the tests can see it."""
    if task_name.startswith(f"{__name__}.") and "REPORT_PREFIX" in sender.config:
        with sender.app_context():
            client().rpush(
                f"{sender.config['REPORT_PREFIX']}:failed",
                json.dumps({"id": task_id, "name": task_name, "exception": repr(exception)}),
            )
