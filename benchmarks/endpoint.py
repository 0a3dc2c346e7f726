"""Endpoint overhead per enqueue: ``python -m benchmarks.endpoint TARGET REQUESTS``.

Runs in a process of its own per target (so no peer's imports or globals
touch another's numbers) and prints one JSON object. Requests go through
Flask's test client in triples: ``/noop``, ``/queue``, ``/noop`` again. Each
is timed in full (request, response, close) and up to the moment the
response body has been produced (what a WSGI server would send before
closing it), so work done after the response (``after_response`` mode) shows
in the first figure but not in the second.

The second ``/noop`` absorbs the knock-on cost of a publish on the request
that follows it (the broker client's code and data have pushed Flask's out
of the CPU caches: ~25 µs here, ~50 µs when the publish ran on close). It is
reported as ``knock_on_us`` and kept out of the baseline, which would
otherwise be inflated by a different amount for each target.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any, Callable, Iterable

from flask import Flask

from benchmarks import peers
from benchmarks.common import ARGS, HEADERS, PUBLISH_ENV, broker_url, median

WARMUP = 200


def build_ext(publish: str) -> Flask:
    os.environ[PUBLISH_ENV] = publish
    from benchmarks.app_ext import app

    return app


def build_ext_big() -> Flask:
    """The same app with 1,000 more routes over 50 blueprints (the cost must not grow with the app)."""
    os.environ[PUBLISH_ENV] = "immediate"
    from benchmarks.app_ext import create_app

    return create_app("immediate", big=True)


def build_celery() -> Flask:
    from benchmarks.app_celery import app

    return app


TARGETS: dict[str, Callable[[], Flask]] = {
    "ext_immediate": lambda: build_ext("immediate"),
    "ext_immediate_big": build_ext_big,
    "ext_after_response": lambda: build_ext("after_response"),
    "celery": build_celery,
    "celeryext": peers.build_celeryext,
    "rq": peers.build_rq,
    "dramatiq": peers.build_dramatiq,
    "lpush": peers.build_lpush,
}


class _Timed:
    """WSGI middleware: how long until the response body was produced, per request."""

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]]) -> None:
        self.wsgi_app = wsgi_app
        self.last = 0.0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.perf_counter()
        body = self.wsgi_app(environ, start_response)
        chunks = list(body)
        self.last = time.perf_counter() - started
        return _Body(chunks, body)


class _Body:
    def __init__(self, chunks: list[bytes], original: Any) -> None:
        self.chunks = chunks
        self.original = original

    def __iter__(self):
        return iter(self.chunks)

    def close(self) -> None:
        close = getattr(self.original, "close", None)
        if close is not None:
            close()


def _probe_after_response(app: Flask) -> str | None:
    """None when calls are held until the response is closed, else why not."""
    import redis

    client = redis.Redis.from_url(broker_url())
    client.flushdb()

    def queued() -> int:
        return sum(client.llen(k) for k in client.scan_iter() if client.type(k) == b"list")

    seen: dict[str, int] = {}

    @app.get("/probe")
    def probe():
        from benchmarks.app_ext import noop

        noop.delay(*ARGS)
        seen["during"] = queued()
        return "ok"

    response = app.test_client().get("/probe")
    seen["before_close"] = queued()
    response.close()
    seen["after_close"] = queued()
    client.flushdb()
    if seen["during"] or seen["before_close"]:
        return f"tasks are published before the response ({seen}): after_response mode not implemented"
    if seen["after_close"] != 1:
        return f"the held task was not published when the response closed ({seen})"
    return None


def measure(target: str, requests: int) -> dict[str, Any]:
    try:
        app = TARGETS[target]()
    except ModuleNotFoundError as exc:
        return {"target": target, "error": f"not installed ({exc}): pip install flask-celeryext rq 'dramatiq[redis]'"}
    if "/noop" not in {rule.rule for rule in app.url_map.iter_rules()}:
        app.add_url_rule("/noop", "noop", lambda: "ok")
    if target == "ext_after_response":
        reason = _probe_after_response(app)
        if reason is not None:
            return {"target": target, "error": reason}
    timer = _Timed(app.wsgi_app)
    app.wsgi_app = timer  # type: ignore[method-assign]
    client = app.test_client()
    steps = (("noop", "/noop"), ("queue", "/queue"), ("next", "/noop"))
    total: dict[str, list[float]] = {name: [] for name, _path in steps}
    pre: dict[str, list[float]] = {name: [] for name, _path in steps}
    clock = time.perf_counter
    for i in range(WARMUP + requests):
        for name, path in steps:
            started = clock()
            response = client.get(path, headers=HEADERS)
            response.close()
            elapsed = clock() - started
            if response.status_code != 200:
                raise RuntimeError(f"{target} {path} answered {response.status_code}: {response.get_data(True)}")
            if i >= WARMUP:
                total[name].append(elapsed)
                pre[name].append(timer.last)
        if i == WARMUP:
            gc.collect()
    us = 1e6
    return {
        "target": target,
        "requests": requests,
        "noop_us": median(total["noop"]) * us,
        "queue_us": median(total["queue"]) * us,
        "overhead_us": (median(total["queue"]) - median(total["noop"])) * us,
        "pre_response_overhead_us": (median(pre["queue"]) - median(pre["noop"])) * us,
        "knock_on_us": (median(total["next"]) - median(total["noop"])) * us,
    }


def main(argv: list[str]) -> None:
    target, requests = argv[0], int(argv[1])
    result = measure(target, requests)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
