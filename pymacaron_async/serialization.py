"""pymacaron models as task arguments.

A model generated from the service's swagger spec travels as its api name,
model name and ``to_json()``; the worker rebuilds it with the class that
``apipool`` holds for that api, so the task receives the service's own class.
Only models loaded in ``apipool`` are rebuilt: a message cannot make the
worker build anything else.

The classes of generated models live in modules that are not importable
(pymacaron loads them from files), so pickle cannot find them by name.
Celery's prefork pool pickles the decoded arguments to hand them to a pool
process (and a pool process pickles return values back): without a reducer
the worker dies with "Unrecoverable error: PicklingError". Every model class is
given one that rebuilds the model through ``apipool`` on the other side.
"""

from __future__ import annotations

import copyreg
from typing import Any, Mapping

from pymacaron.model import PymacaronBaseModel

from flask_pymacaron_async.serialization import TAG, register_type

#: Tag of pymacaron models in task messages.
MODEL_TAG = "pymacaron"


def encode_model(model: PymacaronBaseModel) -> dict[str, Any]:
    """The JSON form of a pymacaron model."""
    try:
        api_name = model.get_model_api()
    except Exception:  # PymacaronBaseModel raises a bare Exception when it is not overridden
        raise TypeError(
            f"{type(model).__name__} is not a model generated from a swagger spec (it has no get_model_api())"
        ) from None
    return {TAG: MODEL_TAG, "api": api_name, "model": type(model).__name__, "v": model.to_json()}


def decode_model(value: Any, tagged: Mapping[str, Any]) -> PymacaronBaseModel:
    """Rebuild a model with the class ``apipool`` holds for its api."""
    from pymacaron import apipool, modelpool

    api_name, model_name = tagged.get("api"), tagged.get("model")
    pool = getattr(apipool, api_name, None) if isinstance(api_name, str) else None
    if not isinstance(pool, modelpool) or model_name not in pool.get_model_names():
        raise ValueError(
            f"no pymacaron model {api_name}.{model_name} is loaded in this process: "
            "does the worker load the same swagger specs as the server?"
        )
    if not isinstance(value, dict):
        raise ValueError(f"pymacaron model {api_name}.{model_name}: expected a JSON object, got {type(value).__name__}")
    cls = getattr(pool, str(model_name))
    copyreg.pickle(cls, _reduce_model)
    return cls.from_json(value)


def rebuild_model(api_name: str, model_name: str, value: Any) -> PymacaronBaseModel:
    """Unpickle a model (see :func:`register_pickling`)."""
    return decode_model(value, {"api": api_name, "model": model_name})


def _reduce_model(model: PymacaronBaseModel) -> tuple[Any, ...]:
    tagged = encode_model(model)
    return rebuild_model, (tagged["api"], tagged["model"], tagged["v"])


def register_pickling() -> None:
    """Make every model class loaded in ``apipool`` picklable (called in the worker once the service is loaded)."""
    from pymacaron import apipool, modelpool

    for api_name in apipool.get_api_names():
        pool = getattr(apipool, api_name, None)
        if isinstance(pool, modelpool):
            for model_name in pool.get_model_names():
                copyreg.pickle(getattr(pool, model_name), _reduce_model)


register_type(MODEL_TAG, PymacaronBaseModel, encode_model, decode_model)
