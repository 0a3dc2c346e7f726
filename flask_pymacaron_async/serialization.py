"""JSON with rich types, registered in kombu's serializer registry.

Task arguments travel as JSON. Values JSON has no type for are written as
small tagged objects ``{"__pma__": <tag>, "v": <value>}`` and read back as the
same Python types, in both kombu 5.2 (which would turn them into strings) and
kombu 5.3+ (which has its own tags).

Arguments round-trip exactly: a dict of the caller's that has a ``"__pma__"``
key (a JSON body forwarded to a task, say) is written escaped, as its list of
``[key, value]`` pairs under the ``"dict"`` tag, and arrives as the same dict.
A tag is only ever read from what the serializer itself wrote.

Supported out of the box: datetime, date, time, UUID, Decimal, bytes and
pydantic models (when pydantic is installed). More types can be added with
:func:`register_type`.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import inspect
import json
import sys
import uuid
from typing import Any, Callable, Iterable, Mapping

from kombu.serialization import register as _kombu_register

#: Name of the serializer in kombu's registry, used as Celery's task_serializer.
SERIALIZER = "pymacaron_json"
CONTENT_TYPE = "application/x-pymacaron-json"
TAG = "__pma__"
# The tag of a caller's dict that has a TAG key of its own.
_ESCAPED_DICT = "dict"

_Encoder = Callable[[Any], Any]
_Decoder = Callable[[Any, Mapping[str, Any]], Any]

_DECODERS: dict[str, _Decoder] = {}
_ENCODERS: dict[type, tuple[str, _Encoder]] = {}


def register_type(tag: str, cls: type, encode: _Encoder, decode: Callable[..., Any]) -> None:
    """Teach the serializer a new type.

    :param tag: a short unique name written in the message.
    :param cls: instances of this class (and its subclasses) are encoded.
    :param encode: ``encode(obj)`` returns a JSON-able value, or a dict with
        extra keys when ``decode`` needs them (see pydantic below).
    :param decode: ``decode(value, tagged_dict)`` returns the object.

    The value ``encode`` returns is the caller's data: a dict in it with a
    ``"__pma__"`` key arrives as that dict, only the tag set here is read back.
    """
    if tag == _ESCAPED_DICT:
        raise ValueError(f"the tag {tag!r} is the serializer's own: choose another name")
    _DECODERS[tag] = decode
    _ENCODERS[cls] = (tag, encode)


def _has_tagged_dict(obj: Any) -> bool:
    """Whether a dict with a TAG key is in ``obj``, looking through dicts, lists and tuples only."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if TAG in item:
                return True
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def _json_key(key: Any) -> str:
    """The key JSON writes for ``key``: an escaped dict arrives as the dict would have without the escape."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return _ENCODER.encode(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _escape(obj: Any) -> Any:
    """A copy of ``obj`` where every dict with a TAG key is written as its escaped form."""
    if isinstance(obj, dict):
        if TAG in obj:
            return {TAG: _ESCAPED_DICT, "v": [[_json_key(k), _escape(v)] for k, v in obj.items()]}
        return {k: _escape(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_escape(v) for v in obj]
    return obj


def _escaped(obj: Any) -> Any:
    """``obj`` itself when it holds no dict with a TAG key, else its escaped copy."""
    if isinstance(obj, (dict, list, tuple)) and _has_tagged_dict(obj):
        return _escape(obj)
    return obj


def _decode_dict(value: Any, _obj: Mapping[str, Any]) -> dict[str, Any]:
    # object_hook runs inside out: the values are decoded already.
    if not isinstance(value, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) for pair in value
    ):
        raise ValueError("an escaped dict must be a list of [key, value] pairs")
    return dict(value)


def _default(obj: Any) -> Any:
    # The most derived registered class wins: a datetime is not sent as a date.
    # What an encoder returns is the caller's data: only the tag it sets itself is a tag.
    for cls in type(obj).__mro__:
        if cls in _ENCODERS:
            tag, encode = _ENCODERS[cls]
            value = encode(obj)
            if isinstance(value, dict) and TAG in value:
                return {**{k: _escaped(v) for k, v in value.items()}, TAG: tag}
            return {TAG: tag, "v": _escaped(value)}
    if _is_model(obj):
        return _encode_model(obj)
    raise TypeError(f"an object of type {type(obj).__module__}.{type(obj).__qualname__} cannot be sent to a worker")


def _object_hook(obj: dict[str, Any]) -> Any:
    tag = obj.get(TAG)
    if tag is None:
        return obj
    try:
        decode = _DECODERS[tag]
    except KeyError:
        raise ValueError(f"unknown serialized type {tag!r}") from None
    return decode(obj.get("v"), obj)


# One encoder for every call: ``json.dumps`` with options makes a new one each time.
_ENCODER = json.JSONEncoder(default=_default, separators=(",", ":"), allow_nan=False)


def dumps(obj: Any) -> str:
    """Encode ``obj`` to a JSON string; raise :class:`TypeError` for what cannot be sent.

    A dict with a ``"__pma__"`` key is written escaped, so that :func:`loads`
    gives it back as the same dict.
    """
    text = _ENCODER.encode(obj)
    # Most calls carry no TAG at all; with one, walk the arguments for a dict of the caller's to escape.
    if TAG in text and _has_tagged_dict(obj):
        text = _ENCODER.encode(_escape(obj))
    return text


def loads(data: str | bytes) -> Any:
    """Decode what :func:`dumps` wrote, restoring the rich types."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data).decode("utf-8")
    return json.loads(data, object_hook=_object_hook)


def roundtrip(obj: Any) -> Any:
    """What a worker would receive for ``obj``: ``loads(dumps(obj))``."""
    return loads(dumps(obj))


def check_arguments(name: str, func: Callable[..., Any] | None, args: Iterable[Any], kwargs: Mapping[str, Any]) -> str:
    """Encode a task call, or raise :class:`TypeError` naming the argument that cannot be sent.

    Returns the encoded ``[args, kwargs]`` so the caller can check its size.
    """
    args = tuple(args)
    try:
        return dumps([args, kwargs])
    except (TypeError, ValueError):
        pass
    names: list[str] = []
    if func is not None:
        try:
            names = [p.name for p in inspect.signature(func).parameters.values()]
        except (TypeError, ValueError):  # builtins without a signature
            names = []
    labelled = [(f"'{names[i]}'" if i < len(names) else f"#{i}", v) for i, v in enumerate(args)]
    labelled += [(f"'{k}'", v) for k, v in kwargs.items()]
    for label, value in labelled:
        try:
            dumps(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name}(): argument {label} of type {type(value).__name__} cannot be sent to a worker: {exc}"
            ) from None
    raise TypeError(f"{name}(): its arguments cannot be sent to a worker")  # pragma: no cover


# -- built-in types ---------------------------------------------------------


def _time_decoder(parse: Callable[[str], Any]) -> _Decoder:
    return lambda value, _obj: parse(value)


register_type(
    "datetime", datetime.datetime, datetime.datetime.isoformat, _time_decoder(datetime.datetime.fromisoformat)
)
register_type("date", datetime.date, datetime.date.isoformat, _time_decoder(datetime.date.fromisoformat))
register_type("time", datetime.time, datetime.time.isoformat, _time_decoder(datetime.time.fromisoformat))
register_type("uuid", uuid.UUID, str, lambda value, _obj: uuid.UUID(value))
register_type("decimal", decimal.Decimal, str, lambda value, _obj: decimal.Decimal(value))
register_type(
    "bytes",
    bytes,
    lambda b: base64.b64encode(b).decode("ascii"),
    lambda value, _obj: base64.b64decode(value),
)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_class(path: str, base: type) -> type:
    """Find an already imported class by ``module:qualname``; never imports anything.

    Messages come from the broker: a name in one must not make the worker
    import arbitrary modules.
    """
    module_name, _, qualname = path.partition(":")
    target: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if not (isinstance(target, type) and issubclass(target, base)):
        raise ValueError(f"{path!r} is not a loaded {base.__name__} class")
    return target


# pydantic is optional, and not imported here: importing it costs a worker
# ~40 ms of start-up. A model can only exist once pydantic has been imported.


def _encode_model(model: Any) -> dict[str, Any]:
    data = model.model_dump(mode="json") if hasattr(model, "model_dump") else json.loads(model.json())
    return {TAG: "pydantic", "cls": _class_path(type(model)), "v": _escaped(data)}


def _decode_model(value: Any, obj: Mapping[str, Any]) -> Any:
    import pydantic

    cls: Any = resolve_class(obj["cls"], pydantic.BaseModel)
    return cls.model_validate(value) if hasattr(cls, "model_validate") else cls.parse_obj(value)


def _is_model(obj: Any) -> bool:
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(obj, pydantic.BaseModel)


_DECODERS["pydantic"] = _decode_model
_DECODERS[_ESCAPED_DICT] = _decode_dict


_kombu_register(SERIALIZER, dumps, loads, content_type=CONTENT_TYPE, content_encoding="utf-8")
