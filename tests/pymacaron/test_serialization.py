"""pymacaron models as task arguments: JSON in the message, the service's own classes on arrival."""

from __future__ import annotations

import pickle
from datetime import datetime, timezone

import pytest
from pymacaron.model import PymacaronBaseModel

from flask_pymacaron_async import serialization
from pymacaron_async.serialization import decode_model, register_pickling


def test_models_round_trip_alone_in_lists_and_dicts(pets):
    owner = pets.Owner(id="u1", name="Ada")
    pet = pets.Pet(name="Rex", tags=["a"], born=datetime(2020, 1, 2, 3, 4, tzinfo=timezone.utc), owner=owner)
    args, kwargs = serialization.roundtrip([(pet, [pet, owner]), {"owner": owner, "extra": {"pets": [pet]}}])

    assert type(args[0]) is pets.Pet and args[0] == pet
    assert args[0].born == pet.born and isinstance(args[0].born, datetime)
    assert type(args[0].owner) is pets.Owner
    assert [type(m) for m in args[1]] == [pets.Pet, pets.Owner] and args[1] == [pet, owner]
    assert type(kwargs["owner"]) is pets.Owner and kwargs["owner"] == owner
    assert type(kwargs["extra"]["pets"][0]) is pets.Pet


def test_the_message_names_the_api_and_model(pets):
    encoded = serialization.dumps(pets.Owner(id="u1"))
    assert '"api":"pets"' in encoded and '"model":"Owner"' in encoded and '"v":{"id":"u1"}' in encoded


def test_only_loaded_models_are_rebuilt(pets):
    for tagged in ({"api": "pets", "model": "json_to_model"}, {"api": "nope", "model": "Pet"}, {"api": "pets"}):
        with pytest.raises(ValueError, match="no pymacaron model"):
            decode_model({}, tagged)
    with pytest.raises(ValueError, match="expected a JSON object"):
        decode_model([1], {"api": "pets", "model": "Owner"})


def test_a_model_that_is_not_generated_cannot_be_sent():
    from pydantic import BaseModel

    class Handmade(PymacaronBaseModel, BaseModel):
        x: int = 1

    def task(item):
        pass

    with pytest.raises(TypeError, match="argument 'item' of type Handmade cannot be sent"):
        serialization.check_arguments("task", task, (Handmade(),), {})


def test_models_pickle_between_pool_processes(pets):
    # Celery's prefork pool pickles decoded arguments; generated classes are not importable.
    register_pickling()
    pet = pets.Pet(name="Rex", owner=pets.Owner(id="u1"))
    again = pickle.loads(pickle.dumps([pet]))
    assert type(again[0]) is pets.Pet and again[0] == pet
