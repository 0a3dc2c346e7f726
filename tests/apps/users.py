"""Flask-Login users of the test apps: an id, from the session or the ``X-Login`` header."""

from __future__ import annotations

from flask_login import UserMixin


class User(UserMixin):
    def __init__(self, user_id):
        self.id = user_id


def load_user(user_id):
    return User(user_id)


def load_from_header(req):
    user_id = req.headers.get("X-Login")
    return User(user_id) if user_id else None
