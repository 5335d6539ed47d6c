"""Reading a channel's settings: switches and numbers that may be TOML values or strings.

Any value under ``[channels.*]`` may come from the environment, ``{ "$env" = "NAME", default =
"..." }`` (docs/configuration.md): it then arrives as a string ("false", "20", "2.5"), or as
None or "" when the variable is unset and there is no default. Read with ``bool()`` or
``float()``, the string "false" switched a setting on (``trust_forwarded_for``) and None
crashed the start. These small, pure functions read such a value the same way in every plugin:

- a value not given (missing, None, a blank string) is the setting's default;
- a TOML value (a bool for a switch, an int or float for a number) is taken as before;
- a string is read as the switch or number it spells;
- anything else (a switch of "ja", a number of "soon", a bool where a number belongs, nan or
  inf, a fraction where a whole number belongs) raises a ``SettingsError`` naming the full key
  (``channels.webform.trust_forwarded_for``), rather than being replaced by a default.

Each reader takes ``where`` (the table: ``channels.phone``) and ``error``, the ``SettingsError``
subclass a plugin raises (``PhoneSettingsError``); both are part of the message, never guessed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .channel import SettingsError

__all__ = [
    "flag",
    "given",
    "non_negative_float",
    "positive_float",
    "positive_int",
    "whole_number",
]

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})

_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
"""A decimal number as it is written in a configuration (``20``, ``2.5``, ``1e6``). Python's own
``float()`` also takes "nan", "inf", "1_000" and digits of other scripts, none of which is a
setting anyone meant."""


def given(section: Mapping[str, Any], key: str) -> Any:
    """The value of ``key`` in ``section`` as it is, or None when it is not given: missing,
    None (an unset environment variable without a default), or a blank string (one set to
    ""). A value not given means the setting's default, never a value of its own."""
    value = section.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value


def flag(
    section: Mapping[str, Any], key: str, default: bool, where: str, *, error: type[SettingsError] = SettingsError
) -> bool:
    """A switch: ``default`` when not given; a TOML bool as it is; the strings true, yes, on, 1
    and false, no, off, 0 in any case and with blanks around them (from the environment).

    Anything else, a number or a word such as "ja", raises ``error`` naming ``where.key``: read
    as "not true", a misspelt "ture" would silently switch off what was meant on, and
    ``bool("false")`` switched on what was meant off."""
    value = given(section, key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # TOML's 0 and 1, read as off and on before
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise error(f"{where}.{key}", f"expected true or false, got {value!r}")


def _number(section: Mapping[str, Any], key: str, where: str, expected: str, error: type[SettingsError]) -> int | float | None:
    """The number ``key`` holds (an int stays an int, so a large one loses no digits), or None
    when it is not given. A bool, a string that is no decimal number, a value of another type,
    nan and inf raise ``error`` with ``expected`` (what the caller wants) and the value."""
    value = given(section, key)
    if value is None:
        return None
    number: int | float | None = None
    if isinstance(value, bool):  # True is an int in Python, but a switch is no number
        number = None
    elif isinstance(value, int | float):
        number = value
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip()
        try:
            number = int(text) if text.lstrip("+-").isdigit() else float(text)
        except ValueError:  # more digits than Python writes into an int
            number = None
    if number is None or (isinstance(number, float) and not math.isfinite(number)):
        raise error(f"{where}.{key}", f"expected {expected}, got {value!r}")
    return number


def whole_number(
    section: Mapping[str, Any],
    key: str,
    default: int,
    where: str,
    *,
    minimum: int = 0,
    expected: str | None = None,
    error: type[SettingsError] = SettingsError,
) -> int:
    """A whole number of at least ``minimum`` (a count, bytes, a port): ``default`` when not
    given. ``20``, ``20.0`` and ``"20"`` are 20; ``2.5``, ``"zwanzig"``, ``true`` and a number
    below ``minimum`` raise ``error`` naming ``where.key``, saying ``expected`` (by default "a
    whole number of at least <minimum>")."""
    expected = expected or f"a whole number of at least {minimum}"
    number = _number(section, key, where, expected, error)
    if number is None:
        return default
    if isinstance(number, float):
        if not number.is_integer():
            raise error(f"{where}.{key}", f"expected {expected}, got {section.get(key)!r}")
        number = int(number)
    if number < minimum:
        raise error(f"{where}.{key}", f"expected {expected}, got {section.get(key)!r}")
    return number


def positive_int(
    section: Mapping[str, Any], key: str, default: int, where: str, *, error: type[SettingsError] = SettingsError
) -> int:
    """A whole number above 0 (a size limit, a count of attempts): ``default`` when not given;
    0, a negative number or a fraction raises ``error`` naming ``where.key``."""
    return whole_number(section, key, default, where, minimum=1, expected="a positive whole number", error=error)


def _seconds(section: Mapping[str, Any], key: str, where: str, expected: str, error: type[SettingsError]) -> float | None:
    """The number ``key`` holds as a float, or None when it is not given; a whole number too
    large for a float (``10**400``) raises ``error`` like inf does."""
    number = _number(section, key, where, expected, error)
    if number is None:
        return None
    try:
        return float(number)
    except OverflowError:
        raise error(f"{where}.{key}", f"expected {expected}, got {section.get(key)!r}") from None


def non_negative_float(
    section: Mapping[str, Any], key: str, default: float, where: str, *, error: type[SettingsError] = SettingsError
) -> float:
    """Seconds where 0 means off (a wait, a minimum time): ``default`` when not given; the
    number 0 and the string "0" alike are 0.0, a negative number raises ``error`` naming
    ``where.key``."""
    expected = "seconds (0 for off)"
    seconds = _seconds(section, key, where, expected, error)
    if seconds is None:
        return default
    if seconds < 0:
        raise error(f"{where}.{key}", f"expected {expected}, got {section.get(key)!r}")
    return seconds


def positive_float(
    section: Mapping[str, Any], key: str, default: float, where: str, *, error: type[SettingsError] = SettingsError
) -> float:
    """Seconds above 0 (a timeout, an interval, a maximum age): ``default`` when not given; 0 or
    a negative number raises ``error`` naming ``where.key`` (a timeout of 0 is no timeout one
    could mean)."""
    expected = "a positive number of seconds"
    seconds = _seconds(section, key, where, expected, error)
    if seconds is None:
        return default
    if seconds <= 0:
        raise error(f"{where}.{key}", f"expected {expected}, got {section.get(key)!r}")
    return seconds
