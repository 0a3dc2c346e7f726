"""The background tasks. Each runs in the worker inside the request it was queued from.

``@ext.task`` is ``@asynctask`` for the apps of this extension only.

``request``, ``current_user`` and ``current_app`` answer as they did in the
endpoint: the mail knows the URL of the signup call and who made it.
"""

from __future__ import annotations

import datetime
import json
import uuid
from email.message import EmailMessage

from flask import current_app, request
from flask_login import current_user

from . import data_path, ext


@ext.task
def send_welcome_mail(email: str) -> str:
    """Write the welcome mail to the outbox folder (a real service would hand it to SMTP)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    message = EmailMessage()
    message["From"] = current_app.config["MAIL_SENDER"]
    message["To"] = email
    message["Subject"] = f"Welcome, {current_user.name}!"
    message["Date"] = now.strftime("%a, %d %b %Y %H:%M:%S +0000")
    message["X-Queued-From"] = f"{request.method} {request.url}"
    message["X-Queued-By"] = current_user.get_id()
    message["X-Request-Id"] = request.headers.get("X-Request-Id", "")
    message.set_content(
        f"Hello {current_user.name},\n\n"
        f"Your account is ready. You signed up with {email}.\n\n"
        f"-- sent by the worker for {request.method} {request.url}\n",
        cte="8bit",
    )
    path = data_path(current_app, "outbox", f"{now:%Y%m%dT%H%M%S}-{current_user.get_id()}-{uuid.uuid4().hex[:6]}.eml")
    path.write_text(message.as_string(), encoding="utf-8")
    audit.delay("mail.sent", to=email, file=path.name)
    return str(path)


@ext.task(queue="accounts-media")
def make_thumbnail(filename: str) -> str:
    """Make a square-bounded PNG thumbnail of an uploaded avatar."""
    from PIL import Image

    size = current_app.config["THUMBNAIL_SIZE"]
    source = data_path(current_app, "media", "avatars", filename)
    target = source.with_name(f"{source.stem}-{size}.png")
    with Image.open(source) as image:
        image.thumbnail((size, size))
        image.save(target, "PNG")
    audit.delay("avatar.thumbnail", file=target.name, width=image.width, height=image.height)
    return str(target)


@ext.task(queue="accounts-audit")
def audit(action: str, **details: object) -> None:
    """Append who did what, from where, to the audit log (one JSON object per line)."""
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "action": action,
        "user": current_user.get_id(),
        "method": request.method,
        "url": request.url,
        "request_id": request.headers.get("X-Request-Id"),
        "remote_addr": request.remote_addr,
        "details": details,
    }
    with data_path(current_app, "audit.log").open("a", encoding="utf-8") as log:
        log.write(json.dumps(entry) + "\n")
