"""Flask apps the tests queue tasks from and run workers for."""

from __future__ import annotations

from flask import g

from flask_pymacaron_async import PymacaronAsync


def carry_g_user(ext: PymacaronAsync) -> None:
    """The test apps' user is ``g.user``, a plain string, carried as it is."""

    @ext.user_dumper
    def dump_user():
        return g.get("user")

    @ext.user_loader
    def load_user(user_id):
        g.user = user_id
