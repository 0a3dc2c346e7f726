"""Bad messages never kill the worker or run.

A corpus of hostile items is pushed straight onto the queue of a real worker
(prefork pool) on a redis-server this module owns. For each: it is not
executed, it is rejected (gone from the queue, nothing left unacknowledged),
the worker logs one line with the reason, it is kept in the dead letters, and
the worker stays alive; a valid task queued after the corpus runs.
"""

from __future__ import annotations

import base64
import bz2
import copy
import json
import os
import pickle
import re
import time
import uuid
import zlib
from pathlib import Path
from unittest import mock

import pytest

from flask_pymacaron_async import MessageTooLarge
from flask_pymacaron_async import _context as context
from tests.apps import reliable
from tests.conftest import Worker
from tests.faults import RedisServer, rss_kib, unique_queue, wait_for

pytestmark = pytest.mark.slow

LIMIT = 1024 * 1024
RUN = "hostile"
_LEVEL = re.compile(r"^\[[^\]]*: (WARNING|ERROR|CRITICAL)/")


class _Mkdir:
    """A pickle that makes a directory when loaded: proof that pickle never runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-hostile")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def queue():
    return unique_queue()


@pytest.fixture(scope="module")
def app(server, queue):
    return reliable.create_app(broker=server.url, queue=queue, prefix="hostile")


@pytest.fixture(scope="module")
def template(app, server, queue):
    """A valid message for ``work("hostile", 1, 0)``, as it sits in Redis."""
    with app.test_request_context("/hostile", headers={"X-Request-Id": "rid-1"}):
        reliable.work.delay(RUN, 1, 0)
    raw = server.client().rpop(queue)
    return json.loads(raw)


@pytest.fixture(scope="module")
def worker(server, queue, tmp_path_factory):
    # No deploy grace: an unknown task is dead-lettered at once (test_deadletters.py has the grace period).
    env = {"PMA_REL_BROKER_URL": server.url, "PMA_REL_QUEUE": queue, "PMA_REL_PREFIX": "hostile", "PMA_REL_GRACE": "0"}
    worker = Worker(
        "tests.apps.reliable:celery",
        tmp_path_factory.mktemp("worker-hostile"),
        "--pool=prefork",
        "-c",
        "1",
        env=env,
        queue=queue,
    ).wait_ready()
    yield worker
    worker.stop()


def _encode(value) -> str:
    return base64.b64encode(value if isinstance(value, bytes) else json.dumps(value).encode()).decode()


def _body(m: dict) -> bytes:
    try:
        return base64.b64decode(m["body"])
    except (KeyError, TypeError, ValueError):
        return b""


def _corpus(template: dict, app, marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (the item pushed onto the queue, a fragment of the expected log line)."""
    signer = app.extensions["pymacaron_async"].signer
    good_token = template["headers"][context.HEADER]
    payload = good_token.rsplit(".", 1)[0]
    snapshot = json.loads(payload.translate(str.maketrans({'"': "'", "'": '"'})))  # the payload's quotes exchanged
    task_name = template["headers"]["task"]

    def signed(m: dict, payload: str = payload) -> str:
        return signer.sign(payload, m["headers"]["task"], m["headers"]["id"], _body(m), _bound(m))

    def message(payload=None, resign=True, **changes) -> dict:
        m = copy.deepcopy(template)
        m["headers"]["id"] = str(uuid.uuid4())
        if payload is not None:
            m["body"] = _encode(payload)
        for path, value in changes.items():
            target = m
            *parents, last = path.split("__")
            for p in parents:
                target = target[p]
            if value is _DROP:
                target.pop(last, None)
            else:
                target[last] = value
        headers = m.get("headers")
        if resign and isinstance(headers, dict) and isinstance(headers.get("task"), str) and "body" in m:
            if isinstance(headers.get("id"), str) and isinstance(headers.get(context.HEADER), str):
                # A valid signature for this message: what is wrong is what the test changed.
                headers[context.HEADER] = signed(m)
        return m

    def raw(m) -> bytes:
        return json.dumps(m).encode()

    def header(name, value):
        return raw(message(**{f"headers__{name}": value}))

    def unsigned_change(name, value) -> bytes:
        return raw(message(resign=False, **{f"headers__{name}": value}))

    def unsigned(token: str) -> bytes:
        return raw(message(resign=False, **{f"headers__{context.HEADER}": token}))

    def token_for(payload_text: str, signer_=signer):
        m = message()
        m["headers"][context.HEADER] = signer_.sign(payload_text, task_name, m["headers"]["id"], _body(m), _bound(m))
        return raw(m)

    valid = raw(message())
    with mock.patch("flask_pymacaron_async._context.time.time", return_value=time.time() - 8 * 24 * 3600):
        old_payload = signer.payload({k: v for k, v in snapshot.items() if k != "ts"})
    forged = {**snapshot, "user": "admin"}
    forged_token = json.dumps(forged, separators=(",", ":")) + "." + good_token.rsplit(".", 1)[1]
    no_ts = json.dumps({k: v for k, v in snapshot.items() if k != "ts"}, separators=(",", ":"))
    # Moved: alice's honest header on another message.
    spliced = message(resign=False)
    spliced["headers"][context.HEADER] = good_token
    swapped_body = copy.deepcopy(template)
    swapped_body["body"] = _encode(
        [[RUN, 99, 0], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    swapped_id = copy.deepcopy(template)
    swapped_id["headers"]["id"] = str(uuid.uuid4())
    renamed = message()
    renamed["headers"]["task"] = "tests.apps.reliable.count"
    renamed["body"] = _encode([[RUN, 7], {}, _EMBED])
    renamed["headers"][context.HEADER] = signer.sign(
        payload, task_name, renamed["headers"]["id"], _body(renamed), _bound(renamed)
    )
    forged_unknown = message(resign=False, headers__task="tests.apps.reliable.nope")
    unbound = message(resign=False)
    unbound["headers"][context.HEADER] = signer.sign(payload, task_name, unbound["headers"]["id"], _body(unbound))
    chained = copy.deepcopy(template)
    chained["body"] = _encode(
        [
            [RUN, 1, 0],
            {},
            {"callbacks": None, "errbacks": None, "chain": [{"task": "tests.apps.reliable.fail", "args": [RUN]}]},
        ]
    )
    big = "x" * (LIMIT + 100 * 1024)
    just_over = "x" * (LIMIT + 1000)
    envelope = "not a readable message envelope"
    item = "Rejected an item"

    def compressed(body: bytes, content_type: str) -> bytes:
        m = message(resign=False, headers__compression=content_type)
        m["body"] = base64.b64encode(body).decode()
        return raw(m)

    corpus = {
        # Not a message envelope at all.
        "text": (b"hello world", envelope),
        "empty": (b"", envelope),
        "whitespace": (b"   \n", envelope),
        "json-null": (b"null", item),
        "json-number": (b"42", item),
        "json-string": (b'"a string"', item),
        "json-true": (b"true", item),
        "json-list": (b"[1, 2, 3]", item),
        "non-utf8": (b"\xff\xfe\x00\x81garbage", envelope),
        "non-utf8-inside-json": (valid[:40] + b"\xff\xfe" + valid[40:], "Rejected"),
        "truncated-1": (valid[:1], envelope),
        "truncated-half": (valid[: len(valid) // 2], envelope),
        "truncated-last-byte": (valid[:-1], envelope),
        "nested-arrays": (b"[" * 100_000 + b"]" * 100_000, envelope),
        "nested-objects": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, envelope),
        "kombu-type-tag": (b'{"__type__": "datetime", "__value__": "garbage"}', "Rejected"),
        # An envelope kombu cannot turn into a message.
        "no-properties": (raw(message(properties=_DROP)), "no 'properties'"),
        "properties-list": (raw(message(properties=[1])), "no 'properties'"),
        "no-delivery-tag": (raw(message(properties__delivery_tag=_DROP)), "delivery_tag"),
        "delivery-tag-int": (raw(message(properties__delivery_tag=7)), "delivery_tag"),
        "no-delivery-info": (raw(message(properties__delivery_info=_DROP)), "delivery_info"),
        "no-routing-key": (raw(message(properties__delivery_info={"exchange": ""})), "delivery_info"),
        "headers-null": (raw(message(headers=None)), "'headers' is not a mapping"),
        "headers-list": (raw(message(headers=["task"])), "'headers' is not a mapping"),
        "body-int": (raw(message(body=5)), "'body' is not a string"),
        "body-not-base64": (raw(message(body="!!!not base64")), "not base64"),
        "body-encoding-rot13": (raw(message(properties__body_encoding="rot13")), "rot13"),
        "content-type-int": (raw(message(**{"content-type": 3})), "'content-type' is not a string"),
        # Headers Celery cannot read.
        "no-task-header": (raw(message(headers__task=_DROP)), "'task' header"),
        "task-header-list": (header("task", ["a", "b"]), "'task' header"),
        "task-header-int": (header("task", 1), "'task' header"),
        "no-id-header": (raw(message(headers__id=_DROP)), "'id' header"),
        "id-header-int": (header("id", 5), "'id' header"),
        "unknown-task": (header("task", "tests.apps.reliable.nope"), "unknown task"),
        "unknown-task-os-system": (header("task", "os.system"), "unknown task"),
        "eta-garbage": (header("eta", "next tuesday"), "'eta' header"),
        "eta-int": (header("eta", 12), "'eta' header"),
        "expires-garbage": (header("expires", "never"), "'expires' header"),
        "timelimit-string": (header("timelimit", "x"), "'timelimit'"),
        "timelimit-short": (header("timelimit", [1]), "'timelimit'"),
        "retries-string": (header("retries", "x"), "'retries'"),
        "root-id-dict": (header("root_id", {"a": 1}), "'root_id'"),
        # Bodies the worker must not decode or run.
        "pickle": (
            raw(
                message(
                    payload=pickle.dumps(((RUN, _Mkdir(str(marker)), 0), {}, {})),
                    **{"content-type": "application/x-python-serialize", "content-encoding": "binary"},
                )
            ),
            "not accepted",
        ),
        "pickle-content-type-json-body": (
            raw(message(**{"content-type": "application/x-python-serialize"})),
            "not accepted",
        ),
        "text-plain": (raw(message(**{"content-type": "text/plain"})), "not accepted"),
        "yaml": (raw(message(**{"content-type": "application/x-yaml"})), "not accepted"),
        "content-type-missing": (raw(message(**{"content-type": _DROP})), "not accepted"),
        "body-not-json": (raw(message(payload=b"not json")), "cannot be decoded"),
        "body-non-utf8": (raw(message(payload=b"\xff\xfe[]")), "cannot be decoded"),
        "body-nested": (raw(message(payload=b"[" * 100_000)), "cannot be decoded"),
        "body-unknown-rich-type": (raw(message(payload=[[{"__pma__": "nope"}], {}, {}])), "cannot be decoded"),
        "body-bad-rich-value": (raw(message(payload=[[{"__pma__": "datetime", "v": 5}], {}, {}])), "cannot be decoded"),
        "body-protocol-1": (raw(message(payload={"task": "tests.apps.reliable.work", "args": []})), "[args, kwargs"),
        "body-two-items": (raw(message(payload=[[], {}])), "[args, kwargs"),
        "body-args-not-list": (raw(message(payload=[1, {}, {}])), "[args, kwargs"),
        "body-kwargs-not-dict": (raw(message(payload=[[], [], {}])), "[args, kwargs"),
        "too-many-args": (raw(message(payload=[[RUN, 2, 0, 4, 5], {}, {}])), "do not match"),
        "too-few-args": (raw(message(payload=[[RUN], {}, {}])), "do not match"),
        "unknown-kwarg": (raw(message(payload=[[RUN, 3, 0], {"sudo": True}, {}])), "do not match"),
        "over-max-bytes": (raw(message(payload=[[RUN, big, 0], {}, {}])), "PYMACARON_ASYNC_MAX_MESSAGE_BYTES"),
        "args-just-over-max-bytes": (
            raw(message(payload=[[RUN, just_over, 0], {}, {}])),
            "PYMACARON_ASYNC_MAX_MESSAGE_BYTES",
        ),
        # Compressed bodies: bounded before they are inflated, refused when they cannot be.
        "bz2-bomb": (compressed(_bomb(bz2.BZ2Compressor(), 64), "application/x-bz2"), "inflates past"),
        "zlib-bomb": (compressed(_bomb(zlib.compressobj(9), 64), "application/x-gzip"), "inflates past"),
        "compression-mismatch": (compressed(_body(message()), "application/x-bz2"), "cannot be decoded"),
        "compression-truncated": (compressed(bz2.compress(_body(message()))[:-8], "application/x-bz2"), "truncated"),
        "compression-unknown": (compressed(_body(message()), "application/x-rot13"), "cannot be decoded"),
        # Headers and items too big to read.
        "header-huge": (header("x-junk", "j" * 100_000), "'x-junk' header takes 100000 bytes"),
        "header-deep": (header("x-junk", _deep(500)), "'x-junk' header takes"),
        "headers-many": (
            raw(message(**{f"headers__x-{n}": "h" * 30_000 for n in range(30)})),
            "its headers take",
        ),
        "item-huge": (raw(message(properties__junk="p" * (3 * LIMIT))), "bytes, over the"),
        # The signed context snapshot.
        "signature-missing": (raw(message(**{f"headers__{context.HEADER}": _DROP})), "no context snapshot"),
        "signature-not-a-string": (header(context.HEADER, {"user": "admin"}), "no context snapshot"),
        "signature-garbage": (
            raw(message(resign=False, **{f"headers__{context.HEADER}": "garbage"})),
            "does not match",
        ),
        "signature-forged": (
            raw(message(resign=False, **{f"headers__{context.HEADER}": forged_token})),
            "does not match",
        ),
        "signature-another-key": (token_for(payload, context.ContextSigner("another-key")), "does not match"),
        "signature-expired": (token_for(old_payload), "expired"),
        "signature-without-time": (token_for(no_ts), "no signing time"),
        # An honest context moved to another message, or a message changed under its context.
        "signature-spliced": (raw(spliced), "does not match this message"),
        "signature-body-swapped": (raw(swapped_body), "does not match this message"),
        "signature-id-swapped": (raw(swapped_id), "does not match this message"),
        "signature-task-renamed": (raw(renamed), "does not match this message"),
        "signature-chain-added": (raw(chained), "does not match this message"),
        # Headers the signature covers, changed on a signed message.
        "signature-eta-changed": (unsigned_change("eta", "2030-01-01T00:00:00+00:00"), "does not match"),
        "signature-expires-past": (unsigned_change("expires", "2000-01-01T00:00:00+00:00"), "does not match"),
        "signature-retries-changed": (unsigned_change("retries", 5), "does not match"),
        "signature-timelimit-changed": (unsigned_change("timelimit", [1, 1]), "does not match"),
        "signature-shadow-added": (unsigned_change("shadow", "innocent.task"), "does not match"),
        "signature-argsrepr-changed": (unsigned_change("argsrepr", "('nothing to see',)"), "does not match"),
        "signature-kwargsrepr-changed": (unsigned_change("kwargsrepr", "{}x"), "does not match"),
        "signature-content-type-changed": (
            raw(message(resign=False, **{"content-type": "application/json"})),
            "does not match",
        ),
        # Checked before it is deferred: a forged message for an unknown task is not handled again and again.
        "unknown-task-forged": (raw(forged_unknown), "does not match"),
        # Signed without its headers (a sender before 0.3): deferred for a worker of its version, then refused.
        "signature-unbound": (raw(unbound), "does not cover its headers"),
    }
    return corpus


def _bound(m: dict) -> str:
    return context.bound_headers(m["headers"], m.get("content-type"))


def _bomb(compressor, megabytes: int) -> bytes:
    """``megabytes`` of zeros, compressed (a few kilobytes), without holding them."""
    chunk = b"\0" * (1024 * 1024)
    return b"".join([*(compressor.compress(chunk) for _ in range(megabytes)), compressor.flush()])


def _deep(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


_DROP = object()
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if _LEVEL.match(line)]


def test_corpus(app, template, worker, server, queue, tmp_path):
    """Every hostile item: rejected with one log line, not run, not requeued; the worker lives."""
    marker = tmp_path / "pickle-ran"
    corpus = _corpus(template, app, marker)
    assert len(corpus) >= 50
    client = server.client()
    results = {}
    for name, (item, reason) in corpus.items():
        before = len(worker.log())
        client.lpush(queue, item)

        def logged():
            return _warnings(worker.log()[before:])  # noqa: B023 (evaluated in this iteration)

        lines = wait_for(logged, timeout=15, what=f"a log line for {name!r}")
        wait_for(lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0, 10, what=f"{name!r} gone")
        time.sleep(0.05)
        lines = logged()
        results[name] = lines
        assert worker.alive(), f"the worker died on {name!r}:\n{worker.log()[before:]}"
        assert len(lines) == 1, f"{name!r} logged {len(lines)} lines: {lines}"
        assert "Rejected" in lines[0] and reason in lines[0], f"{name!r}: {lines[0]}"
        assert "Traceback" not in worker.log()[before:], name
    # Nothing of the corpus ran, nothing waits for a redelivery, everything is kept.
    assert not marker.exists()
    assert client.llen(f"hostile:{RUN}:started") == 0
    assert client.llen(queue) == 0 and client.hlen("unacked") == 0
    assert client.llen(f"{queue}.pma.dead") == len(corpus)
    assert client.hlen(f"{queue}.pma.dead.raw") == len(corpus)
    print(f"\nhostile corpus: {len(corpus)} items rejected, worker alive")

    # A valid task queued after the corpus runs.
    with app.test_request_context("/after"):
        reliable.work.delay("after-corpus", 1, 0)
    wait_for(lambda: client.sismember("hostile:after-corpus:done", 1), 15, what="the valid task")
    assert worker.alive()


def test_a_flood_of_compression_bombs_leaves_the_worker_flat(app, template, worker, server, queue):
    """Bodies of a few hundred bytes inflating to 512 MB each: refused past the limit, kept compressed, memory flat."""
    client = server.client()
    bomb = base64.b64encode(_bomb(bz2.BZ2Compressor(9), 512)).decode()
    assert len(bomb) < 2048

    def push(first: int, count: int) -> None:
        with client.pipeline(transaction=False) as pipe:
            for n in range(first, first + count):
                m = copy.deepcopy(template)
                m["headers"]["id"] = f"bomb-{n}"
                m["headers"]["compression"] = "application/x-bz2"
                m["body"] = bomb
                pipe.lpush(queue, json.dumps(m))
            pipe.execute()
        wait_for(lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0, 120, interval=0.5, what="the bombs")

    push(0, 20)  # the worker's allocator warmed up by the first ones
    rss_before = rss_kib(worker.pid)
    flood = 1000
    push(20, flood)
    growth = rss_kib(worker.pid) - rss_before
    print(f"\n{flood} bz2 bombs of {len(bomb)} bytes inflating to 512 MB each: worker RSS {growth:+} KiB")
    assert growth < 20 * 1024
    dead = [json.loads(v) for v in client.hgetall(f"{queue}.pma.dead.meta").values()]
    bombs = [d for d in dead if str(d.get("task_id", "")).startswith("bomb-")]
    assert len(bombs) == flood + 20 and all("inflates past" in d["reason"] for d in bombs)
    # Kept as they came: compressed.
    assert all(len(client.hget(f"{queue}.pma.dead.raw", d["id"])) < 4096 for d in bombs)
    assert worker.alive()
    assert "Can't decode message body" not in worker.log()


def test_a_replayed_message_does_not_run_again(app, template, worker, server, queue):
    """The same signed item pushed five times after it succeeded: it ran once, the replays are dead letters."""
    client = server.client()
    signer = app.extensions["pymacaron_async"].signer
    m = copy.deepcopy(template)
    task_id = m["headers"]["id"] = str(uuid.uuid4())
    payload = template["headers"][context.HEADER].rsplit(".", 1)[0]
    m["headers"][context.HEADER] = signer.sign(payload, m["headers"]["task"], task_id, _body(m), _bound(m))
    item = json.dumps(m)
    runs = client.llen(f"hostile:{RUN}:runs")
    client.lpush(queue, item)
    wait_for(lambda: client.llen(f"hostile:{RUN}:runs") == runs + 1, 15, what="the first run")
    wait_for(lambda: client.hlen("unacked") == 0, 15, what="its acknowledgement")
    for _ in range(5):
        client.lpush(queue, item)
    wait_for(lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0, 15, what="the replays taken")
    time.sleep(0.5)
    assert client.llen(f"hostile:{RUN}:runs") == runs + 1
    dead = [json.loads(v) for v in client.hgetall(f"{queue}.pma.dead.meta").values()]
    replays = [d for d in dead if d.get("task_id") == task_id]
    assert len(replays) == 5 and all("succeeded already" in d["reason"] for d in replays)
    # The app sending the same task id again (a frozen signature applied again) is a new message: it runs.
    with app.test_request_context("/again"):
        reliable.work.apply_async((RUN, 1, 0), task_id=task_id)
    wait_for(lambda: client.llen(f"hostile:{RUN}:runs") == runs + 2, 15, what="the new send")


def test_garbage_on_the_broadcast_channel(app, worker, server):
    """Items published on the workers' pub/sub (remote control) channel do not kill the worker."""
    client = server.client()
    for item in (b"not json", b"null", b"[" * 100_000, b'{"no": "properties"}'):
        client.publish("/0.celery.pidbox", item)
    time.sleep(0.5)
    assert worker.alive()
    with app.test_request_context("/after"):
        reliable.work.delay("after-pubsub", 1, 0)
    wait_for(lambda: client.sismember("hostile:after-pubsub:done", 1), 15, what="the valid task")


def test_oversized_call_is_refused_at_the_call_site(app, server, queue):
    before = server.client().llen(queue)
    with app.test_request_context("/big"), pytest.raises(MessageTooLarge, match="PYMACARON_ASYNC_MAX_MESSAGE_BYTES"):
        reliable.work.delay(RUN, "x" * (LIMIT + 1), 0)
    assert server.client().llen(queue) == before
