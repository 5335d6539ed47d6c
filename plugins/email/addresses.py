"""Addresses out of a header value, whatever the value holds."""

from __future__ import annotations

import re
from email.utils import getaddresses

from router.identity import ascii_domain

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


def ascii_address(address: str) -> str:
    """``address`` with its domain in ASCII (``ascii_domain``) when its local part is ASCII, so
    that a relay without SMTPUTF8 (RFC 6531) takes it; otherwise, or when the domain cannot be
    converted, unchanged: ``jürgen@…`` has no ASCII form."""
    local, at, domain = address.rpartition("@")
    if not at or address.isascii() or not local.isascii():
        return address
    converted = ascii_domain(domain)
    return f"{local}@{converted}" if converted else address
