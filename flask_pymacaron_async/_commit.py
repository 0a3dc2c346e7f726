"""Publishing after the database commit: calls held by an SQLAlchemy session's transaction.

With ``publish="after_commit"`` (per task, or ``PYMACARON_ASYNC_PUBLISH``), a
call made while the app's SQLAlchemy session is in a transaction is held by
that transaction: published when it commits, dropped when it rolls back.
A savepoint (``session.begin_nested()``) hands what it holds to its parent
when it is released, and drops it when rolled back; the outermost
transaction publishes when its commit succeeded. A commit that fails rolls
back, so nothing is published. Outside a transaction, a call is published at
once (as Django's ``delay_on_commit`` does outside an atomic block).

The session is Flask-SQLAlchemy's ``db.session`` when the app has
Flask-SQLAlchemy, else what the extension's
:meth:`~flask_pymacaron_async.PymacaronAsync.sqlalchemy_session` hook returns.
SQLAlchemy 1.4 and 2.x; the events are registered once, on first use.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

# What each transaction holds, and how the transactions that ended, ended.
_HELD: weakref.WeakKeyDictionary[Any, list[Callable[[], None]]] = weakref.WeakKeyDictionary()
_COMMITTED: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_listening = False


def current_session(app: Flask, getter: Callable[[], Any] | None) -> Any:
    """The SQLAlchemy session of the current context: ``getter()``, else Flask-SQLAlchemy's, else None."""
    if getter is not None:
        session = getter()
    else:
        db = app.extensions.get("sqlalchemy")
        if db is None:
            return None
        # Flask-SQLAlchemy 3 keeps the extension itself there, 2.x a state with `.db`.
        session = getattr(getattr(db, "db", db), "session", None)
    if session is not None and not hasattr(session, "in_transaction"):
        session = session()  # a scoped_session: the session of this scope
    return session


def hold(session: Any, publish: Callable[[], None]) -> bool:
    """Hold ``publish`` until ``session``'s transaction commits; False (nothing held) when it has none."""
    if session is None or not session.in_transaction():
        return False
    _listen()
    transaction = _current(session)
    with _lock:
        _HELD.setdefault(transaction, []).append(publish)
    return True


def _current(session: Any) -> Any:
    """The transaction a commit or rollback of ``session`` ends next: the innermost savepoint, else the root."""
    return session.get_nested_transaction() or session.get_transaction()


def _listen() -> None:
    global _listening
    if _listening:
        return
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    with _lock:
        if _listening:
            return
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_transaction_end", _after_transaction_end)
        _listening = True


def _after_commit(session: Any) -> None:
    _COMMITTED.add(_current(session))


def _after_transaction_end(session: Any, transaction: Any) -> None:
    with _lock:
        held = _HELD.pop(transaction, None)
        committed = transaction in _COMMITTED
        _COMMITTED.discard(transaction)
        if not held:
            return
        if not committed:
            log.debug("Transaction rolled back (or closed): dropping %d task(s) held for its commit", len(held))
            return
        parent = transaction.parent
        if parent is not None:
            # A released savepoint: its calls wait for the outer commit.
            _HELD.setdefault(parent, []).extend(held)
            return
    for publish in held:
        publish()
