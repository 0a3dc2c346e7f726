"""What the package promises about itself: no secret in a repr or a message, no process left behind, no deprecation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from flask import Flask, g, request

from flask_pymacaron_async import AsyncUnavailable, PymacaronAsync, _compat
from flask_pymacaron_async import _context as context
from flask_pymacaron_async._cli import async_cli
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


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@127.0.0.1:{port}/0;redis://:hunter3@127.0.0.2:{port}/0",
        "redis://:hunter2@h1/0;redis://:hunter3@h2/0",
        "sentinel://:hunter2@127.0.0.1:{port};sentinel://:hunter3@127.0.0.2:{port}",
        "amqp://guest:hunter2@127.0.0.1:{port}/vhost",
        "rediss://user:hunter2@127.0.0.1:{port}/0",
    ],
)
def test_every_form_of_broker_url_is_masked_everywhere_it_is_shown(url):
    url = url.format(port=free_port())
    app = _app(PYMACARON_ASYNC_BROKER_URL=url, PYMACARON_ASYNC_PUBLISH_TIMEOUT=0.5)
    ext = PymacaronAsync(app)
    app.register_blueprint(ext.dashboard_blueprint(allow=lambda: True), url_prefix="/ops")
    shown = [repr(ext.state_for(app).settings)]
    for args in (["status", "--json", "--timeout", "0.5"], ["status", "--timeout", "0.5"]):
        result = app.test_cli_runner().invoke(async_cli, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        shown.append(result.output)
    client = app.test_client()
    for path in ("/ops/status.json", "/ops/"):
        response = client.get(path)
        assert response.status_code in (200, 503), path
        shown.append(response.get_data(as_text=True))
    for text in shown:
        assert "hunter2" not in text and "hunter3" not in text, text
    assert "**@" in shown[0]


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


# os._exit is the standard library's documented exit without clean-up, not a third party's internal.
_STDLIB_PRIVATE = {"_exit"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_third_party_internals_are_used_in_compat_only():
    """No ``_name`` of Flask, Werkzeug, Celery, kombu, py-amqp, redis-py or Flask-Login outside ``_compat.py``.

    A private name the package does not define itself (as a function, class,
    variable, attribute, argument or import) is someone else's: it may only
    be read or overridden in ``_compat.py``, where each use says the versions
    it was checked on. Attribute access and the strings given to
    ``getattr``/``hasattr``/``setattr``/``delattr`` alike.
    """
    import ast

    root = Path(__file__).resolve().parent.parent
    files = [
        path for package in ("flask_pymacaron_async", "pymacaron_async") for path in (root / package).rglob("*.py")
    ]
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in files}
    own = {path.stem for path in files}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
            elif isinstance(node, ast.alias):
                own.add(node.asname or node.name.split(".")[0])
    allowed = own | _STDLIB_PRIVATE
    found = []
    for path, tree in trees.items():
        if path.name == "_compat.py":
            continue
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and _private(node.attr):
                name = node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
            ):
                name = node.args[1].value
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("get", "pop")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and _private(node.args[0].value)
            ):
                name = node.args[0].value  # a private keyword a third party passes (kombu's _publish_batch)
            if name is not None and name not in allowed:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {name}")
    assert found == [], "third-party internals outside _compat.py:\n" + "\n".join(found)
