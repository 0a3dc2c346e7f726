"""The operations page: queues, workers, running tasks, failures and dead letters, inside the app.

:meth:`PymacaronAsync.dashboard_blueprint` returns a blueprint the app
registers where it likes, behind its own access rule:

.. code-block:: python

    app.register_blueprint(ext.dashboard_blueprint(allow=is_admin), url_prefix="/ops")

Routes (relative to the prefix): ``/`` the page, ``/live`` the part of it
that refreshes itself, ``/status.json`` the same data as
``flask async status --json``, and the actions, each a POST behind a
confirmation and a CSRF check: ``/requeue``, ``/purge``, ``/revoke``.

Server-rendered templates, a small CSS and JS shipped in the package: no CDN,
no build step, and it works offline.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Callable

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from . import broker
from ._shown import shown_text
from ._state import state_for
from ._status import collect_status

if TYPE_CHECKING:
    from flask import Response
    from flask.typing import ResponseReturnValue

    from ._state import AsyncState

log = logging.getLogger(__name__)

#: The blueprint's default name (``url_for("pymacaron_async_dashboard.index")``).
NAME = "pymacaron_async_dashboard"
#: Where the page's own CSRF token is kept in the session when Flask-WTF's CSRFProtect is not set up.
CSRF_SESSION_KEY = "_pymacaron_async_csrf"
#: Seconds the page waits for the workers' replies.
TIMEOUT = 1.0


def blueprint(allow: Callable[[], Any] | None = None, name: str = NAME) -> Blueprint:
    """The dashboard blueprint; see :meth:`~flask_pymacaron_async.PymacaronAsync.dashboard_blueprint`."""
    bp = Blueprint(
        name,
        __name__,
        template_folder="templates",
        static_folder="static/pymacaron_async",
        static_url_path="/static",
    )

    @bp.before_request
    def check_access() -> ResponseReturnValue | None:
        allowed = current_app.debug if allow is None else allow()
        if allowed:
            if request.method == "POST":
                check_csrf()
            return None
        manager = getattr(current_app, "login_manager", None)
        if manager is not None:
            from flask_login import current_user

            if not current_user.is_authenticated:
                response: ResponseReturnValue = manager.unauthorized()
                return response
        abort(403)

    @bp.after_request
    def protect(response: Response) -> Response:
        # Never framed (a same-site frame could click "Stop"), never cached (it shows users and URLs).
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.context_processor
    def helpers() -> dict[str, Any]:
        return {"age": age, "when": when, "csrf_token": csrf_token, "csrf_field": csrf_field()}

    bp.add_url_rule("/", "index", index)
    bp.add_url_rule("/live", "live", live)
    bp.add_url_rule("/status.json", "status", status_json)
    bp.add_url_rule("/requeue", "requeue", requeue, methods=["POST"])
    bp.add_url_rule("/purge", "purge", purge, methods=["POST"])
    bp.add_url_rule("/revoke", "revoke", revoke, methods=["POST"])
    return bp


# -- access and CSRF -------------------------------------------------------------------


def csrf_field() -> str:
    """The form field the CSRF token travels in (Flask-WTF's ``WTF_CSRF_FIELD_NAME`` when it is set up)."""
    return str(current_app.config.get("WTF_CSRF_FIELD_NAME", "csrf_token"))


def _flask_wtf() -> bool:
    return "csrf" in current_app.extensions


def csrf_token() -> str:
    """The CSRF token of the current session: Flask-WTF's when its CSRFProtect is set up, else the page's own."""
    if _flask_wtf():
        from flask_wtf.csrf import generate_csrf

        return str(generate_csrf())
    token = session.get(CSRF_SESSION_KEY)
    if not isinstance(token, str):
        token = session[CSRF_SESSION_KEY] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    """Refuse (400) a POST whose CSRF token is missing or wrong.

    With Flask-WTF's CSRFProtect on the app, its ``validate_csrf`` decides
    (checked here too, so exempting the blueprint from CSRFProtect does not
    exempt the actions); otherwise the form's token must equal the session's.
    """
    sent = request.form.get(csrf_field(), "")
    if _flask_wtf():
        from flask_wtf.csrf import validate_csrf
        from wtforms.validators import ValidationError

        try:
            validate_csrf(sent)
            return
        except ValidationError:
            pass
    else:
        expected = session.get(CSRF_SESSION_KEY)
        if isinstance(expected, str) and hmac.compare_digest(expected.encode(), sent.encode()):
            return
    log.warning(
        "Dashboard: refused a %s to %s with a missing or wrong CSRF token",
        shown_text(request.method, 20),
        shown_text(request.path, 200),
    )
    abort(400, description="The CSRF token is missing or wrong: reload the page and try again.")


def actor() -> str:
    """Who is acting, for the log: the app's user (as the user dumper or Flask-Login gives it) and address.

    Shown as the status shows users (never a token), escaped: the address may
    come from a proxy's header.
    """
    state = _state()
    user = state.users.shown(state.dump_user()) or "anonymous"
    return f"{user} from {shown_text(request.remote_addr, 100)}"


# -- views --------------------------------------------------------------------------------


def _state() -> AsyncState:
    return state_for(current_app)


def _status() -> dict[str, Any]:
    state = _state()
    return collect_status(state, None, TIMEOUT, show_args=state.settings.dashboard_show_args)


def index() -> ResponseReturnValue:
    """The page."""
    state = _state()
    return render_template(
        "pymacaron_async/dashboard.html",
        status=_status(),
        refresh=state.settings.dashboard_refresh,
        queues=broker.queue_names(state.celery),
    )


def live() -> ResponseReturnValue:
    """The refreshing part of the page, as an HTML fragment."""
    html = render_template("pymacaron_async/_live.html", status=_status())
    return html, 200, {"X-Pma-Fragment": "1", "Cache-Control": "no-store"}


def status_json() -> ResponseReturnValue:
    """The data of the page, as ``flask async status --json`` prints it; 503 when the broker does not answer."""
    status = _status()
    response: Response = jsonify(status)
    response.status_code = 200 if status["broker"]["ok"] else 503
    response.headers["Cache-Control"] = "no-store"
    return response


def _confirmed(action: str, question: str) -> ResponseReturnValue | None:
    """None when the form was confirmed; else a page asking to confirm it (a browser without JavaScript)."""
    if request.form.get("confirmed") == "1":
        return None
    fields = {k: v for k, v in request.form.items() if k not in ("confirmed", csrf_field())}
    return render_template("pymacaron_async/confirm.html", action=action, question=question, fields=fields)


def _queue() -> str | None:
    queue = request.form.get("queue") or None
    if queue is not None and queue not in broker.queue_names(_state().celery):
        abort(400, description=f"{queue!r} is not a queue of this app.")
    return queue


def _back() -> ResponseReturnValue:
    return redirect(url_for(".index"))


def requeue() -> ResponseReturnValue:
    """Put one dead letter (``id``) or all of them (of ``queue``, or of every queue) back on their queue."""
    letter_id = request.form.get("id") or None
    queue = _queue()
    where = queue or "every queue"
    what = f"dead letter {shown_text(letter_id, 200)}" if letter_id else f"every dead letter of {where}"
    asking = _confirmed("requeue", f"Put {what} back on its queue?")
    if asking is not None:
        return asking
    ext = _state().ext
    requeued = ext.requeue_dead_letters([letter_id] if letter_id else None, queue)
    log.warning("Dashboard: %s requeued %s: %d message(s)", actor(), what, len(requeued))
    if letter_id and not requeued:
        flash(f"No dead letter {letter_id} (requeued or deleted meanwhile?).", "error")
    else:
        flash(f"Requeued {len(requeued)} dead letter{'s' if len(requeued) != 1 else ''}.", "info")
    return _back()


def purge() -> ResponseReturnValue:
    """Delete the dead letters of ``queue`` (or of every queue). There is no undo."""
    queue = _queue()
    where = queue or "every queue"
    asking = _confirmed("purge", f"Delete every dead letter of {where}? There is no undo.")
    if asking is not None:
        return asking
    count = _state().ext.purge_dead_letters(queue)
    log.warning("Dashboard: %s purged the dead letters of %s: %d deleted", actor(), where, count)
    flash(f"Deleted {count} dead letter{'s' if count != 1 else ''} of {where}.", "info")
    return _back()


def revoke() -> ResponseReturnValue:
    """Revoke the task ``id``: a queued one is discarded when a worker takes it; ``terminate=1`` stops a running one."""
    task_id = (request.form.get("id") or "").strip()
    if not task_id or len(task_id) > 200:
        abort(400, description="Give the id of the task to revoke.")
    terminate = request.form.get("terminate") == "1"
    verb = "Stop the running task" if terminate else "Revoke the task"
    asking = _confirmed("revoke", f"{verb} {task_id}?")
    if asking is not None:
        return asking
    _state().celery.control.revoke(task_id, terminate=terminate)
    log.warning("Dashboard: %s revoked task %s%s", actor(), shown_text(task_id), " (terminate)" if terminate else "")
    flash(f"Revoked {task_id}{' and stopped it' if terminate else ''}.", "info")
    return _back()


# -- template helpers -------------------------------------------------------------------


def age(seconds: float | None) -> str:
    """``seconds`` as a short duration (``42s``, ``3m``, ``2h``, ``5d``), or ``-``."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def when(timestamp: float | None) -> str:
    """How long ago a Unix time was (``42s ago``), or ``-``."""
    if timestamp is None:
        return "-"
    return f"{age(max(0.0, time.time() - timestamp))} ago"
