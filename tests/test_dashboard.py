"""The operations page: its access rule, its CSRF check, its actions against a real worker, and a real browser."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from flask import Flask

from flask_pymacaron_async import PymacaronAsync
from flask_pymacaron_async._cli import async_cli
from tests.apps import ops

WORKER = "tests.apps.ops:celery"


# Not named `app`: pytest-flask would push a request context for the whole
# test, and every request would share its `g` (Flask-Login's user with it).
@pytest.fixture
def ops_app():
    return ops.create_app()


@pytest.fixture
def admin(ops_app):
    client = ops_app.test_client()
    assert client.get("/login?user=admin").status_code == 302
    return client


@pytest.fixture(autouse=True)
def _empty_queue(ops_app):
    """The ops queue and its dead letters start and end empty."""
    ext = ops.ext

    def empty():
        with ops_app.app_context():
            ext.purge_dead_letters()
            ext.celery.control.purge()

    empty()
    yield
    empty()


def _token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def _page(client) -> str:
    response = client.get("/ops/")
    assert response.status_code == 200
    return response.get_data(as_text=True)


def _wait(predicate, timeout: float = 20, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} not met after {timeout}s")


def _dead(ops_app) -> list:
    with ops_app.app_context():
        return ops.ext.dead_letters()


# -- access -------------------------------------------------------------------------------


def _code(client, path: str, **kwargs) -> int:
    response = client.get(path, **kwargs)
    response.close()  # a static file's response holds the file open
    return response.status_code


@pytest.mark.parametrize("path", ["/ops/", "/ops/live", "/ops/status.json", "/ops/static/dashboard.css"])
def test_anonymous_is_sent_to_the_login_page_a_user_gets_403_an_admin_the_page(ops_app, path):
    anonymous = ops_app.test_client().get(path)
    assert anonymous.status_code == 302
    assert "/login?next=" in anonymous.headers["Location"]

    user = ops_app.test_client()
    user.get("/login?user=bob")
    assert _code(user, path) == 403
    assert _code(ops_app.test_client(), path, headers={"X-Login": "bob"}) == 403

    admin = ops_app.test_client()
    admin.get("/login?user=admin")
    assert _code(admin, path) == 200


@pytest.mark.parametrize("action", ["requeue", "purge", "revoke"])
def test_actions_are_refused_like_the_page(ops_app, action):
    assert ops_app.test_client().post(f"/ops/{action}").status_code == 302
    assert ops_app.test_client().post(f"/ops/{action}", headers={"X-Login": "bob"}).status_code == 403


def _bare_app(debug: bool, allow=None) -> Flask:
    app = Flask("bare_dashboard")
    app.config.update(SECRET_KEY="s", PYMACARON_ASYNC_BROKER_URL=os.environ["PMA_TEST_BROKER_URL"])
    app.debug = debug
    ext = PymacaronAsync(app)
    app.register_blueprint(ext.dashboard_blueprint(allow=allow), url_prefix="/tasks")
    return app


def test_without_an_access_rule_only_debug_shows_the_page():
    assert _bare_app(debug=False).test_client().get("/tasks/").status_code == 403
    assert _bare_app(debug=False).test_client().get("/tasks/status.json").status_code == 403
    assert _bare_app(debug=True).test_client().get("/tasks/").status_code == 200
    # Without Flask-Login, a refusal is a plain 403.
    assert _bare_app(debug=True, allow=lambda: False).test_client().get("/tasks/").status_code == 403


def test_every_answer_of_the_page_is_never_framed_nor_cached():
    allowed, refused = _bare_app(debug=True).test_client(), _bare_app(debug=False).test_client()
    answers = [
        allowed.get("/tasks/"),
        allowed.get("/tasks/status.json"),
        allowed.get("/tasks/static/dashboard.js"),
        allowed.post("/tasks/requeue"),  # refused: no CSRF token
        refused.get("/tasks/"),
        refused.post("/tasks/purge"),
    ]
    for response in answers:
        assert response.headers["X-Frame-Options"] == "DENY", response.request.path
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["Cache-Control"] == "no-store"
        response.close()
    assert [r.status_code for r in answers][-2:] == [403, 403]


def test_the_page_renders_offline_without_a_broker():
    app = Flask("no_broker")
    app.config.update(SECRET_KEY="s", PYMACARON_ASYNC_BROKER_URL="redis://127.0.0.1:1/0")
    ext = PymacaronAsync(app)
    app.register_blueprint(ext.dashboard_blueprint(allow=lambda: True), url_prefix="/ops")
    client = app.test_client()
    html = client.get("/ops/").get_data(as_text=True)
    assert "unreachable" in html and "redis://127.0.0.1:1/0" in html
    assert "http://" not in html.replace("redis://127.0.0.1:1/0", ""), "the page loads nothing from elsewhere"
    response = client.get("/ops/status.json")
    assert response.status_code == 503 and response.get_json()["broker"]["ok"] is False


# -- CSRF ----------------------------------------------------------------------------------


def test_an_action_without_the_right_csrf_token_is_refused_and_does_nothing(ops_app, admin, caplog):
    with ops_app.app_context():
        ops.flaky.apply_async(("csrf",), queue=ops.QUEUE + "-nowhere")  # a queue no worker takes
    html = _page(admin)
    token = _token(html)
    for data in ({"confirmed": "1"}, {"confirmed": "1", "csrf_token": "forged"}, {"confirmed": "1", "csrf_token": ""}):
        assert admin.post("/ops/purge", data=data).status_code == 400
    # Another session's token is not this session's.
    other = ops_app.test_client()
    other.get("/login?user=admin")
    assert admin.post("/ops/purge", data={"confirmed": "1", "csrf_token": _token(_page(other))}).status_code == 400
    assert "CSRF" in caplog.text

    unconfirmed = admin.post("/ops/purge", data={"csrf_token": token})
    assert unconfirmed.status_code == 200, "without confirmation, the server asks"
    assert 'name="confirmed" value="1"' in unconfirmed.get_data(as_text=True)

    done = admin.post("/ops/purge", data={"csrf_token": token, "confirmed": "1"})
    assert done.status_code == 302 and done.headers["Location"].endswith("/ops/")


def test_flask_wtf_csrfprotect_checks_the_forms_when_the_app_has_it():
    csrf = pytest.importorskip("flask_wtf.csrf", reason="Flask-WTF is not installed here (modern has it)")
    app = ops.create_app()
    csrf.CSRFProtect(app)
    admin = app.test_client()
    admin.get("/login?user=admin")
    html = _page(admin)
    assert admin.post("/ops/purge", data={"confirmed": "1", "csrf_token": "forged"}).status_code == 400
    assert admin.post("/ops/purge", data={"confirmed": "1", "csrf_token": _token(html)}).status_code == 302


def test_exempting_the_page_from_csrfprotect_does_not_exempt_its_actions():
    csrf = pytest.importorskip("flask_wtf.csrf", reason="Flask-WTF is not installed here (modern has it)")
    app = ops.create_app()
    protect = csrf.CSRFProtect(app)
    protect.exempt(app.blueprints["pymacaron_async_dashboard"])
    admin = app.test_client()
    admin.get("/login?user=admin")
    html = _page(admin)
    assert admin.post("/ops/purge", data={"confirmed": "1", "csrf_token": "forged"}).status_code == 400
    assert admin.post("/ops/purge", data={"confirmed": "1", "csrf_token": _token(html)}).status_code == 302


# -- what it shows, and the JSON endpoint -------------------------------------------------


def test_the_json_endpoint_prints_what_flask_async_status_json_prints(ops_app, admin):
    with ops_app.app_context():
        ops.flaky.delay("json")
    endpoint = admin.get("/ops/status.json")
    assert endpoint.status_code == 200 and endpoint.headers["Cache-Control"] == "no-store"
    page = endpoint.get_json()
    cli = json.loads(ops_app.test_cli_runner().invoke(async_cli, ["status", "--json"]).output)
    assert sorted(page) == sorted(cli)
    assert page["queues"] == cli["queues"] == {ops.QUEUE: 1}
    assert 0 <= page["oldest"][ops.QUEUE] < 30
    assert page["broker"] == cli["broker"] and page["broker"]["ok"]
    assert page["args_shown"] is False and cli["args_shown"] is True

    # The part the page refreshes: a fragment, marked so a login page is never swapped in.
    live = admin.get("/ops/live")
    fragment = live.get_data(as_text=True)
    assert live.headers["X-Pma-Fragment"] == "1" and 'id="pma-queues"' in fragment and "<html" not in fragment


@pytest.mark.parametrize(
    "item",
    [
        json.dumps({"headers": [1]}),
        "[" * 5000 + "]" * 5000,
        "not json at all",
        # A context whose environ no request could have: a scheme that is not a string.
        json.dumps({"headers": {"pymacaron_async_context": '{"env":{"wsgi.url_scheme":7}}.x'}}),
    ],
    ids=["headers-a-list", "5000-deep", "not-json", "bad-scheme"],
)
def test_one_malformed_item_at_the_head_of_a_queue_does_not_blind_the_status(ops_app, admin, redis_client, item):
    redis_client.rpush(ops.QUEUE, item)  # the next one a worker would take
    response = admin.get("/ops/status.json")
    assert response.status_code == 200
    status = response.get_json()
    assert status["broker"]["ok"] and status["queues"][ops.QUEUE] == 1 and status["oldest"][ops.QUEUE] is None
    assert admin.get("/ops/").status_code == 200
    cli = ops_app.test_cli_runner().invoke(async_cli, ["status", "--json"])
    assert cli.exit_code == 0 and json.loads(cli.output)["queues"][ops.QUEUE] == 1


def test_running_tasks_show_who_queued_them_and_never_a_token(ops_app, admin, start_worker, unique):
    # prefork: Celery 5.1's threads pool was seen dropping a busy worker's replies (see test_cli).
    worker = start_worker(WORKER, "--pool=prefork", "--concurrency=1", queue=ops.QUEUE)
    with ops_app.test_request_context("/orders/7?token=s3cret&page=2", headers={"X-Login": "alice"}):
        task_id = ops.slow.delay(unique, 8).id

    def running():
        workers = admin.get("/ops/status.json").get_json()["workers"]
        return [t for tasks in workers.values() for t in tasks if t["id"] == task_id]

    [task] = _wait(running, what="the task running on the page")
    assert worker.node_name.split("@")[0] in " ".join(admin.get("/ops/status.json").get_json()["workers"])
    assert task["name"] == "tests.apps.ops.slow"
    assert task["user"] == "alice"
    assert task["url"] == "http://localhost/orders/7?token=***&page=2"
    assert 0 <= time.time() - task["started"] < 30
    assert task["args"] is None and task["kwargs"] is None, "arguments are hidden unless the ops_app allows them"
    html = _page(admin)
    assert task_id in html and "alice" in html and "s3cret" not in html and unique not in html

    shown = ops.create_app(PYMACARON_ASYNC_DASHBOARD_SHOW_ARGS=True).test_client()
    shown.get("/login?user=admin")
    [task] = [t for tasks in shown.get("/ops/status.json").get_json()["workers"].values() for t in tasks]
    assert unique in task["args"]
    assert unique in _page(shown)


def test_a_dict_user_shows_by_its_naming_field_or_the_display_hook_never_its_token(
    ops_app, admin, start_worker, unique, monkeypatch
):
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI3In0.S1gn4tur3-_Xq9"
    secret = f"{unique}SECRETtok3nQx7Qx7Qx7"
    user = {"id": 7, "name": "al\nFORGED", "jwt": jwt, "bearer": secret}
    monkeypatch.setattr(ops.ext.users, "dumper", lambda: user)  # the caller's; the worker has none
    start_worker(WORKER, "--pool=prefork", "--concurrency=1", queue=ops.QUEUE)
    with ops_app.test_request_context(f"/orders/7?token={secret}&q=ok&state={jwt}"):
        running = ops.slow.delay(f"{unique}-running", 12).id
        ops.slow.delay(f"{unique}-queued", 0)  # waits behind it (in the queue, or prefetched): one process

    def shown():
        status = admin.get("/ops/status.json").get_json()
        return [t for tasks in status["workers"].values() for t in tasks if t["id"] == running]

    [task] = _wait(shown, 30, what="the task running on the page")
    assert task["user"] == "7"
    assert task["url"] == "http://localhost/orders/7?token=***&q=ok&state=***"
    monkeypatch.setattr(ops.ext.users, "display", lambda value: f"{value['name']} (#{value['id']})")
    [task] = shown()
    assert task["user"] == "al\\nFORGED (#7)"
    pages = [
        _page(admin),
        admin.get("/ops/live").get_data(as_text=True),
        admin.get("/ops/status.json").get_data(as_text=True),
    ]
    for page in pages:
        assert running in page and "FORGED" in page
        assert secret not in page and "bearer" not in page and "eyJ" not in page and "jwt" not in page


def test_the_page_on_rabbitmq_shows_depth_without_an_oldest_age(rabbitmq_url, unique):
    from kombu import Connection

    from flask_pymacaron_async import _deadletter as deadletter

    queue = f"{os.environ['PMA_TEST_QUEUE']}-ops-amqp-{unique}"
    app = ops.create_app(PYMACARON_ASYNC_BROKER_URL=rabbitmq_url, CELERY={"task_default_queue": queue})
    admin = app.test_client()
    admin.get("/login?user=admin")
    try:
        with app.app_context():
            ops.flaky.delay("amqp")
        status = admin.get("/ops/status.json").get_json()
        assert status["broker"]["ok"] and status["queues"] == {queue: 1}
        assert status["oldest"] == {queue: None} and status["dead"] == []
        assert "amqp://guest:**@" in _page(admin)
    finally:
        with Connection(rabbitmq_url) as connection:
            channel = connection.channel()
            for name in (queue, queue + deadletter.SUFFIX):
                try:
                    channel.queue_delete(name)
                except Exception:  # not declared: the broker closed the channel
                    channel = connection.channel()


# -- actions against a real worker ---------------------------------------------------------


def _fail(ops_app, *keys: str) -> list[str]:
    with ops_app.app_context():
        ids = [ops.flaky.delay(key).id for key in keys]
    _wait(lambda: len(_dead(ops_app)) >= len(keys), what=f"{len(keys)} dead letters")
    return ids


def test_requeue_one_then_all_run_again_and_are_logged_with_the_user(ops_app, admin, start_worker, reports, caplog):
    start_worker(WORKER, queue=ops.QUEUE)
    first, second, third = _fail(ops_app, "one", "two", "three")
    html = _page(admin)
    assert first in html and "first run of one fails" in html and 'id="pma-failures"' in html
    token = _token(html)
    caplog.set_level(logging.WARNING, "flask_pymacaron_async._dashboard")

    response = admin.post("/ops/requeue", data={"csrf_token": token, "confirmed": "1", "id": first})
    assert response.status_code == 302
    assert reports.one("one") == 2
    assert sorted(d.task_id for d in _dead(ops_app)) == sorted([second, third])
    assert "Requeued 1 dead letter." in _page(admin)
    assert "admin from 127.0.0.1 requeued dead letter " + first in caplog.text

    admin.post("/ops/requeue", data={"csrf_token": token, "confirmed": "1", "queue": ops.QUEUE})
    assert reports.one("two") == 2 and reports.one("three") == 2
    assert _dead(ops_app) == []
    assert f"admin from 127.0.0.1 requeued every dead letter of {ops.QUEUE}: 2 message(s)" in caplog.text


def test_purge_deletes_the_dead_letters_of_a_queue(ops_app, admin, start_worker, caplog):
    start_worker(WORKER, queue=ops.QUEUE)
    _fail(ops_app, "p1", "p2")
    token = _token(_page(admin))
    assert (
        admin.post("/ops/purge", data={"csrf_token": token, "queue": "not-ours", "confirmed": "1"}).status_code == 400
    )
    assert len(_dead(ops_app)) == 2
    admin.post("/ops/purge", data={"csrf_token": token, "queue": ops.QUEUE, "confirmed": "1"})
    assert _dead(ops_app) == []
    assert f"admin from 127.0.0.1 purged the dead letters of {ops.QUEUE}: 2 deleted" in caplog.text
    assert admin.get("/ops/status.json").get_json()["dead_letters"] == {ops.QUEUE: 0}


def test_revoke_stops_a_running_task_and_discards_a_queued_one(ops_app, admin, start_worker, reports, unique, caplog):
    # prefork, one process: the second task waits in the queue while the first runs.
    worker = start_worker(WORKER, "--pool=prefork", "--concurrency=1", queue=ops.QUEUE)
    with ops_app.app_context():
        running = ops.slow.delay(f"{unique}-running", 20).id
        queued = ops.slow.delay(f"{unique}-queued", 0).id

    def is_running():
        workers = admin.get("/ops/status.json").get_json()["workers"]
        return any(t["id"] == running for tasks in workers.values() for t in tasks)

    _wait(is_running, what="the first task running")
    status = admin.get("/ops/status.json").get_json()
    assert status["queues"][ops.QUEUE] == 1
    token = _token(_page(admin))
    admin.post("/ops/revoke", data={"csrf_token": token, "confirmed": "1", "id": queued})
    admin.post("/ops/revoke", data={"csrf_token": token, "confirmed": "1", "id": running, "terminate": "1"})
    assert f"revoked task {running} (terminate)" in caplog.text and f"revoked task {queued}" in caplog.text

    _wait(lambda: not is_running(), what="the running task stopped")
    _wait(lambda: admin.get("/ops/status.json").get_json()["queues"][ops.QUEUE] == 0, what="the queued task taken")
    worker.wait_for_output(f"Discarding revoked task: tests.apps.ops.slow[{queued}]", 20)
    assert reports.none(f"{unique}-running", wait=1) and reports.none(f"{unique}-queued", wait=0)


# -- a real browser -----------------------------------------------------------------------


def _chromium():
    """A headless Chromium driven by Selenium, or a skip naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed in this environment (make test-modern installs it)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "no Chromium: Debian's `chromium` and `chromium-driver` packages are needed "
            "(make test installs them when run as root with apt-get)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


class _Server:
    """The app on a free port of 127.0.0.1, served by Werkzeug in a thread of the test."""

    def __init__(self, app: Flask) -> None:
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_the_page_in_a_real_browser(start_worker, tmp_path, redis_client, unique):
    browser = _chromium()
    app = ops.create_app(PYMACARON_ASYNC_DASHBOARD_REFRESH=1)
    server = _Server(app)
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        # One thread: a task runs while the next one waits in the queue.
        start_worker(WORKER, "--pool=threads", "--concurrency=1", queue=ops.QUEUE)
        failed = _fail(app, f"{unique}-a")[0]
        redis_client.lpush(ops.QUEUE, b"not a message")  # refused by the worker: a dead letter with its reason
        _wait(lambda: len(_dead(app)) == 2, what="the refused item dead-lettered")
        with app.test_request_context("/reports/monthly?month=11", headers={"X-Login": "alice"}):
            # Done before the worker's warm shutdown at teardown gives up.
            running = ops.slow.delay(f"{unique}-slow", 8).id
            ops.slow.delay(f"{unique}-next", 0)

        wait = WebDriverWait(browser, 20)
        browser.get(server.url + "/ops/")
        assert "/login" in browser.current_url, "anonymous: the login page"
        browser.get(server.url + "/login?user=admin")
        wait.until(expected_conditions.presence_of_element_located((By.ID, "pma-live")))
        text = browser.find_element(By.TAG_NAME, "body").text
        assert ops.QUEUE in text and "reachable" in text and failed in text
        assert "first run of" in text and "not a message" not in text
        wait.until(lambda b: running in b.find_element(By.ID, "pma-workers").text)
        workers = browser.find_element(By.ID, "pma-workers").text
        assert "alice" in workers and "/reports/monthly?month=11" in workers
        assert browser.execute_script("return getComputedStyle(document.body).fontFamily"), "the CSS loaded"

        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        target = os.environ.get("PMA_DASHBOARD_SCREENSHOT")
        if target:
            _save_for_docs(shot, Path(target))

        # Refreshed without a reload: a new dead letter shows up, the page's state stays.
        browser.execute_script("window.pmaMarker = 42")
        redis_client.lpush(ops.QUEUE, b"more garbage")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "tr.pma-dead")) == 3)
        assert browser.execute_script("return window.pmaMarker") == 42, "the page was reloaded"
        assert browser.find_element(By.ID, "pma-updated").text.startswith("updated")

        # An action: dismissing the confirmation does nothing, accepting it requeues.
        def requeue_button():
            row = [r for r in browser.find_elements(By.CSS_SELECTOR, "tr.pma-dead") if failed in r.text][0]
            return row.find_element(By.TAG_NAME, "button")

        requeue_button().click()
        wait.until(expected_conditions.alert_is_present()).dismiss()
        assert len(_dead(app)) == 3
        requeue_button().click()
        alert = wait.until(expected_conditions.alert_is_present())
        assert failed in alert.text
        alert.accept()
        wait.until(lambda b: "Requeued 1 dead letter." in b.find_element(By.TAG_NAME, "body").text)
        assert len(_dead(app)) == 2
        assert failed not in browser.find_element(By.ID, "pma-dead").text
        browser.save_screenshot(str(tmp_path / "dashboard-after.png"))
    finally:
        browser.quit()
        server.stop()


def _save_for_docs(shot: Path, target: Path) -> None:
    """The screenshot, as the docs ship it: a palette PNG of reasonable size."""
    from PIL import Image

    with Image.open(shot) as image:
        image.convert("RGB").quantize(colors=64).save(target, optimize=True)
