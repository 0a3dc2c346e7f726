"""`python -m pymacaron_async`: a worker for a service, started apart from its server (containers)."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

from .conftest import alive, copy_service, make_token, service_env, wait_for


def run_cli(*args: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pymacaron_async", *args],
        cwd=cwd,
        env=env or service_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_worker_runs_the_tasks_of_a_server_that_spawns_none(servers, reports, unique, tmp_path):
    server = servers.start("--no-debug", env={"PYMACARON_ASYNC_SPAWN_WORKER": "0"})
    assert server.workers() == [] and server.started_workers() == []

    log_path = tmp_path / "cli-worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pymacaron_async",
                "--config",
                str(server.folder),
                "--concurrency",
                "1",
                "-n",
                f"cli-{uuid.uuid4().hex[:6]}@%h",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=tmp_path,
            env=service_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: " ready." in log_path.read_text(errors="replace"), 60, 0.2, "the CLI worker")
        reply = server.post(f"/v1/pets?key={unique}", make_token("user-3"), json={"name": "Rex"})
        assert reply.status_code == 200, reply.text
        seen = reports.one(f"{unique}:call", timeout=30)
        # The command became the Celery worker (same pid); the task ran in its pool.
        assert seen["ppid"] == worker.pid and "celery" in seen["argv0"]
        assert seen["user_id"] == "user-3" and seen["pet"]["is_service_class"]
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert not alive(worker.pid)


def test_cli_without_a_service(tmp_path):
    result = run_cli("--config", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no pym-config.yaml at" in result.stderr


def test_cli_finds_no_service_from_an_unrelated_folder(tmp_path):
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2
    assert "no pym-config.yaml in" in result.stderr


def test_cli_refuses_to_start_without_a_signing_key(tmp_path):
    folder = copy_service(tmp_path / "service", jwt_secret=None)
    result = run_cli("--config", str(folder), cwd=tmp_path)
    assert result.returncode == 2
    assert "PYMACARON_ASYNC_SECRET_KEY" in result.stderr and "jwt_secret" in result.stderr
