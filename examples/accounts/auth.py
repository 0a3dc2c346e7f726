"""Who is calling: Flask-Login, with a demo login by header.

A request with ``X-User: ada`` is made by the user ``ada``. A real service
would check a session or a token instead; nothing else in the example
depends on how the user logged in. The worker gets the same user back
through Flask-Login's user loader, without any hook of the extension.
"""

from __future__ import annotations

from flask import Flask, Request
from flask_login import LoginManager, UserMixin


class User(UserMixin):
    """A user of the service, known by its id."""

    def __init__(self, user_id: str) -> None:
        self.id = user_id

    @property
    def name(self) -> str:
        return self.id.capitalize()


def load_user(user_id: str) -> User | None:
    """Flask-Login's user loader: also what the worker uses to restore the caller."""
    return User(user_id) if user_id else None


def load_user_from_request(request: Request) -> User | None:
    """The demo login: the ``X-User`` header names the user."""
    return load_user(request.headers.get("X-User", "").strip())


def init_app(app: Flask, login_manager: LoginManager) -> None:
    login_manager.user_loader(load_user)
    login_manager.request_loader(load_user_from_request)
    login_manager.init_app(app)
