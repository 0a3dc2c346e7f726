"""How the app's Celery builds task messages: each one gets its context signed for it.

Celery's ``AMQP`` class builds a task message (headers, properties, body)
and hands it to the producer. :class:`AMQP` adds one step in between: when
the publisher left an unsigned snapshot (:class:`~flask_pymacaron_async.context.Unsigned`)
in the context header, it signs it for this message (task name, task id, and
the body exactly as the serializer encodes it), so that a context copied onto
another message is refused by the worker. A message sent with Celery's own
API (``send_task``, ``celery call``) gets the context of where it was sent
from (the current request, else none). It also removes what must never
leave a worker: the consumer's verification mark, and the deferral count of a
message being retried.

:class:`~flask_pymacaron_async.PymacaronAsync` creates every Celery app with
``amqp="flask_pymacaron_async.amqp:AMQP"``.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable

from celery.app import amqp as celery_amqp
from kombu.serialization import dumps

from . import _compat, context
from .deadletter import DEFERRED

_NEVER_SENT = (context.VERIFIED, DEFERRED)


class AMQP(celery_amqp.AMQP):
    """Celery's ``AMQP``, signing the context of each task message it sends."""

    @cached_property
    def send_task_message(self) -> Callable[..., Any]:
        send = _compat.task_sender(self)
        conf = self.app.conf

        def send_task_message(producer: Any, name: str, message: Any, **options: Any) -> Any:
            headers = message[0]
            extra = options.get("headers")
            for key in _NEVER_SENT:
                headers.pop(key, None)
                if extra:
                    extra.pop(key, None)
            pending = (extra or {}).get(context.HEADER, headers.get(context.HEADER))
            state = self.app.pma_state
            if pending is None:
                # Sent with Celery's own API (send_task, `celery call`): the
                # context of where it was sent from, as a task call would have.
                pending = context.Unsigned(context.take(state))
            if isinstance(pending, context.Unsigned):
                # Encoded here as the producer will encode it (same serializer, same input).
                _, _, body = dumps(message[2], serializer=options.get("serializer") or conf.task_serializer)
                token = state.signer.sign(str(pending), name, headers["id"], body)
                headers[context.HEADER] = token
                if extra is not None and context.HEADER in extra:
                    extra[context.HEADER] = token
            return send(producer, name, message, **options)

        return send_task_message
