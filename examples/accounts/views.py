"""The HTTP endpoints. Each answers at once; the slow work is queued."""

from __future__ import annotations

from flask import Blueprint, current_app, request
from flask_login import current_user, login_required

from . import data_path
from .tasks import audit, make_thumbnail, send_welcome_mail

bp = Blueprint("accounts", __name__)


@bp.route("/")
def index():
    outbox = data_path(current_app, "outbox", "x").parent
    return {
        "service": "accounts (flask-pymacaron-async example)",
        "try": [
            f"curl -X POST -H 'X-User: ada' '{request.host_url}signup?email=ada@example.com'",
            f"curl -X POST -H 'X-User: ada' --data-binary @photo.jpg {request.host_url}avatar",
            f"curl {request.host_url}outbox",
        ],
        "outbox": str(outbox),
    }


@bp.route("/signup", methods=["POST"])
@login_required
def signup():
    email = request.args.get("email") or request.form.get("email", "")
    if "@" not in email:
        return {"error": "give an email address: /signup?email=ada@example.com"}, 400
    mail = send_welcome_mail(email)
    audit("signup", email=email)
    return {"user": current_user.get_id(), "email": email, "queued": {"welcome_mail": mail.id}}, 202


@bp.route("/avatar", methods=["POST"])
@login_required
def upload_avatar():
    data = request.get_data()
    if not data:
        return {"error": "send the image as the request body: curl --data-binary @photo.jpg ..."}, 400
    filename = f"{current_user.get_id()}.upload"
    data_path(current_app, "media", "avatars", filename).write_bytes(data)
    thumbnail = make_thumbnail(filename)
    audit("avatar.upload", bytes=len(data))
    return {"user": current_user.get_id(), "queued": {"thumbnail": thumbnail.id}}, 202


@bp.route("/outbox")
def outbox():
    folder = data_path(current_app, "outbox", "x").parent
    return {"mails": sorted(p.name for p in folder.glob("*.eml"))}
