"""Fan-out in one round trip: ``ext.batch()`` and the tasks a request holds for after the response.

Real Redis (the run's, and redis-server processes of the tests' own whose
command counters say how many round trips a batch took), the machine's
RabbitMQ, real `celery worker` processes of tests/apps/reliable.py.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging

import pytest
import redis

from flask_pymacaron_async import AsyncUnavailable, signals
from flask_pymacaron_async import _context as context
from tests.apps import reliable
from tests.faults import RedisServer, unique_queue, wait_for


@pytest.fixture
def server(tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    yield server
    server.stop()


def _stats(client: redis.Redis) -> dict[str, int]:
    return {name: value["calls"] for name, value in client.info("commandstats").items()}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def _queued(server: RedisServer, queue: str) -> list[dict]:
    return [json.loads(m) for m in server.client().lrange(queue, 0, -1)]


@pytest.fixture
def failed():
    seen = []

    def receiver(sender, task_id, **extra):
        seen.append(task_id)

    with signals.task_failed.connected_to(receiver):
        yield seen


# -- one round trip ------------------------------------------------------------


def test_a_batch_is_one_pipeline(server):
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue)
    client = server.client()
    with app.test_request_context("/fan-out"):
        reliable.count.delay("warm-up", 0)  # connection, queue declared
        before = _stats(client)
        with reliable.ext.batch():
            results = [reliable.count.delay("fan", n) for n in range(50)]
            assert client.llen(queue) == 1  # held until the block ends
        spent = _delta(before, _stats(client))
    # The test's own INFO and LLEN; then one LPUSH of the 50 messages,
    # after at most one read of the exchange's bindings (older kombu reads them per message).
    assert spent.pop("cmdstat_info") == 1 and spent.pop("cmdstat_llen") == 1
    assert spent.pop("cmdstat_smembers", 0) <= 1
    assert spent == {"cmdstat_lpush": 1}
    ids = [m["headers"]["id"] for m in reversed(_queued(server, queue)[:-1])]
    assert ids == [r.id for r in results]  # taken in the order they were queued


def test_a_batch_to_several_queues_is_one_transaction(server):
    """One LPUSH per queue, in one MULTI/EXEC: all the batch's messages are queued, or none is."""
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue)
    client = server.client()
    other = f"{queue}-other"
    with app.test_request_context("/fan-out"):
        reliable.count.apply_async(("warm-up", 0), queue=other)  # both queues declared
        reliable.count.delay("warm-up", 0)
        before = _stats(client)
        with reliable.ext.batch():
            here = [reliable.count.delay("fan", n).id for n in range(3)]
            there = [reliable.count.apply_async(("fan", n), queue=other).id for n in range(3)]
            here.append(reliable.count.delay("fan", 3).id)
        spent = _delta(before, _stats(client))
    assert spent.pop("cmdstat_info") == 1 and spent.pop("cmdstat_smembers", 0) <= 1
    assert spent == {"cmdstat_multi": 1, "cmdstat_lpush": 2, "cmdstat_exec": 1}
    assert [m["headers"]["id"] for m in reversed(_queued(server, queue)[:-1])] == here
    assert [m["headers"]["id"] for m in reversed(_queued(server, other)[:-1])] == there
    client.delete(other)


def test_a_batch_routed_by_its_arguments_sends_each_call_where_celery_routes_it(server):
    """A router may send calls of one task to other queues by their arguments: no copy of another call's message."""
    queue = unique_queue()
    odd = f"{queue}-odd"
    app = reliable.create_app(broker=server.url, queue=queue)

    def by_parity(name, args, kwargs, options, task=None, **kw):
        return {"queue": odd} if args[1] % 2 else None

    app.extensions["pymacaron_async"].celery.conf.task_routes = (by_parity,)
    with app.test_request_context("/fan-out"), reliable.ext.batch():
        ids = [reliable.count.delay("fan", n).id for n in range(6)]
    assert [m["headers"]["id"] for m in reversed(_queued(server, queue))] == ids[0::2]
    assert [m["headers"]["id"] for m in reversed(_queued(server, odd))] == ids[1::2]
    server.client().delete(odd)


def test_after_response_publishes_when_the_response_is_closed_in_one_pipeline(server):
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, PYMACARON_ASYNC_PUBLISH="after_response")

    @app.route("/notify/<int:count>", methods=["POST"])
    def notify(count):
        with reliable.ext.batch():  # the same batch as the request's
            ids = [reliable.count.delay("notify", n).id for n in range(count)]
        return {"ids": ids}

    test_client = app.test_client()
    test_client.post("/notify/1").close()  # connection, queue declared
    before = _stats(server.client())
    response = test_client.post("/notify/20")
    assert server.client().llen(queue) == 1
    response.close()
    spent = _delta(before, _stats(server.client()))
    assert spent.get("cmdstat_lpush") == 1 and "cmdstat_exec" not in spent  # the 20 messages in one LPUSH
    assert {m["headers"]["id"] for m in _queued(server, queue)} >= set(response.json["ids"])


@pytest.mark.parametrize("where", ["request", "script"])
def test_a_copied_message_is_the_one_celery_builds(server, monkeypatch, where):
    """The second call of a task in a batch copies the first one's message: the same as Celery's own, byte for byte."""
    from flask import g

    from flask_pymacaron_async._task import ContextTask

    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, PYMACARON_ASYNC_PUBLISH="immediate")
    through_celery = []
    original = ContextTask.celery_apply_async

    def counted(self, *args, **kwargs):
        through_celery.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ContextTask, "celery_apply_async", counted)
    call = ("copy", {"n": [2, 3], "when": "2026-12-02T10:00:00", "name": "zoë"})
    scope = (
        app.test_request_context("/copies?x=1", headers={"User-Agent": "copies"})
        if where == "request"
        else app.app_context()
    )
    with scope:
        g.user = "ada"
        with reliable.ext.batch():
            reliable.count.delay("copy", 1)
            reliable.who.delay("copy", 1)
            reliable.count.apply_async(call, task_id="the-same-id")
            reliable.count.apply_async(("copy", 7), task_id="flat-id")  # flat arguments: repr, not saferepr
            reliable.count.apply_async(call, countdown=1)  # another shape: through Celery
        assert through_celery == [reliable.count.name, reliable.who.name, reliable.count.name]
        # The same calls, immediate, through Celery: without the templates the batch left.
        publisher = app.extensions["pymacaron_async"].publisher
        publisher.forget_templates()
        reliable.count.apply_async(call, task_id="the-same-id")
        publisher.forget_templates()
        reliable.count.apply_async(("copy", 7), task_id="flat-id")
        assert through_celery[3:] == [reliable.count.name] * 2
    messages = list(reversed(_queued(server, queue)))  # LPUSH: newest first
    assert len(messages) == 7
    for task_id in ("the-same-id", "flat-id"):
        _assert_same_message(app, *[m for m in messages if m["headers"]["id"] == task_id])


def _assert_same_message(app, copy: dict, reference: dict) -> None:
    """Two messages are the same but for their delivery tags and their signatures (each has its own nonce)."""
    signer = app.extensions["pymacaron_async"].signer
    signatures = []
    for message in (copy, reference):
        message["properties"].pop("delivery_tag")
        headers = message["headers"]
        token = headers[context.HEADER]
        bound = context.bound_headers(headers, message["content-type"])
        signer.verify(token, headers["task"], headers["id"], base64.b64decode(message["body"]), bound=bound)
        headers[context.HEADER], signature = token.rsplit(".", 1)
        signatures.append(signature)
    assert copy == reference
    assert signatures[0] != signatures[1] and all(len(s) == 30 for s in signatures)


def test_an_immediate_call_copies_its_tasks_message_and_it_is_the_one_celery_builds(server, monkeypatch):
    """Outside a batch too: after a task's first call in a thread, its calls are copies of that message."""
    import threading

    from flask_pymacaron_async._task import ContextTask

    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, PYMACARON_ASYNC_PUBLISH="immediate")
    publisher = app.extensions["pymacaron_async"].publisher
    through_celery = []
    original = ContextTask.celery_apply_async

    def counted(self, *args, **kwargs):
        through_celery.append(threading.get_ident())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ContextTask, "celery_apply_async", counted)
    client = server.client()
    call = ("immediate", {"n": (1, 2), "name": "zoë", "at": datetime.datetime(2026, 12, 5, 10, 0)})
    with app.test_request_context("/immediate?x=1", headers={"User-Agent": "copies"}):
        reliable.count.delay("first", 0)
        before = _stats(client)
        copy = reliable.count.apply_async(call, task_id="the-same-id")
        spent = _delta(before, _stats(client))
        assert len(through_celery) == 1  # the second call is a copy
        assert spent.pop("cmdstat_info") == 1 and spent == {"cmdstat_lpush": 1}  # one LPUSH, nothing else

        publisher.forget_templates()
        reference = reliable.count.apply_async(call, task_id="the-same-id")
        assert len(through_celery) == 2

        # Another thread has templates of its own (a message names its thread's reply queue).
        elsewhere = []

        def in_a_thread():
            with app.app_context():
                elsewhere.append(reliable.count.delay("thread", 1).id)

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join()
        assert len(through_celery) == 3 and through_celery[-1] != threading.get_ident()
    assert copy.id == reference.id == "the-same-id" and elsewhere
    _assert_same_message(app, *[m for m in _queued(server, queue) if m["headers"]["id"] == "the-same-id"])


def test_a_call_returns_the_result_celery_would(server):
    app = reliable.create_app(broker=server.url, queue=unique_queue())
    publisher = app.extensions["pymacaron_async"].publisher
    with app.app_context():
        task = reliable.count.celery_task
        ours, celerys = publisher.result(task, "some-id"), task.AsyncResult("some-id")
        with reliable.ext.batch():
            queued = reliable.count.delay("result", 1)
    for result in (ours, queued):
        assert type(result) is type(celerys) and result.app is celerys.app and result.backend is celerys.backend
    assert ours.id == "some-id" and ours.parent is None and queued.id != ours.id


def test_a_thread_keeps_few_templates_when_every_call_has_headers_of_its_own(server):
    """A trace context per call makes a shape per call: the templates a thread keeps stay bounded."""
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue)
    publisher = app.extensions["pymacaron_async"].publisher
    with app.app_context():
        for n in range(150):
            reliable.count.apply_async(("headers", n), headers={"traceparent": f"00-{n:032x}-{n:016x}-01"})
    assert 0 < len(publisher.templates()) <= 64
    assert server.client().llen(queue) == 150
    server.client().delete(queue)


def test_an_immediate_copy_to_a_broker_that_died_raises_or_runs_inline(server):
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue)
    inline = reliable.create_app(broker=server.url, queue=queue, PYMACARON_ASYNC_FALLBACK="inline")
    reliable.NOTES.clear()
    with app.app_context():
        reliable.count.delay("warm-up", 0)  # the template
    with inline.app_context():
        reliable.note.delay("warm-up")
    server.stop()
    with app.app_context(), pytest.raises(AsyncUnavailable, match="could not queue .*count"):
        reliable.count.delay("lost", 1)
    with inline.app_context():
        reliable.note.delay("here")
    assert reliable.NOTES == ["here"]


@pytest.mark.parametrize("setting", [{"task_compression": "gzip"}], ids=["compressed"])
def test_what_a_copy_could_get_wrong_goes_through_celery(server, monkeypatch, setting):
    from flask_pymacaron_async._task import ContextTask

    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, CELERY={"task_default_queue": queue, **setting})
    through_celery = []
    original = ContextTask.celery_apply_async
    monkeypatch.setattr(
        ContextTask, "celery_apply_async", lambda self, *a, **k: through_celery.append(1) or original(self, *a, **k)
    )
    with app.app_context(), reliable.ext.batch():
        for n in range(3):
            reliable.count.delay("setting", n)
    assert len(through_celery) == 3 and len(_queued(server, queue)) == 3


# -- held, dropped, reported -----------------------------------------------------


def test_a_block_that_raises_queues_nothing(server, caplog):
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue)
    with app.app_context(), caplog.at_level(logging.DEBUG, "flask_pymacaron_async"):
        with pytest.raises(RuntimeError), reliable.ext.batch():
            reliable.count.delay("dropped", 1)
            reliable.count.delay("dropped", 2)
            raise RuntimeError("the transaction failed")
    assert server.client().llen(queue) == 0
    assert "dropping 2 held call(s)" in caplog.text


def test_a_block_that_raises_in_a_request_held_for_the_response_takes_its_calls_back(server):
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, PYMACARON_ASYNC_PUBLISH="after_response")

    @app.route("/partly", methods=["POST"])
    def partly():
        reliable.count.delay("kept", 1)
        try:
            with reliable.ext.batch():
                reliable.count.delay("dropped", 2)
                raise KeyError("no such follower")
        except KeyError:
            pass
        return {"ok": True}

    app.test_client().post("/partly").close()
    assert [m["headers"]["argsrepr"] for m in _queued(server, queue)] == ["('kept', 1)"]


def test_an_argument_that_cannot_be_sent_raises_at_the_call(server):
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue)
    with app.app_context(), reliable.ext.batch():
        reliable.count.delay("fine", 1)
        with pytest.raises(TypeError, match="object"):
            reliable.count.delay("bad", object())
    assert len(_queued(server, queue)) == 1


def test_nested_batches_join_the_outer_one(server):
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue)
    with app.app_context(), reliable.ext.batch():
        reliable.count.delay("outer", 1)
        with reliable.ext.batch():
            reliable.count.delay("inner", 2)
        assert server.client().llen(queue) == 0
    assert len(_queued(server, queue)) == 2


def test_a_broker_that_died_raises_with_every_task_id_and_queues_nothing(server):
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue)
    with app.app_context():
        reliable.count.delay("warm-up", 0)
        with pytest.raises(AsyncUnavailable) as raised, reliable.ext.batch():
            results = [reliable.count.delay("lost", n) for n in range(5)]
            server.stop()
    assert raised.value.task_ids == [r.id for r in results]
    assert "5 task(s)" in str(raised.value)
    server.start()  # its data is gone with it (no append-only file): nothing was half-sent either way
    assert server.client().llen(queue) == 0


def test_after_response_with_a_dead_broker_reports_each_task(server, broker_url, caplog, failed):
    queue = unique_queue()
    app = reliable.create_app(
        broker=server.url, queue=queue, reports=broker_url, PYMACARON_ASYNC_PUBLISH="after_response"
    )

    @app.route("/three", methods=["POST"])
    def three():
        return {"ids": [reliable.count.delay("late", n).id for n in range(3)]}

    test_client = app.test_client()
    test_client.post("/three").close()
    response = test_client.post("/three")
    server.stop()
    with caplog.at_level(logging.ERROR, "flask_pymacaron_async"):
        response.close()
    assert failed == response.json["ids"]
    for task_id in response.json["ids"]:
        assert f"[{task_id}] not published" in caplog.text


def test_the_inline_fallback_runs_a_batch_in_the_caller(server):
    queue = unique_queue()
    app = reliable.create_app(broker=server.url, queue=queue, PYMACARON_ASYNC_FALLBACK="inline")
    reliable.NOTES.clear()
    with app.test_request_context("/inline"):
        reliable.note.delay("warm-up")
        with reliable.ext.batch():
            reliable.note.delay("a")
            reliable.note.delay("b")
            server.stop()
    assert reliable.NOTES == ["a", "b"]


def test_captured_tasks_sees_a_batch(captured_tasks):
    app = reliable.create_app(broker="redis://127.0.0.1:1/0", queue=unique_queue())
    with app.test_request_context("/captured"):
        with reliable.ext.batch():
            reliable.count.delay("captured", 1)
            assert len(captured_tasks) == 0
        assert len(captured_tasks) == 1
        assert captured_tasks.assert_queued("count", "captured", 1)


# -- real workers: each task once, in its own context ----------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_each_task_of_a_batch_runs_once_with_its_own_context(request, broker, broker_url, start_worker, unique):
    url = request.getfixturevalue("rabbitmq_url") if broker == "rabbitmq" else broker_url
    queue = unique_queue()
    app = reliable.create_app(broker=url, queue=queue, prefix=f"pma-test-batch-{unique}", reports=broker_url)
    start_worker(
        "tests.apps.reliable:celery",
        "--pool=solo",
        env={
            "PMA_REL_BROKER_URL": url,
            "PMA_REL_QUEUE": queue,
            "PMA_REL_REPORT_URL": broker_url,
            "PMA_REL_PREFIX": f"pma-test-batch-{unique}",
        },
        queue=queue,
    )
    from flask import g

    # A script's batch of calls made in ten requests of ten users: one round trip, ten contexts.
    with app.app_context(), reliable.ext.batch():
        for n in range(10):
            with app.test_request_context(f"/followers?page={n}"):
                g.user = f"user-{n}"
                reliable.who.delay(unique, n)
    reports = redis.Redis.from_url(broker_url)
    try:
        key = f"pma-test-batch-{unique}:{unique}:who"
        wait_for(lambda: reports.llen(key) >= 10, 30, what="the batch's ten tasks")
        wait_for(lambda: True, 1)
        seen = sorted(json.loads(item) for item in reports.lrange(key, 0, -1))
        assert seen == [[n, f"user-{n}", f"http://localhost/followers?page={n}"] for n in range(10)]
    finally:
        reports.delete(f"pma-test-batch-{unique}:{unique}:who")
        reports.close()


def test_rabbitmq_with_publisher_confirms_waits_once_for_the_whole_batch(
    rabbitmq_url, broker_url, start_worker, unique
):
    queue = unique_queue()
    prefix = f"pma-test-batch-{unique}"
    app = reliable.create_app(
        broker=rabbitmq_url,
        queue=queue,
        prefix=prefix,
        reports=broker_url,
        CELERY={"task_default_queue": queue, "broker_transport_options": {"confirm_publish": True}},
    )
    with app.app_context():
        reliable.count.delay(unique, 0)  # one message confirmed as py-amqp does it
        with reliable.ext.batch():
            for n in range(1, 31):
                reliable.count.delay(unique, n)
        # The batch went out on a channel of its own, in confirm mode, and its
        # 30 messages were all acked (the pool hands back the same connection).
        with app.extensions["celery"].producer_or_acquire() as producer:
            confirmed = producer.connection._pma_confirmed_batch
            assert confirmed.published == 30 and confirmed._confirmed(1)
    start_worker(
        "tests.apps.reliable:celery",
        "--pool=solo",
        env={
            "PMA_REL_BROKER_URL": rabbitmq_url,
            "PMA_REL_QUEUE": queue,
            "PMA_REL_REPORT_URL": broker_url,
            "PMA_REL_PREFIX": prefix,
        },
        queue=queue,
    )
    reports = redis.Redis.from_url(broker_url)
    try:
        wait_for(lambda: reports.scard(f"{prefix}:{unique}:done") == 31, 30, what="the 31 tasks")
        wait_for(lambda: True, 0.5)
        assert sorted(int(n) for n in reports.lrange(f"{prefix}:{unique}:runs", 0, -1)) == list(range(31))
    finally:
        reports.delete(f"{prefix}:{unique}:done", f"{prefix}:{unique}:runs")
        reports.close()


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((42, "hello"), {}),
        ((), {"a": 1, "b": None, "c": True, "d": -2.5}),
        ((10**30, float("inf"), False, ""), {"zoë": "naïve café", "x": "a b\tc"}),
        (("it's",), {"path": "C:\\temp"}),  # quotes and backslashes: saferepr's own
        (("x" * 300,), {}),  # long: truncated by saferepr
        (([1, 2], {"k": (3,)}), {"deep": [[[[1]]]]}),  # nested: saferepr's own
        ((1,) * 30, {}),
    ],
)
def test_argument_reprs_are_celerys(args, kwargs):
    """The reprs a copied message carries are those Celery's as_task_v2 writes."""
    from celery.utils.saferepr import saferepr

    from flask_pymacaron_async import _compat

    app = reliable.create_app(broker="redis://127.0.0.1:1/0", queue=unique_queue())
    amqp = app.extensions["celery"].amqp
    levels = getattr(amqp.app.conf, "task_repr_maxlevels", None)
    extra = {} if levels is None else {"maxlevels": levels}
    expected = (saferepr(args, amqp.argsrepr_maxsize, **extra), saferepr(kwargs, amqp.kwargsrepr_maxsize, **extra))
    assert _compat.task_reprs(amqp, args, kwargs) == expected
