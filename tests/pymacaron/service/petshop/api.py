"""Endpoints of the test service (bound in apis/pets.yaml)."""

import time
from datetime import datetime

from pymacaron import apipool
from pymacaron.auth import get_userid

from . import tasks


def do_create_pet(pet, key=None):
    owner = apipool.pets.Owner(id=get_userid(), name="Ada")
    twin = apipool.pets.Pet(name=f"{pet.name} II", born=datetime(2020, 2, 29, 12, 30), owner=owner)
    queued = [
        tasks.record_call(key, pet, [pet, twin], count=3, owner=owner, extra={"pets": [twin], "n": 1}),
        tasks.call_whoami(key),
        tasks.delayed(key, time.time()),
    ]
    return apipool.pets.Queued(key=key, task_ids=[r.id for r in queued])


def do_crash(key=None):
    queued = [tasks.explode(key), tasks.after_explode(key)]
    return apipool.pets.Queued(key=key, task_ids=[r.id for r in queued])


def do_whoami():
    return apipool.pets.Me(user_id=get_userid())
