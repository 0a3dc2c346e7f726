"""What each step costs in real conditions: ``python -m benchmarks.ablate [--workers]``.

Tight loops under-state what a step costs inside a request or a worker
(there, its code and data are no longer in the CPU caches). This re-runs a
measurement of ``benchmarks/run.py`` with one step at a time replaced.

Without ``--workers``: the "before the response" overhead of an enqueue (as
in ``benchmarks/endpoint.py``), in after_response mode (``--target
ext_immediate``: immediate mode, fewer variants), with these stand-ins:

- ``no_sign``: the snapshot is still taken, but each message is not signed
  for itself (no body encoded for its digest, no HMAC);
- ``no_check``: arguments not encoded by ``check_arguments``;
- ``no_result``: no ``AsyncResult`` built for the caller;
- ``no_uuid``: a fixed task id instead of ``uuid4()``;
- ``client_cache``: see below (with ``--target ext_immediate``, the gain in
  immediate mode).

With ``--workers``: no-op throughput and CPU per task of the prefork worker
(as in ``run.py``), with:

- ``client_cache``: the extension's Redis channel keeps one redis-py client
  for its synchronous commands instead of kombu building a new one for each
  (LPUSH, ack); unlike the others, a working change;
- ``plain_consumer``: Celery's own consumer and kombu's own Redis transport
  (no message checks in the worker's main process);
- ``child_noop``: ``ContextTask.__call__`` runs the body without verifying
  the snapshot or rebuilding the context.

The other stand-ins break the extension (the worker refuses unsigned
messages, ids repeat, no context): they exist only to price what they remove.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import types
from typing import Any

VARIANTS = (
    "",
    "no_sign",
    "no_check",
    "no_result",
    "no_uuid",
    "no_sign,no_check,no_result,no_uuid",
    "client_cache",
)
#: Immediate mode: ``no_sign`` prices the per-message signature.
IMMEDIATE_VARIANTS = ("", "client_cache", "no_sign", "no_check")
WORKER_VARIANTS = ("", "client_cache", "plain_consumer", "child_noop", "plain_consumer,child_noop")
#: The worker app of ``--workers``: benchmarks.app_ext with PMA_BENCH_ABLATE applied.
ABLATE_ENV = "PMA_BENCH_ABLATE"


def _patch(variant: str) -> None:
    from flask_pymacaron_async import _context as context
    from flask_pymacaron_async import _publish as publish
    from flask_pymacaron_async import serialization
    from flask_pymacaron_async._task import ContextTask

    steps = set(filter(None, variant.split(",")))
    if "client_cache" in steps:
        _cache_clients()
    if "no_sign" in steps:
        from flask_pymacaron_async import _amqp as amqp

        context.ContextSigner.sign = lambda self, payload, *message: f"{payload}.unsigned"  # type: ignore[method-assign]
        amqp.dumps = lambda body, serializer=None: (None, None, b"")  # type: ignore[assignment]
    if "no_check" in steps:
        serialization.check_arguments = lambda *args: ""  # type: ignore[assignment]
    if "no_result" in steps:
        # Publishing reads the id of what apply_async returns (a copied or held call: Publisher.result).
        ContextTask.AsyncResult = lambda self, task_id, **kwargs: types.SimpleNamespace(id=task_id)  # type: ignore[assignment,method-assign]
        publish.Publisher.result = lambda self, task, task_id: types.SimpleNamespace(id=task_id)  # type: ignore[assignment,method-assign,return-value]
    if "no_uuid" in steps:
        publish.ids = types.SimpleNamespace(uuid4=lambda: "fixed-task-id")  # type: ignore[assignment]


def _cache_clients() -> None:
    """One redis-py client per channel for kombu's synchronous commands (it builds one per command)."""
    from flask_pymacaron_async import _transport as transport

    create = transport.Channel.make_client

    def cached_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return create(self, asynchronous=True)
        client = self.__dict__.get("_bench_client")
        if client is None:
            client = self.__dict__["_bench_client"] = create(self)
        return client

    transport.Channel.make_client = cached_client  # type: ignore[method-assign]


def patch_worker(variant: str, celery: Any) -> None:
    """Apply a ``--workers`` variant to the extension's benchmark worker app (at import, before it starts)."""
    steps = set(filter(None, variant.split(",")))
    if "client_cache" in steps:
        _cache_clients()
    if "plain_consumer" in steps:
        celery.conf.broker_transport = None
        celery.conf.worker_consumer = "celery.worker.consumer:Consumer"
    if "child_noop" in steps:
        from flask_pymacaron_async._task import ContextTask

        ContextTask.__call__ = lambda self, *args, **kwargs: self.run(*args, **kwargs)  # type: ignore[method-assign]


def child(variant: str, target: str, requests: int) -> None:
    _patch(variant)
    from benchmarks import endpoint

    print(json.dumps({"variant": variant, **endpoint.measure(target, requests)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target", default="ext_after_response", choices=("ext_after_response", "ext_immediate"))
    parser.add_argument("--workers", action="store_true", help="price the worker's steps instead")
    parser.add_argument("--tasks", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.workers:
        workers(args.rounds, args.tasks)
        return

    from benchmarks.run import LABELS, RedisServer, _env

    # The reference of each target: one LPUSH for after_response, raw Celery for immediate.
    reference = "lpush" if args.target == "ext_after_response" else "celery"
    metric = "pre_response_overhead_us" if args.target == "ext_after_response" else "overhead_us"
    server = RedisServer()
    variants = VARIANTS if args.target == "ext_after_response" else IMMEDIATE_VARIANTS
    measured: dict[str, list[float]] = {v: [] for v in variants}
    baseline: list[float] = []
    try:
        for _ in range(args.rounds):
            for variant in variants:
                command = ["-m", "benchmarks.ablate", "--child", variant, args.target, str(args.requests)]
                measured[variant].append(_run(server, _env, command)[metric])
            command = ["-m", "benchmarks.endpoint", reference, str(args.requests)]
            baseline.append(_run(server, _env, command)["overhead_us"])
    finally:
        server.stop()
    base = statistics.median(baseline)
    what = "µs before the response" if args.target == "ext_after_response" else "overhead µs"
    print(f"{args.target}: {what}, median of {args.rounds} rounds; {LABELS[reference]}: {base:.0f} µs per enqueue")
    print()
    print(f"| step replaced | {what} | / {LABELS[reference]} |")
    print("| --- | ---: | ---: |")
    for variant, values in measured.items():
        value = statistics.median(values)
        print(f"| {variant or '(none)'} | {value:.0f} | {value / base:.2f} |")


def _run(server: Any, env: Any, command: list[str]) -> dict[str, Any]:
    server.client.flushdb()
    out = subprocess.run([sys.executable, *command], env=env(server, "bench_ablate"), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def workers(rounds: int, tasks: int) -> None:
    from benchmarks import run

    server = run.RedisServer()
    dumps: dict[str, dict[str, bytes]] = {}
    measured: dict[str, list[dict[str, float]]] = {v: [] for v in (*WORKER_VARIANTS, "raw Celery")}
    try:
        for fill in ("ext", "celery"):
            server.client.flushdb()
            env = run._env(server, f"bench_worker_{fill}")
            keys = run._child("benchmarks.fill", fill, str(tasks), run.START_KEY, run.END_KEY, env=env)
            dumps[fill] = {key: server.client.dump(key) for key in keys}
        for _ in range(rounds):
            for variant in measured:
                if variant == "raw Celery":
                    app, fill, extra = "benchmarks.app_celery:celery", "celery", {}
                else:
                    app, fill, extra = "benchmarks.ablate_app:celery", "ext", {ABLATE_ENV: variant}
                result = run._worker_run(server, app, dumps[fill], f"bench_worker_{fill}", tasks, extra)
                if "error" in result:
                    raise SystemExit(f"{variant}: {result['error']}")
                measured[variant].append(result)
    finally:
        server.stop()
    print(f"prefork -c 2, {tasks:,} no-op tasks, median of {rounds} runs")
    print()
    print("| worker | no-op tasks/s | CPU µs per task: main | pool |")
    print("| --- | ---: | ---: | ---: |")
    for variant, results in measured.items():
        row = [statistics.median(r.get(key, float("nan")) for r in results) for key in _WORKER_KEYS]
        print(f"| {variant or 'flask-pymacaron-async as is'} | {row[0]:,.0f} | {row[1]:,.0f} | {row[2]:,.0f} |")


_WORKER_KEYS = ("throughput_per_s", "main_cpu_us_per_task", "pool_cpu_us_per_task")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
