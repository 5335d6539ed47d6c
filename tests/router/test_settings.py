"""The shared readers of channel settings: a value from the environment is a string, or None
when its variable is unset, and reads as the TOML value it spells."""

from __future__ import annotations

from typing import Any

import pytest

from router.channel import SettingsError
from router.settings import flag, given, non_negative_float, positive_float, positive_int, whole_number

WHERE = "channels.demo"


class DemoSettingsError(SettingsError):
    """A plugin's own subclass, as WhatsApp, e-mail and phone have."""


@pytest.mark.parametrize(("section", "expected"), [
    ({}, None),
    ({"key": None}, None),
    ({"key": ""}, None),
    ({"key": "  \t"}, None),
    ({"key": "x"}, "x"),
    ({"key": " x "}, " x "),
    ({"key": 0}, 0),
    ({"key": False}, False),
    ({"key": []}, []),
])
def test_given_is_none_only_for_a_value_not_given(section: dict[str, Any], expected: Any) -> None:
    assert given(section, "key") == expected
    assert type(given(section, "key")) is type(expected)


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False),
    ("true", True), ("TRUE", True), (" True ", True), ("yes", True), ("On", True), ("1", True),
    ("false", False), ("FALSE", False), ("\tfalse\n", False), ("no", False), ("OFF", False), ("0", False),
])
def test_flag_reads_bools_and_their_strings(value: Any, expected: bool) -> None:
    assert flag({"key": value}, "key", not expected, WHERE) is expected


@pytest.mark.parametrize("value", [None, "", "   "])
@pytest.mark.parametrize("default", [True, False])
def test_flag_not_given_is_the_default(value: Any, default: bool) -> None:
    assert flag({"key": value}, "key", default, WHERE) is default
    assert flag({}, "key", default, WHERE) is default


@pytest.mark.parametrize("value", ["ja", "nein", "ture", "y", "t", "2", "true false", 2, -1, 1.0, [], {}])
def test_flag_refuses_anything_else_naming_the_key(value: Any) -> None:
    with pytest.raises(SettingsError) as caught:
        flag({"key": value}, "key", False, WHERE)
    assert type(caught.value) is SettingsError
    assert caught.value.path == "channels.demo.key"
    assert caught.value.message == f"expected true or false, got {value!r}"


def test_every_reader_raises_the_error_class_it_is_given() -> None:
    calls = [
        lambda error: flag({"key": "ja"}, "key", False, WHERE, error=error),
        lambda error: whole_number({"key": "x"}, "key", 1, WHERE, error=error),
        lambda error: positive_int({"key": 0}, "key", 1, WHERE, error=error),
        lambda error: non_negative_float({"key": -1}, "key", 1.0, WHERE, error=error),
        lambda error: positive_float({"key": "nan"}, "key", 1.0, WHERE, error=error),
    ]
    for call in calls:
        with pytest.raises(DemoSettingsError) as caught:
            call(DemoSettingsError)
        assert caught.value.path == "channels.demo.key"


@pytest.mark.parametrize(("value", "expected"), [
    (20, 20), (20.0, 20), ("20", 20), (" 20 ", 20), ("+20", 20), ("20.0", 20), ("2e1", 20),
    (1, 1), ("1", 1), (10**30, 10**30), (str(10**30), 10**30),
])
def test_positive_int_reads_numbers_and_numeric_strings(value: Any, expected: int) -> None:
    number = positive_int({"key": value}, "key", 7, WHERE)
    assert number == expected and type(number) is int


@pytest.mark.parametrize("value", [
    0, "0", -1, "-1", 2.5, "2.5", True, False, "true", "zwanzig", "20s", "0x14", "1_000", "٢٠",
    "nan", "inf", "-inf", float("nan"), float("inf"), [20], {"n": 20},
])
def test_positive_int_refuses_what_is_no_positive_whole_number(value: Any) -> None:
    with pytest.raises(SettingsError) as caught:
        positive_int({"key": value}, "key", 7, WHERE)
    assert caught.value.path == "channels.demo.key"
    assert caught.value.message == f"expected a positive whole number, got {value!r}"


@pytest.mark.parametrize(("value", "expected"), [(0, 0), ("0", 0), (25, 25), ("25", 25), (3.0, 3)])
def test_whole_number_takes_its_minimum(value: Any, expected: int) -> None:
    assert whole_number({"key": value}, "key", 9, WHERE) == expected


@pytest.mark.parametrize(("value", "minimum"), [(-1, 0), ("-1", 0), (1, 2), ("1.5", 0), (True, 0)])
def test_whole_number_refuses_less_than_its_minimum_or_a_fraction(value: Any, minimum: int) -> None:
    with pytest.raises(SettingsError) as caught:
        whole_number({"key": value}, "key", 9, WHERE, minimum=minimum)
    assert caught.value.path == "channels.demo.key"
    assert caught.value.message == f"expected a whole number of at least {minimum}, got {value!r}"


@pytest.mark.parametrize(("value", "expected"), [
    (0, 0.0), ("0", 0.0), (0.0, 0.0), (5, 5.0), ("12.5", 12.5), (" .5 ", 0.5), ("1e3", 1000.0),
])
def test_non_negative_float_reads_seconds_with_zero_for_off(value: Any, expected: float) -> None:
    seconds = non_negative_float({"key": value}, "key", 30.0, WHERE)
    assert seconds == expected and type(seconds) is float


@pytest.mark.parametrize("value", [-1, "-0.5", True, "soon", "inf", float("nan"), 10**400, "1e400"])
def test_non_negative_float_refuses_negatives_and_what_is_no_number(value: Any) -> None:
    with pytest.raises(SettingsError) as caught:
        non_negative_float({"key": value}, "key", 30.0, WHERE)
    assert caught.value.path == "channels.demo.key"
    assert caught.value.message == f"expected seconds (0 for off), got {value!r}"


@pytest.mark.parametrize(("value", "expected"), [(5, 5.0), ("5", 5.0), ("0.25", 0.25), (86400, 86400.0)])
def test_positive_float_reads_seconds(value: Any, expected: float) -> None:
    seconds = positive_float({"key": value}, "key", 30.0, WHERE)
    assert seconds == expected and type(seconds) is float


@pytest.mark.parametrize("value", [0, "0", 0.0, -3, "10s", False, "inf", float("-inf"), "nan", (1,)])
def test_positive_float_refuses_zero_negatives_and_what_is_no_number(value: Any) -> None:
    with pytest.raises(SettingsError) as caught:
        positive_float({"key": value}, "key", 30.0, WHERE)
    assert caught.value.path == "channels.demo.key"
    assert caught.value.message == f"expected a positive number of seconds, got {value!r}"


@pytest.mark.parametrize("section", [{}, {"key": None}, {"key": ""}, {"key": "  "}])
def test_every_number_reader_returns_its_default_for_a_value_not_given(section: dict[str, Any]) -> None:
    assert positive_int(section, "key", 7, WHERE) == 7
    assert whole_number(section, "key", 0, WHERE) == 0
    assert non_negative_float(section, "key", 2.5, WHERE) == 2.5
    assert positive_float(section, "key", 30.0, WHERE) == 30.0


def test_a_nested_table_is_named_in_full() -> None:
    with pytest.raises(SettingsError) as caught:
        positive_int({"max_parameter_chars": "viel"}, "max_parameter_chars", 700, "channels.whatsapp.template")
    assert caught.value.path == "channels.whatsapp.template.max_parameter_chars"
    assert str(caught.value).startswith("channels.whatsapp.template.max_parameter_chars: expected")


def test_flag_reads_tomls_0_and_1_as_off_and_on() -> None:
    """``listen = 0`` switched the mail listener off before; it still does."""
    assert flag({"key": 0}, "key", True, WHERE) is False
    assert flag({"key": 1}, "key", False, WHERE) is True


def test_a_number_too_long_to_read_is_refused_naming_the_key() -> None:
    """``int()`` of more than 4,300 digits raised a bare ValueError, reported without the key."""
    with pytest.raises(SettingsError) as caught:
        positive_int({"key": "9" * 5000}, "key", 1, WHERE)
    assert caught.value.path == f"{WHERE}.key"
