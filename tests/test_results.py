"""``ext.result_for``: a task's result is given to the user who queued it, and to no one else.

A real worker of tests/apps/results.py records the owner of each task it
runs in the Redis result backend; the tests queue tasks through the app's
endpoints as alice, then read ``/results/<id>`` as alice, bob and anonymous.
Every result and owner key a test made is deleted at its end.
"""

from __future__ import annotations

import logging
import types
import uuid

import pytest
from celery.backends.base import BaseKeyValueStoreBackend
from celery.result import AsyncResult
from flask import g

from flask_pymacaron_async import ConfigError, PymacaronAsync
from flask_pymacaron_async._deadletter import done_key
from flask_pymacaron_async._task import OWNER_KEY, record_owner
from tests.apps import results
from tests.faults import unique_queue


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from tests.conftest import Worker

    worker = Worker("tests.apps.results:celery", tmp_path_factory.mktemp("results"), queue=results.QUEUE).wait_ready()
    yield worker
    worker.stop()


@pytest.fixture
def app():
    return results.app


@pytest.fixture
def backend(app):
    return PymacaronAsync.state_for(app).celery.backend


@pytest.fixture
def task_ids(backend, redis_client):
    """The ids of the tasks a test queued: their result, owner and done keys are deleted at its end."""
    ids: list[str] = []
    yield ids
    keys = [
        key
        for i in ids
        for key in (backend.get_key_for_task(i), backend.get_key_for_task(i, key=OWNER_KEY), done_key(i))
    ]
    if keys:
        redis_client.delete(*keys)


def as_user(user):
    return {"X-User": user} if user else {}


def queue(client, task_ids, path, user="alice") -> str:
    """Queue through the app's endpoint ``path`` as ``user``; the task id."""
    response = client.post(path, headers=as_user(user))
    assert response.status_code == 200, response.data
    task_ids.append(response.get_json()["id"])
    return task_ids[-1]


def done(app, task_id):
    """The value of the task once it succeeded (read around ``result_for``, as the test's own)."""
    with app.app_context():
        return PymacaronAsync.state_for(app).celery.AsyncResult(task_id).get(timeout=20)


def read(client, task_id, user):
    return client.get(f"/results/{task_id}", headers=as_user(user))


def result_for(app, task_id, user):
    with app.test_request_context("/"):
        g.user = user
        return results.ext.result_for(task_id)


def test_the_user_who_queued_a_task_reads_its_result(app, client, worker, task_ids):
    task_id = queue(client, task_ids, "/double/21")
    assert done(app, task_id) == {"n": 42, "user": "alice"}

    response = read(client, task_id, "alice")
    assert response.status_code == 200
    assert response.get_json() == {"state": "SUCCESS", "value": {"n": 42, "user": "alice"}}
    found = result_for(app, task_id, "alice")
    assert isinstance(found, AsyncResult) and found.id == task_id
    assert found.get(timeout=5) == {"n": 42, "user": "alice"}


def test_another_user_or_anonymous_reads_nothing(app, client, worker, task_ids):
    task_id = queue(client, task_ids, "/double/5")
    done(app, task_id)

    assert read(client, task_id, "bob").status_code == 404
    assert read(client, task_id, None).status_code == 404
    assert result_for(app, task_id, "bob") is None
    assert result_for(app, task_id, None) is None
    # A value that prints like alice's is not alice.
    assert result_for(app, task_id, ["alice"]) is None


def test_an_unknown_id_is_pending_for_any_user_and_nothing_for_anonymous(app, client, worker):
    unknown = str(uuid.uuid4())
    for user in ("alice", "bob"):
        response = read(client, unknown, user)
        assert response.status_code == 200
        assert response.get_json() == {"state": "PENDING", "value": None}
    assert read(client, unknown, None).status_code == 404


def test_a_task_not_started_yet_is_pending_as_an_unknown_id_is(app, task_ids):
    """No worker consumes its queue: it has no owner yet, and its state tells nothing."""
    with app.test_request_context("/"):
        g.user = "alice"
        task_id = results.double.apply_async((1,), queue=unique_queue()).id
    task_ids.append(task_id)
    for user in ("alice", "bob"):
        assert result_for(app, task_id, user).state == "PENDING"


def test_a_task_queued_without_a_user_is_readable_by_no_one(app, client, worker, task_ids, redis_client, backend):
    task_id = queue(client, task_ids, "/double/2", user=None)
    assert done(app, task_id) == {"n": 4, "user": None}

    assert not redis_client.exists(backend.get_key_for_task(task_id, key=OWNER_KEY))
    for user in ("alice", "bob", None):
        assert read(client, task_id, user).status_code == 404


def test_no_owner_is_recorded_for_a_task_that_ignores_its_result(
    app, client, worker, task_ids, reports, unique, redis_client, backend
):
    task_id = queue(client, task_ids, f"/quiet/{unique}")
    assert reports.one(unique) == {"user": "alice"}

    assert not redis_client.exists(backend.get_key_for_task(task_id, key=OWNER_KEY))
    assert not redis_client.exists(backend.get_key_for_task(task_id))


def test_the_owner_is_a_digest_that_expires_with_the_result(app, client, worker, task_ids, redis_client, backend):
    task_id = queue(client, task_ids, "/double/3")
    done(app, task_id)

    key = backend.get_key_for_task(task_id, key=OWNER_KEY)
    assert key == backend.get_key_for_task(task_id) + b".pma-owner"
    owner = redis_client.get(key)
    state = PymacaronAsync.state_for(app)
    assert owner == state.owner_digest("alice").encode() and b"alice" not in owner
    assert 0 < redis_client.ttl(key) <= results.RESULT_EXPIRES
    assert 0 < redis_client.ttl(backend.get_key_for_task(task_id)) <= results.RESULT_EXPIRES


@pytest.mark.parametrize("task_id", ["", "x" * 256, "a\nb", "a\x00b", "\x7f", "a\ud800b"])
def test_an_id_that_no_task_has_reads_nothing(app, task_id):
    assert result_for(app, task_id, "alice") is None


def test_an_id_that_is_not_a_string_is_a_type_error(app):
    with pytest.raises(TypeError, match="task id string, not int"):
        result_for(app, 7, "alice")


def test_result_for_needs_a_key_value_store_result_backend():
    without = results.create_app(PYMACARON_ASYNC_RESULT_BACKEND=None)
    with pytest.raises(ConfigError, match="PYMACARON_ASYNC_RESULT_BACKEND"):
        result_for(without, str(uuid.uuid4()), "alice")

    rpc = results.create_app(
        PYMACARON_ASYNC_RESULT_BACKEND=None,
        CELERY={"task_default_queue": results.QUEUE, "result_backend": "rpc://"},
    )
    with pytest.raises(ConfigError, match="key-value store result backend.*RPCBackend"):
        result_for(rpc, str(uuid.uuid4()), "alice")


def test_the_owner_digest_is_keyed_canonical_and_survives_a_key_rotation():
    old = PymacaronAsync.state_for(results.create_app(SECRET_KEY="old"))
    new = PymacaronAsync.state_for(results.create_app(SECRET_KEY="new", PYMACARON_ASYNC_SECRET_KEY_FALLBACKS=["old"]))
    other = PymacaronAsync.state_for(results.create_app(SECRET_KEY="other"))

    assert old.owner_digest({"id": 7, "org": 1}) == old.owner_digest({"org": 1, "id": 7})
    assert old.owner_digest(7) != old.owner_digest("7")
    recorded = old.owner_digest("alice")
    assert new.owner_digest("alice") != recorded
    assert new.is_owner("alice", recorded) and new.is_owner("alice", recorded.encode())
    assert not new.is_owner("bob", recorded)
    assert not other.is_owner("alice", recorded)
    assert not new.is_owner("alice", None) and not new.is_owner("alice", "é" * 64)


class _Store(BaseKeyValueStoreBackend):
    """A key-value backend whose writes fail."""

    def __init__(self) -> None:  # no app: only set and get_key_for_task are used
        self.key_t = str

    task_keyprefix = "celery-task-meta-"

    def set(self, key, value):
        raise ConnectionError("store down")


def test_an_owner_that_cannot_be_recorded_is_logged_and_the_task_runs(app, caplog):
    task = types.SimpleNamespace(name="tests.apps.results.double", backend=_Store(), store_eager_result=False)
    request = types.SimpleNamespace(id="abc", is_eager=False)
    with caplog.at_level(logging.WARNING, logger="flask_pymacaron_async._task"):
        record_owner(task, PymacaronAsync.state_for(app), request, "alice")
    assert "Could not record the owner of tests.apps.results.double[abc]" in caplog.text
    assert "store down" in caplog.text and "alice" not in caplog.text
