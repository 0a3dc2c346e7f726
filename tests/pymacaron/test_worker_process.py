"""WorkerProcess: the worker start_celery owns, started, watched, restarted and stopped by pid."""

from __future__ import annotations

import logging
import sys

import pytest

import pymacaron_async
from pymacaron_async.process import WorkerProcess

from .conftest import alive, wait_for

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def owned():
    started: list[WorkerProcess] = []

    def make(argv, **kwargs) -> WorkerProcess:
        worker = WorkerProcess(argv, env={}, **kwargs)
        started.append(worker)
        worker.start()
        return worker

    yield make
    for worker in started:
        worker.stop()
        assert worker.pid is None or not alive(worker.pid)


def test_start_and_stop_by_pid(owned):
    worker = owned(SLEEPER)
    pid = worker.pid
    assert worker.running and alive(pid)
    worker.stop()
    assert not worker.running and not alive(pid)
    worker.stop()  # twice is fine


def test_a_worker_that_ignores_sigterm_is_killed_after_the_timeout(owned, tmp_path):
    marker = tmp_path / "ready"
    code = (
        "import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(marker)!r}).touch(); time.sleep(60)"
    )
    worker = owned([sys.executable, "-c", code], stop_timeout=0.5)
    wait_for(marker.exists, 10, 0.05, "the process to ignore SIGTERM")
    pid = worker.pid
    worker.stop()
    assert not alive(pid)


def test_restart_requests_after_the_first_restart_the_worker(owned):
    worker = owned(SLEEPER)
    first = worker.pid
    worker.request_restart()  # the reloader's first child: nothing to do
    with pytest.raises(AssertionError):
        wait_for(lambda: worker.pid != first, 0.8, 0.05)
    worker.request_restart()  # a reload
    second = wait_for(lambda: worker.pid != first and worker.pid, 15, 0.05, "a new process")
    assert not alive(first) and alive(second)


def test_keep_alive_starts_an_exited_worker_again(owned):
    worker = WorkerProcess([sys.executable, "-c", "import time; time.sleep(0.3)"], env={}, keep_alive=True)
    worker.restart_delay = 0.2
    try:
        worker.start()
        first = worker.pid
        wait_for(lambda: worker.pid != first, 15, 0.05, "a restart")
    finally:
        worker.stop()


def test_without_keep_alive_an_exited_worker_is_reported(owned, caplog):
    caplog.set_level(logging.ERROR, logger="pymacaron_async.process")
    worker = owned([sys.executable, "-c", "raise SystemExit(3)"])
    wait_for(lambda: worker.proc is None, 15, 0.05, "the exit to be noticed")
    assert "exited with code 3" in caplog.text


def test_start_celery_spawns_nothing_when_told_so(monkeypatch):
    monkeypatch.setenv("PYMACARON_ASYNC_SPAWN_WORKER", "false")
    assert pymacaron_async.start_celery(8080, True) is None
    assert pymacaron_async.process._worker is None
