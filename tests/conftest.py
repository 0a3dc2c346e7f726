"""Fixtures: a real Redis (the machine's, else an embedded one) and real workers.

Every run uses its own queue name and key prefix, so runs sharing a Redis
never see each other's tasks.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from flask_pymacaron_async import process

# The extension's pytest plugin is opt-in (no pytest11 entry point).
pytest_plugins = ["flask_pymacaron_async.testing"]

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:8]

try:  # the pymacaron service tests run in the legacy environment only
    import pymacaron  # noqa: F401
except ImportError:
    collect_ignore = ["pymacaron"]


def _redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            pass
        with redis.Redis(host=host, port=port, socket_timeout=1) as client:
            return bool(client.ping())
    except (OSError, redis.RedisError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_EMBEDDED = None


def _choose_redis() -> str:
    """The machine's Redis at 127.0.0.1:6379 when it answers, else one this run owns (stopped at its end)."""
    global _EMBEDDED
    if os.environ.get("PMA_TEST_EMBEDDED") != "1" and _redis_answers("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379/0"
    import tempfile

    from tests.faults import RedisServer

    _EMBEDDED = RedisServer(Path(tempfile.mkdtemp(prefix="pma-test-redis-")), appendonly=False).start()
    _record_pid(_EMBEDDED.proc.pid)
    return _EMBEDDED.url


def _record_pid(pid: int | None) -> None:
    """Note a process this run started, for the test that checks none outlives the run (PMA_TEST_PIDFILE)."""
    path = os.environ.get("PMA_TEST_PIDFILE")
    if path and pid is not None:
        with open(path, "a") as f:
            f.write(f"{pid}\n")


def pytest_unconfigure(config):
    if _EMBEDDED is not None:
        _EMBEDDED.stop()
        shutil.rmtree(_EMBEDDED.directory, ignore_errors=True)


# Set before any test app is imported: the apps and the workers read them.
if "PMA_TEST_BROKER_URL" not in os.environ:
    os.environ["PMA_TEST_BROKER_URL"] = _choose_redis()
os.environ["PMA_TEST_QUEUE"] = f"pma-test-{RUN_ID}"
os.environ["PMA_TEST_PREFIX"] = f"pma-test-{RUN_ID}"
BROKER_URL = os.environ["PMA_TEST_BROKER_URL"]


class Worker(process.OwnedProcess):
    """A `celery worker` subprocess, owned by the test that started it (stopped by pid at teardown)."""

    def __init__(
        self, target: str, tmp_path: Path, *extra: str, env: dict[str, str] | None = None, queue: str | None = None
    ) -> None:
        self.node_name = f"pma-{uuid.uuid4().hex[:8]}@%h"
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            target,
            "worker",
            "-n",
            self.node_name,
            "-Q",
            queue or os.environ["PMA_TEST_QUEUE"],
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            *(extra or ("--pool=solo",)),
        ]
        super().__init__(
            args,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            log_path=tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log",
            name="worker",
        )
        self.start()
        _record_pid(self.pid)

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop it by pid; when it had to be killed, kill its pool processes too (they would outlive it)."""
        from tests.faults import alive, children

        pool = children(self.pid) if self.alive() else []
        code = super().stop(grace)
        for pid in pool:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        return code

    def wait_ready(self, timeout: float = 30) -> Worker:
        self.wait_for_output(" ready.", timeout)
        return self


@pytest.fixture(scope="session")
def broker_url() -> str:
    return BROKER_URL


def _port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq_url():
    """The machine's RabbitMQ, on a vhost of this run (deleted at the end) when rabbitmqctl can make one."""
    if not _port_answers("127.0.0.1", 5672):
        pytest.skip("no RabbitMQ answers at 127.0.0.1:5672 (guest/guest): the RabbitMQ tests need one")
    ctl = shutil.which("rabbitmqctl")
    vhost = f"pma-test-{RUN_ID}"
    made = False
    if ctl:
        made = subprocess.run([ctl, "add_vhost", vhost], capture_output=True, timeout=120).returncode == 0
        if made:
            subprocess.run(
                [ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], capture_output=True, timeout=120
            )
    if not made:
        # The default vhost: the tests name their queues per run and delete them.
        yield "amqp://guest:guest@127.0.0.1:5672//"
        return
    yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    subprocess.run([ctl, "delete_vhost", vhost], capture_output=True, timeout=120)


# Bindings of Celery's own exchanges, shared by every Celery app on a Redis:
# the events of `worker -E` and Flower, the remote control of `celery inspect`.
_SHARED_BINDINGS = ("_kombu.binding.celeryev", "_kombu.binding.celery.pidbox", "_kombu.binding.reply.celery.pidbox")


@pytest.fixture(scope="session", autouse=True)
def redis_client():
    client = redis.Redis.from_url(BROKER_URL)
    before = {key: client.smembers(key) for key in _SHARED_BINDINGS}
    bindings_before = set(client.scan_iter("_kombu.binding*"))
    yield client
    # Everything this run wrote: its queues, their dead letters and delayed
    # sets, the reports under its prefix, and kombu's bindings of its queues.
    keys = [
        *client.scan_iter(f"pma-test-{RUN_ID}*"),
        *client.scan_iter(f"_kombu.binding*pma-test-{RUN_ID}*"),
        os.environ["PMA_TEST_QUEUE"],
    ]
    # The queues its workers, Flower and `celery inspect` bound to Celery's
    # exchanges (a member is routing key, pattern and queue, \x06\x16-separated).
    for binding, members in before.items():
        for member in client.smembers(binding) - members:
            client.srem(binding, member)
            keys.append(member.split(b"\x06\x16")[-1])
    # Bindings that appeared during the run (an exchange a test queue named
    # outright, "mail" say; kombu 5.7's binding deadlines): the run's too.
    for key in set(client.scan_iter("_kombu.binding*")) - bindings_before:
        if client.type(key) == b"set":
            keys.extend(member.split(b"\x06\x16")[-1] for member in client.smembers(key))
        keys.append(key)
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(autouse=True)
def _close_celery_pools():
    """Close the connections the test's apps opened, and collect what the test left.

    A socket or file left open warns when it is collected (an error here):
    collected now, the warning points at the test that left it, not at
    whichever test happens to run when the garbage collector does.
    """
    yield
    from flask_pymacaron_async._state import states

    for state in states():
        state.celery.close()
        # The Redis result backend keeps a client and a pub/sub connection of
        # its own; a result it waited for unsubscribes when collected, on a
        # new connection, unless the backend forgets it first.
        backend = state.celery.backend
        consumer = getattr(backend, "result_consumer", None)
        try:
            if consumer is not None and hasattr(consumer, "subscribed_to"):
                consumer.subscribed_to.clear()
                consumer.stop()
                # Celery 5.1 unsubscribes on a stopped pub/sub all the same (reconnecting).
                consumer._pubsub = None
            client = vars(backend).get("client")
            if client is not None:
                client.connection_pool.disconnect()
        except Exception as exc:  # a test stopped that Redis: nothing left to close
            print(f"closing the result backend of {state!r}: {exc!r}")
    gc.collect()


class Reports:
    """What tasks wrote to Redis under the run's prefix."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.prefix = os.environ["PMA_TEST_PREFIX"]

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def get(self, name: str, count: int = 1, timeout: float = 15) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            items = self.client.lrange(self.key(name), 0, -1)
            if len(items) >= count:
                return [json.loads(i) for i in items]
            time.sleep(0.05)
        raise AssertionError(f"no report {name!r} after {timeout}s (got {len(items)} of {count})")

    def one(self, name: str, timeout: float = 15):
        return self.get(name, 1, timeout)[0]

    def none(self, name: str, wait: float = 1.0) -> bool:
        time.sleep(wait)
        return self.client.llen(self.key(name)) == 0


@pytest.fixture
def reports(redis_client) -> Reports:
    return Reports(redis_client)


@pytest.fixture
def unique() -> str:
    """A name unique to this test, for report keys."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def start_worker(tmp_path):
    """Start `celery -A <target> worker` subprocesses; all are killed by pid at teardown."""
    started: list[Worker] = []

    def start(target: str = "tests.apps.basic:celery", *extra: str, env=None, queue=None, ready=True) -> Worker:
        worker = Worker(target, tmp_path, *extra, env=env, queue=queue)
        started.append(worker)
        return worker.wait_ready() if ready else worker

    yield start
    for worker in started:
        worker.stop()
        assert worker.proc.poll() is not None


@pytest.fixture(scope="module")
def module_worker(tmp_path_factory):
    """One worker for the basic test app shared by a test module."""
    worker = Worker("tests.apps.basic:celery", tmp_path_factory.mktemp("worker")).wait_ready()
    yield worker
    worker.stop()


@pytest.fixture
def app():
    """A fresh instance of the basic test app (pytest-flask's `client` uses it)."""
    from tests.apps.basic import create_app

    return create_app()
