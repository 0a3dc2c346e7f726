"""Celery's own tools beside the extension: Flower, ``celery inspect``, ``celery call``, ``send_task``.

Real processes: a worker of tests/apps/basic.py (with events for Flower), a
Flower server, and the ``celery`` command line, all started by the tests and
stopped by pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from celery import Celery

from flask_pymacaron_async import _context as context
from flask_pymacaron_async import process
from tests.apps import basic
from tests.conftest import ROOT, _free_port
from tests.faults import wait_for

CELERY = [sys.executable, "-m", "celery", "-A", "tests.apps.basic:celery"]


def _celery(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CELERY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def flower(tmp_path):
    pytest.importorskip("flower", reason="the Flower test needs Flower (modern environment)")
    port = _free_port()
    server = process.OwnedProcess(
        [*CELERY, "flower", f"--port={port}", "--address=127.0.0.1"],
        # Flower 2 closes its HTTP API to anonymous callers unless told otherwise.
        env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"},
        cwd=ROOT,
        log_path=tmp_path / "flower.log",
        name="Flower",
    ).start()
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/healthcheck", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_for(answers, 60, 0.2, "Flower to answer")
        yield url
    finally:
        server.stop()


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def test_flower_shows_the_real_arguments_and_results_and_no_context(start_worker, flower, app):
    start_worker("tests.apps.basic:celery", "--pool=solo", "-E")
    with app.test_request_context("/flower", headers={"X-User": "ada"}):
        result = basic.add.delay(2, 3)
    tasks = wait_for(
        lambda: (t := _get(f"{flower}/api/tasks")) and result.id in t and t[result.id].get("state") == "SUCCESS" and t,
        60,
        0.5,
        "Flower to see the task succeed",
    )
    shown = tasks[result.id]
    assert shown["name"] == "tests.apps.basic.add"
    assert shown["args"] == "(2, 3)" and shown["kwargs"] == "{}" and shown["result"] == "5"
    everything = json.dumps(tasks)
    assert context.HEADER not in everything and "ada" not in everything


def test_celery_inspect_and_call(start_worker, reports, unique):
    worker = start_worker()
    pong = _celery("inspect", "ping", "-d", worker.node_name.replace("%h", os.uname().nodename))
    assert pong.returncode == 0 and "pong" in pong.stdout, pong.stdout + pong.stderr
    registered = _celery("inspect", "registered", "-d", worker.node_name.replace("%h", os.uname().nodename))
    assert "tests.apps.basic.record_value" in registered.stdout
    # `celery call` publishes through the app's Celery: the message gets a context
    # (of no request: the command line has none) and runs.
    called = _celery("call", "tests.apps.basic.record_value", "--args", json.dumps(["called", unique]))
    assert called.returncode == 0, called.stderr
    assert reports.one(unique)["value"] == "called"


def test_a_message_from_a_plain_celery_is_kept_with_a_clear_reason(start_worker, redis_client, unique):
    """No context: the worker refuses it, says why on one line, and keeps it as a dead letter."""
    queue = f"{basic.celery.conf.task_default_queue}-{unique}"
    worker = start_worker(queue=queue)
    plain = Celery("another-service", broker=basic.celery.conf.broker_url, set_as_current=False)
    try:
        sent = plain.send_task("tests.apps.basic.record_value", ("plain", unique), queue=queue, serializer="json")
    finally:
        plain.close()
    wait_for(lambda: redis_client.llen(f"{queue}.pma.dead"), 15, what="the dead letter")
    meta = json.loads(redis_client.hget(f"{queue}.pma.dead.meta", sent.id))
    assert "no context snapshot" in meta["reason"] and "plain Celery" in meta["reason"]
    time.sleep(0.2)
    lines = [line for line in worker.log().splitlines() if sent.id in line and "Rejected" in line]
    assert len(lines) == 1 and "kept as dead letter" in lines[0]
