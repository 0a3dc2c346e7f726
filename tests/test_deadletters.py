"""Deploy-safe delivery on Redis: message-bound contexts, key rotation, dead letters, deferrals, long delays.

Each test owns a redis-server (tests/faults.py), a queue, and real `celery
worker` processes of tests/apps/reliable.py, configured through PMA_REL_*
environment variables (the worker's release, keys, deploy grace, bound).
"""

from __future__ import annotations

import copy
import json
import re
import time
import uuid

import pytest
from flask import Flask

from flask_pymacaron_async import _context as context
from tests.apps import reliable
from tests.faults import RedisServer, children, kill_tree, rss_kib, unique_queue, wait_for
from tests.faults import cli as _cli

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def deploy(server, start_worker):
    """A queue, the web app publishing to it, and a way to start workers of either release."""
    queue = unique_queue()

    def env(**extra: str) -> dict[str, str]:
        return {
            "PMA_REL_BROKER_URL": server.url,
            "PMA_REL_QUEUE": queue,
            "PMA_REL_PREFIX": "rel",
            "PMA_REL_VISIBILITY": "3",
            **extra,
        }

    def worker(*extra: str, **variables: str):
        return start_worker(
            "tests.apps.reliable:celery", *(extra or ("--pool=solo",)), env=env(**variables), queue=queue
        )

    def app(**config):
        return reliable.create_app(broker=server.url, queue=queue, visibility=3, prefix="rel", **config)

    return queue, app, worker


def _dead(client, queue: str) -> list[dict]:
    ids = [i.decode() for i in client.lrange(f"{queue}.pma.dead", 0, -1)]
    return [json.loads(client.hget(f"{queue}.pma.dead.meta", i)) for i in ids]


def _honest(app, server, queue, run: str, n: int) -> dict:
    """An honest message for ``count(run, n)``, taken off the queue as it sits in Redis."""
    with app.test_request_context(f"/runs/{run}", headers={"X-Request-Id": f"rid-{n}"}):
        reliable.count.delay(run, n)
    return json.loads(server.client().rpop(queue))


# -- 1. the signature binds the context to its message -----------------------------------


def test_a_context_moved_to_another_message_is_refused_and_kept(deploy, server):
    """Alice's header on another message (other arguments, other id) is refused; her own message runs."""
    queue, make_app, start = deploy
    app = make_app()
    client = server.client()
    alice = _honest(app, server, queue, "alice", 1)
    forged = copy.deepcopy(_honest(app, server, queue, "mallory", 666))
    forged["headers"][context.HEADER] = alice["headers"][context.HEADER]
    client.lpush(queue, json.dumps(forged), json.dumps(alice))
    worker = start()
    wait_for(lambda: client.sismember("rel:alice:done", 1), 15, what="alice's task")
    wait_for(lambda: _dead(client, queue), 15, what="the forged message dead-lettered")
    assert not client.exists("rel:mallory:done")
    (letter,) = _dead(client, queue)
    assert letter["task_id"] == forged["headers"]["id"] and letter["task"] == "tests.apps.reliable.count"
    assert "does not match this message" in letter["reason"] and letter["kind"] == "refused"
    assert "Rejected task tests.apps.reliable.count" in worker.log()
    # The signal was sent in the worker.
    wait_for(lambda: client.llen("rel:dead"), 10, what="message_dead_lettered")
    assert json.loads(client.lindex("rel:dead", 0))["task_id"] == forged["headers"]["id"]

    # Requeued, it is checked again, and refused again: a forgery never runs.
    requeued = _cli(app, "requeue", forged["headers"]["id"])
    assert requeued.exit_code == 0, requeued.output
    wait_for(lambda: client.llen("rel:dead") == 2, 15, what="refused again")
    assert not client.exists("rel:mallory:done")
    assert len(_dead(client, queue)) == 1


# -- 2. key rotation ----------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["PYMACARON_ASYNC_SECRET_KEY_FALLBACKS", "SECRET_KEY_FALLBACKS"])
def test_key_rotation(deploy, server, setting):
    """Messages signed with the old key still run on a worker that lists it as a fallback."""
    if setting == "SECRET_KEY_FALLBACKS" and "SECRET_KEY_FALLBACKS" not in Flask.default_config:
        pytest.skip("SECRET_KEY_FALLBACKS is Flask 3.1's")
    queue, make_app, start = deploy
    client = server.client()
    if setting == "SECRET_KEY_FALLBACKS":
        # Signing with Flask's SECRET_KEY: the app has no key of its own.
        old_app = make_app(PYMACARON_ASYNC_SECRET_KEY=None, SECRET_KEY="old-key")
        new_app = make_app(PYMACARON_ASYNC_SECRET_KEY=None, SECRET_KEY="new-key", SECRET_KEY_FALLBACKS=["old-key"])
    else:
        old_app = make_app(PYMACARON_ASYNC_SECRET_KEY="old-key")
        new_app = make_app(PYMACARON_ASYNC_SECRET_KEY="new-key", PYMACARON_ASYNC_SECRET_KEY_FALLBACKS=["old-key"])
    with old_app.test_request_context("/before"):
        reliable.count.delay("rotation", 1)  # queued before the web tier got the new key
    with new_app.test_request_context("/after"):
        reliable.count.delay("rotation", 2)

    flask_keys = {"PMA_REL_FLASK_KEYS": "1"} if setting == "SECRET_KEY_FALLBACKS" else {}
    # A worker with only the new key refuses the old message, and keeps it.
    worker = start(PMA_REL_SECRET="new-key", **flask_keys)
    wait_for(lambda: client.sismember("rel:rotation:done", 2), 15, what="the new-key message")
    wait_for(lambda: _dead(client, queue), 15, what="the old-key message dead-lettered")
    assert "signed with a key this worker does not have" in _dead(client, queue)[0]["reason"]
    worker.stop()

    # With the old key as a fallback, the same message runs once requeued.
    start(PMA_REL_SECRET="new-key", PMA_REL_FALLBACKS="old-key", **flask_keys)
    assert _cli(new_app, "requeue", "--all").exit_code == 0
    wait_for(lambda: client.sismember("rel:rotation:done", 1), 15, what="the old-key message")
    assert client.llen("rel:rotation:runs") == 2
    assert _dead(client, queue) == []


# -- 3 and 4. dead letters, listed and requeued ------------------------------------------------


def test_a_task_that_failed_for_good_is_kept_and_runs_once_when_requeued(deploy, server):
    queue, make_app, start = deploy
    app = make_app()
    client = server.client()
    start()
    with app.test_request_context("/fail"):
        result = reliable.fails_until_allowed.delay("requeue")
    wait_for(lambda: _dead(client, queue), 15, what="the failed task dead-lettered")
    (letter,) = _dead(client, queue)
    assert letter["kind"] == "failed" and letter["exception"] == "RuntimeError"
    assert letter["id"] == result.id and "not allowed yet" in letter["reason"]

    listed = _cli(app, "dead", "--json")
    assert listed.exit_code == 0, listed.output
    (shown,) = json.loads(listed.output)
    assert shown["id"] == result.id and shown["task"] == "tests.apps.reliable.fails_until_allowed"
    assert shown["queue"] == queue and shown["age"] >= 0 and "raw" not in shown
    text = _cli(app, "dead").output
    assert "1 dead letter:" in text and result.id in text and "not allowed yet" in text
    status = json.loads(_cli(app, "status", "--json").output)
    assert status["dead_letters"][queue] == 1
    assert "1 dead letter (flask async dead)" in _cli(app, "status").output

    # The Python API says the same.
    with app.app_context():
        assert [d.id for d in reliable.ext.dead_letters()] == [result.id]

    client.set("rel:requeue:allow", 1)
    requeued = _cli(app, "requeue", result.id)
    assert requeued.exit_code == 0, requeued.output
    assert f"Requeued {result.id}" in requeued.output
    wait_for(lambda: client.sismember("rel:requeue:done", 1), 15, what="the requeued task")
    time.sleep(1)
    assert client.llen("rel:requeue:runs") == 2  # the failure, then the one requeued run
    assert _dead(client, queue) == []
    assert _cli(app, "requeue", "nope").exit_code == 1


def test_purge_and_the_failed_setting(deploy, server):
    queue, make_app, start = deploy
    app = make_app()
    client = server.client()
    start()
    with app.test_request_context("/fail"):
        reliable.fail.delay("purge")
    wait_for(lambda: _dead(client, queue), 15, what="the failed task dead-lettered")
    assert _cli(app, "dead", "--purge").exit_code == 1  # asks first; no input: aborted
    purged = _cli(app, "dead", "--purge", "--yes")
    assert purged.exit_code == 0 and "Deleted 1 dead letter." in purged.output
    assert _dead(client, queue) == [] and not client.keys(f"{queue}.pma.dead*")


def test_failed_tasks_are_not_kept_when_the_setting_is_off(deploy, server):
    queue, make_app, start = deploy
    app = make_app()
    client = server.client()
    start(PMA_REL_KEEP_FAILED="0")
    with app.test_request_context("/fail"):
        reliable.fail.delay("not-kept")
    wait_for(lambda: client.llen("rel:not-kept:runs"), 15, what="the task ran")
    time.sleep(1)
    assert _dead(client, queue) == []


def test_a_task_failing_while_the_broker_is_away_runs_again_then_is_kept(deploy, server, tmp_path):
    """Dead-lettering needs the broker: without it the message is not acknowledged, and comes back."""
    queue, make_app, start = deploy
    reports = RedisServer(tmp_path / "reports").start()
    try:
        app = make_app(REPORT_URL=reports.url)
        start(PMA_REL_REPORT_URL=reports.url)
        runs = reports.client()
        with app.test_request_context("/late"):
            reliable.fail_after.delay("late", 1.5)
        wait_for(lambda: runs.llen("rel:late:runs") == 1, 15, what="the task started")
        server.stop()
        time.sleep(3)  # it failed meanwhile
        server.start()
        client = server.client()
        wait_for(lambda: _dead(client, queue), 60, what="dead-lettered once the broker is back")
        assert runs.llen("rel:late:runs") == 2  # ran again, rather than being lost
        (letter,) = _dead(client, queue)
        assert letter["kind"] == "failed" and "failed late" in letter["reason"]
    finally:
        reports.stop()


# -- 5. rolling deploys --------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["unknown-task", "changed-signature"])
def test_a_task_an_old_worker_does_not_know_waits_for_a_new_worker(deploy, server, call):
    queue, make_app, start = deploy
    app = make_app()
    client = server.client()
    old = start(PMA_REL_VERSION="1")
    with app.test_request_context("/deploy"):
        if call == "unknown-task":
            reliable.added_in_v2.delay("deploy", 1)
        else:
            reliable.changed.delay("deploy", 1, "extra")
    wait_for(lambda: "Deferred task tests.apps.reliable." in old.log(), 15, what="the old worker deferring it")
    assert re.search(r"back on its queue in [01](\.\d)?s", old.log())
    time.sleep(2)
    assert not client.exists("rel:deploy:done")
    # The deploy goes on: the new release's worker starts, the old one stops.
    start()
    old.stop()
    wait_for(lambda: client.sismember("rel:deploy:done", 1), 45, what="the new worker running it")
    time.sleep(1)
    assert client.llen("rel:deploy:runs") == 1
    assert _dead(client, queue) == []


def test_past_the_deploy_grace_it_is_dead_lettered(deploy, server):
    queue, make_app, start = deploy
    app = make_app()
    client = server.client()
    old = start(PMA_REL_VERSION="1", PMA_REL_GRACE="3")
    with app.test_request_context("/deploy"):
        reliable.added_in_v2.delay("late", 1)
    wait_for(lambda: _dead(client, queue), 30, what="dead-lettered after the grace period")
    (letter,) = _dead(client, queue)
    assert "unknown task 'tests.apps.reliable.added_in_v2'" in letter["reason"]
    assert "PYMACARON_ASYNC_DEPLOY_GRACE=3s" in letter["reason"]
    assert old.log().count("Deferred task") >= 2
    # Requeued once the deploy is over, it runs (its deferral count starts again).
    start()
    old.stop()
    assert _cli(app, "requeue", "--all").exit_code == 0
    wait_for(lambda: client.sismember("rel:late:done", 1), 30, what="the requeued task")


# -- bounded, and atomic ------------------------------------------------------------------------


def test_the_dead_letters_stay_bounded_under_a_flood(deploy, server):
    queue, make_app, start = deploy
    app = make_app()
    client = server.client()
    worker = start("--pool=prefork", "-c", "1", PMA_REL_DEAD_MAX="1000")
    with app.test_request_context("/warm"):
        reliable.count.delay("warm", 1)
    wait_for(lambda: client.sismember("rel:warm:done", 1), 15, what="a first task")
    rss_before = rss_kib(worker.pid)
    flood = 50_000
    with client.pipeline(transaction=False) as pipe:
        for n in range(flood):
            pipe.lpush(queue, f"garbage {n}")
        pipe.execute()
    wait_for(lambda: client.llen(queue) == 0, 300, interval=0.5, what="the flood taken")
    assert client.llen(f"{queue}.pma.dead") == 1000
    assert client.hlen(f"{queue}.pma.dead.raw") == 1000 and client.hlen(f"{queue}.pma.dead.meta") == 1000
    # The newest are kept.
    newest = json.loads(client.hget(f"{queue}.pma.dead.meta", client.lindex(f"{queue}.pma.dead", 0)))
    assert newest["reason"].startswith("not a readable message envelope")
    assert client.hget(f"{queue}.pma.dead.raw", newest["id"]) == f"garbage {flood - 1}".encode()
    assert "are full (PYMACARON_ASYNC_DEAD_LETTER_MAX=1000): dropped the oldest" in worker.log()
    growth = rss_kib(worker.pid) - rss_before
    print(f"\nflood of {flood}: worker RSS +{growth} KiB")
    assert growth < 20 * 1024
    with app.test_request_context("/after"):
        reliable.count.delay("after-flood", 1)
    wait_for(lambda: client.sismember("rel:after-flood:done", 1), 15, what="a task after the flood")
    assert worker.alive()


def test_a_worker_killed_while_dead_lettering_loses_nothing(deploy, server):
    """SIGKILL in the middle of a stream of refused messages: each is on its queue, unacknowledged or dead."""
    queue, make_app, start = deploy
    app = make_app()
    client = server.client()
    template = _honest(app, server, queue, "k", 1)
    total = 3000
    with client.pipeline(transaction=False) as pipe:
        for n in range(total):
            if n % 2:
                pipe.lpush(queue, f"garbage {n}")
            else:  # a message kombu reads, refused for its signature
                m = copy.deepcopy(template)
                m["headers"]["id"] = str(uuid.uuid4())
                m["properties"]["delivery_tag"] = str(uuid.uuid4())
                pipe.lpush(queue, json.dumps(m))
        pipe.execute()

    def accounted() -> int:
        return client.llen(queue) + client.hlen("unacked") + client.llen(f"{queue}.pma.dead")

    for kill_after in (400, 1500):
        worker = start("--pool=prefork", "-c", "1")
        wait_for(lambda: client.llen(f"{queue}.pma.dead") >= kill_after, 120, what=f"{kill_after} dead")  # noqa: B023
        assert children(worker.pid)
        kill_tree(worker)
        assert accounted() == total
    start("--pool=prefork", "-c", "1")
    # What the killed workers held comes back after the visibility timeout (3 s), and is refused too.
    wait_for(lambda: client.llen(f"{queue}.pma.dead") == total, 120, what="every message dead-lettered")
    assert client.llen(queue) == 0 and client.hlen("unacked") == 0


# -- 7. a long countdown runs once -----------------------------------------------------------------


def test_a_long_countdown_runs_once_with_two_workers(deploy, server):
    """Held past the visibility timeout, Celery's ETA task would run on both workers; here it waits in Redis."""
    queue, make_app, start = deploy
    app = make_app(PYMACARON_ASYNC_VISIBILITY_TIMEOUT=4)
    client = server.client()
    for _ in range(2):
        start("--pool=prefork", "-c", "1", PMA_REL_VISIBILITY="4")
    queued_at = time.time()
    with app.test_request_context("/later"):
        reliable.work.apply_async(("later", 1, 0), countdown=14)
    assert client.zcard(f"{queue}.pma.scheduled") == 1 and client.llen(queue) == 0
    wait_for(lambda: client.sismember("rel:later:done", 1), 40, what="the delayed task")
    ran_at = time.time()
    time.sleep(8)  # two visibility timeouts: a second run would show by now
    assert client.llen("rel:later:runs") == 1
    assert ran_at - queued_at >= 13.5
    assert client.zcard(f"{queue}.pma.scheduled") == 0 and client.hlen("unacked") == 0


def test_a_short_countdown_is_published_as_usual(deploy, server):
    queue, make_app, start = deploy
    app = make_app()
    client = server.client()
    with app.test_request_context("/soon"):
        reliable.work.apply_async(("soon", 1, 0), countdown=1)
    assert client.llen(queue) == 1 and client.zcard(f"{queue}.pma.scheduled") == 0
    start()
    wait_for(lambda: client.sismember("rel:soon:done", 1), 15, what="the task")


def test_purge_drops_delayed_tasks_too(deploy, server):
    queue, make_app, start = deploy
    app = make_app()
    client = server.client()
    with app.test_request_context("/later"):
        reliable.work.apply_async(("purged", 1, 0), countdown=3600)
    status = json.loads(_cli(app, "status", "--json").output)
    assert status["delayed"][queue] == 1
    assert "1 delayed" in _cli(app, "status").output
    purged = _cli(app, "purge", "--yes")
    assert purged.exit_code == 0 and "Purged 1 task" in purged.output
    assert client.zcard(f"{queue}.pma.scheduled") == 0
