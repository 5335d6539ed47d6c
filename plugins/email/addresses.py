"""Addresses out of a header value, whatever the value holds."""

from __future__ import annotations

import re
from email.utils import getaddresses

# What an address looks like when the header cannot be parsed as one. It starts only where a
# run of such characters starts: else a long run without "@" is scanned again from each of its
# characters (quadratic: 40 KB took seconds).
_PLAIN_ADDRESS = re.compile(r"(?<![^\s<>()\[\],;:\"@])[^\s<>()\[\],;:\"@]+@[^\s<>()\[\],;:\"@]+")


def addresses_of(value: str) -> list[tuple[str, str]]:
    """``email.utils.getaddresses`` of one header value, never raising. The stdlib reads
    comments recursively: a From with a few thousand nested "(" (2.8 KB) exhausted the stack,
    and the mail was answered 451 for ever. Such a value gives the addresses a plain pattern
    finds in it, without display names."""
    try:
        return getaddresses([value])
    except RecursionError:
        return [("", found) for found in _PLAIN_ADDRESS.findall(value)]
