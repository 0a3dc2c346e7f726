"""The pytest plugin: captured_tasks, async_worker, loaded when a project asks for it, and only then."""

from __future__ import annotations

import datetime
import decimal
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from flask_pymacaron_async import signals
from tests.apps import basic
from tests.conftest import ROOT, _free_port


def test_captured_tasks_records_calls_in_context_and_sends_nothing(app, client, captured_tasks, redis_client, unique):
    queue = os.environ["PMA_TEST_QUEUE"]
    before = redis_client.llen(queue)
    response = client.post(f"/items/3?key={unique}", headers={"X-User": "ada", "X-Request-Id": "rid-1"})
    assert response.status_code == 200

    call = captured_tasks.assert_queued("record_context", unique)
    assert call.name == "tests.apps.basic.record_context"
    assert call.args == (unique,) and call.kwargs == {}
    assert call.user == "ada"
    assert call.url == f"http://localhost/items/3?key={unique}"
    assert call.request_id == "rid-1"
    assert call.snapshot["app"] == "tests.apps.basic"
    assert call.app is app
    assert not call.ran
    assert redis_client.llen(queue) == before  # nothing reached the broker
    assert len(captured_tasks) == 1 and list(captured_tasks) == [captured_tasks[0]]


def test_run_all_runs_each_call_in_its_rebuilt_context(client, captured_tasks, reports, unique):
    client.post(f"/items/3?key={unique}", headers={"X-User": "ada", "X-Tenant": "t1"})
    assert captured_tasks.run_all() == [None]
    seen = reports.one(unique, timeout=1)
    assert seen["user"] == "ada"
    assert seen["url"] == f"http://localhost/items/3?key={unique}"
    assert seen["endpoint"] == "item" and seen["view_args"] == {"item_id": 3}
    assert seen["headers"]["X-Tenant"] == "t1"
    assert captured_tasks[0].ran
    assert captured_tasks.run_all() == []  # each call runs once


def test_run_all_runs_the_tasks_queued_by_tasks(app, captured_tasks, reports, unique):
    with app.test_request_context("/items/1", headers={"X-Tenant": "t2"}):
        basic.nested.delay(unique)
    captured_tasks.run_all()
    assert [c.name.rsplit(".", 1)[1] for c in captured_tasks] == ["nested", "record_context"]
    inner = captured_tasks.assert_queued("record_context", unique)
    assert inner.request_id == captured_tasks[0].request_id  # the caller's context, carried on
    assert reports.one(unique, timeout=1)["headers"]["X-Tenant"] == "t2"


def test_arguments_are_round_tripped_through_the_serializer(app, captured_tasks):
    when = datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc)
    with app.app_context():
        basic.record_types.delay("k", when, amount=decimal.Decimal("1.10"), ids=(1, 2))
    call = captured_tasks.assert_queued("record_types")
    assert call.args == ("k", when) and isinstance(call.args[1], datetime.datetime)
    assert call.kwargs == {"amount": decimal.Decimal("1.10"), "ids": [1, 2]}  # JSON has lists, not tuples
    with app.app_context(), pytest.raises(TypeError, match="cannot be sent"):
        basic.record_types.delay("k", object())
    assert len(captured_tasks) == 1


def test_options_and_the_returned_result(app, captured_tasks):
    with app.app_context():
        result = basic.add.apply_async((1, 2), countdown=30, queue="elsewhere")
    call = captured_tasks.assert_queued("add", 1, 2)
    assert result.id == call.id
    assert call.options["countdown"] == 30 and call.options["queue"] == "elsewhere"
    assert "headers" not in call.options
    assert call.run() == 3


def test_assertion_helpers_say_what_was_queued(app, captured_tasks):
    captured_tasks.assert_not_queued()
    with app.app_context():
        basic.add(1, 2)
    with pytest.raises(
        AssertionError, match=r"add\(5, 6\) was not queued; queued: \[<CapturedTask tests.apps.basic.add\(1, 2\)>\]"
    ):
        captured_tasks.assert_queued("add", 5, 6)
    with pytest.raises(AssertionError, match="send_email was not queued"):
        captured_tasks.assert_queued("send_email")
    with pytest.raises(AssertionError, match="add was queued"):
        captured_tasks.assert_not_queued("add")
    captured_tasks.assert_not_queued("fail")
    assert captured_tasks.named("tests.apps.basic.add") == captured_tasks.named("add")
    assert not captured_tasks.named("dd")  # the last part of the name, not any suffix
    captured_tasks.clear()
    assert len(captured_tasks) == 0


def test_a_failing_task_raises_from_run_all(app, captured_tasks, reports, unique):
    with app.app_context():
        basic.fail.delay(unique)
    with pytest.raises(ValueError, match="boom"):
        captured_tasks.run_all()
    assert reports.one(unique, timeout=1) == "ran"


def test_signals_are_sent_as_usual(app, captured_tasks):
    queued = []
    with signals.task_queued.connected_to(lambda sender, **kw: queued.append(kw["task_id"]), app):
        with app.app_context():
            result = basic.add(1, 1)
    assert queued == [result.id]


def test_no_broker_needed_even_after_the_response(captured_tasks):
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    app = basic.create_app(PYMACARON_ASYNC_BROKER_URL=dead, PYMACARON_ASYNC_PUBLISH="after_response")
    response = app.test_client().post("/items/9?key=late", headers={"X-User": "bob"})
    response.close()
    assert response.status_code == 200
    assert captured_tasks.assert_queued("record_context", "late").user == "bob"


def test_inline_mode_runs_tasks_and_captures_nothing(captured_tasks, reports, unique):
    app = basic.create_app(PYMACARON_ASYNC_ENABLED=False)
    with app.test_request_context("/items/2"):
        basic.record_context(unique)
    assert reports.one(unique, timeout=1)
    assert len(captured_tasks) == 0


def test_async_worker_runs_the_apps_tasks(client, async_worker, reports, unique):
    assert async_worker.alive()
    client.post(f"/items/5?key={unique}", headers={"X-User": "ada"})
    seen = reports.one(unique, timeout=30)
    assert seen["user"] == "ada" and seen["url"] == f"http://localhost/items/5?key={unique}"
    assert " ready." in async_worker.log()


# -- the plugin as a user gets it ------------------------------------------------------

INNER_APP = """
import json
import os

import redis
from flask import Flask, request

from flask_pymacaron_async import PymacaronAsync

ext = PymacaronAsync()


def create_app():
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="inner",
        PYMACARON_ASYNC_BROKER_URL=os.environ["PMA_TEST_BROKER_URL"],
        CELERY={"task_default_queue": os.environ["INNER_QUEUE"]},
    )
    ext.init_app(app)

    @app.route("/hello", methods=["POST"])
    def hello():
        greet.delay(request.args["name"])
        return "queued"

    return app


@ext.task
def greet(name):
    with redis.Redis.from_url(os.environ["PMA_TEST_BROKER_URL"]) as client:
        client.rpush(os.environ["INNER_KEY"], json.dumps({"name": name, "url": request.url, "pid": os.getpid()}))
"""

INNER_TESTS = """
import json
import os
import time

import pytest
import redis

from innerapp import create_app


@pytest.fixture
def app():
    return create_app()


def test_captured(client, captured_tasks):
    client.post("/hello?name=ada")
    assert captured_tasks.assert_queued("greet", "ada").url == "http://localhost/hello?name=ada"


def test_worker(client, async_worker):
    with open(os.environ["INNER_PIDFILE"], "w") as f:
        f.write(str(async_worker.pid))
    client.post("/hello?name=bob")
    client_ = redis.Redis.from_url(os.environ["PMA_TEST_BROKER_URL"])
    item = client_.blpop(os.environ["INNER_KEY"], timeout=30)
    client_.close()
    assert item is not None
    seen = json.loads(item[1])
    assert seen["name"] == "bob" and seen["pid"] == async_worker.pid
"""


def _run_inner_pytest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "INNER_QUEUE": os.environ["PMA_TEST_QUEUE"] + "-inner",
        "INNER_KEY": os.environ["PMA_TEST_PREFIX"] + ":inner-" + uuid.uuid4().hex[:8],
        "INNER_PIDFILE": str(tmp_path / "worker.pid"),
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_the_plugin_is_loaded_when_asked_for_and_kills_the_worker(tmp_path):
    (tmp_path / "innerapp.py").write_text(textwrap.dedent(INNER_APP))
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    result = _run_inner_pytest(tmp_path, "-p", "flask_pymacaron_async.testing", "test_inner.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    pid = int((tmp_path / "worker.pid").read_text())
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}")

    not_asked = _run_inner_pytest(tmp_path, "test_inner.py::test_captured")
    assert not_asked.returncode != 0
    assert "fixture 'captured_tasks' not found" in not_asked.stdout
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["flask_pymacaron_async.testing"]\n')
    in_conftest = _run_inner_pytest(tmp_path, "test_inner.py::test_captured")
    assert in_conftest.returncode == 0, in_conftest.stdout + in_conftest.stderr


def _imported(tmp_path, *args: str) -> set[str]:
    """The modules a pytest session collecting an empty project imports (``-X importtime``; no capture,
    which would swallow what is imported after it starts)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pytest", "--collect-only", "-q", "--capture=no"]
        + ["-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_a_project_that_does_not_ask_for_the_plugin_imports_nothing_of_it(tmp_path):
    """Installed, the package adds nothing to another project's pytest session: no entry point, no import."""
    from importlib.metadata import distribution

    assert not [e for e in distribution("flask-pymacaron-async").entry_points if e.group == "pytest11"]
    (tmp_path / "test_empty.py").write_text("def test_nothing():\n    pass\n")
    heavy = {"flask_pymacaron_async", "celery", "kombu", "redis"}
    imported = _imported(tmp_path)
    assert "pytest" in imported  # -X importtime did report
    assert not {name for name in imported if name.split(".")[0] in heavy}
    # The same measure sees them when the project asks for the plugin.
    asked = _imported(tmp_path, "-p", "flask_pymacaron_async.testing")
    assert {"flask_pymacaron_async._publish", "celery", "kombu"} <= asked


def test_plugin_module_creates_nothing_at_import():
    code = (
        "import sys, threading; import flask_pymacaron_async.testing as t; "
        "import flask_pymacaron_async._state as e; "
        "assert not e.states(), 'a state'; assert threading.active_count() == 1, 'a thread'; "
        "print(json.dumps(sorted(n for n in dir(t) if not n.startswith('_'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import json; " + code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    names = json.loads(result.stdout)
    assert {"captured_tasks", "async_worker", "async_worker_target", "CapturedTask", "CapturedTasks"} <= set(names)
