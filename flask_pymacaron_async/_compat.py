"""Every use of a Flask, Flask-Login, Celery or kombu internal, in one place.

Each entry says the versions it was checked on and the public alternative,
when there is one. Nothing else in the package touches a third-party private
name; setup.py bounds kombu and Celery to the versions checked here, because
:class:`KombuRedisChannel` and :func:`task_sender` override or call internals
that a new release may change.

Checked on: Flask 1.1.4 and 3.1.3 (and Flask's main branch, 3.2 to be, for
:func:`request_context`); Flask-Login 0.5.0 and 0.6.3; Celery 5.1.2 and
5.7.0; kombu 5.2.0, 5.2.4 and 5.7.0.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any, Callable

from celery import Celery
from flask import ctx as flask_ctx
from kombu import connection as kombu_connection
from kombu.transport import redis as kombu_redis
from werkzeug.routing import Map

if TYPE_CHECKING:
    from flask import Flask
    from flask.sessions import SessionMixin


# -- Flask --------------------------------------------------------------------------


#: Whether Flask merged ``RequestContext`` into ``AppContext`` (Flask 3.2+): a
#: request context is then a fresh app context too.
MERGED_CONTEXTS = hasattr(flask_ctx.AppContext, "from_environ")


def request_context(app: Flask, environ: dict[str, Any], session: SessionMixin | None = None) -> Any:
    """A request context for ``app`` built from ``environ``.

    Flask 3.2 merges ``RequestContext`` into ``AppContext`` (``RequestContext``
    becomes a deprecated alias): ``app.request_context()`` makes one context
    for the app and the request, and opens the session only when it is used.
    Up to 3.1, ``app.request_context(environ)`` opens the session when pushed
    (~17 µs per task, for a session that could only be empty: the caller's
    cookie never travels), so ``RequestContext`` gets ``session`` ready-made.

    Public alternative: ``app.request_context(environ)``, used from Flask 3.2.
    """
    if MERGED_CONTEXTS:
        return app.request_context(environ)
    return _RebuiltRequestContext(app, environ, session=session)


# Flask 3.2 (merged contexts) has RequestContext as a deprecated alias: not subclassed there.
if not MERGED_CONTEXTS:

    class _RebuiltRequestContext(flask_ctx.RequestContext):
        """Flask's request context, with the route of a URL matched once per worker process.

        Tasks queued from one endpoint rebuild the same method, host and path
        over and over; matching it again costs ~15% of a rebuild. The match is
        kept through Flask's documented hook for it (``match_request``: "can be
        overridden by a subclass to hook into the matching of the request") and
        only when nothing in it can differ from one request to the next: the
        route's converters are all Werkzeug's own (a custom converter may read
        the request or a database), the URL map has had no rule added since
        (see :func:`_routes_of`), and the match succeeded (a 404 or a
        redirect is matched again each time). Nothing here counts the rules:
        the cost is the same for 4 routes or 2,000 (``Map._rules``, which an
        older version counted, is a list built on each read in Werkzeug 3).

        ``Rule._converters`` is private (Werkzeug 0.16.0–3.1.x).
        """

        def match_request(self) -> None:
            adapter: Any = self.url_adapter
            url_map = adapter.map
            key = (
                adapter.server_name,
                adapter.script_name,
                adapter.subdomain,
                adapter.url_scheme,
                adapter.path_info,
                adapter.default_method,
            )
            routes = _ROUTES.get(url_map)
            if routes is None:
                routes = _ROUTES[url_map] = _routes_of(url_map)
            found = routes.get(key)
            request = self.request
            if found is not None:
                request.url_rule, view_args = found
                request.view_args = dict(view_args)
                return
            super().match_request()
            rule = request.url_rule
            if request.routing_exception is None and rule is not None and _plain_converters(rule):
                if len(routes) >= _MOST_ROUTES:
                    routes.clear()
                routes[key] = (rule, dict(request.view_args or {}))


def _routes_of(url_map: Any) -> dict[tuple[Any, ...], tuple[Any, dict[str, Any]]]:
    """A new, empty cache of matched routes for ``url_map``, dropped whenever a rule is added to it.

    The map's ``add`` (Werkzeug's public method, which ``app.add_url_rule``
    calls) is wrapped on the instance, once: adding a rule drops the map's
    matches, so a route added later is seen. (``Map._remap`` would not do:
    any other match of the map, the caller's own request in inline mode,
    clears it.)
    """
    if not getattr(url_map, "pma_drops_routes", False):
        add = url_map.add

        def add_and_drop(rule_factory: Any) -> Any:
            _ROUTES.pop(url_map, None)
            return add(rule_factory)

        url_map.add = add_and_drop
        url_map.pma_drops_routes = True
    return {}


#: Matched routes by URL map, then by what the match depends on.
_ROUTES: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], tuple[Any, dict[str, Any]]]] = weakref.WeakKeyDictionary()
_MOST_ROUTES = 256


#: Werkzeug's own converters: pure functions of the URL.
_BUILTIN_CONVERTERS = tuple(Map.default_converters.values())


def _plain_converters(rule: Any) -> bool:
    """Whether every converter of ``rule`` is one of Werkzeug's own."""
    return all(type(converter) in _BUILTIN_CONVERTERS for converter in rule._converters.values())


# -- Flask-Login ----------------------------------------------------------------------


def user_callback(manager: Any) -> Callable[[Any], Any] | None:
    """The function registered with ``@login_manager.user_loader``.

    Public since Flask-Login 0.6 (``LoginManager.user_callback``); 0.5 keeps it in ``_user_callback``.
    """
    if hasattr(type(manager), "user_callback"):
        return manager.user_callback  # type: ignore[no-any-return]
    return manager._user_callback  # type: ignore[no-any-return]


def set_current_user(manager: Any, user: Any) -> None:
    """Make ``current_user`` answer ``user`` in the current request context (Flask-Login 0.5.0–0.6.3).

    No public alternative: ``login_user()`` also writes the session and sends
    ``user_logged_in``, which a task restoring its caller must not do.
    """
    manager._update_request_context_with_user(user)


# -- Celery --------------------------------------------------------------------------


def current_celery_app() -> Any:
    """The Celery app Celery's ``current_app`` stands for in this thread (Celery 5.1.2–5.7.0).

    Public alternative: the ``celery.current_app`` proxy, whose object is
    reached through ``_get_current_object()``, no more public.
    """
    from celery._state import get_current_app

    return get_current_app()


class CombiningCelery(Celery):
    """Celery, whose task decorator combines a ``base=`` with the app's own task class (Celery 5.1.2–5.7.0).

    ``@celery.task(base=MyTask)`` and ``@shared_task(base=MyTask)`` make
    ``MyTask`` the task's class, in place of the app's ``task_cls``: here
    the class is ``task_cls.with_base(MyTask)`` when ``task_cls`` has that
    classmethod (:meth:`flask_pymacaron_async.ContextTask.with_base`), so
    the task keeps its caller's context. Both go through ``_task_from_fun``.

    Public alternative: none (Celery has no hook for a task's base class).
    """

    def _task_from_fun(self, fun: Any, name: Any = None, base: Any = None, bind: bool = False, **options: Any) -> Any:
        if base is not None:
            own = self.Task
            combine = getattr(own, "with_base", None)
            if combine is not None:
                base = combine(base)
        return super()._task_from_fun(fun, name, base, bind, **options)


def task_sender(amqp: Any) -> Callable[..., Any]:
    """Celery's function that publishes a task message (Celery 5.1.2–5.7.0).

    Public alternative: ``AMQP.send_task_message``, the cached property that
    :class:`~flask_pymacaron_async._amqp.AMQP` overrides to wrap this one.
    """
    return amqp._create_task_sender()  # type: ignore[no-any-return]


def run_celery(celery: Any, argv: list[str], prog_name: str) -> int | None:
    """``celery -A <celery> <argv>``, returning the command's exit code (Celery 5.1.2–5.7.0).

    Public alternative: ``Celery.start(argv)``, which does the same (it sets
    the default of the global ``celery`` command's ``--app`` option) but drops
    the exit code of a command that returns normally.
    """
    from celery.bin.celery import celery as celery_main

    celery_main.params[0].default = celery
    try:
        return celery_main.main(args=argv, prog_name=prog_name, standalone_mode=False)  # type: ignore[no-any-return]
    finally:
        celery_main.params[0].default = None


# -- kombu ---------------------------------------------------------------------------


def envelope(message: Any) -> dict[str, Any]:
    """The envelope a message of kombu's virtual transports was decoded from (``Message._raw``, kombu 5.2–5.7).

    Public alternative: ``Message.serializable()``, which re-encodes the body
    (its signature then no longer matches what the worker checked).
    """
    return message._raw  # type: ignore[no-any-return]


class KombuRedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, with the private hooks the extension overrides under public names.

    kombu calls ``_brpop_start`` to send the blocking take of the next
    message, ``_brpop_read`` when its reply can be read, ``_get`` for
    ``basic_get``, ``_put`` to publish, ``_receive_one`` for fanout
    messages and ``_create_client`` for every synchronous command
    (kombu 5.2.0–5.7.0). A subclass implements :meth:`take_start`,
    :meth:`take_read`, :meth:`get_one`, :meth:`put_one`, :meth:`receive_fanout`
    and :meth:`make_client`; ``kombu_*`` are kombu's own versions.

    ``transport.SentinelChannel`` puts kombu's ``SentinelChannel`` after this
    class in its MRO: kombu's Sentinel channel overrides none of these hooks,
    only how the connection pool is made (``_get_pool``, which this class
    maps to :meth:`make_pool`, kombu's own still called) and, from kombu
    5.7, the fanout topics (checked on kombu 5.2.0, 5.2.4 and 5.7.0;
    ``tests/test_sentinel.py`` checks it on the installed kombu).
    """

    #: kombu's private hooks this class maps to public names.
    HOOKS = ("_brpop_start", "_brpop_read", "_get", "_put", "_receive_one", "_create_client")

    def _brpop_start(self, timeout: float | None = None) -> None:
        self.take_start(timeout)

    def _brpop_read(self, **options: Any) -> Any:
        return self.take_read(**options)

    def _get(self, queue: str) -> Any:
        return self.get_one(queue)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        self.put_one(queue, message, **kwargs)

    def _receive_one(self, c: Any) -> Any:
        return self.receive_fanout(c)

    def _create_client(self, asynchronous: bool = False) -> Any:
        return self.make_client(asynchronous)

    def _get_pool(self, asynchronous: bool = False) -> Any:
        return self.make_pool(asynchronous)

    def make_pool(self, asynchronous: bool = False) -> Any:
        """The redis-py connection pool of the channel (kombu's ``_get_pool``, 5.2.0–5.7.0)."""
        return self.kombu_make_pool(asynchronous)

    # kombu's own versions.

    def kombu_put(self, queue: str, message: Any, **kwargs: Any) -> None:
        super()._put(queue, message, **kwargs)

    def kombu_receive_fanout(self, c: Any) -> Any:
        return super()._receive_one(c)

    def kombu_create_client(self, asynchronous: bool = False) -> Any:
        return super()._create_client(asynchronous=asynchronous)

    def kombu_make_pool(self, asynchronous: bool = False) -> Any:
        return super()._get_pool(asynchronous=asynchronous)

    # kombu's private state, read and written under public names.

    def queue_key(self, queue: str, priority: Any) -> str:
        """The Redis list of ``queue`` for ``priority``."""
        return self._q_for_pri(queue, priority)  # type: ignore[no-any-return]

    def priority_of(self, message: Any) -> Any:
        """The priority step of a message to publish."""
        return self._get_message_priority(message, reverse=False)

    def kombu_publishes_itself(self, queue: str, put_kwargs: dict[str, Any]) -> bool:
        """Whether kombu publishes this message its own way: in its batch (``_publish_batch``,
        kombu 5.3+), or to a reply queue with an expiry (``Channel._expires``, kombu 5.2.0–5.7.0)."""
        return put_kwargs.get("_publish_batch") is not None or queue in (getattr(self, "_expires", None) or ())

    def next_queues(self) -> list[str]:
        """The active queues, starting with the one whose turn it is."""
        return self._queue_cycle.consume(len(self.active_queues))  # type: ignore[no-any-return]

    def rotate(self, queue: str) -> None:
        """Give the other queues their turn after a message of ``queue``."""
        self._queue_cycle.rotate(queue)

    @property
    def polling(self) -> Any:
        """The connection a blocking take was sent on and not read yet, or None."""
        return self._in_poll

    @polling.setter
    def polling(self, connection: Any) -> None:
        self._in_poll = connection
        if connection is not None:
            self._brpop_sent_at = _monotonic()

    def after_take_read(self) -> None:
        """What kombu does once a take's reply is read (kombu 5.7: flush a streaming re-authentication)."""
        flush = getattr(self, "_flush_brpop_reauth", None)
        if flush is not None:
            flush()

    def deliver(self, envelope: Any, queue: str) -> None:
        """Hand a decoded envelope to the queue's consumer."""
        self.connection._deliver(envelope, queue)

    def wake_poller(self) -> None:
        """Send the next take now, when the event loop polls this channel and no take is pending.

        Celery acknowledges from a callback that runs after the event loop's
        "poll start" hook and before it polls: without this, the slot the ack
        frees waits for the poll to time out (up to 2 s) first.
        """
        cycle = getattr(self.connection, "cycle", None)
        if cycle is None or self._in_poll or not self.active_queues or not self.qos.can_consume():
            return
        if getattr(cycle, "poller", None) is None or self not in cycle._channels:
            return
        cycle._register_BRPOP(self)


class KombuRedisQoS(kombu_redis.QoS):
    """kombu's Redis QoS, with its private record of delivered messages under a public name (kombu 5.2.0–5.7.0)."""

    def forget_delivered(self) -> None:
        """Forget every message delivered and not acknowledged (Redis keeps them unacknowledged)."""
        self._delivered.clear()


class KombuRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, with its private delivery hook under a public name (kombu 5.2.0–5.7.0)."""

    def _deliver(self, message: Any, queue: str | None) -> None:
        self.deliver_one(message, queue)

    def kombu_deliver(self, message: Any, queue: str | None) -> None:
        super()._deliver(message, queue)


def pool_connection(pool: Any) -> Any:
    """A connection taken from a redis-py connection pool (give it back with ``pool.release``).

    redis-py before 5.3 requires a command name (which it ignores); 5.3 and
    later warn when one is given (checked on redis-py 4.0.2, 4.6.0 and 8.2.0).
    """
    if _names_a_command(pool.__class__):
        return pool.get_connection("MULTI")
    return pool.get_connection()


@functools.cache
def _names_a_command(pool_class: Any) -> bool:
    """Whether ``pool_class.get_connection`` requires a command name (looked at once per class: ~20 µs)."""
    import inspect

    parameter = inspect.signature(pool_class.get_connection).parameters.get("command_name")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def _monotonic() -> float:
    from time import monotonic

    return monotonic()


class KombuConnection(kombu_connection.Connection):
    """kombu's ``Connection``, keeping the transport it was given when it moves to the next URL of a list.

    With a broker URL listing several hosts (``sentinel://a;sentinel://b``),
    kombu's ``switch`` (called when a connection fails) takes the transport
    from the next URL's scheme, dropping the one given at construction: a
    connection of :class:`~flask_pymacaron_async._transport.SentinelTransport`
    became one of kombu's own Sentinel transport, without the dead letters,
    the atomic take or ``min_replicas``. The body is kombu's ``switch``
    (kombu 5.2.0–5.7.0) without that override; a connection given no
    transport behaves as kombu's.
    """

    def switch(self, conn_str: str) -> None:
        transport = self._initial_params.get("transport")
        if not transport:
            super().switch(conn_str)
            return
        self.close()
        self.declared_entities.clear()
        self._closed = False
        params = kombu_connection.parse_url(conn_str) if "://" in conn_str else {"hostname": conn_str}
        params.pop("transport", None)
        self._init_params(**dict(self._initial_params, **params))

    def Pool(self, limit: int | None = None, **kwargs: Any) -> Any:  # noqa: N802 - kombu's name
        """kombu's pool of connections, whose connections keep the transport too (kombu 5.7's ``PooledConnection``)."""
        return _KeepingConnectionPool(self, limit=limit, **kwargs)


class _KeepingConnectionPool(kombu_connection.ConnectionPool):
    def new(self) -> Any:
        if _PooledConnection is None:  # kombu before 5.4: a clone, of this class
            return super().new()
        return _PooledConnection(self, **dict(self.connection._info(resolve=False)))


_KOMBU_POOLED = getattr(kombu_connection, "PooledConnection", None)
_PooledConnection: Any = (
    None
    if _KOMBU_POOLED is None
    else type("PooledConnection", (_KOMBU_POOLED, KombuConnection), {"__module__": __name__})
)


# -- py-amqp (RabbitMQ) ---------------------------------------------------------------


def confirms_publishes(producer: Any) -> bool:
    """Whether ``producer`` publishes on py-amqp with publisher confirms (``confirm_publish``)."""
    raw = getattr(getattr(producer, "connection", None), "connection", None)
    return bool(getattr(raw, "confirm_publish", False)) and hasattr(raw, "drain_events")


class ConfirmedBatch:
    """Publishes on a py-amqp channel of its own, then waits once for every confirm.

    py-amqp's ``basic_publish_confirm`` waits for each message's ``basic.ack``
    in turn (one round trip per message). This channel is put in confirm mode
    by the batch itself, so the delivery tag of each message is known (they
    count from 1 on a channel), its messages are written one after the other,
    and :meth:`wait` reads the acks (single or ``multiple``) until the last one
    is covered. A ``basic.nack`` or a timeout raises; the channel is then
    closed. Uses py-amqp's ``_basic_publish`` (the publish without a wait) and
    ``events``; checked on py-amqp 5.0 and 5.3.
    """

    def __init__(self, connection: Any) -> None:
        self.connection = connection  # kombu's Connection
        self.channel = connection.channel()
        self.channel.confirm_select()
        self.channel._confirm_selected = True
        self.published = 0
        self.acked: set[int] = set()
        self.acked_upto = 0
        self.nacked: list[int] = []
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.basic_publish = self._publish

    @classmethod
    def of(cls, producer: Any) -> ConfirmedBatch:
        """The batch channel of ``producer``'s connection (made on first use, kept with the connection)."""
        connection = producer.connection
        batch = getattr(connection, "_pma_confirmed_batch", None)
        if batch is None or not batch.channel.is_open or batch.channel.connection is None:
            batch = connection._pma_confirmed_batch = cls(connection)
        return batch

    def _publish(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("confirm_timeout", None)
        self.published += 1
        return self.channel._basic_publish(*args, **kwargs)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.acked_upto = max(self.acked_upto, tag)
        else:
            self.acked.add(tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self.nacked.append(tag)

    def _confirmed(self, first: int) -> bool:
        return all(t <= self.acked_upto or t in self.acked for t in range(first, self.published + 1))

    def wait(self, first: int, timeout: float) -> None:
        """Read confirms until the messages from tag ``first`` on are all acked (``MessageNacked`` on a nack)."""
        import socket
        import time

        from amqp.exceptions import MessageNacked

        deadline = time.monotonic() + timeout
        try:
            while not self._confirmed(first):
                if self.nacked:
                    raise MessageNacked(f"the broker refused message(s) {sorted(self.nacked)}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout(f"no publisher confirm after {timeout}s")
                self.channel.connection.drain_events(timeout=remaining)
            if self.nacked:
                raise MessageNacked(f"the broker refused message(s) {sorted(self.nacked)}")
        except BaseException:
            self.close()
            raise
        self.acked = {t for t in self.acked if t > self.acked_upto}

    def close(self) -> None:
        try:
            self.channel.close()
        except Exception:  # the connection is gone already
            pass
        self.connection._pma_confirmed_batch = None


# -- Celery's task message ------------------------------------------------------------


def _plain(value: Any) -> bool:
    """Whether Celery's ``saferepr`` of ``value`` is its ``repr``: a number, None, or a short plain string."""
    kind = type(value)
    if kind is str:
        return len(value) < 200 and value.isprintable() and "'" not in value and "\\" not in value
    return kind in (int, float, bool, type(None))


def task_reprs(amqp: Any, args: Any, kwargs: Any) -> tuple[str, str]:
    """The ``argsrepr`` and ``kwargsrepr`` headers Celery's ``as_task_v2`` writes for these arguments.

    For flat arguments of numbers, None and short plain strings, well under
    the size limit, Celery's ``saferepr`` gives ``repr``'s text, ~10x slower:
    ``repr`` it is (tests/test_batch.py compares them). Celery 5.3 added
    ``task_repr_maxlevels``; 5.1 and 5.2 use the default depth.
    """
    if (
        type(args) is tuple
        and type(kwargs) is dict
        and len(args) + len(kwargs) < 20
        and all(_plain(a) for a in args)
        and all(type(k) is str and _plain(k) and _plain(v) for k, v in kwargs.items())
    ):
        return repr(args), repr(kwargs)

    from celery.utils.saferepr import saferepr

    levels = getattr(amqp.app.conf, "task_repr_maxlevels", None)
    if levels is None:
        return saferepr(args, amqp.argsrepr_maxsize), saferepr(kwargs, amqp.kwargsrepr_maxsize)
    return (
        saferepr(args, amqp.argsrepr_maxsize, maxlevels=levels),
        saferepr(kwargs, amqp.kwargsrepr_maxsize, maxlevels=levels),
    )


def publish_signals_connected() -> bool:
    """Whether anything listens to Celery's ``before_task_publish`` or ``after_task_publish``."""
    from celery import signals as celery_signals

    return bool(celery_signals.before_task_publish.receivers or celery_signals.after_task_publish.receivers)
