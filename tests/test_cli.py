"""`flask async worker|status|purge`, in-process (test_cli_runner) and through the entry point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import celery
import pytest
from flask import Flask

from flask_pymacaron_async._cli import async_cli
from tests.apps import basic
from tests.conftest import ROOT, _free_port


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def queue(app):
    """The basic app's queue."""
    name = app.extensions["pymacaron_async"].celery.conf.task_default_queue
    assert name == os.environ["PMA_TEST_QUEUE"]
    return name


def _status(runner) -> dict:
    result = runner.invoke(async_cli, ["status", "--json", "--timeout", "1"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_status_queue_depth_and_purge(app, runner, queue, broker_url):
    assert runner.invoke(async_cli, ["purge", "--yes", "-Q", queue]).exit_code == 0
    with app.app_context():
        for i in range(3):
            basic.record_value(i, "unused")

    status = _status(runner)
    assert status["broker"] == {"url": broker_url, "ok": True, "error": None}
    assert status["queues"][queue] == 3

    text = runner.invoke(async_cli, ["status"]).output
    assert f"Broker: {broker_url} (reachable)" in text
    assert f"  {queue}: 3 waiting" in text

    refused = runner.invoke(async_cli, ["purge", "-Q", queue], input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert _status(runner)["queues"][queue] == 3

    purged = runner.invoke(async_cli, ["purge", "-Q", queue], input="y\n")
    assert purged.exit_code == 0, purged.output
    assert f"Purged 3 tasks ({queue}: 3)." in purged.output
    assert _status(runner)["queues"][queue] == 0


def test_purge_defaults_to_the_apps_queues(app, runner, queue):
    with app.app_context():
        basic.record_value(1, "unused")
    result = runner.invoke(async_cli, ["purge", "--yes"])
    assert result.exit_code == 0, result.output
    assert f"{queue}: 1" in result.output


@pytest.mark.xfail(
    celery.VERSION < (5, 3),
    reason="Celery 5.1 / kombu 5.2 on Redis: replies to `inspect active` from a busy threads-pool worker "
    "were seen lost intermittently (the worker answers ping, its active list comes back empty)",
    strict=False,
)
def test_status_lists_live_workers_and_their_running_tasks(app, runner, queue, start_worker, unique):
    # Its own queue too, so no other worker of the run can take the slow task.
    own = f"{queue}-{unique}"
    worker = start_worker("tests.apps.basic:celery", "--pool=threads", "--concurrency=2", queue=f"{queue},{own}")
    with app.app_context():
        task_id = basic.slow.apply_async((unique, 4), queue=own).id
    deadline = time.monotonic() + 20
    running: list = []
    while time.monotonic() < deadline:
        workers = _status(runner)["workers"]
        running = [
            t for name, tasks in workers.items() if name.startswith(worker.node_name.split("@")[0] + "@") for t in tasks
        ]
        if running:
            break
        time.sleep(0.2)
    assert running and running[0]["id"] == task_id
    assert running[0]["name"] == "tests.apps.basic.slow"
    text = runner.invoke(async_cli, ["status"]).output
    assert f"tests.apps.basic.slow[{task_id}]" in text
    # Workers of other queues answer too; they are counted, not listed.
    other = start_worker("tests.apps.basic:celery", queue=queue + "-other").name.split("@")[0] + "@"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = _status(runner)
        assert not [name for name in status["workers"] if name.startswith(other)]
        if status["other_workers"]:
            break
    assert status["other_workers"] >= 1


def test_status_and_purge_exit_1_when_the_broker_is_down():
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    app = basic.create_app(PYMACARON_ASYNC_BROKER_URL=dead)
    runner = app.test_cli_runner()

    result = runner.invoke(async_cli, ["status"])
    assert result.exit_code == 1
    assert f"Broker: {dead} is unreachable:" in result.output
    assert "Connection refused" in result.output or "111" in result.output

    status = json.loads(runner.invoke(async_cli, ["status", "--json"]).output)
    assert status["broker"]["ok"] is False and status["broker"]["error"]
    assert status["workers"] == {}

    result = runner.invoke(async_cli, ["purge", "--yes"])
    assert result.exit_code == 1
    assert f"the broker {dead} is unreachable" in result.output


def test_an_app_without_the_extension_is_told_what_to_do():
    app = Flask("bare")
    result = app.test_cli_runner().invoke(async_cli, ["status"])
    assert result.exit_code == 2
    assert "did you call PymacaronAsync.init_app(app)?" in result.output


def test_worker_rejects_an_unknown_celery_option(runner):
    result = runner.invoke(async_cli, ["worker", "--no-such-option"])
    assert result.exit_code == 2
    assert "no-such-option" in result.output


# -- through the `flask` command (the flask.commands entry point) ---------------


def _flask(*args: str) -> list[str]:
    return [sys.executable, "-m", "flask", *args]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "FLASK_APP": "tests.apps.basic", **extra}
    env.pop("FLASK_RUN_FROM_CLI", None)
    return env


def test_flask_async_status_in_a_subprocess(broker_url):
    ok = subprocess.run(_flask("async", "status"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert f"Broker: {broker_url} (reachable)" in ok.stdout

    dead = f"redis://127.0.0.1:{_free_port()}/0"
    down = subprocess.run(
        _flask("async", "status"),
        cwd=ROOT,
        env=_env(PMA_TEST_BROKER_URL=dead),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1
    assert f"Broker: {dead} is unreachable" in down.stdout + down.stderr


def test_flask_async_worker_runs_the_apps_tasks(client, reports, unique, tmp_path):
    log_path = tmp_path / "worker.log"
    name = f"cli-{unique}@%h"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _flask("async", "worker", "--pool=solo", "--loglevel=INFO", "-n", name, "--without-mingle"),
            cwd=ROOT,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        output = log_path.read_text()
        assert " ready." in output, output
        assert f".> {os.environ['PMA_TEST_QUEUE']} " in output  # -Q defaults to the app's queues
        client.post(f"/items/4?key={unique}", headers={"X-User": "ada"})
        seen = reports.one(unique)
        assert seen["user"] == "ada" and seen["url"].endswith(f"/items/4?key={unique}")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log_path.read_text()
