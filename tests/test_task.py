"""Tasks queued from the app run in a real `celery worker` process."""

from __future__ import annotations

import datetime
import decimal
import time
import uuid

import pytest
from celery import Celery, chain, group
from celery.result import AsyncResult
from flask import g

from flask_pymacaron_async import _context as context
from tests.apps import basic


def test_call_queues_and_returns_async_result(app, module_worker, reports, unique):
    result = basic.record_value("hello", unique)
    assert isinstance(result, AsyncResult)
    assert reports.one(unique) == {"value": "hello", "type": "str"}


def test_delay_apply_async_and_results(app, module_worker, reports, unique):
    basic.record_value.delay(1, unique)
    basic.record_value.apply_async((2, unique), countdown=0.1)
    assert sorted(r["value"] for r in reports.get(unique, 2)) == [1, 2]
    assert basic.add.delay(2, 3).get(timeout=15) == 5


def test_delay_option_postpones(app, module_worker, reports, unique):
    queued_at = time.time()
    basic.later(unique)
    assert reports.one(unique) >= queued_at + 1.4
    queued_at = time.time()
    basic.later.apply_async((f"{unique}-now",), countdown=0)  # an explicit countdown wins
    assert reports.one(f"{unique}-now") < queued_at + 1.4


def test_rich_arguments_arrive_as_same_types(app, module_worker, reports, unique):
    when = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    ident = uuid.UUID(int=7)
    basic.record_types(
        unique, when, [decimal.Decimal("1.5"), {"d": datetime.date(2024, 1, 2)}], blob=b"\x01", ident=ident
    )
    seen = reports.one(unique)
    assert seen["args"] == [repr(when), repr([decimal.Decimal("1.5"), {"d": datetime.date(2024, 1, 2)}])]
    assert seen["kwargs"] == {"blob": repr(b"\x01"), "ident": repr(ident)}


def test_unsendable_argument_raises_and_queues_nothing(app, redis_client, unique):
    queue = basic.celery.conf.task_default_queue
    before = redis_client.llen(queue)
    with pytest.raises(TypeError, match=r"record_value\(\): argument 'value' of type object"):
        basic.record_value(object(), unique)
    with pytest.raises(TypeError, match="argument 'key'"):
        basic.record_value.delay(1, key={1})
    assert redis_client.llen(queue) == before


def test_wrong_argument_count_raises_at_call_site(app):
    with pytest.raises(TypeError):
        basic.add(1)


def test_chain_and_group_carry_the_context(client, module_worker, reports, unique):
    client.get("/chain", headers={"X-User": "chainer"})
    assert reports.one("chained")["value"] == 3
    group(basic.record_context.s(f"{unique}-g1"), basic.record_context.s(f"{unique}-g2")).delay()
    chain(basic.add.s(1, 1), basic.record_value.s(f"{unique}-c")).delay()
    assert reports.one(f"{unique}-g1")["has_request"] is True
    assert reports.one(f"{unique}-g2")["has_request"] is True
    assert reports.one(f"{unique}-c")["value"] == 2


def test_task_queued_from_task_carries_its_context(client, module_worker, reports, unique):
    with client.application.test_request_context("/outer?x=1", headers={"X-Tenant": "acme"}):
        from flask import g

        g.user = "nester"
        basic.nested(unique)
    seen = reports.one(unique)
    assert seen["url"] == "http://localhost/outer?x=1"
    assert seen["user"] == "nester"
    assert seen["headers"]["X-Tenant"] == "acme"


def test_a_chord_callback_runs_in_the_context_of_the_request(app, module_worker, reports, unique):
    """The callback is sent by the worker once the header is done: signed for its own message, same context."""
    from celery import chord

    with app.test_request_context("/chord?x=1"):
        g.user = "chordist"
        chord([basic.add.s(1, 2), basic.add.s(3, 4)])(basic.record_with_user.s(unique))
    seen = reports.one(unique, timeout=30)
    assert sorted(seen["value"]) == [3, 7]
    assert seen["user"] == "chordist" and seen["url"] == "http://localhost/chord?x=1"


def test_tampered_or_missing_context_is_rejected_worker_survives(app, start_worker, reports, unique):
    queue = f"{basic.celery.conf.task_default_queue}-{unique}"
    worker = start_worker(queue=queue)
    task = basic.record_value.celery_task
    state = app.extensions["pymacaron_async"]
    with app.app_context():
        payload = context.take(state)
    # Signed for some other message, then a digit changed: the signature matches nothing.
    good = state.signer.sign(payload, task.name, "some-id", b"[]")
    task.celery_apply_async(("tampered", f"{unique}-bad"), {}, headers={context.HEADER: good[:-2] + "xx"}, queue=queue)
    # Sent by another service's plain Celery: no context at all.
    plain = Celery("other-service", broker=basic.celery.conf.broker_url, set_as_current=False)
    plain.send_task(task.name, ("missing", f"{unique}-bad"), queue=queue, serializer="json")
    plain.close()
    other = context.ContextSigner("another-key").sign(payload, task.name, "some-id", b"[]")
    task.celery_apply_async(("other-key", f"{unique}-bad"), {}, headers={context.HEADER: other}, queue=queue)
    basic.record_value.apply_async(("after", unique), queue=queue)
    assert reports.one(unique)["value"] == "after"
    assert reports.none(f"{unique}-bad", wait=0.5)
    assert worker.alive()
    log = worker.log()
    assert log.count("Rejected task tests.apps.basic.record_value") == 3
    assert "signature does not match" in log and "no context snapshot" in log


def test_app_factory_with_blueprint_tasks(start_worker, reports, unique):
    from tests.apps.factory import create_app, ship

    queue = f"{basic.celery.conf.task_default_queue}-factory"
    start_worker("tests.apps.make_celery:celery", queue=queue)
    app = create_app()
    response = app.test_client().post(f"/orders/9/ship?key={unique}")
    assert response.json == {"shipping": 9}
    seen = reports.one(unique)
    assert seen == {"order": 9, "url": f"http://localhost/orders/9/ship?key={unique}", "endpoint": "shop.ship_order"}
    assert ship.name == "tests.apps.factory.ship"
