"""Blinker signals sent around a task's life.

Every signal is sent with the Flask app as sender and these keyword arguments:
``task_name`` and ``task_id``; ``task_failed`` adds ``exception``,
``task_succeeded`` adds ``result``, ``message_dead_lettered`` adds ``reason``
and ``dead_letter_id`` (its ``task_name`` and ``task_id`` are None for an item
that was not a task message).

.. code-block:: python

    from flask_pymacaron_async.signals import task_failed

    @task_failed.connect_via(app)
    def alert(sender, task_name, task_id, exception, **extra):
        ...
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: Sent in the caller once a task has been handed to the broker (or run inline).
task_queued = _signals.signal("task-queued")

#: Sent in the worker when a task starts, inside its rebuilt context.
task_started = _signals.signal("task-started")

#: Sent in the worker when a task returned.
task_succeeded = _signals.signal("task-succeeded")

#: Sent when a task raised, or when it could not be published after the response.
task_failed = _signals.signal("task-failed")

#: Sent in the worker when a message it refused, or a task that failed for
#: good, was moved into the dead letters.
message_dead_lettered = _signals.signal("message-dead-lettered")
