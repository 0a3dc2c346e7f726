"""The broker module: reachability, queue sizes, and the embedded Redis."""

from __future__ import annotations

import dataclasses
import os

import pytest
import redis
from flask import Flask

from flask_pymacaron_async import PymacaronAsync, broker
from flask_pymacaron_async.config import DEFAULTS, load_settings
from tests.conftest import _free_port
from tests.faults import alive


def _dead_url() -> str:
    return f"redis://127.0.0.1:{_free_port()}/0"


def test_check_answers_none_when_the_broker_answers(broker_url):
    assert broker.check(broker_url) is None


def test_check_gives_the_reason_when_nothing_answers():
    error = broker.check(_dead_url(), timeout=0.5)
    assert error and "\n" not in error
    assert "refused" in error.lower() or "111" in error


def test_describe_masks_the_password():
    assert "secret" not in broker.describe("redis://:secret@example.com:6379/0")
    assert "example.com" in broker.describe("redis://:secret@example.com:6379/0")


ext = PymacaronAsync()


@ext.task(queue="pma-broker-test-extra")
def _routed():
    pass


def test_queue_names_are_the_default_queue_and_the_tasks_queues():
    app = Flask("queues")
    app.config.update(SECRET_KEY="s", CELERY={"task_default_queue": "main"})
    ext.init_app(app)
    assert broker.queue_names(app.extensions["pymacaron_async"].celery) == ["main", "pma-broker-test-extra"]
    app = Flask("configured")
    app.config.update(SECRET_KEY="s", CELERY={"task_queues": {"a": {}, "b": {}}})
    assert broker.queue_names(PymacaronAsync(app).celery) == ["a", "b"]


def test_queue_sizes_and_purge(broker_url, redis_client):
    app = Flask("sizes")
    queue = os.environ["PMA_TEST_QUEUE"] + "-sizes"
    app.config.update(SECRET_KEY="s", PYMACARON_ASYNC_BROKER_URL=broker_url, CELERY={"task_default_queue": queue})
    ext.init_app(app)
    celery = app.extensions["pymacaron_async"].celery
    redis_client.delete(queue)
    assert broker.queue_sizes(celery, [queue, queue + "-missing"]) == {queue: 0, queue + "-missing": 0}
    with app.app_context():
        _routed.apply_async(queue=queue)
        _routed.apply_async(queue=queue)
    assert broker.queue_sizes(celery, [queue]) == {queue: 2}
    assert broker.queue_sizes(celery, [queue], purge=True) == {queue: 2}
    assert broker.queue_sizes(celery, [queue]) == {queue: 0}


def _settings(**config):
    return load_settings({"SECRET_KEY": "s", **config})


def test_embedded_reason_auto_uses_embedded_only_for_the_default_url_when_nothing_answers(monkeypatch):
    dead = _dead_url()
    # A configured URL is never replaced, even when nothing answers there.
    assert broker.embedded_reason(_settings(PYMACARON_ASYNC_BROKER_URL=dead)) is None
    # The default URL, something answers (this machine's Redis, or the test's): use it.
    monkeypatch.setitem(DEFAULTS, "PYMACARON_ASYNC_BROKER_URL", os.environ["PMA_TEST_BROKER_URL"])
    assert broker.embedded_reason(_settings()) is None
    # The default URL, nothing answers: embedded.
    monkeypatch.setitem(DEFAULTS, "PYMACARON_ASYNC_BROKER_URL", dead)
    reason = broker.embedded_reason(_settings())
    assert reason.startswith(f"no Redis at {dead} (")
    assert broker.embedded_reason(_settings(PYMACARON_ASYNC_EMBEDDED_BROKER=False)) is None


def test_embedded_reason_true_always():
    settings = _settings(PYMACARON_ASYNC_EMBEDDED_BROKER=True, PYMACARON_ASYNC_BROKER_URL="redis://example.com/1")
    assert broker.embedded_reason(settings) == "PYMACARON_ASYNC_EMBEDDED_BROKER is True"
    assert broker.embedded_reason(dataclasses.replace(settings, embedded_broker=False)) is None


def test_embedded_redis_runs_on_a_private_socket_and_stops():
    embedded = broker.EmbeddedRedis()
    with embedded:
        pid, path = embedded.pid, embedded.socket_path
        assert embedded.url == f"redis+socket://{path}"
        assert oct(os.stat(path).st_mode & 0o777) == "0o700"
        client = redis.Redis(unix_socket_path=path)
        assert client.ping()
        info = client.info("server")
        assert int(info["tcp_port"]) == 0  # no TCP port at all
        assert info["process_id"] == pid
        assert client.config_get("save")["save"] == ""
        assert broker.check(embedded.url) is None
        client.close()
        with pytest.raises(RuntimeError, match="already started"):
            embedded.start()
    assert not alive(pid)
    assert not os.path.exists(path)
    assert embedded.pid is None
    embedded.stop()  # twice is fine


def test_a_killed_embedded_redis_leaves_no_socket():
    embedded = broker.EmbeddedRedis().start()
    path = embedded.socket_path
    os.kill(embedded.pid, 9)
    embedded.stop()
    assert not os.path.exists(path)


def test_embedded_redis_is_a_celery_broker():
    with broker.EmbeddedRedis() as embedded:
        app = Flask("embedded")
        app.config.update(SECRET_KEY="s", PYMACARON_ASYNC_BROKER_URL=embedded.url, CELERY={"task_default_queue": "q"})
        ext.init_app(app)
        celery = app.extensions["pymacaron_async"].celery
        with app.app_context():
            _routed.apply_async(queue="q")
        assert broker.queue_sizes(celery, ["q"]) == {"q": 1}


def test_embedded_redis_that_cannot_start_says_why(tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot start' >&2\nexit 1\n")
    fake.chmod(0o755)
    embedded = broker.EmbeddedRedis(executable=str(fake))
    with pytest.raises(RuntimeError, match="did not start: FATAL: cannot start"):
        embedded.start(timeout=5)
    assert embedded.pid is None
    with pytest.raises(RuntimeError, match="Could not run"):
        broker.EmbeddedRedis(executable=str(tmp_path / "missing")).start()


def test_embedded_redis_not_started_has_no_url():
    with pytest.raises(RuntimeError, match="start"):
        _ = broker.EmbeddedRedis().url
