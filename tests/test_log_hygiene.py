"""Logs and the dashboard never show a token, and no client-controlled value forges a log line.

The rules of ``_shown`` (users, URLs, free text) table by table, then a
failing task's log line, inline and in a real worker.
"""

from __future__ import annotations

import base64
import json
import logging

import pytest
from flask import Flask, g

from flask_pymacaron_async import PymacaronAsync
from flask_pymacaron_async._shown import (
    MASK,
    URL_LIMIT,
    USER_LIMIT,
    secret_name,
    secret_value,
    shown_text,
    shown_url,
    shown_user,
)
from flask_pymacaron_async.errors import one_line
from tests.apps import ops


def _b64(value: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


JWT = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64({'sub': 'user-7', 'exp': 1900000000})}.S1gn4tur3-_Xq9"
SECRET = "SECRETtok3n-" + "Qx7" * 8
OPAQUE = "aB3dE5gH7jK9mN1pQ3sT5vX7"  # 24 characters of three classes: an API key's shape
HEX = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"  # a SHA-1 digest
UUID = "3f2b6a9e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"


# -- the rules, table by table -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("token", True),
        ("access_token", True),
        ("refresh-token", True),
        ("apiKey", True),
        ("api_key", True),
        ("key", True),
        ("X-Amz-Signature", True),
        ("X-Amz-Credential", True),
        ("sig", True),
        ("password", True),
        ("passwd", True),
        ("auth", True),
        ("Authorization", True),
        ("code", True),
        ("code_verifier", True),
        ("sessionid", True),
        ("PHPSESSID", True),
        ("csrf_token", True),
        ("jwt", True),
        ("client_secret", True),
        ("otp", True),
        ("q", False),
        ("page", False),
        ("keyword", False),
        ("monkey", False),
        ("author", False),
        ("design", False),
        ("signup", False),
        ("user_id", False),
        ("next", False),
    ],
)
def test_names_of_secret_arguments(name, secret):
    assert secret_name(name) is secret


@pytest.mark.parametrize(
    ("value", "secret"),
    [
        (JWT, True),
        (f"Bearer {JWT}", True),
        ("eyJ1c2VyIjo3fQ.ZbC1xA.sig", True),  # an itsdangerous token: JSON payload, then a dot
        (OPAQUE, True),
        (f"key {OPAQUE} in a sentence", True),
        ("abc+DEF/ghi=jkl012MNOpq345==", True),  # standard base64, "/" and all
        (HEX, True),
        (HEX.upper(), True),
        ("5f3a9c1e2b4d6f8a0c1e3b5d", False),  # a 24-hex ObjectId: an id
        (UUID, False),
        ("ok", False),
        ("averyveryverylongsearchterm", False),
        ("ThisIsSomeCamelCaseWordOnly", False),  # no digit
        ("123456789012345678901234", False),  # digits only
        ("2024-01-01T10:00:00Z", False),
        ("/Reports/Monthly2024/November", False),  # a path
        ("https://Example.com/Reports/2024", False),
        ("eyJ-not-a-token", False),  # no dot after it
    ],
)
def test_values_shaped_like_tokens(value, secret):
    assert secret_value(value) is secret


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (None, None),
        ("", ""),
        ("http://localhost/orders/7?page=2&q=ok", "http://localhost/orders/7?page=2&q=ok"),
        ("http://localhost/orders/7?token=s3cret&page=2", "http://localhost/orders/7?token=***&page=2"),
        (f"http://h/p?q=ok&state={JWT}", "http://h/p?q=ok&state=***"),
        (f"http://h/p?k={OPAQUE}&id={UUID}", f"http://h/p?k=***&id={UUID}"),
        (f"http://h/p?h={HEX}", "http://h/p?h=***"),
        ("http://h/p?apiKey=1&keyword=monkey&author=me", "http://h/p?apiKey=***&keyword=monkey&author=me"),
        ("http://h/p?x=1;sig=abc&&flag", "http://h/p?x=1;sig=***&&flag"),
        (f"http://h/p?{OPAQUE}", "http://h/p?***"),  # a bare token
        ("http://h/p?q=a+b%20c", "http://h/p?q=a+b%20c"),  # as it was sent
        ("https://ada:pa55word@example.com:8443/x", "https://***@example.com:8443/x"),
        (f"https://h/reset/{JWT}/confirm", "https://h/reset/***/confirm"),
        (f"https://h/keys/{OPAQUE}", "https://h/keys/***"),
        ("https://h/users/5f3a9c1e2b4d6f8a0c1e3b5d", "https://h/users/5f3a9c1e2b4d6f8a0c1e3b5d"),
        (f"https://h/cb#access_token={OPAQUE}&state=1", "https://h/cb#access_token=***&state=1"),
        ("http://h/a\nb?x=1\x1b[2J", "http://h/a\\nb?x=1\\x1b[2J"),
        ("http://[broken/", "(unreadable)"),
    ],
)
def test_urls_are_masked_by_name_and_by_shape(url, shown):
    assert shown_url(url) == shown


def test_a_long_url_is_cut():
    shown = shown_url("http://h/p?q=" + "x" * 2000)
    assert len(shown) == URL_LIMIT and shown.endswith("...")


@pytest.mark.parametrize(
    ("user", "shown"),
    [
        (None, None),
        (7, "7"),
        ("alice", "alice"),
        ("al\nFORGED", "al\\nFORGED"),
        ("\x1b[31mred", "\\x1b[31mred"),
        (UUID, UUID),
        (JWT, MASK),
        ({"id": 7, "name": "al\nFORGED", "jwt": JWT}, "7"),
        ({"sub": "user-7", "jwt": JWT}, "user-7"),  # pymacaron's user
        ({"name": "al\nFORGED", "jwt": JWT}, "al\\nFORGED"),
        ({"id": {"nested": 1}, "email": "ada@example.com"}, "ada@example.com"),
        ({"id": True, "uid": ""}, "<dict>"),
        ({"jwt": JWT, "token": SECRET, "tenant": "t1"}, "<dict>"),  # no naming field: no field at all
        ({}, "<dict>"),
        ([7, JWT], "<list>"),
        (True, "<bool>"),
        (1.5, "<float>"),
    ],
)
def test_users_show_by_a_naming_field_only(user, shown):
    assert shown_user(user) == shown


def test_a_long_user_name_is_cut():
    assert len(shown_user("x" * 1000)) == USER_LIMIT


def test_the_display_hook_says_what_shows_escaped_and_falls_back_on_none_or_failure(caplog):
    user = {"id": 7, "name": "al\nFORGED", "jwt": JWT}
    assert shown_user(user, lambda u: f"{u['name']} (#{u['id']})") == "al\\nFORGED (#7)"
    assert shown_user(user, lambda u: u["jwt"]) == MASK
    assert shown_user(user, lambda u: None) == "7"

    def broken(u):
        raise KeyError("oops\nFORGED")

    class Unprintable:
        def __str__(self):
            raise RuntimeError("no text")

    with caplog.at_level(logging.WARNING, "flask_pymacaron_async._shown"):
        assert shown_user(user, broken) == "7"
        assert shown_user(user, lambda u: Unprintable()) == "7"
    assert len(caplog.records) == 2
    for record in caplog.records:
        assert "user display hook failed" in record.getMessage() and "\n" not in record.getMessage()


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain 'quoted' \\ back", "plain 'quoted' \\ back"),
        ("a\r\nb", "a\\r\\nb"),
        ("tab\there", "tab\\there"),
        ("\x1b[2Jclear", "\\x1b[2Jclear"),
        ("line\u2028sep\x85nel", "line\\u2028sep\\x85nel"),
        ("\u202eright-to-left", "\\u202eright-to-left"),
        ("é ü 日本", "é ü 日本"),
        (f"token {JWT} expired", f"token {MASK} expired"),
    ],
)
def test_free_text_is_one_line_with_control_characters_escaped(text, shown):
    assert shown_text(text) == shown


def test_one_line_escapes_and_masks_what_it_keeps():
    assert one_line(RuntimeError(f"bad\x1b[2J\n  {JWT}")) == f"RuntimeError: bad\\x1b[2J {MASK}"
    assert one_line(ValueError("x" * 1000), 50, kind=False) == "x" * 50


# -- a failing task's log line -----------------------------------------------------------

QUERY = f"/orders/7?token={SECRET}&q=ok&state={JWT}"
USER = {"id": 7, "name": "al\nFORGED", "jwt": JWT}
FORGED = "k\n[2030-01-01 00:00:00,000: ERROR/MainProcess] FORGED \x1b[2J"

INLINE = PymacaronAsync()


@INLINE.user_dumper
def _dump_user():
    return g.get("user")


@INLINE.user_loader
def _load_user(value):
    g.user = value


@INLINE.task
def fails_loudly(message):
    raise RuntimeError(message)


@pytest.fixture
def inline_app():
    app = Flask("log_hygiene")
    app.config.update(PYMACARON_ASYNC_ENABLED=False, SECRET_KEY="k")
    INLINE.init_app(app)
    return app


def _failure_lines(records) -> list[str]:
    return [r.getMessage() for r in records if " failed: " in r.getMessage()]


def test_inline_a_failure_is_logged_on_one_line_without_a_token(inline_app, caplog):
    with inline_app.test_request_context(QUERY, headers={"X-Request-Id": f"rid-{JWT}"}):
        g.user = USER
        with caplog.at_level(logging.ERROR, inline_app.logger.name), pytest.raises(RuntimeError):
            fails_loudly.delay(FORGED)
    [line] = _failure_lines(caplog.records)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert SECRET not in line and JWT not in line and "eyJ" not in line
    assert "FORGED \\x1b[2J" in line, "the message is kept, escaped"
    assert f"(url=http://localhost/orders/7?token={MASK}&q=ok&state={MASK}, user=7, request_id=rid-{MASK})" in line


def test_inline_the_display_hook_names_the_user_escaped(inline_app, caplog, monkeypatch):
    monkeypatch.setattr(INLINE.users, "display", lambda user: user["name"])
    with inline_app.test_request_context("/p?q=ok"):
        g.user = USER
        with caplog.at_level(logging.ERROR, inline_app.logger.name), pytest.raises(RuntimeError):
            fails_loudly.delay("boom")
    [line] = _failure_lines(caplog.records)
    assert "user=al\\nFORGED," in line and "\n" not in line


def test_inline_a_user_without_a_naming_field_shows_as_its_type(inline_app, caplog):
    with inline_app.test_request_context("/p"):
        g.user = {"bearer": SECRET, "jwt": JWT}
        with caplog.at_level(logging.ERROR, inline_app.logger.name), pytest.raises(RuntimeError):
            fails_loudly.delay("boom")
    [line] = _failure_lines(caplog.records)
    assert "user=<dict>," in line and "bearer" not in line and SECRET not in line


@pytest.fixture
def _ops_dead_letters_purged():
    app = ops.create_app()
    yield
    with app.app_context():
        ops.ext.purge_dead_letters()


@pytest.mark.usefixtures("_ops_dead_letters_purged")
def test_in_a_worker_a_failure_is_logged_on_one_line_without_a_token(start_worker, monkeypatch, unique):
    monkeypatch.setattr(ops.ext.users, "dumper", lambda: USER)  # what the caller sends; the worker has no hook
    worker = start_worker("tests.apps.ops:celery", queue=ops.QUEUE)
    app = ops.create_app()
    key = f"{unique}{FORGED}"
    with app.test_request_context(QUERY, headers={"X-Request-Id": f"rid-{unique}"}):
        task_id = ops.flaky.delay(key).id
    worker.wait_for_output(f"rid-{unique})", 20).wait_for_output(f"flaky[{task_id}] from queue", 20)
    log = worker.log()
    assert SECRET not in log and JWT not in log and "eyJ" not in log, log
    # Celery's own traceback prints the message raw; the extension's lines are one line each.
    ours = [line for line in log.splitlines() if f"flaky[{task_id}]" in line and "received" not in line]
    failed = next(line for line in ours if " failed: " in line)
    forged = "\\n[2030-01-01 00:00:00,000: ERROR/MainProcess] FORGED \\x1b[2J"  # as repr escapes it
    message = f"failed: ValueError('first run of {unique}k{forged} fails')"
    where = f"(url=http://localhost/orders/7?token={MASK}&q=ok&state={MASK}, user=7, request_id=rid-{unique})"
    assert failed.endswith(f"flaky[{task_id}] {message} {where}"), failed
    dead = next(line for line in ours if "kept as dead letter" in line)
    assert "FORGED \\x1b[2J fails" in dead and "\x1b" not in dead


def test_user_display_registers_the_hook():
    ext = PymacaronAsync()

    @ext.user_display
    def display(user):
        return "shown"

    assert ext.users.display is display and ext.users.shown({"id": 1}) == "shown"
