"""Celery's own integration suite on raw Celery and on the extension's app, side by side.

.. code-block:: sh

    python -m tests.conformance.run [--raw|--ext|--both] [--ci] [--timeout S] [pytest selection or options...]

The suite is ``t/integration`` of the installed Celery's sdist, fetched from PyPI once into
``.venv/conformance/celery-<version>/`` (its ``t/`` and ``pyproject.toml`` only, so ``import celery`` is the
installed one). Selections are relative to that directory (``t/integration/test_canvas.py::test_chord``); by
default both ``test_tasks.py`` and ``test_canvas.py``. Each side runs in its own pytest session, one after the
other, against Redis at 127.0.0.1:6379 (else an embedded redis-server this script starts and stops) in an empty
database of 1..15 claimed for the run and emptied at its end; the keys the suite's tasks write in database 0 are
removed. The extension's side differs by one set-up plugin (``tests.conformance.plugin``), never by a test file.

Exit status 1 when a test that passes on raw Celery fails on the extension's app; without a raw run in the same
invocation (``--ext``, ``--ci``), when a test fails that :data:`KNOWN_RAW_FAILURES` does not list. ``--ci``: the
extension's side only, on :data:`CI_SELECTION`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import celery
import redis

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".venv" / "conformance"
FILES = ("t/integration/test_tasks.py", "t/integration/test_canvas.py")

#: ``--ci``: all of test_tasks.py (retries among them), and the test_canvas.py classes that exercise what the
#: extension changes (link_error errbacks, chains, groups, chords), less :data:`CI_LEFT_OUT`.
CI_SELECTION = (
    "t/integration/test_tasks.py",
    "t/integration/test_canvas.py::test_link_error",
    "t/integration/test_canvas.py::test_chain",
    "t/integration/test_canvas.py::test_group",
    "t/integration/test_canvas.py::test_chord",
)

_CHORD = "t/integration/test_canvas.py::test_chord::"
_WAITS = "mostly 10 s waits confirming that no more callbacks run"
#: Left out of ``--ci`` (run by ``make conformance``), with the reason: ~12 minutes of the ~15 of test_canvas.py.
CI_LEFT_OUT: dict[str, str] = {
    _CHORD + "test_disabling_flag_allow_error_cb_on_chord_header": f"~300 s, {_WAITS}",
    _CHORD + "test_enabling_flag_allow_error_cb_on_chord_header": f"~170 s, {_WAITS}",
    _CHORD + "test_flag_allow_error_cb_on_chord_header_on_upgraded_chord": f"~130 s, {_WAITS}",
    _CHORD + "test_nested_chord_header_link_error": f"~45 s, {_WAITS}",
    _CHORD + "test_error_propagates_from_chord": "~60 s waiting for the chord's error",
    _CHORD + "test_generator": "~50 s, generators as chord headers: nothing the extension changes",
    _CHORD + "test_large_header": "~7 s, a 1000-task header: nothing the extension changes",
    _CHORD + "test_chain_to_a_chord_with_large_header": "~5 s, the same",
    _CHORD + "test_redis_subscribed_channels_leak": "~12 s, the result backend's pub/sub channels",
}

#: Tests never run, with the reason. None: with a Redis broker and result backend every test of
#: test_tasks.py and test_canvas.py runs (Celery's own skips and xfails aside).
EXCLUDED: dict[str, str] = {}

#: Tests that fail on raw Celery 5.7.0 on these machines (Redis broker and backend), with the reason: what
#: ``--ext`` and ``--ci`` compare with when raw Celery does not run in the same invocation.
KNOWN_RAW_FAILURES: dict[str, str] = {
    "t/integration/test_tasks.py::test_trace_log_arguments::test_task_success": (
        "Celery's own: the worker's 'received' and 'succeeded' log records (INFO) never reach caplog here"
    ),
    "t/integration/test_tasks.py::test_trace_log_arguments::test_task_failed": (
        "Celery's own: the worker's 'received' log record (INFO) never reaches caplog here"
    ),
    _CHORD + "test_chord_on_error": (
        "reads the chord's join key with t.integration.tasks.get_redis_connection(), always Redis database 0, "
        "while this run's result backend is in a database of its own"
    ),
}

CLAIM = "celery-conformance:claimed-by"
OWNER = f"{socket.gethostname()}:{os.getpid()}"
#: Keys the suite's tasks and tests write in Redis database 0 (``t.integration.tasks.get_redis_connection``).
SUITE_KEY = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|redis-echo|echo_\w+|Done")
OUTCOMES = ("passed", "failed", "skipped")


def sdist() -> Path:
    """The root of the installed Celery's sdist (``t/`` and ``pyproject.toml``), fetched from PyPI if needed."""
    root = CACHE / f"celery-{celery.__version__}"
    if (root / "t" / "integration" / "conftest.py").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(CACHE)]
    subprocess.run([*pip, f"celery=={celery.__version__}"], check=True)
    with tarfile.open(CACHE / f"celery-{celery.__version__}.tar.gz") as tar:
        wanted = [m for m in tar.getmembers() if m.name.split("/")[1:2] in (["t"], ["pyproject.toml"])]
        tar.extractall(CACHE, members=wanted, filter="data")
    return root


def _answers(host: str, port: int) -> bool:
    try:
        with redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


@contextmanager
def redis_server() -> Iterator[int]:
    """The port of the machine's Redis on 127.0.0.1:6379, else of an embedded one owned by this run."""
    if _answers("127.0.0.1", 6379):
        yield 6379
        return
    from tests.faults import RedisServer

    server = RedisServer(Path(tempfile.mkdtemp(prefix="celery-conformance-redis-")), appendonly=False).start()
    try:
        yield server.port
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


def _stale(claim: bytes | None) -> bool:
    """Whether ``claim`` is that of a run of this machine that is gone."""
    host, _, pid = (claim or b"").decode().rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


@contextmanager
def private_db(port: int) -> Iterator[int]:
    """An empty database of 1..15 claimed for this run, emptied at its end; the suite's keys left in db 0 removed."""
    db0 = redis.Redis(port=port)
    before = set(db0.scan_iter(count=1000))
    for db in range(1, 16):
        client = redis.Redis(port=port, db=db)
        if _stale(client.get(CLAIM)):
            client.flushdb()  # left by a run of this machine that was killed
        if client.dbsize() == 0 and client.set(CLAIM, OWNER, nx=True):
            break
        client.close()
    else:
        raise SystemExit("no empty Redis database among 1..15")
    try:
        yield db
    finally:
        client.flushdb()
        client.close()
        left = [k for k in set(db0.scan_iter(count=1000)) - before if SUITE_KEY.fullmatch(k)]
        if left:
            db0.delete(*left)
        shown = "".join(f" {k.decode()}" for k in sorted(left)[:3]) + (" ..." if len(left) > 3 else "")
        print(f"Redis: database {db} emptied; {len(left)} key(s) of the suite removed from database 0{shown}")
        db0.close()


def run_side(
    side: str, selection: list[str], left_out: list[str], env: dict[str, str], timeout: float
) -> tuple[dict[str, Any], float]:
    """Run ``selection`` on one side (``raw`` or ``ext``): each test's record (results.py, kept in
    ``.venv/conformance/results-<side>.json``) and the wall time."""
    db = redis.Redis.from_url(env["TEST_BROKER"])
    db.flushdb()  # nothing of the other side's run reaches this one
    db.set(CLAIM, OWNER)
    db.close()
    # Celery's fixtures (celery_parameters, ...), as its docs load them when pytest-celery is not installed.
    plugins = ["-p", "celery.contrib.pytest", "-p", "tests.conformance.results"]
    plugins += ["-p", "tests.conformance.plugin"] if side == "ext" else []
    # pytest-flask's autouse fixtures would take the suite's `app` (a Celery app) for a Flask app; the
    # extension's own plugin has nothing for this suite.
    plugins += ["-p", "no:flask", "-p", "no:pymacaron_async", "-p", "no:cacheprovider"]
    deselect = [arg for nodeid in left_out for arg in ("--deselect", nodeid)]
    options = [f"--timeout={timeout}", "-q", "-rfE", "--tb=short", "--show-capture=no"]
    results = CACHE / f"results-{side}.json"
    results.unlink(missing_ok=True)
    print(f"\n=== {side}: {' '.join(selection)}", flush=True)
    start = time.monotonic()
    argv = [sys.executable, "-m", "pytest", *plugins, *options, *deselect, *selection]
    pytest = subprocess.Popen(argv, cwd=sdist(), env={**env, "CONFORMANCE_RESULTS": str(results)})
    try:
        pytest.wait()
    except BaseException:  # Ctrl-C, SIGTERM: pytest stops its worker and pool, then we clean Redis up
        pytest.send_signal(signal.SIGINT)
        try:
            pytest.wait(60)
        except subprocess.TimeoutExpired:
            pytest.kill()
            pytest.wait()
        raise
    wall = time.monotonic() - start
    if pytest.returncode not in (0, 1) or not results.exists():  # 1: tests failed; else collection, usage, ...
        raise SystemExit(f"{side}: pytest exited with status {pytest.returncode} (see its output above)")
    return json.loads(results.read_text()), wall


def counts(records: dict[str, Any]) -> dict[str, str]:
    """Per file: ``N passed, N failed, N skipped (S s)``."""
    by_file: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    seconds: dict[str, float] = collections.defaultdict(float)
    for nodeid, record in records.items():
        name = nodeid.split("::")[0].rsplit("/", 1)[-1]
        by_file[name][record["outcome"] or "failed"] += 1
        seconds[name] += record["duration"]
    return {
        name: ", ".join(f"{c[o]} {o}" for o in OUTCOMES) + f" ({seconds[name]:.0f} s)" for name, c in by_file.items()
    }


def report(sides: dict[str, tuple[dict[str, Any], float]]) -> int:
    """Print the table and the tests failing on the extension's app only; the exit status."""
    table = {side: counts(records) for side, (records, _) in sides.items()}
    names = sorted({name for per_file in table.values() for name in per_file})
    print("\n| file | " + " | ".join(f"{side} (wall {wall:.0f} s)" for side, (_, wall) in sides.items()) + " |")
    print("| --- " * (len(sides) + 1) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(table[side].get(name, "-") for side in sides) + " |")
    if "ext" not in sides:
        return 0
    ext = sides["ext"][0]
    raw = sides["raw"][0] if "raw" in sides else None
    failed = [n for n, r in ext.items() if r["outcome"] in ("failed", None)]
    if raw is not None:
        only = [n for n in failed if raw.get(n, {}).get("outcome") == "passed"]
        known = {n: "fails on raw Celery too" for n in failed if n not in only}
    else:
        only = [n for n in failed if n not in KNOWN_RAW_FAILURES]
        known = {n: KNOWN_RAW_FAILURES[n] for n in failed if n in KNOWN_RAW_FAILURES}
        fixed = [n for n in KNOWN_RAW_FAILURES if ext.get(n, {}).get("outcome") == "passed"]
        for nodeid in fixed:
            print(f"passes now, listed in KNOWN_RAW_FAILURES: {nodeid}")
    for nodeid, reason in known.items():
        print(f"fails on the extension's app, known: {nodeid} ({reason})")
    print(f"\n{len(only)} test(s) fail on the extension's app only")
    for nodeid in only:
        tail = "\n      ".join(ext[nodeid]["error"].splitlines()[-12:])
        print(f"  {nodeid}\n      {tail}")
    return 1 if only else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--raw", dest="sides", action="store_const", const=("raw",))
    which.add_argument("--ext", dest="sides", action="store_const", const=("ext",))
    which.add_argument("--both", dest="sides", action="store_const", const=("raw", "ext"))
    parser.add_argument("--ci", action="store_true", help="the extension's side on CI_SELECTION only")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per test (pytest-timeout)")
    args, selection = parser.parse_known_args(argv)
    sides = ("ext",) if args.ci else args.sides or ("raw", "ext")
    selection = selection or list(CI_SELECTION if args.ci else FILES)
    left_out = [*EXCLUDED, *(CI_LEFT_OUT if args.ci else ())]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sdist()
    with redis_server() as port, private_db(port) as db:
        url = f"redis://127.0.0.1:{port}/{db}"
        env = {**os.environ, "TEST_BROKER": url, "TEST_BACKEND": url, "REDIS_HOST": "127.0.0.1"}
        env.update(REDIS_PORT=str(port), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
        results = {side: run_side(side, selection, left_out, env, args.timeout) for side in sides}
    return report(results)


if __name__ == "__main__":
    sys.exit(main())
