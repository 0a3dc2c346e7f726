"""with_async false (or absent): @asynctask() functions run in the caller, in the same context as in a worker."""

from __future__ import annotations

import pytest

from .conftest import make_token

PET = {"name": "Rex", "tags": ["a"], "born": "2019-01-02T03:04:05+00:00"}


@pytest.mark.parametrize("with_async", ["false", None])
def test_tasks_run_inline_without_a_worker(servers, reports, unique, with_async):
    server = servers.start("--no-debug", config={"with_async": with_async})
    assert server.workers() == [] and server.started_workers() == []
    token = make_token("user-9")

    reply = server.post(f"/v1/pets?key={unique}", token, json=PET)
    assert reply.status_code == 200, reply.text
    seen = reports.one(f"{unique}:call", timeout=5)
    assert seen["pid"] == server.pid and seen["argv0"] == "server.py" and not seen["is_celery_task"]
    assert seen["url"] == f"{server.url}/v1/pets?key={unique}"
    assert seen["user_id"] == "user-9"
    assert seen["pet"]["is_service_class"] and seen["pet"]["json"] == PET
    assert seen["owner"]["is_service_class"] and seen["owner"]["json"]["id"] == "user-9"
    assert reports.one(f"{unique}:whoami", timeout=5)["body"] == {"user_id": "user-9"}
    assert reports.one(f"{unique}:delayed", timeout=5)["waited"] < 1.5  # inline: no delay

    # As before: a crashing task is reported, and the endpoint that called it still answers.
    reply = server.post(f"/v1/crash?key={unique}", token)
    assert reply.status_code == 200, reply.text
    crashes = [c for c in reports.get("crashes", 1, timeout=5) if f"boom {unique}" in c["title"]]
    assert len(crashes) == 1 and crashes[0]["pid"] == server.pid
    assert crashes[0]["user"]["id"] == "user-9"
    assert reports.one(f"{unique}:after", timeout=5)["pid"] == server.pid
