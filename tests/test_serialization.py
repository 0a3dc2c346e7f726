"""The JSON codec: rich types round-trip; what cannot be sent is named at the call site."""

from __future__ import annotations

import datetime
import decimal
import uuid

import pytest

from flask_pymacaron_async import serialization

pydantic = pytest.importorskip("pydantic")


class Address(pydantic.BaseModel):
    city: str
    since: datetime.date


class Person(pydantic.BaseModel):
    name: str
    born: datetime.datetime
    addresses: list[Address]


RICH = [
    datetime.datetime(2024, 5, 17, 10, 30, 1, 500, tzinfo=datetime.timezone.utc),
    datetime.datetime(2024, 5, 17, 10, 30),
    datetime.date(2024, 5, 17),
    datetime.time(23, 59, 58),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    decimal.Decimal("10.05"),
    b"\x00\xffbytes",
    Person(
        name="Ada",
        born=datetime.datetime(1815, 12, 10),
        addresses=[Address(city="London", since=datetime.date(1820, 1, 1))],
    ),
]


@pytest.mark.parametrize("value", RICH, ids=lambda v: type(v).__name__)
def test_rich_types_roundtrip_as_same_type(value):
    back = serialization.roundtrip(value)
    assert type(back) is type(value)
    assert back == value


def test_nested_in_lists_and_dicts():
    value = {"items": RICH, "deep": [{"when": RICH[0]}], "plain": [1, "two", None, True, 2.5]}
    assert serialization.roundtrip(value) == value


def test_messages_are_json_only():
    import json

    json.loads(serialization.dumps(RICH))  # plain JSON on the wire


class NotSendable:
    pass


def test_unsendable_argument_named():
    def task(title, body, when=None):
        pass

    with pytest.raises(TypeError, match=r"send\(\): argument 'body' of type NotSendable"):
        serialization.check_arguments("send", task, ("t", NotSendable()), {})
    with pytest.raises(TypeError, match=r"argument 'when' of type set"):
        serialization.check_arguments("send", task, ("t", "b"), {"when": {1, 2}})
    with pytest.raises(TypeError, match=r"argument 'body' of type dict"):
        serialization.check_arguments("send", task, ("t", {"deep": [NotSendable()]}), {})


def test_unknown_tag_and_unloaded_class_refused():
    with pytest.raises(ValueError, match="unknown serialized type"):
        serialization.loads('{"__pma__": "pickle", "v": "x"}')
    with pytest.raises(ValueError, match="not a loaded BaseModel"):
        serialization.loads('{"__pma__": "pydantic", "cls": "os:system", "v": {}}')
    with pytest.raises(ValueError, match="not a loaded BaseModel"):
        serialization.loads('{"__pma__": "pydantic", "cls": "never.imported:Model", "v": {}}')


class Refund(pydantic.BaseModel):
    amount: decimal.Decimal
    note: dict


def test_a_client_body_naming_a_model_arrives_as_the_dict():
    body = {"__pma__": "pydantic", "cls": f"{__name__}:Refund", "v": {"amount": "10", "note": {}}}
    back = serialization.roundtrip([body])
    assert back == [body] and type(back[0]) is dict


def test_a_model_field_holding_the_tag_key_round_trips():
    refund = Refund(
        amount=decimal.Decimal("10.5"), note={"__pma__": "bytes", "v": "AAAA", "deep": [{"__pma__": "nope"}]}
    )
    back = serialization.roundtrip({"refund": refund})["refund"]
    assert type(back) is Refund and back == refund and back.note == refund.note
