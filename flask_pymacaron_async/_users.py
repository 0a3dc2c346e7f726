"""Who the caller is: dumped in the caller, loaded again in the worker.

An extension's :meth:`~flask_pymacaron_async.PymacaronAsync.user_dumper` and
:meth:`~flask_pymacaron_async.PymacaronAsync.user_loader` hooks, or, without
them, Flask-Login's ``current_user`` on an app that sets Flask-Login up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from flask import has_request_context

from . import _compat
from ._shown import shown_user

if TYPE_CHECKING:
    from flask import Flask


class UserHooks:
    """The user hooks of one extension, shared by the apps it is set up on."""

    def __init__(self) -> None:
        #: Returns what identifies the current user (JSON-able), in the caller.
        self.dumper: Callable[[], Any] | None = None
        #: Restores the user from that value, in the worker's rebuilt request context.
        self.loader: Callable[[Any], Any] | None = None
        #: Says how logs and the dashboard show that value (a short name, never a token);
        #: ``None`` from it, or no display, shows it by its naming field (``_shown.shown_user``).
        self.display: Callable[[Any], str | None] | None = None

    def dump(self, app: Flask) -> Any:
        """What identifies the current user of ``app``, or None."""
        if self.dumper is not None:
            return self.dumper()
        if has_request_context() and hasattr(app, "login_manager"):
            from flask_login import current_user

            if current_user.is_authenticated:
                return current_user.get_id()
        return None

    def shown(self, value: Any) -> str | None:
        """What logs and the dashboard show of the dumped user ``value`` (escaped and cut, never a token)."""
        return shown_user(value, self.display)

    def load(self, app: Flask, value: Any) -> None:
        """Restore the user ``value`` names, in the current (rebuilt) context of ``app``."""
        if value is None:
            return
        if self.loader is not None:
            self.loader(value)
            return
        manager = getattr(app, "login_manager", None)
        if manager is not None:
            callback = _compat.user_callback(manager)
            user = callback(value) if callback is not None else None
            if user is not None:
                _compat.set_current_user(manager, user)
