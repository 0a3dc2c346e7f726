"""Faults around a task: broker down, failing tasks, time limits, and secrets.

Real processes throughout: a redis-server each test owns (stopped, paused
with SIGSTOP, started again), real `celery worker` processes, and MONITOR on
Redis to see every byte the app and the worker write to it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import socket
import threading
import time

import pytest

from flask_pymacaron_async import AsyncUnavailable
from tests.apps import reliable
from tests.faults import RedisServer, free_port, unique_queue, wait_for

pytestmark = pytest.mark.slow

# PYMACARON_ASYNC_PUBLISH_TIMEOUT is 2 s by default; the bound is generous
# because other tests share the machine.
BOUND = 2.0 + 3.0


@pytest.fixture
def server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.resume()
    server.stop()


def _call(app, run="x"):
    """Queue one task from a request; (seconds taken, exception or None)."""
    started = time.monotonic()
    with app.test_request_context("/call"):
        try:
            reliable.work.delay(run, 1, 0)
        except AsyncUnavailable as exc:
            return time.monotonic() - started, exc
    return time.monotonic() - started, None


# -- broker down ------------------------------------------------------------


@pytest.mark.parametrize("results", [False, True], ids=["no-result-backend", "result-backend-down-too"])
def test_nothing_listening_raises_async_unavailable_quickly(results):
    url = f"redis://127.0.0.1:{free_port()}/0"
    app = reliable.create_app(broker=url, queue=unique_queue(), PYMACARON_ASYNC_RESULT_BACKEND=url if results else None)
    for _ in range(3):
        took, exc = _call(app)
        assert isinstance(exc, AsyncUnavailable), exc
        assert "broker is unavailable" in str(exc) and "tests.apps.reliable.work" in str(exc)
        assert took < BOUND
    print(f"\nnothing listening: AsyncUnavailable after {took * 1000:.0f} ms")


@pytest.mark.parametrize("results", [False, True], ids=["no-result-backend", "result-backend-on-it-too"])
def test_redis_stopped_mid_run_then_back(server, results):
    queue = unique_queue()
    app = reliable.create_app(
        broker=server.url, queue=queue, PYMACARON_ASYNC_RESULT_BACKEND=server.url if results else None
    )
    assert _call(app)[1] is None
    server.stop()
    took, exc = _call(app)
    assert isinstance(exc, AsyncUnavailable) and took < BOUND
    print(f"\nredis stopped: AsyncUnavailable after {took * 1000:.0f} ms")
    server.start()
    # The same app, not restarted: the next call queues normally.
    took, exc = _call(app)
    assert exc is None and took < BOUND
    assert server.client().llen(queue) == 2


def test_hung_broker_fails_within_the_publish_timeout(server):
    """A broker that accepts connections but never answers (SIGSTOP) fails the call, no hang."""
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, PYMACARON_ASYNC_PUBLISH_TIMEOUT=1.0)
    assert _call(app)[1] is None
    server.pause()
    took, exc = _call(app)
    server.resume()
    assert isinstance(exc, AsyncUnavailable), exc
    assert 0.5 < took < 1.0 + 3.0
    print(f"\nhung broker (PUBLISH_TIMEOUT=1): AsyncUnavailable after {took * 1000:.0f} ms")
    assert _call(app)[1] is None


def test_fallback_inline_runs_the_task_in_the_caller(server, caplog):
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, PYMACARON_ASYNC_FALLBACK="inline")
    reliable.NOTES.clear()
    server.stop()
    with caplog.at_level(logging.WARNING), app.test_request_context("/fallback"):
        started = time.monotonic()
        result = reliable.note.delay("inline-1")
        took = time.monotonic() - started
    assert reliable.NOTES == ["inline-1"]
    assert result.successful()
    assert took < BOUND
    warnings = [r for r in caplog.records if "running tests.apps.reliable.note inline" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    server.start()
    with app.test_request_context("/fallback"):
        reliable.note.delay("queued")
    assert reliable.NOTES == ["inline-1"]
    assert server.client().llen(queue) == 1


# -- failures are visible and bounded ----------------------------------------


@pytest.fixture
def failing(server, start_worker):
    """An app and a prefork worker (time limits need one) on the test's Redis."""
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, prefix="flt")
    env = {"PMA_REL_BROKER_URL": server.url, "PMA_REL_QUEUE": queue, "PMA_REL_PREFIX": "flt"}
    worker = start_worker("tests.apps.reliable:celery", "--pool=prefork", "-c", "2", env=env, queue=queue)
    return app, worker, server.client()


def _failed(client, task_id):
    return [f for f in map(json.loads, client.lrange("flt:failed", 0, -1)) if f["id"] == task_id]


def test_task_that_raises_is_logged_reported_and_not_retried(failing):
    app, worker, client = failing
    with app.test_request_context("/orders/7?x=1"):
        from flask import g

        g.user = "user-7"
        task_id = reliable.fail.delay("raise").id
    failed = wait_for(lambda: _failed(client, task_id), 15, what="task_failed")
    assert failed == [{"id": task_id, "name": "tests.apps.reliable.fail", "exception": "ValueError('boom')"}]
    line = re.search(rf"reliable\.fail\[{task_id}\] failed: ValueError\('boom'\) \((.*)\)", worker.log())
    assert line, worker.log()
    assert "url=http://localhost/orders/7?x=1, user=user-7, request_id=" in line.group(1)
    time.sleep(1.5)
    assert client.llen("flt:raise:runs") == 1  # no retry unless the task asks


def test_autoretry_and_backoff_pass_through_to_celery(failing):
    app, worker, client = failing
    with app.test_request_context("/flaky"):
        task_id = reliable.flaky.delay("retry").id
    wait_for(lambda: _failed(client, task_id), 20, what="the final failure")
    runs = [float(t) for t in client.lrange("flt:retry:runs", 0, -1)]
    assert len(runs) == 3  # the call and max_retries=2
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert all(gap > 0.8 for gap in gaps), gaps  # retry_backoff=1, retry_backoff_max=1: 1 s each
    assert len(_failed(client, task_id)) == 1  # retries are not failures, the last attempt is


def test_soft_time_limit_stops_and_reports(failing):
    app, worker, client = failing
    with app.test_request_context("/soft"):
        task_id = reliable.soft_limited.delay("soft").id
    failed = wait_for(lambda: _failed(client, task_id), 15, what="task_failed")
    assert "SoftTimeLimitExceeded" in failed[0]["exception"]
    time.sleep(1)
    assert client.llen("flt:soft:started") == 1 and client.llen("flt:soft:done") == 0
    assert re.search(
        rf"soft_limited\[{task_id}\] failed: SoftTimeLimitExceeded.*url=http://localhost/soft", worker.log()
    )


def test_hard_time_limit_kills_reports_and_does_not_rerun(failing):
    app, worker, client = failing
    with app.test_request_context("/hard"):
        from flask import g

        g.user = "user-9"
        task_id = reliable.hard_limited.delay("hard").id
    failed = wait_for(lambda: _failed(client, task_id), 15, what="task_failed")
    assert "TimeLimitExceeded(0.5" in failed[0]["exception"]
    time.sleep(2)
    assert client.llen("flt:hard:started") == 1 and client.llen("flt:hard:done") == 0
    log = worker.log()
    assert f"Hard time limit (0.5s) exceeded for tests.apps.reliable.hard_limited[{task_id}]" in log
    assert re.search(
        rf"hard_limited\[{task_id}\] failed: TimeLimitExceeded.*url=http://localhost/hard, user=user-9", log
    )
    assert worker.alive()
    assert client.hlen("unacked") == 0


# -- secrets stay out of the broker and the logs ------------------------------


class Monitor:
    """Every command Redis receives, through MONITOR on a raw socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.sock.settimeout(0.2)
        self.data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                return
            self.data += chunk

    def stop(self) -> bytes:
        time.sleep(0.3)
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return bytes(self.data)


def _decoded_base64(text: str) -> str:
    """The text of every base64 run in ``text`` (message bodies travel base64-encoded)."""
    found = []
    for run in re.findall(r"[A-Za-z0-9+/]{16,}={0,2}", text):
        try:
            found.append(base64.b64decode(run + "=" * (-len(run) % 4)).decode("utf-8", "replace"))
        except (binascii.Error, ValueError):
            continue
    return "\n".join(found)


def test_secrets_stay_out_of_the_broker_and_the_logs(server, start_worker, caplog):
    token = "tok-" + "S3cr3tBearer" * 3
    cookie = "cookie-" + "S3cr3tSession" * 3
    password = "pw-" + "S3cr3tPassword" * 3
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, prefix="sec")
    env = {"PMA_REL_BROKER_URL": server.url, "PMA_REL_QUEUE": queue, "PMA_REL_PREFIX": "sec"}
    worker = start_worker("tests.apps.reliable:celery", "--loglevel=DEBUG", "--pool=solo", env=env, queue=queue)
    client = server.client()
    monitor = Monitor(server.port)
    web = app.test_client()
    web.set_cookie(*(("session", cookie) if _cookie_takes_key_first() else ("localhost", "session", cookie)))
    with caplog.at_level(logging.DEBUG):
        response = web.post(
            "/signup/sec",
            headers={"Authorization": f"Bearer {token}", "X-Request-Id": "rid-sec"},
            data={"password": password, "name": "Ada"},
        )
        assert response.status_code == 200
        seen = wait_for(lambda: client.lrange("sec:sec:whoami", 0, -1), 15, what="the task ran")
        wait_for(lambda: "fail_as_user" in worker.log() and "failed: RuntimeError" in worker.log(), 15)
    sent = monitor.stop().decode("utf-8", "replace")
    assert json.loads(seen[0]) == {"user": "user-42", "url": "http://localhost/signup/sec"}
    assert "LPUSH" in sent.upper() and len(sent) > 1000  # MONITOR saw the messages
    logs = worker.log() + "\n".join(r.getMessage() for r in caplog.records)
    for secret in (token, cookie, password, "S3cr3t"):
        assert secret not in sent, f"{secret} written to Redis"
        assert secret not in _decoded_base64(sent), f"{secret} written to Redis (base64)"
        assert secret not in logs, f"{secret} in the logs"
    failure = re.search(r"fail_as_user\[([0-9a-f-]+)\] failed: (.*)", worker.log())
    assert failure, worker.log()
    assert "url=http://localhost/signup/sec" in failure.group(2) and "user=user-42" in failure.group(2)


def _cookie_takes_key_first() -> bool:
    """Werkzeug 2.3+ dropped the server_name argument of ``set_cookie``."""
    import inspect

    from flask.testing import FlaskClient

    return "server_name" not in inspect.signature(FlaskClient.set_cookie).parameters
