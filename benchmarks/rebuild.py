"""Worker side, in process: rebuilding the caller's context for one task.

``python -m benchmarks.rebuild`` prints one JSON object, µs per task (median
of 5 repetitions) for:

- ``ext_pushed``: this extension's worker path, ``context.pushed(state,
  snapshot)`` with the user loaded by ``user_loader`` (the 25 µs target);
- ``ext_full``: everything ``ContextTask.__call__`` does around the body in
  the pool process: snapshot decoded, ``pushed``, the started/succeeded signals;
- ``ext_pushed_big`` and ``ext_full_big``: the same two for the same app
  with 1,000 more routes over 50 blueprints and a few ``before_request``
  hooks (``app_ext.add_big_routes``): the cost must not grow with the app;
- ``ext_verify``: the consumer's check of the message-bound signature, in the
  worker's main process (HMAC over the snapshot, task name, id, body digest
  and the bound headers, written as the worker writes them from the message);
- ``codec_plain`` and ``codec_rich``: one argument round trip
  (``serialization.loads(serialization.dumps([args, kwargs]))``), for the
  benchmark's ``(42, "hello")`` and for arguments with a datetime, a
  Decimal, a UUID and a nested dict; ``kombu_json_plain`` and
  ``kombu_json_rich``: the same with kombu's ``json`` serializer (raw
  Celery's), which has its own type tags since kombu 5.3;
- ``test_request_context``: Flask's ``app.test_request_context(...)`` with
  the same URL and headers, and the same user loader;
- ``celeryext_request_task``: calling a Flask-CeleryExt ``RequestContextTask``
  (``test_request_context`` + ``preprocess_request`` + ``process_response``
  around the body, no user).
"""

from __future__ import annotations

import datetime
import decimal
import gc
import json
import time
import uuid
from typing import Any, Callable

from benchmarks.common import ARGS, HEADERS, USER_ID, broker_url, median

REPEATS = 5
LOOPS = 5000
URL = "/queue?page=2"
# The headers of a no-op task message that the signature covers, as Celery writes them.
MESSAGE_HEADERS = {"retries": 0, "timelimit": [None, None], "argsrepr": "('a', 'b')", "kwargsrepr": "{}"}
# The body of a no-op task message, as the serializer encodes it.
BODY = b'[["a","b"],{},{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]'


def _per_call(func: Callable[[], Any], loops: int = LOOPS) -> float:
    """Median over repetitions of the mean µs per call."""
    for _ in range(200):
        func()
    results = []
    for _ in range(REPEATS):
        gc.collect()
        started = time.perf_counter()
        for _ in range(loops):
            func()
        results.append((time.perf_counter() - started) / loops * 1e6)
    return median(results)


def measure() -> dict[str, Any]:
    from benchmarks.app_ext import app, load_user, noop
    from flask_pymacaron_async import _context as context
    from flask_pymacaron_async import _runner as runner
    from flask_pymacaron_async import serialization

    state = app.extensions["pymacaron_async"]
    task = noop.celery_task
    _as_in_the_worker(state)
    with app.test_request_context(URL, headers=HEADERS):
        token = state.signer.sign(context.take(state), task.name, "task-id", BODY)
        bound_token = state.signer.sign(
            context.take(state),
            task.name,
            "task-id",
            BODY,
            context.bound_headers(MESSAGE_HEADERS, serialization.CONTENT_TYPE),
        )
    snapshot = context.ContextSigner.decode(token)
    results: dict[str, Any] = {"loops": LOOPS, "repeats": REPEATS}

    def ext_pushed() -> None:
        with context.pushed(state, snapshot):
            pass

    def ext_full() -> None:
        # What the pool process does: the consumer verified the signature.
        runner.run_in_context(state, task, context.ContextSigner.decode(token), ARGS, {}, "task-id")

    def ext_verify() -> None:
        # What the consumer does in the worker's main process, per message.
        bound = context.bound_headers(MESSAGE_HEADERS, serialization.CONTENT_TYPE)
        state.signer.verify(bound_token, task.name, "task-id", BODY, state.settings.context_max_age, bound)

    environ = dict(snapshot["env"], **{"wsgi.input": None, "wsgi.errors": None})

    def flask_floor() -> None:
        # Flask's own cost of what the worker needs: push and pop a request
        # context (and its app context) for a ready environ, nothing else.
        with app.request_context(environ):
            pass

    def test_request_context() -> None:
        with app.test_request_context(URL, headers=HEADERS):
            load_user(USER_ID)

    big_pushed, big_full = _big_app_paths()
    # Measured in turn, round after round: the big app's ratio to the small one's is not
    # skewed by the machine's load changing between two blocks of measurements.
    results.update(
        _alternating(
            {
                "ext_pushed_us": ext_pushed,
                "ext_pushed_big_us": big_pushed,
                "ext_full_us": ext_full,
                "ext_full_big_us": big_full,
            }
        )
    )
    results["ext_verify_us"] = _per_call(ext_verify)
    results.update(_alternating(_codec_paths()))
    results["test_request_context_us"] = _per_call(test_request_context)
    results["flask_request_context_us"] = _per_call(flask_floor)
    try:
        results["celeryext_request_task_us"] = _per_call(_celeryext_task())
    except ModuleNotFoundError as exc:
        results["celeryext_request_task_us"] = None
        results["celeryext_error"] = str(exc)
    return results


def _codec_paths() -> dict[str, Callable[[], Any]]:
    """One argument round trip with this extension's serializer and with kombu's ``json``, plain and rich."""
    from kombu.serialization import dumps, loads

    from flask_pymacaron_async import serialization

    plain = [list(ARGS), {}]
    rich = [
        [42, datetime.datetime(2026, 12, 7, 12, 30, tzinfo=datetime.timezone.utc), decimal.Decimal("19.99")],
        {"order": uuid.UUID(int=7), "lines": [{"sku": "a-1", "qty": 2}, {"sku": "b-2", "qty": 1}]},
    ]

    def ours(value: Any) -> Callable[[], Any]:
        return lambda: serialization.loads(serialization.dumps(value))

    def kombu_json(value: Any) -> Callable[[], Any]:
        def round_trip() -> Any:
            content_type, encoding, data = dumps(value, serializer="json")
            return loads(data, content_type, encoding, accept=[content_type])

        return round_trip

    return {
        "codec_plain_us": ours(plain),
        "kombu_json_plain_us": kombu_json(plain),
        "codec_rich_us": ours(rich),
        "kombu_json_rich_us": kombu_json(rich),
    }


def _alternating(funcs: dict[str, Callable[[], Any]], loops: int = LOOPS) -> dict[str, float]:
    """Median µs per call of each function, measured one after the other in each of ``REPEATS`` rounds."""
    for func in funcs.values():
        for _ in range(200):
            func()
    times: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(REPEATS):
        for name, func in funcs.items():
            gc.collect()
            started = time.perf_counter()
            for _ in range(loops):
                func()
            times[name].append((time.perf_counter() - started) / loops * 1e6)
    return {name: median(values) for name, values in times.items()}


def _big_app_paths() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """``ext_pushed`` and ``ext_full`` for the benchmark app with 1,000 more routes over 50 blueprints."""
    from benchmarks.app_ext import create_app, noop
    from flask_pymacaron_async import _context as context
    from flask_pymacaron_async import _runner as runner

    big = create_app(big=True)
    state = big.extensions["pymacaron_async"]
    _as_in_the_worker(state)
    with big.app_context():
        task = noop.celery_task
    with big.test_request_context(URL, headers=HEADERS):
        token = state.signer.sign(context.take(state), task.name, "task-id", BODY)
    snapshot = context.ContextSigner.decode(token)

    def pushed() -> None:
        with context.pushed(state, snapshot):
            pass

    def full() -> None:
        runner.run_in_context(state, task, context.ContextSigner.decode(token), ARGS, {}, "task-id")

    return pushed, full


def _as_in_the_worker(state: Any) -> None:
    """What the app's worker process does at start that bears on the rebuild (Celery's ``worker_init``)."""
    from celery import signals

    class Worker:
        app = state.celery

    signals.worker_init.send(sender=Worker())


def _celeryext_task() -> Callable[[], Any]:
    from flask import Flask
    from flask_celeryext import FlaskCeleryExt, RequestContextTask

    app = Flask("bench_celeryext_rebuild")
    app.config.update(CELERY_BROKER_URL=broker_url(), CELERY_TASK_IGNORE_RESULT=True)
    celery = FlaskCeleryExt(app).celery

    # Named: run as __main__, the default name would be another app's task's.
    @celery.task(base=RequestContextTask, name="bench.celeryext_rebuild.noop")
    def noop(a, b):
        return None

    return lambda: noop(*ARGS)


if __name__ == "__main__":
    print(json.dumps(measure()))
