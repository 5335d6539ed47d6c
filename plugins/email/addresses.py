"""Addresses out of a header value, whatever the value holds."""

from __future__ import annotations

import re
from email.utils import getaddresses

# What an address looks like when the header cannot be parsed as one.
_PLAIN_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"@]+@[^\s<>()\[\],;:\"@]+")


def addresses_of(value: str) -> list[tuple[str, str]]:
    """``email.utils.getaddresses`` of one header value, never raising. The stdlib reads
    comments recursively: a From with a few thousand nested "(" (2.8 KB) exhausted the stack,
    and the mail was answered 451 for ever. Such a value gives the addresses a plain pattern
    finds in it, without display names."""
    try:
        return getaddresses([value])
    except RecursionError:
        return [("", found) for found in _PLAIN_ADDRESS.findall(value)]
