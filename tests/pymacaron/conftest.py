"""Fixtures for the pymacaron service tests: the test service, run as `python server.py --port N`.

The service in ``service/`` is copied to a temporary folder first: pymacaron
writes generated code next to its swagger files. Servers and workers are
found by pid (the server's ``Popen``, then its descendants in /proc) and
stopped by pid.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import jwt
import pytest
import requests

from tests.conftest import BROKER_URL, ROOT
from tests.faults import wait_for

SERVICE = Path(__file__).resolve().parent / "service"
JWT_SECRET = "petshop-test-jwt-secret-not-for-production"
JWT_ISSUER = "https://petshop.example.test/"
JWT_AUDIENCE = "petshop-tests"
WORKER_MARK = "pymacaron_async.worker:celery"
# Tasks of this run's servers go to their own queue.
QUEUE = f"{os.environ['PMA_TEST_QUEUE']}-pymacaron"


def make_token(user_id: str = "user-42", **claims) -> str:
    now = int(time.time())
    payload = {"iss": JWT_ISSUER, "sub": user_id, "aud": JWT_AUDIENCE, "iat": now, "exp": now + 3600, **claims}
    token = jwt.encode(payload, JWT_SECRET, algorithm="HS256")
    return token.decode("ascii") if isinstance(token, bytes) else token


def copy_service(dest: Path, **config) -> Path:
    """A copy of the test service, with ``config`` keys replaced in its pym-config.yaml."""
    shutil.copytree(SERVICE, dest, ignore=shutil.ignore_patterns("__pycache__", "*_models.py", "*_app.py"))
    if config:
        path = dest / "pym-config.yaml"
        lines = [line for line in path.read_text().splitlines() if line.split(":")[0] not in config]
        lines += [f"{key}: {value}" for key, value in config.items() if value is not None]
        path.write_text("\n".join(lines) + "\n")
    return dest


def service_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PMA_TEST_BROKER_URL": BROKER_URL,
        "PYMACARON_ASYNC_BROKER_URL": BROKER_URL,
        "PYMACARON_ASYNC_QUEUE": QUEUE,
        "NO_ERROR_REPORTING": "1",
    }
    for name in ("PYMACARON_ASYNC_SECRET_KEY", "PYMACARON_ASYNC_SPAWN_WORKER", "WERKZEUG_RUN_MAIN", "PYM_ENV"):
        env.pop(name, None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes, by pid ------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None when it no longer exists."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] not in ("Z", "X"):
                children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Server:
    """`python server.py --port N` for a copy of the test service, owned by the test."""

    def __init__(self, folder: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # A background job of a non-interactive shell starts with SIGINT
        # ignored, and children inherit that: give the server Python's default.
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.proc = subprocess.Popen(
            [sys.executable, "server.py", "--port", str(self.port), *args],
            cwd=folder,
            env=env or service_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        self.seen: set[int] = set()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> Server:
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-5000:]}")
            try:
                return requests.get(f"{self.url}/ping", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(answers, timeout, 0.2, f"the server on port {self.port}")
        return self

    def processes(self) -> list[int]:
        pids = descendants(self.pid)
        self.seen.update(pids)
        return pids

    def workers(self) -> list[int]:
        """Main processes of the Celery workers below the server (not their pool processes)."""
        pids = self.processes()
        marked = {pid for pid in pids if WORKER_MARK in cmdline(pid)}
        return sorted(pid for pid in marked if (_stat(pid) or ("", 0))[1] not in marked)

    def started_workers(self) -> list[int]:
        """Pids of every worker start_celery started, from the server's log."""
        return [int(pid) for pid in re.findall(r"Started Celery worker \(pid (\d+)\)", self.log())]

    def one_worker(self, timeout: float = 30) -> int:
        """The only worker of the server, once there is exactly one and it is ready."""
        workers = wait_for(lambda: (w := self.workers()) and len(w) == 1 and w, timeout, 0.2, "exactly one worker")
        wait_for(lambda: " ready." in self.log(), timeout, 0.2, "the worker to be ready")
        return workers[0]

    def post(self, path: str, token: str | None = None, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(f"{self.url}{path}", headers=headers, timeout=30, **kwargs)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        """Stop the server with ``sig``; return its exit code."""
        self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server did not stop on signal {sig}:\n{self.log()[-5000:]}") from None
        self._log.close()
        return self.proc.returncode

    def cleanup(self) -> list[int]:
        """Kill (by pid) whatever the server left running; return those pids."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()
        left = [pid for pid in self.seen if alive(pid)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


class Servers:
    """The servers a test (or a module) started; stopped, and checked to leave nothing behind."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[Server] = []

    def start(self, *args: str, config: dict | None = None, env: dict | None = None, ready: bool = True) -> Server:
        """Start `python server.py --port N *args` for a copy of the service (``config``: pym-config keys)."""
        folder = copy_service(self.base / f"service-{uuid.uuid4().hex[:6]}", **(config or {}))
        log_path = self.base / f"server-{len(self.started)}.log"
        server = Server(folder, log_path, *args, env=service_env(**(env or {})))
        self.started.append(server)
        return server.wait_ready() if ready else server

    def close(self) -> None:
        problems = []
        for server in self.started:
            try:
                server.stop()
            except AssertionError as exc:
                problems.append(str(exc))
            left = server.cleanup()
            if left:
                problems.append(f"processes left behind by the server {server.pid}: {left}")
        assert not problems, "\n".join(problems)


@pytest.fixture
def conf(monkeypatch):
    """A fresh pymacaron config object for the test (``get_config()`` returns it)."""
    import pymacaron.config

    for name in ("PYMACARON_ASYNC_SECRET_KEY", "PYMACARON_ASYNC_BROKER_URL", "PYMACARON_ASYNC_QUEUE", "PYM_ENV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PYMACARON_ASYNC_PYM_CONFIG", raising=False)
    fresh = pymacaron.config.PyMacaronConfig()
    monkeypatch.setattr(pymacaron.config, "config", fresh)
    return fresh


@pytest.fixture
def jwt_conf(conf, monkeypatch):
    """pymacaron's config with the test service's JWT settings."""
    monkeypatch.setattr(conf, "jwt_secret", JWT_SECRET)
    monkeypatch.setattr(conf, "jwt_issuer", JWT_ISSUER)
    monkeypatch.setattr(conf, "jwt_audience", JWT_AUDIENCE)
    monkeypatch.setattr(conf, "name", "petshop", raising=False)
    # pymacaron's crash reports probe the EC2 metadata address and leave the socket open.
    import pymacaron.utils

    monkeypatch.setattr(pymacaron.utils, "IS_EC2_INSTANCE", 0)
    return conf


@pytest.fixture(scope="session")
def pets(tmp_path_factory):
    """The models of the test service's swagger spec, loaded in this process."""
    from pymacaron import apipool

    folder = tmp_path_factory.mktemp("apis")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # pymacaron leaves the spec file open
        apipool.load_swagger("pets", str(SERVICE / "apis" / "pets.yaml"), dest_dir=str(folder))
        gc.collect()
    return apipool.pets


@pytest.fixture
def token() -> str:
    return make_token()


@pytest.fixture
def servers(tmp_path):
    """Start servers for copies of the test service: ``servers.start(*args, config=..., env=...)``."""
    started = Servers(tmp_path)
    yield started
    started.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server shared by a test module: `python server.py --port N`, as letsgo runs it (debug, reloader)."""
    started = Servers(tmp_path_factory.mktemp("pymacaron"))
    yield started.start()
    started.close()
