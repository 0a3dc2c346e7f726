"""The worker sees the caller's request, headers, user and app."""

from __future__ import annotations

import base64
import json
import os

import pytest
from flask import g

from tests.apps import basic

_SWAP = str.maketrans({'"': "'", "'": '"'})


def test_request_context_rebuilt_in_worker(client, module_worker, reports, unique):
    client.post(
        f"/items/42?key={unique}&q=a+b&q=c",
        headers={
            "X-User": "alice",
            "User-Agent": "pytest-agent",
            "X-Request-Id": "req-123",
            "X-Tenant": "acme",
            "Authorization": "Bearer s3cret-token",
            "Cookie": "session=abc",
        },
        environ_base={"REMOTE_ADDR": "10.1.2.3"},
    )
    seen = reports.one(unique)
    assert seen["app"] == "tests.apps.basic"
    assert seen["url"] == f"http://localhost/items/42?key={unique}&q=a+b&q=c"
    assert seen["method"] == "POST"
    assert seen["endpoint"] == "item" and seen["view_args"] == {"item_id": 42}
    assert seen["args"]["key"] == unique
    assert seen["user"] == "alice"
    assert seen["remote_addr"] == "10.1.2.3"
    assert seen["url_for"] == "http://localhost/items/7"
    headers = seen["headers"]
    assert headers["User-Agent"] == "pytest-agent"
    assert headers["X-Request-Id"] == "req-123"
    assert headers["X-Tenant"] == "acme"
    assert "Authorization" not in headers and "Cookie" not in headers


def test_request_id_generated_when_absent(client, module_worker, reports, unique):
    client.get(f"/items/1?key={unique}")
    assert len(reports.one(unique)["headers"]["X-Request-Id"]) == 32


def test_secrets_never_reach_the_broker(app, redis_client, unique):
    queue = f"{basic.celery.conf.task_default_queue}-{unique}"  # no worker consumes it
    with app.test_request_context(
        "/items/1", headers={"Authorization": "Bearer tok-XYZ", "Cookie": "session=cookie-XYZ"}
    ):
        basic.record_value.apply_async(("v", unique), queue=queue)
    [raw] = redis_client.lrange(queue, 0, -1)
    redis_client.delete(queue)
    message = json.loads(raw)
    wire = raw + base64.b64decode(message["body"])
    assert unique.encode() in wire
    assert b"tok-XYZ" not in wire and b"cookie-XYZ" not in wire


def test_headers_allowlist_can_carry_authorization(broker_url):
    from tests.apps.basic import create_app

    app = create_app(PYMACARON_ASYNC_CONTEXT_HEADERS=["Authorization"])
    state = app.extensions["pymacaron_async"]
    from flask_pymacaron_async import _context as context

    with app.test_request_context("/", headers={"Authorization": "Bearer ok"}):
        snapshot = context.ContextSigner.decode(f"{context.take(state)}.sig")
    assert snapshot["env"]["HTTP_AUTHORIZATION"] == "Bearer ok"


def test_snapshot_taken_once_per_request(app):
    calls = []
    ext = basic.ext
    original = ext.users.dumper

    def counting():
        calls.append(1)
        return "u"

    ext.users.dumper = counting
    try:
        state = app.extensions["pymacaron_async"]
        from flask_pymacaron_async import _context as context

        with app.test_request_context("/x"):
            assert context.take(state) is context.take(state)
        assert len(calls) == 1
    finally:
        ext.users.dumper = original


def test_outside_request_runs_in_app_context_only(module_worker, reports, unique):
    from tests.apps.basic import create_app

    app = create_app()
    with app.app_context():
        g.user = "cron"
        basic.record_context(unique)
    seen = reports.one(unique)
    assert seen == {"app": "tests.apps.basic", "user": "cron", "has_request": False}


@pytest.fixture
def login_worker(start_worker):
    return start_worker("tests.apps.login:celery", queue=os.environ["PMA_TEST_QUEUE"] + "-login")


def test_flask_login_current_user_without_hooks(login_worker, reports, unique):
    from tests.apps.login import create_app

    app = create_app()
    response = app.test_client().get(f"/whoami?key={unique}", headers={"X-Login": "user-77"})
    assert response.json == {"user": "user-77"}
    assert reports.one(unique) == {"authenticated": True, "id": "user-77", "cls": "User"}
    app.test_client().get(f"/whoami?key={unique}-anon")
    assert reports.one(f"{unique}-anon")["authenticated"] is False


@pytest.mark.parametrize(
    "env",
    [
        # The usual values: left out of the payload, put back when it is read.
        {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": "",
            "PATH_INFO": "/a",
            "QUERY_STRING": "",
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_HOST": "localhost",
            "wsgi.url_scheme": "http",
            "HTTP_X_REQUEST_ID": "r-1",
        },
        # Nothing usual: all kept.
        {
            "REQUEST_METHOD": "POST",
            "SCRIPT_NAME": "/shop",
            "PATH_INFO": "/a",
            "QUERY_STRING": "x=1",
            "SERVER_NAME": "internal",
            "SERVER_PORT": "8443",
            "SERVER_PROTOCOL": "HTTP/2",
            "REMOTE_ADDR": "::1",
            "HTTP_HOST": "[::1]:8443",
            "wsgi.url_scheme": "https",
            "HTTP_X_REQUEST_ID": "r-2",
        },
        # https on its default port, an IPv6 host named in the Host header.
        {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/",
            "SERVER_NAME": "[::1]",
            "SERVER_PORT": "443",
            "HTTP_HOST": "[::1]",
            "wsgi.url_scheme": "https",
            "HTTP_X_REQUEST_ID": "r-3",
        },
    ],
    ids=["usual", "unusual", "https-ipv6"],
)
def test_a_snapshot_travels_compact_and_is_read_back_whole(env):
    from flask_pymacaron_async._context import ContextSigner

    signer = ContextSigner("k")
    snapshot = {"app": "a", "rid": env["HTTP_X_REQUEST_ID"], "user": 7, "env": env}
    payload = ContextSigner.payload(snapshot)
    token = signer.sign(payload, "t", "id-1", b"body")
    read = signer.verify(token, "t", "id-1", b"body")
    read.pop("ts")
    assert read["env"] == {**read["env"], **env} and read["rid"] == env["HTTP_X_REQUEST_ID"]
    # What the worker rebuilds the request from: the same URL, method, scheme.
    from werkzeug.wsgi import get_current_url

    assert get_current_url(read["env"]) == get_current_url(env)
    assert read["env"]["REQUEST_METHOD"] == env["REQUEST_METHOD"]
    if env["HTTP_X_REQUEST_ID"] == "r-1":
        assert "SERVER_PROTOCOL" not in payload and "rid" not in json.loads(payload.translate(_SWAP))
        assert len(payload) < len(json.dumps(snapshot, separators=(",", ":"))) - 150
        # No escape for the envelope's JSON to add before the payload's quotes, nor for the JSON text
        # in the payload (a header value with both quote characters is read back exactly).
        assert '"' not in payload and json.dumps(payload)[1:-1] == payload


def test_a_payload_reads_back_every_key_and_value_exactly():
    """Quotes, backslashes and non-ASCII in values; header names that look like the payload's short names."""
    from flask_pymacaron_async._context import ContextSigner

    env = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/caf\u00e9/it's",
        "QUERY_STRING": 'q="a\\b"',
        "REMOTE_ADDR": "::1",
        "HTTP_HOST": "h:8080",
        "wsgi.url_scheme": "https",
        "HTTP_USER_AGENT": 'say "hi" it\'s \\ me',
        "HTTP_WSGI.URL_SCHEME": "a header named like the WSGI key",
        "HTTP_1_2": "a header named with digits only",
        "HTTP_X_REQUEST_ID": "r-9",
        "CONTENT_TYPE": "text/plain",
    }
    snapshot = {"app": "a", "rid": "r-9", "user": {"name": 'O\'Hara "Q"'}, "env": env}
    signer = ContextSigner("k")
    read = signer.verify(signer.sign(ContextSigner.payload(snapshot), "t", "id", b"b"), "t", "id", b"b")
    assert read["user"] == snapshot["user"] and read["rid"] == "r-9"
    assert {k: read["env"][k] for k in env} == env


def test_a_token_of_an_older_sender_verifies():
    """Earlier senders wrote plain JSON and the whole HMAC: a worker of this version still accepts their tokens."""
    from flask_pymacaron_async import _context as context

    signer = context.ContextSigner("k")
    payload = json.dumps({"app": "a", "rid": "r", "user": 1, "env": {"PATH_INFO": "/old"}, "ts": 1})
    digest = context._mac(context._derive("k"), payload, "t", "id", b"body")
    whole = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert len(whole) == 43
    assert signer.verify(f"{payload}.{whole}", "t", "id", b"body")["env"]["PATH_INFO"] == "/old"
    # The current token: a 128-bit tag, 22 characters.
    token = signer.sign(context.ContextSigner.payload({"user": 1, "env": None}), "t", "id", b"body")
    assert len(token.rpartition(".")[2]) == 22
    with pytest.raises(context.ContextError, match="does not match"):
        signer.verify(f"{payload}.{whole[:-1]}", "t", "id", b"body")


def test_signing_again_with_the_last_payload_signs_as_at_first():
    """The signer keeps the HMAC of the last payload: each token is still the HMAC of its whole message."""
    import hashlib
    import hmac

    from flask_pymacaron_async import _context as context

    signer = context.ContextSigner("k", fallbacks=["old"])
    key = context._derive("k")
    first = context.ContextSigner.payload({"user": 1, "env": None})
    second = context.ContextSigner.payload({"user": 2, "env": None})
    for payload, name, task_id, body in [
        (first, "t", "id-1", b"[1]"),
        (first, "t", "id-2", "[2]"),  # the same payload: the kept HMAC
        (second, 'odd "name"', "id-3", b"[3]"),  # another payload, a name JSON escapes
        (first, "t", "id-2", b"[1]"),  # back to the first
    ]:
        token = signer.sign(payload, name, task_id, body)
        names = json.dumps([name, task_id]).encode()
        digest = hashlib.sha256(body if isinstance(body, bytes) else body.encode()).digest()
        whole = hmac.digest(key, payload.encode() + b"\n" + names + b"\n" + digest, "sha256")
        assert token == f"{payload}.{base64.urlsafe_b64encode(whole[:16]).rstrip(b'=').decode()}"
        assert signer.verify(token, name, task_id, body)["user"] in (1, 2)
        with pytest.raises(context.ContextError):
            signer.verify(token, name, "another-id", body)


def test_a_whole_snapshot_from_an_older_sender_is_read_as_before():
    from flask_pymacaron_async._context import ContextSigner

    env = {"REQUEST_METHOD": "PUT", "PATH_INFO": "/x", "SERVER_NAME": "h", "SERVER_PORT": "81", "HTTP_HOST": "h:81"}
    payload = json.dumps({"app": "a", "rid": "old", "user": None, "env": env, "ts": 1})
    read = ContextSigner.decode(f"{payload}.sig")
    assert read["rid"] == "old" and {k: read["env"][k] for k in env} == env


def test_a_request_without_an_id_gets_one_that_its_logs_and_tasks_share():
    """The id made for a request without X-Request-Id is the one its log lines and its tasks' requests carry."""
    import logging

    from flask_pymacaron_async import _context as context
    from flask_pymacaron_async._state import state_for
    from flask_pymacaron_async.tracing import RequestIdFilter

    app = basic.create_app()
    with app.test_request_context("/no-id"):
        record = logging.LogRecord("view", logging.INFO, __file__, 1, "in the view", None, None)
        RequestIdFilter().filter(record)  # logged before any task is queued
        assert record.request_id not in ("-", None)
        token = context.take(state_for(app))
        snapshot = context.ContextSigner.decode(f"{token}.sig")
        assert snapshot["rid"] == record.request_id == snapshot["env"]["HTTP_X_REQUEST_ID"]
    with app.test_request_context("/with-id", headers={"X-Request-Id": "from-the-proxy"}):
        RequestIdFilter().filter(record)
        assert record.request_id == "from-the-proxy"
