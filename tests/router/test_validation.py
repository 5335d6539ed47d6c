"""The compiled validator and jsonschema agree on the canonical inbound schema."""

from __future__ import annotations

import math

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.channel import InvalidMessage
from router.validation import inbound_schema, validate_inbound

REFERENCE = jsonschema.Draft202012Validator(inbound_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)

VALID = {"channel": "webform", "channel_message_id": "x1", "sender": {"kind": "email", "address": "a@b.de"}, "text": "Hallo"}

values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, width=32) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(["channel", "channel_message_id", "kind", "sender", "text", "language", "topic", "location",
                        "thread", "attachments", "flags", "sent_at", "address", "unknown"])


def _finite(value) -> bool:
    """No NaN or infinity anywhere: refused before the schema (they pass any minimum)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _agree(message) -> None:
    reference_ok = REFERENCE.is_valid(message) and _finite(message)
    try:
        validate_inbound(message)
        fast_ok = True
    except InvalidMessage:
        fast_ok = False
    assert fast_ok == reference_ok, message


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(keys, values, max_size=5))
def test_engines_agree_on_mutations(changes):
    _agree({**VALID, **changes})


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["kind", "sender", "location", "thread", "language"]), values)
def test_engines_agree_on_nested_values(key, value):
    _agree({**VALID, key: value})


def test_error_names_the_field():
    try:
        validate_inbound({**VALID, "language": "Deutsch"})
    except InvalidMessage as exc:
        assert exc.path == "language"
    else:
        raise AssertionError("expected InvalidMessage")


def test_lone_surrogates_become_replacement_characters_at_any_depth():
    message = {**VALID, "text": "Hallo \ud800", "sender": {"kind": "email", "address": "a@b.de", "display_name": "E\udc00"},
               "raw": {"nested": ["x\udfff", {"k\ud800": "ok"}, [["\udbff tief"]]], "both\udc00": "v\ud800"}}
    checked = validate_inbound(message)
    assert checked["text"] == "Hallo \ufffd"
    assert checked["sender"]["display_name"] == "E\ufffd"
    assert checked["raw"] == {"nested": ["x\ufffd", {"k\ufffd": "ok"}, [["\ufffd tief"]]], "both\ufffd": "v\ufffd"}
    assert validate_inbound({**VALID, "text": "Grüße 😀"})["text"] == "Grüße 😀"  # whole characters stay


def test_a_message_that_contains_itself_is_walked_once():
    """A plugin may build a message with a cycle; the repair must end (then the schema decides)."""
    message = {**VALID, "text": "Hallo \ud800", "meta": {"note": "x\udc00"}}
    message["meta"]["self"] = message["meta"]
    message["raw"] = [message["meta"]]
    from router.validation import _repair_text

    _repair_text(message)
    assert message["text"] == "Hallo \ufffd" and message["meta"]["note"] == "x\ufffd"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_that_is_not_finite_is_refused_naming_its_key(value):
    """NaN passed latitude's minimum and maximum and was stored as JSON that SQLite's json
    functions and the inbox's clients refuse (Python's JSON reads "NaN" from a body)."""
    with pytest.raises(InvalidMessage) as caught:
        validate_inbound({**VALID, "location": {"lat": value, "lon": 13.4}})
    assert caught.value.path == "lat"
    with pytest.raises(InvalidMessage):
        validate_inbound({**VALID, "raw": {"readings": [1.5, value]}})
