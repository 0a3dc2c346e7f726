"""Arguments round-trip exactly: a dict with the type tag key arrives as that dict, never as a decoded type."""

from __future__ import annotations

import datetime
import decimal
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flask_pymacaron_async import serialization
from tests.apps import basic

TAG = serialization.TAG

# What a web client can put in a JSON body that a view forwards to a task (issue 23).
ATTACKS = {
    "pydantic-class-path": {TAG: "pydantic", "cls": "tests.test_serialization:Address", "v": {"city": "x"}},
    "bytes": {TAG: "bytes", "v": "AAAA"},
    "decimal-nan": {TAG: "decimal", "v": "NaN"},
    "unknown-tag": {TAG: "nope"},
    "bad-rich-value": {TAG: "datetime", "v": 5},
    "escaped-dict": {TAG: "dict", "v": [["a", 1]]},
    "bad-escaped-dict": {TAG: "dict", "v": 5},
    "tag-not-a-string": {TAG: None, "v": [1]},
}


def typed(value):
    """``value`` with the type of each leaf and the order of each dict's keys: ``==`` alone says 1 == True."""
    if isinstance(value, dict):
        return ("dict", [(k, typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    return (type(value), value)


keys = st.sampled_from([TAG, "v", "cls", "api", "model", "", "é", "\u2603", f"x{TAG}"]) | st.text(max_size=6)
strings = st.sampled_from([TAG, json.dumps(ATTACKS["bytes"]), f'"{TAG}"']) | st.text(max_size=8)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | strings
rich = (
    st.datetimes(timezones=st.none() | st.just(datetime.timezone.utc))
    | st.dates()
    | st.times()
    | st.uuids()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars | rich | st.sampled_from(list(ATTACKS.values())),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, database=None)
@given(args=st.lists(values, max_size=4), kwargs=st.dictionaries(st.text(max_size=6), values, max_size=4))
def test_arguments_round_trip_exactly(args, kwargs):
    call = [args, kwargs]
    assert typed(serialization.loads(serialization.dumps(call))) == typed(call)


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_a_tagged_dict_arrives_as_the_dict(attack):
    for value in (attack, [attack], {"body": attack}, {"body": {TAG: attack}}):
        assert typed(serialization.roundtrip(value)) == typed(value)


def test_a_dict_with_the_tag_key_is_keyed_as_json_keys_it():
    # Non-string keys become what JSON makes of them, escaped or not.
    value = {2: "two", None: "none", False: "no", 1.5: "half"}
    assert serialization.roundtrip({**value, TAG: 0}) == {**serialization.roundtrip(value), TAG: 0}
    with pytest.raises(TypeError, match="keys must be str"):
        serialization.dumps({TAG: 0, (1, 2): "tuple"})


def test_check_arguments_still_names_the_argument():
    def task(body, blob):
        pass

    with pytest.raises(TypeError, match=r"argument 'blob' of type set"):
        serialization.check_arguments("task", task, ({TAG: "nope"}, {1}), {})


class Box:
    def __init__(self, content):
        self.content = content

    def __eq__(self, other):
        return isinstance(other, Box) and other.content == self.content


serialization.register_type("test-box", Box, lambda box: box.content, lambda value, _tagged: Box(value))


def test_what_an_encoder_returns_is_data_not_tags():
    box = Box({"attack": ATTACKS["bytes"], "deep": [{TAG: "nope", "when": datetime.date(2024, 1, 2)}]})
    back = serialization.roundtrip([box, {"box": box}])
    assert back == [box, {"box": box}] and type(back[0]) is Box
    assert typed(back[0].content) == typed(box.content)


def test_the_escape_tag_is_reserved():
    with pytest.raises(ValueError, match="the serializer's own"):
        serialization.register_type("dict", Box, lambda box: box.content, lambda value, _tagged: Box(value))


def test_a_forged_escape_in_a_message_is_refused_or_a_plain_dict():
    # What a worker reads from the broker: an escaped dict gives a dict, a malformed one is refused.
    assert serialization.loads(json.dumps(ATTACKS["escaped-dict"])) == {"a": 1}
    nested = {TAG: "dict", "v": [[TAG, "bytes"], ["v", "AAAA"]]}
    assert serialization.loads(json.dumps(nested)) == {TAG: "bytes", "v": "AAAA"}
    for forged in (ATTACKS["bad-escaped-dict"], {TAG: "dict", "v": [[1, 2]]}, {TAG: "dict", "v": [["a"]]}):
        with pytest.raises(ValueError, match="escaped dict"):
            serialization.loads(json.dumps(forged))


def test_calls_without_the_tag_are_written_as_plain_json():
    call = [["id", 3, [1.5, None]], {"body": {"v": "x", "cls": "y"}, "when": decimal.Decimal("1.5")}]
    assert (
        serialization.dumps(call)
        == '[["id",3,[1.5,null]],{"body":{"v":"x","cls":"y"},"when":{"__pma__":"decimal","v":"1.5"}}]'
    )


def test_a_worker_receives_the_dicts_as_sent(app, module_worker, reports, unique):
    attacks = list(ATTACKS.values())
    basic.record_value(attacks, unique)
    assert reports.one(unique) == {"value": attacks, "type": "list"}
