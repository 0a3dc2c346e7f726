"""pytest plugin: the ``captured_tasks`` and ``async_worker`` fixtures.

Opt-in, as Celery's own plugin: ``pytest_plugins = ["flask_pymacaron_async.testing"]``
in the project's root ``conftest.py``, or ``pytest -p flask_pymacaron_async.testing``.
Installing the package loads nothing into other projects' test sessions
(no Celery, kombu or redis-py import). The fixtures work with
pytest-flask's ``app`` and ``client``.

.. code-block:: python

    def test_signup(client, captured_tasks):
        client.post("/signup?email=ada@example.com", headers={"X-User": "ada"})
        mail = captured_tasks.assert_queued("send_welcome_mail", "ada@example.com")
        assert mail.user == "ada"
        captured_tasks.run_all()        # in the rebuilt request context, as ada

    def test_signup_end_to_end(client, async_worker):
        client.post("/signup?email=ada@example.com")   # a real worker runs it
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from . import _runner as runner
from . import broker
from ._publish import captured
from ._state import state_for
from .spawn import DEV_WORKER_OPTIONS, WorkerProcess, app_import_path, start_worker

if TYPE_CHECKING:
    from celery.result import AsyncResult
    from flask import Flask

    from ._task import ContextTask


class CapturedTask:
    """One task call recorded by :func:`captured_tasks`, as the worker would receive it."""

    def __init__(
        self,
        task: ContextTask,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        payload: str,
        options: dict[str, Any],
        body: bytes | str = b"",
    ) -> None:
        #: The task's full name (``module.function``).
        self.name: str = task.name
        #: The id the call returned (``AsyncResult.id``).
        self.id = task_id
        #: Positional arguments, after a round trip through the task serializer.
        self.args = args
        #: Keyword arguments, after a round trip through the task serializer.
        self.kwargs = kwargs
        #: Celery options of the call (``queue``, ``countdown``, ``eta``, ...).
        self.options = options
        #: Whether :meth:`run` was called.
        self.ran = False
        self._task = task
        # Signed for this call and verified, as the worker does.
        signer = task.pma_state.signer
        token = signer.sign(payload, task.name, task_id, body)
        #: The verified context snapshot: ``app``, ``rid``, ``user``, ``env``.
        self.snapshot: dict[str, Any] = {
            "app": task.pma_state.import_name,  # not in the message: the worker has its own
            **signer.verify(token, task.name, task_id, body),
        }

    @property
    def app(self) -> Flask:
        """The Flask app the task was queued for."""
        return self._task.pma_state.app

    @property
    def user(self) -> Any:
        """What the user dumper returned when the task was queued."""
        return self.snapshot.get("user")

    @property
    def request_id(self) -> str | None:
        """The id of the request the task was queued from."""
        return self.snapshot.get("rid")

    @property
    def url(self) -> str | None:
        """The URL of the request the task was queued from (``None`` outside a request)."""
        return runner.snapshot_url(self.snapshot)

    def matches(self, name: str) -> bool:
        """Whether ``name`` is this task's full name or its last part (``"send_email"``)."""
        return self.name == name or self.name.endswith("." + name)

    def run(self) -> Any:
        """Run the task here, as the worker would: in its rebuilt app and request context, as its user."""
        self.ran = True
        return runner.run_in_context(self._task.pma_state, self._task, self.snapshot, self.args, self.kwargs, self.id)

    def __repr__(self) -> str:
        arguments = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"<CapturedTask {self.name}({', '.join(arguments)})>"


class CapturedTasks:
    """The task calls queued during a test, in order; nothing reaches a broker.

    A list of :class:`CapturedTask` with assertion helpers.
    """

    def __init__(self) -> None:
        self._calls: list[CapturedTask] = []

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[CapturedTask]:
        return iter(list(self._calls))

    def __getitem__(self, index: int) -> CapturedTask:
        return self._calls[index]

    def __repr__(self) -> str:
        return f"<CapturedTasks {self._calls!r}>"

    def named(self, name: str) -> list[CapturedTask]:
        """The calls of the task ``name`` (full name or last part)."""
        return [call for call in self._calls if call.matches(name)]

    def assert_queued(self, name: str, *args: Any, **kwargs: Any) -> CapturedTask:
        """Assert that ``name`` was queued, with exactly these arguments when any are given.

        :returns: the first matching call.
        """
        calls = self.named(name)
        if args or kwargs:
            calls = [c for c in calls if c.args == args and c.kwargs == kwargs]
        if not calls:
            wanted = name
            if args or kwargs:
                wanted += "(" + ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]) + ")"
            raise AssertionError(f"{wanted} was not queued; queued: {self._calls or 'nothing'}")
        return calls[0]

    def assert_not_queued(self, name: str | None = None) -> None:
        """Assert that ``name`` (or, without a name, any task) was not queued."""
        calls = self.named(name) if name is not None else self._calls
        if calls:
            raise AssertionError(f"{name or 'a task'} was queued: {calls}")

    def run_all(self, limit: int = 1000) -> list[Any]:
        """Run every call not run yet, in order, each in its rebuilt context.

        Tasks queued by those tasks are captured and run too.

        :returns: the values the tasks returned.
        :raises RuntimeError: after ``limit`` runs (a task that keeps queueing itself).
        """
        values: list[Any] = []
        for _ in range(limit):
            pending = next((c for c in self._calls if not c.ran), None)
            if pending is None:
                return values
            values.append(pending.run())
        raise RuntimeError(f"run_all() ran {limit} tasks and more are queued: does a task queue itself?")

    def clear(self) -> None:
        """Forget the calls captured so far."""
        self._calls.clear()

    def _record(
        self, task: ContextTask, payload: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> AsyncResult:
        """Record a call the extension would hand to Celery (the sender given to ``publish.captured``)."""
        from kombu.serialization import dumps, loads, prepare_accept_content

        options = dict(options)
        options.pop("headers", None)
        options.pop("retry", None)
        task_id = options.pop("task_id", None) or str(uuid.uuid4())
        conf = task.app.conf
        content_type, encoding, body = dumps([list(args), dict(kwargs)], serializer=conf.task_serializer)
        accept = prepare_accept_content(conf.accept_content)
        decoded_args, decoded_kwargs = loads(body, content_type, encoding, accept=accept)
        self._calls.append(CapturedTask(task, task_id, tuple(decoded_args), decoded_kwargs, payload, options, body))
        return task.AsyncResult(task_id)


@pytest.fixture
def captured_tasks() -> Iterator[CapturedTasks]:
    """Capture the tasks queued during the test instead of sending them.

    Every call goes through the extension as usual (argument checks, context
    snapshot, signals, ``after_response`` holding), then is recorded with its
    arguments round-tripped through the task serializer and its context
    snapshot signed and verified as the worker would. Inline mode
    (``PYMACARON_ASYNC_ENABLED = False``) runs tasks at once and records nothing.
    """
    recorded = CapturedTasks()
    with captured(recorded._record):
        yield recorded


@pytest.fixture
def async_worker_target(app: Flask) -> str | None:
    """How the ``async_worker`` finds the app (``--app`` / ``FLASK_APP`` syntax).

    By default the module of ``app``; override this fixture when the worker
    needs a factory call, e.g. ``"myapp:create_app('testing')"``.
    """
    return app_import_path(app)


@pytest.fixture
def async_worker(app: Flask, async_worker_target: str | None, tmp_path: Any) -> Iterator[WorkerProcess]:
    """A real Celery worker for ``app``, in a child process, stopped (by its pid) at teardown.

    It consumes the app's queues on the app's broker and is ready when the
    test starts; its output is in ``async_worker.log()``.
    """
    state = state_for(app)
    worker = start_worker(
        app,
        app_path=async_worker_target,
        celery_args=DEV_WORKER_OPTIONS,
        queues=broker.queue_names(state.celery),
        name=f"pytest-{uuid.uuid4().hex[:8]}@%h",
        log_path=tmp_path / f"async-worker-{uuid.uuid4().hex[:6]}.log",
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()
