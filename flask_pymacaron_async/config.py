"""Configuration keys, their defaults, and their validation.

Every key is read once, in :meth:`PymacaronAsync.init_app`; a wrong value
raises :class:`~flask_pymacaron_async.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from .errors import ConfigError

#: Request headers copied into the worker's rebuilt request unless
#: ``PYMACARON_ASYNC_CONTEXT_HEADERS`` says otherwise. Authorization and
#: Cookie are deliberately absent; so is Accept (a task answers no client,
#: and a browser's Accept costs ~100 bytes in every message).
DEFAULT_CONTEXT_HEADERS = (
    "Accept-Language",
    "User-Agent",
    "Referer",
    "X-Request-Id",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Real-Ip",
)

DEFAULT_BROKER_URL = "redis://localhost:6379/0"

PUBLISH_MODES = ("immediate", "after_response", "after_commit")
FALLBACKS = (None, "inline")
EMBEDDED_BROKER_MODES = ("auto", True, False)

#: key -> default; the single table of what the extension reads from app.config.
DEFAULTS: dict[str, Any] = {
    "PYMACARON_ASYNC_ENABLED": True,
    "PYMACARON_ASYNC_BROKER_URL": DEFAULT_BROKER_URL,
    "PYMACARON_ASYNC_RESULT_BACKEND": None,
    "PYMACARON_ASYNC_CONTEXT_HEADERS": list(DEFAULT_CONTEXT_HEADERS),
    "PYMACARON_ASYNC_PUBLISH": "immediate",
    "PYMACARON_ASYNC_PUBLISH_TIMEOUT": 2.0,
    "PYMACARON_ASYNC_BROKER_MIN_REPLICAS": 0,
    "PYMACARON_ASYNC_DELIVERY_LIMIT": 20,
    "PYMACARON_ASYNC_FALLBACK": None,
    "PYMACARON_ASYNC_SECRET_KEY": None,
    "PYMACARON_ASYNC_SECRET_KEY_FALLBACKS": [],
    "PYMACARON_ASYNC_MAX_MESSAGE_BYTES": 1024 * 1024,
    "PYMACARON_ASYNC_VISIBILITY_TIMEOUT": 3600,
    "PYMACARON_ASYNC_CONTEXT_MAX_AGE": 7 * 24 * 3600,
    "PYMACARON_ASYNC_DEAD_LETTER_MAX": 10_000,
    "PYMACARON_ASYNC_DEAD_LETTER_FAILED": True,
    "PYMACARON_ASYNC_DEPLOY_GRACE": 600,
    "PYMACARON_ASYNC_DONE_TTL": 3600,
    "PYMACARON_ASYNC_SPAWN_WORKER": None,
    "PYMACARON_ASYNC_EMBEDDED_BROKER": "auto",
    "PYMACARON_ASYNC_DASHBOARD_SHOW_ARGS": False,
    "PYMACARON_ASYNC_DASHBOARD_REFRESH": 5,
    "CELERY": {},
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated configuration of one Flask app.

    Its ``repr`` leaves the keys out and masks the passwords of the broker
    and result backend URLs.
    """

    enabled: bool
    broker_url: str
    result_backend: str | None
    context_headers: tuple[str, ...]
    publish: str
    publish_timeout: float
    broker_min_replicas: int
    delivery_limit: int
    fallback: str | None
    secret_key: str | bytes | None = dataclasses.field(repr=False)
    secret_key_fallbacks: tuple[str | bytes, ...] = dataclasses.field(repr=False)
    max_message_bytes: int
    visibility_timeout: float
    context_max_age: float | None
    dead_letter_max: int
    dead_letter_failed: bool
    deploy_grace: float
    done_ttl: float
    spawn_worker: bool | None
    embedded_broker: str | bool
    dashboard_show_args: bool
    dashboard_refresh: float
    celery: Mapping[str, Any]

    def __repr__(self) -> str:
        shown = []
        for field in dataclasses.fields(self):
            if not field.repr:
                continue
            value = getattr(self, field.name)
            if field.name in ("broker_url", "result_backend") and isinstance(value, str):
                value = masked_url(value)
            elif field.name == "celery":
                value = {k: masked_url(v) if isinstance(v, str) and "://" in v else v for k, v in value.items()}
            shown.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(shown)})"


def masked_url(url: str) -> str:
    """``url`` with every password masked, for messages, logs, pages and reprs.

    Every form kombu accepts: several URLs separated by ``;`` (failover
    Redis, Sentinels), with or without ports, amqp with a vhost. A URL kombu
    cannot parse is masked all the same (whatever sits between ``user:`` and
    ``@``), never raised on.
    """
    return ";".join(_masked_one(part) for part in url.split(";"))


# What sits between "//user:" and "@" in a URL: its password.
_PASSWORD = re.compile(r"(//[^/@:;]*:)[^@;]*@")


def _masked_one(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    try:
        masked = str(maybe_sanitize_url(url))
    except Exception:  # not a URL kombu can parse: the pattern below masks it all the same
        masked = url
    return _PASSWORD.sub(r"\1**@", masked)


def _check(key: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _number(config: Mapping[str, Any], key: str, expected: str = "a positive number", zero: bool = False) -> float:
    value = config[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 or (zero and value == 0))
    _check(key, ok, expected, value)
    return float(value)


def _count(config: Mapping[str, Any], key: str) -> int:
    value = config[key]
    _check(key, isinstance(value, int) and not isinstance(value, bool) and value > 0, "a positive integer", value)
    return int(value)


def _keys(config: Mapping[str, Any], key: str) -> list[str | bytes]:
    value = config.get(key)
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        value = [value]
    _check(
        key,
        isinstance(value, (list, tuple)) and all(isinstance(k, (str, bytes)) and k for k in value),
        "a list of keys (strings or bytes)",
        "<hidden>",
    )
    return list(value)


def load_settings(config: dict[str, Any]) -> Settings:
    """Fill in the defaults of ``config`` and validate every key."""
    for key, default in DEFAULTS.items():
        config.setdefault(key, list(default) if isinstance(default, list) else default)
        if key == "CELERY" and config[key] is default:
            config[key] = {}

    headers = config["PYMACARON_ASYNC_CONTEXT_HEADERS"]
    _check(
        "PYMACARON_ASYNC_CONTEXT_HEADERS",
        isinstance(headers, (list, tuple)) and all(isinstance(h, str) and h for h in headers),
        "a list of header names (strings)",
        headers,
    )
    publish = config["PYMACARON_ASYNC_PUBLISH"]
    _check("PYMACARON_ASYNC_PUBLISH", publish in PUBLISH_MODES, f"one of {PUBLISH_MODES}", publish)
    fallback = config["PYMACARON_ASYNC_FALLBACK"]
    _check("PYMACARON_ASYNC_FALLBACK", fallback in FALLBACKS, f"one of {FALLBACKS}", fallback)
    embedded = config["PYMACARON_ASYNC_EMBEDDED_BROKER"]
    _check(
        "PYMACARON_ASYNC_EMBEDDED_BROKER",
        embedded in EMBEDDED_BROKER_MODES,
        f"one of {EMBEDDED_BROKER_MODES}",
        embedded,
    )
    for key in ("PYMACARON_ASYNC_ENABLED", "PYMACARON_ASYNC_DEAD_LETTER_FAILED", "PYMACARON_ASYNC_DASHBOARD_SHOW_ARGS"):
        _check(key, isinstance(config[key], bool), "True or False", config[key])
    spawn = config["PYMACARON_ASYNC_SPAWN_WORKER"]
    _check("PYMACARON_ASYNC_SPAWN_WORKER", spawn in (None, True, False), "None, True or False", spawn)
    broker = config["PYMACARON_ASYNC_BROKER_URL"]
    _check("PYMACARON_ASYNC_BROKER_URL", isinstance(broker, str) and "://" in broker, "a URL", broker)
    backend = config["PYMACARON_ASYNC_RESULT_BACKEND"]
    _check("PYMACARON_ASYNC_RESULT_BACKEND", backend is None or isinstance(backend, str), "a URL or None", backend)
    celery = config["CELERY"]
    _check("CELERY", isinstance(celery, Mapping), "a dict of Celery settings", celery)
    max_bytes = _count(config, "PYMACARON_ASYNC_MAX_MESSAGE_BYTES")
    dead_max = _count(config, "PYMACARON_ASYNC_DEAD_LETTER_MAX")
    replicas = config["PYMACARON_ASYNC_BROKER_MIN_REPLICAS"]
    _check(
        "PYMACARON_ASYNC_BROKER_MIN_REPLICAS",
        isinstance(replicas, int) and not isinstance(replicas, bool) and replicas >= 0,
        "a number of replicas (0 or more)",
        replicas,
    )

    max_age = config["PYMACARON_ASYNC_CONTEXT_MAX_AGE"]
    if max_age is not None:
        max_age = _number(config, "PYMACARON_ASYNC_CONTEXT_MAX_AGE", "a positive number of seconds, or None")

    own_secret = config["PYMACARON_ASYNC_SECRET_KEY"]
    secret = own_secret or config.get("SECRET_KEY")
    fallbacks = _keys(config, "PYMACARON_ASYNC_SECRET_KEY_FALLBACKS")
    if not own_secret:
        # Flask 3.1's: the keys SECRET_KEY had before.
        fallbacks += _keys(config, "SECRET_KEY_FALLBACKS")
    if config["PYMACARON_ASYNC_ENABLED"] and not secret:
        raise ConfigError(
            "SECRET_KEY (or PYMACARON_ASYNC_SECRET_KEY) must be set: the request context "
            "sent to the worker is signed with it"
        )

    return Settings(
        enabled=config["PYMACARON_ASYNC_ENABLED"],
        broker_url=broker,
        result_backend=backend,
        context_headers=tuple(headers),
        publish=publish,
        publish_timeout=_number(config, "PYMACARON_ASYNC_PUBLISH_TIMEOUT"),
        broker_min_replicas=replicas,
        delivery_limit=_count(config, "PYMACARON_ASYNC_DELIVERY_LIMIT"),
        fallback=fallback,
        secret_key=secret,
        secret_key_fallbacks=tuple(dict.fromkeys(k for k in fallbacks if k != secret)),
        max_message_bytes=max_bytes,
        visibility_timeout=_number(config, "PYMACARON_ASYNC_VISIBILITY_TIMEOUT"),
        context_max_age=max_age,
        dead_letter_max=dead_max,
        dead_letter_failed=config["PYMACARON_ASYNC_DEAD_LETTER_FAILED"],
        deploy_grace=_number(config, "PYMACARON_ASYNC_DEPLOY_GRACE", "a number of seconds (0: no grace)", zero=True),
        done_ttl=_number(config, "PYMACARON_ASYNC_DONE_TTL", "a number of seconds (0: not kept)", zero=True),
        spawn_worker=spawn,
        embedded_broker=embedded,
        dashboard_show_args=config["PYMACARON_ASYNC_DASHBOARD_SHOW_ARGS"],
        dashboard_refresh=_number(config, "PYMACARON_ASYNC_DASHBOARD_REFRESH", "a positive number of seconds"),
        celery=dict(celery),
    )
