"""The test service end to end: `python server.py --port N`, its worker from start_celery, real Redis.

Tasks write what they saw to Redis (see service/petshop/reporting.py); the
tests read it and check it against the call that queued them.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import pytest

from .conftest import QUEUE, WORKER_MARK, alive, cmdline, make_token, wait_for

PET = {"name": "Rex", "tags": ["good", "dog"], "born": "2019-01-02T03:04:05+00:00", "owner": {"id": "o-1"}}


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def queued(server, token, key):
    reply = server.post(f"/v1/pets?key={key}", token, json=PET)
    assert reply.status_code == 200, reply.text
    return reply.json()["task_ids"]


def test_one_worker_owned_by_the_server(server):
    # letsgo runs with the reloader: start_celery is called in the watcher and
    # in the child that serves; one worker runs, a child of the watcher.
    worker = server.one_worker()
    assert worker in server.started_workers()
    assert len([pid for pid in server.processes() if "server.py" in cmdline(pid)]) == 1
    assert f"{WORKER_MARK} worker" in cmdline(worker)


def test_models_user_and_url_reach_the_task(server, token, reports, unique):
    queued(server, token, unique)
    seen = reports.one(f"{unique}:call", timeout=30)

    assert "celery" in seen["argv0"] and seen["is_celery_task"]
    assert seen["ppid"] in server.started_workers()
    assert seen["pid"] != server.pid
    assert seen["url"] == f"{server.url}/v1/pets?key={unique}"
    assert seen["user_id"] == "user-42"
    assert seen["token"] == fingerprint(token)

    pet = seen["pet"]
    assert pet["class"] == "Pet" and pet["is_service_class"] and pet["born_is_datetime"]
    assert pet["json"] == PET
    twin = {"name": "Rex II", "born": "2020-02-29T12:30:00", "owner": {"id": "user-42", "name": "Ada"}}
    assert [p["json"] for p in seen["pets"]] == [PET, twin]
    assert all(p["class"] == "Pet" and p["is_service_class"] for p in seen["pets"])
    assert seen["count"] == 3
    assert seen["owner"]["class"] == "Owner" and seen["owner"]["is_service_class"]
    assert seen["owner"]["json"] == {"id": "user-42", "name": "Ada"}
    assert [p["json"] for p in seen["extra_pets"]] == [twin] and seen["extra_pets"][0]["is_service_class"]
    assert seen["extra_n"] == 1


def test_downstream_call_with_the_users_token(server, reports, unique):
    token = make_token("user-7")
    queued(server, token, unique)
    seen = reports.one(f"{unique}:whoami", timeout=30)
    assert seen["status"] == 200
    assert seen["body"] == {"user_id": "user-7"}
    assert seen["user_id"] == "user-7" and seen["token"] == fingerprint(token)


def test_delayed_task_and_no_readable_token_in_the_broker(server, token, redis_client, reports, unique):
    task_id = queued(server, token, unique)[2]

    def message():
        for raw in [*redis_client.lrange(QUEUE, 0, -1), *redis_client.hvals("unacked")]:
            if task_id.encode() in raw:
                return raw
        return None

    deadline = time.monotonic() + 2
    raw = None
    while raw is None and time.monotonic() < deadline:
        raw = message()
        time.sleep(0.02)
    assert raw is not None, "the delayed task's message is not in Redis"
    assert token.encode() not in raw
    assert token.split(".")[1].encode() not in raw  # not even the claims part
    assert b"pymacaron_async_context" in raw

    seen = reports.one(f"{unique}:delayed", timeout=30)
    assert seen["waited"] >= 1.5
    assert seen["user_id"] == "user-42" and seen["url"].endswith(f"/v1/pets?key={unique}")


def test_a_crashing_task_is_reported_and_the_worker_keeps_running(server, token, reports, unique):
    reply = server.post(f"/v1/crash?key={unique}", token)
    assert reply.status_code == 200, reply.text

    after = reports.one(f"{unique}:after", timeout=30)
    assert after["user_id"] == "user-42" and after["ppid"] in server.started_workers()

    def crash():
        return [c for c in reports.get("crashes", 1, timeout=30) if f"boom {unique}" in c["title"]]

    deadline = time.monotonic() + 30
    while not crash() and time.monotonic() < deadline:
        time.sleep(0.1)
    (report,) = crash()
    assert report["title"] == f"petshop.tasks.explode(): boom {unique}"
    assert report["user"]["id"] == "user-42" and report["user"]["is_auth"] == 1
    assert report["url"] == f"{server.url}/v1/crash?key={unique}"
    assert "ValueError: boom" in report["trace"]
    assert "exited with code" not in server.log()
    assert alive(server.one_worker())


@pytest.mark.parametrize("path", ["/v1/pets", "/v1/crash"])
def test_unauthenticated_calls_queue_nothing(server, reports, unique, path):
    reply = server.post(f"{path}?key={unique}", None, json=PET)
    assert reply.status_code == 401
    assert json.loads(reply.text)["error"] == "AUTHORIZATION_HEADER_MISSING"
    assert reports.none(f"{unique}:call", wait=0.5)


def test_a_message_naming_an_unknown_model_does_not_kill_the_worker(server, token, reports, unique):
    from kombu import Connection

    from tests.conftest import BROKER_URL

    server.one_worker()
    task_id = str(uuid.uuid4())
    bad = {"__pma__": "pymacaron", "api": "pets", "model": "NotAModel", "v": {}}
    body = json.dumps([[unique, bad], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    headers = {"lang": "py", "task": "petshop.tasks.after_explode", "id": task_id, "root_id": task_id}
    with Connection(BROKER_URL) as conn:
        conn.Producer().publish(
            body,
            routing_key=QUEUE,
            content_type="application/x-pymacaron-json",
            content_encoding="utf-8",
            headers=headers,
        )
    wait_for(lambda: task_id in server.log(), 30, 0.2, "the worker to see the message")

    queued(server, token, unique)
    assert reports.one(f"{unique}:call", timeout=30)["ppid"] in server.started_workers()
    assert "exited with code" not in server.log() and reports.none(f"{unique}:after", wait=0.2)
