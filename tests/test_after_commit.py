"""``publish="after_commit"``: a task queued in a transaction is published when it commits, never when it rolls back.

Real databases (an SQLite file, and the machine's PostgreSQL when it
answers), real Redis: "published" means on the queue. One test runs a real
worker that reads the row the request wrote.
"""

from __future__ import annotations

import json
import os
import socket
import uuid

import pytest

os.environ.setdefault("PMA_ORDERS_TABLE", f"pma_orders_{uuid.uuid4().hex[:8]}")

sqlalchemy = pytest.importorskip("sqlalchemy", reason="the after_commit tests need SQLAlchemy")
pytest.importorskip("flask_sqlalchemy", reason="the after_commit tests need Flask-SQLAlchemy")

from tests.apps import orders  # noqa: E402  (after the table name is set)

PG_DRIVERS = ("psycopg", "psycopg2")


def _postgres_url() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            pass
    except OSError:
        return None
    for driver in PG_DRIVERS:
        try:
            __import__(driver)
        except ImportError:
            continue
        return f"postgresql+{driver}://{os.environ.get('PGUSER', 'postgres')}@127.0.0.1:5432/test"
    return None


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'orders.sqlite'}"
    url = _postgres_url()
    if url is None:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432 (or no psycopg / psycopg2): SQLite only here")
    return url


@pytest.fixture
def queue(redis_client):
    name = f"{os.environ['PMA_TEST_PREFIX']}-orders-{uuid.uuid4().hex[:6]}"
    yield name
    redis_client.delete(name)


@pytest.fixture
def app(db_url, queue):
    app = orders.create_app(SQLALCHEMY_DATABASE_URI=db_url, CELERY={"task_default_queue": queue})
    with app.app_context():
        orders.db.create_all()
    yield app
    with app.app_context():
        orders.db.session.remove()
        orders.db.drop_all()
        orders.db.engine.dispose()


def _queued(redis_client, queue) -> list[tuple]:
    """(task, args) of what waits on the queue."""
    import base64

    found = []
    for raw in redis_client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        body = json.loads(base64.b64decode(envelope["body"]))
        found.append((envelope["headers"]["task"].rsplit(".", 1)[-1], body[0]))
    return sorted(found)


def _add(name):
    orders.db.session.add(orders.Order(name=name))


def test_published_when_the_transaction_commits(app, redis_client, queue):
    with app.test_request_context("/orders"):
        _add("one")
        result = orders.ship.delay("one")
        assert _queued(redis_client, queue) == []  # held: the row is not committed yet
        assert result.id
        orders.db.session.commit()
        assert _queued(redis_client, queue) == [("ship", ["one"])]


def test_dropped_when_the_transaction_rolls_back(app, redis_client, queue):
    with app.test_request_context("/orders"):
        _add("two")
        orders.ship.delay("two")
        orders.db.session.rollback()
        orders.db.session.commit()  # a later commit publishes nothing of the rolled-back transaction
    assert _queued(redis_client, queue) == []


def test_savepoints(app, redis_client, queue):
    """A savepoint rolled back drops its tasks; one released hands them to the outer transaction."""
    with app.test_request_context("/orders"):
        _add("outer")
        orders.ship.delay("outer")
        with orders.db.session.begin_nested():
            _add("released")
            orders.ship.delay("released")
            with orders.db.session.begin_nested():
                _add("inner-released")
                orders.ship.delay("inner-released")
        savepoint = orders.db.session.begin_nested()
        _add("rolled-back")
        orders.ship.delay("rolled-back")
        savepoint.rollback()
        assert _queued(redis_client, queue) == []
        orders.db.session.commit()
    assert _queued(redis_client, queue) == [("ship", ["inner-released"]), ("ship", ["outer"]), ("ship", ["released"])]


def test_a_released_savepoint_of_a_rolled_back_transaction_publishes_nothing(app, redis_client, queue):
    with app.test_request_context("/orders"):
        _add("a")
        with orders.db.session.begin_nested():
            orders.ship.delay("a")
        orders.db.session.rollback()
    assert _queued(redis_client, queue) == []


def test_a_commit_that_fails_publishes_nothing(app, redis_client, queue):
    with app.test_request_context("/orders"):
        _add("dup")
        orders.db.session.commit()
        _add("dup")  # the unique constraint fails at the commit's flush
        orders.ship.delay("dup")
        with pytest.raises(sqlalchemy.exc.IntegrityError):
            orders.db.session.commit()
        orders.db.session.rollback()
    assert _queued(redis_client, queue) == []


def test_outside_a_transaction_and_per_task_immediate(app, redis_client, queue):
    with app.test_request_context("/orders"):
        orders.ship.delay("no-transaction")  # nothing touched the session: published at once
        assert _queued(redis_client, queue) == [("ship", ["no-transaction"])]
        _add("b")
        orders.notify.delay("b")  # publish="immediate" on the task wins over PYMACARON_ASYNC_PUBLISH
        assert ("notify", ["b"]) in _queued(redis_client, queue)
        orders.db.session.rollback()
    assert len(_queued(redis_client, queue)) == 2


def test_the_worker_finds_the_row_the_request_wrote(app, db_url, queue, start_worker, reports):
    start_worker(
        "tests.apps.orders:celery",
        queue=queue,
        env={"PMA_ORDERS_DB_URL": db_url, "PMA_ORDERS_QUEUE": queue},
    )
    with app.test_request_context("/orders"):
        _add("shipped")
        orders.ship.delay("shipped")
        orders.db.session.commit()
    assert reports.one("ship") == {"name": "shipped", "found": True}


def test_a_session_of_your_own(tmp_path, redis_client, queue):
    """Without Flask-SQLAlchemy: the session the ``sqlalchemy_session`` hook returns."""
    from flask import Flask
    from sqlalchemy.orm import Session

    from flask_pymacaron_async import PymacaronAsync

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'own.sqlite'}")
    session = Session(engine)
    app = Flask(__name__)
    app.config.update(SECRET_KEY="s", PYMACARON_ASYNC_PUBLISH="after_commit", CELERY={"task_default_queue": queue})
    ext = PymacaronAsync(app)
    ext.sqlalchemy_session(lambda: session)

    @ext.task
    def audit(what):
        pass

    with app.test_request_context("/"):
        session.execute(sqlalchemy.text("create table if not exists t (x int)"))
        audit.delay("kept")
        assert redis_client.llen(queue) == 0
        session.commit()
        assert redis_client.llen(queue) == 1
        session.execute(sqlalchemy.text("insert into t values (1)"))
        audit.delay("dropped")
        session.rollback()
    assert redis_client.llen(queue) == 1
    session.close()
    engine.dispose()
