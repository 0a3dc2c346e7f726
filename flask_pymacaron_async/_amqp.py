"""How the app's Celery builds task messages: each one gets its context signed for it.

Celery's ``AMQP`` class builds a task message (headers, properties, body)
and hands it to the producer. :class:`AMQP` adds one step in between: when
the publisher left an unsigned snapshot (:class:`~flask_pymacaron_async._context.Unsigned`)
in the context header, it signs it for this message (task name, task id, and
the body exactly as the serializer encodes it), so that a context copied onto
another message is refused by the worker. A message sent with Celery's own
API (``send_task``, ``celery call``) gets the context of where it was sent
from (the current request, else none). It also removes what must never
leave a worker: the consumer's verification mark, and the deferral count of a
message being retried.

On RabbitMQ, a quorum queue (``task_default_queue_type = "quorum"``, Celery
5.5+, or a ``Queue`` declared with ``x-queue-type: quorum``) gets a delivery
limit and a dead-letter route into the extension's dead letters
(:class:`Queues`): a message that is delivered again and again (its worker
killed each time) ends in ``flask async dead``, not in a loop.

:class:`~flask_pymacaron_async.PymacaronAsync` creates every Celery app with
``amqp="flask_pymacaron_async._amqp:AMQP"``.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable

from celery.app import amqp as celery_amqp
from kombu import compression
from kombu.serialization import dumps

from . import _compat
from . import _context as context
from ._deadletter import DEFERRED, SUFFIX

_NEVER_SENT = (context.VERIFIED, DEFERRED)

#: ``x-delivery-limit`` of a quorum queue unless it sets its own (RabbitMQ 4's default).
DELIVERY_LIMIT = 20


def quorum_arguments(
    queue: str, arguments: dict[str, Any] | None, delivery_limit: int = DELIVERY_LIMIT
) -> dict[str, Any] | None:
    """``arguments`` of a queue named ``queue``, with the delivery limit and dead-letter route of a quorum queue.

    A queue that is not a quorum queue keeps its arguments; one that sets
    any of these keeps its own values.
    """
    if not arguments or arguments.get("x-queue-type") != "quorum":
        return arguments
    return {
        "x-delivery-limit": delivery_limit,
        # The default exchange routes by queue name: into the queue's dead letters.
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue + SUFFIX,
        **arguments,
    }


class Queues(celery_amqp.Queues):
    """Celery's queue table: a quorum queue gets a delivery limit and its dead letters as dead-letter route."""

    #: ``PYMACARON_ASYNC_DELIVERY_LIMIT`` of the app (:attr:`AMQP.queues_cls` sets it).
    delivery_limit = DELIVERY_LIMIT

    def add(self, queue: Any, **kwargs: Any) -> Any:
        limit = self.delivery_limit
        if hasattr(queue, "queue_arguments"):
            queue.queue_arguments = quorum_arguments(queue.name, queue.queue_arguments, limit)
        elif isinstance(queue, str) and kwargs.get("queue_arguments"):
            kwargs["queue_arguments"] = quorum_arguments(queue, kwargs["queue_arguments"], limit)
        return super().add(queue, **kwargs)


class AMQP(celery_amqp.AMQP):
    """Celery's ``AMQP``, signing the context of each task message it sends."""

    #: kombu's connection, keeping the app's transport through a failover
    #: (:class:`~flask_pymacaron_async._compat.KombuConnection`).
    Connection = _compat.KombuConnection

    @cached_property
    def queues_cls(self) -> type[Queues]:
        """:class:`Queues` with the app's ``PYMACARON_ASYNC_DELIVERY_LIMIT``."""
        state = getattr(self.app, "pma_state", None)
        limit = state.settings.delivery_limit if state is not None else DELIVERY_LIMIT
        return type("Queues", (Queues,), {"delivery_limit": limit})

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
                content_type, _, body = dumps(message[2], serializer=options.get("serializer") or conf.task_serializer)
                bound = context.bound_headers(
                    {**headers, "compression": _compression(options.get("compression") or conf.task_compression)},
                    content_type,
                )
                token = state.signer.sign(str(pending), name, headers["id"], body, bound)
                headers[context.HEADER] = token
                if extra is not None and context.HEADER in extra:
                    extra[context.HEADER] = token
            return send(producer, name, message, **options)

        return send_task_message


def _compression(name: Any) -> str | None:
    """The ``compression`` header kombu writes for a compression named ``name`` (an alias or a content type)."""
    if not name:
        return None
    try:
        return str(compression.get_encoder(name)[1])
    except KeyError:  # kombu refuses to publish it anyway
        return str(name)
