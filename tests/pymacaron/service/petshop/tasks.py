"""Background tasks of the test service, declared as with the old pymacaron-async."""

import time

import requests
from flask import request
from pymacaron import apipool
from pymacaron.auth import get_user_token

from pymacaron_async import asynctask

from .reporting import report, seen


def describe(model):
    cls = type(model)
    return {
        "class": cls.__name__,
        "is_service_class": cls is getattr(apipool.pets, cls.__name__),
        "json": model.to_json(),
        "born_is_datetime": type(getattr(model, "born", None)).__name__ == "datetime",
    }


@asynctask()
def record_call(key, pet, pets, count=0, owner=None, extra=None):
    report(
        key,
        "call",
        {
            **seen(),
            "pet": describe(pet),
            "pets": [describe(p) for p in pets],
            "count": count,
            "owner": describe(owner),
            "extra_pets": [describe(p) for p in extra["pets"]],
            "extra_n": extra["n"],
        },
    )


@asynctask()
def call_whoami(key):
    """A downstream call to a pymacaron service (here: this one) with the user's token."""
    reply = requests.get(
        request.host_url + "v1/whoami",
        headers={"Authorization": f"Bearer {get_user_token()}"},
        timeout=10,
    )
    report(key, "whoami", {**seen(), "status": reply.status_code, "body": reply.json()})


@asynctask(delay=2)
def delayed(key, queued_at):
    report(key, "delayed", {**seen(), "waited": time.time() - queued_at})


@asynctask()
def explode(key):
    raise ValueError(f"boom {key}")


@asynctask()
def after_explode(key):
    report(key, "after", seen())
