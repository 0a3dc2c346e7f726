"""What the package promises about itself: no secret in a repr or a message, no process left behind, no deprecation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

from flask import Flask, g, request

from flask_pymacaron_async import AsyncUnavailable, PymacaronAsync, _compat, context
from flask_pymacaron_async.cli import async_cli
from tests.conftest import ROOT
from tests.faults import alive, free_port


def _app(**config) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="the-secret-key", **config)
    return app


def test_reprs_show_no_key_and_no_password():
    app = _app(
        PYMACARON_ASYNC_SECRET_KEY_FALLBACKS=["an-old-key"],
        PYMACARON_ASYNC_BROKER_URL="redis://:hunter2@127.0.0.1:6379/0",
        PYMACARON_ASYNC_RESULT_BACKEND="redis://user:pw-backend@127.0.0.1:6379/1",
        CELERY={"result_backend": "redis://user:pw-celery@127.0.0.1:6379/2"},
    )
    state = PymacaronAsync(app).state_for(app)
    shown = " ".join(repr(x) for x in (state, state.settings, state.signer))
    for secret in ("the-secret-key", "an-old-key", "hunter2", "pw-backend", "pw-celery"):
        assert secret not in shown, secret
    assert "redis://:**@127.0.0.1:6379/0" in shown


def test_status_and_errors_mask_the_broker_password():
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    app = _app(PYMACARON_ASYNC_BROKER_URL=url)
    ext = PymacaronAsync(app)

    @ext.task
    def nothing():
        pass

    result = app.test_cli_runner().invoke(async_cli, ["status", "--json", "--timeout", "0.5"])
    assert result.exit_code == 1
    assert "hunter2" not in result.output and json.loads(result.output)["broker"]["url"].startswith("redis://:**@")
    with app.test_request_context("/"):
        try:
            nothing.delay()
        except AsyncUnavailable as exc:
            assert "hunter2" not in str(exc)
        else:
            raise AssertionError("the broker is down: the call must raise AsyncUnavailable")


def test_the_rebuilt_request_raises_no_deprecation_warning():
    """Flask 3.2 merges RequestContext into AppContext and deprecates the name: the rebuild must not use it."""
    app = _app(PYMACARON_ASYNC_ENABLED=False)
    ext = PymacaronAsync(app)
    seen = []

    @ext.user_dumper
    def dump():
        return "ada"

    @ext.user_loader
    def load(value):
        g.user = value

    @ext.task
    def where():
        seen.append((request.url, g.user))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with app.test_request_context("/here?x=1"):
            where.delay()
        state = ext.state_for(app)
        with app.test_request_context("/p", base_url="http://h"):
            snapshot = {**context.request_snapshot(state), "user": "bob"}
        with context.pushed(state, snapshot):
            seen.append((request.url, g.user))
    assert seen == [("http://localhost/here?x=1", "ada"), ("http://h/p", "bob")]
    assert isinstance(_compat.MERGED_CONTEXTS, bool)


INNER = """
def test_a_worker_runs_a_task(start_worker, reports, unique):
    from tests.apps import basic

    start_worker()
    with basic.app.app_context():
        basic.record_value.delay("v", unique)
    assert reports.one(unique)["value"] == "v"
"""


def test_a_test_run_leaves_no_process_behind(tmp_path):
    """A run on a machine with no Redis: its own redis-server and its workers are gone when it ends."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    pidfile = tmp_path / "pids"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMA_TEST_")}
    env.update(PMA_TEST_EMBEDDED="1", PMA_TEST_PIDFILE=str(pidfile), PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest"),
            # Old Celery and kombu warn of their own deprecations (the Makefile says the same).
            *("-W", "ignore::DeprecationWarning", "-W", "ignore::PendingDeprecationWarning"),
            *("-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), str(tmp_path / "test_inner.py")),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) >= 2, pids  # the run's own redis-server, and a worker
    assert not [pid for pid in pids if alive(pid)]
