"""Addresses out of a header value, whatever the value holds."""

from __future__ import annotations

import re
import unicodedata
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


# Dots that IDNA (RFC 3490 3.1) reads as label separators besides ".".
_IDEOGRAPHIC_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def ascii_domain(domain: str) -> str | None:
    """``domain`` in ASCII, each label beyond ASCII as ``xn--`` and its Punycode (RFC 3492),
    after NFC and lower case: the IDNA 2008 form, ``müller-bau.de`` -> ``xn--mller-bau-q9a.de``.
    None when it cannot be written so (an empty or too long label).

    Not the standard library's ``idna`` codec: that is IDNA 2003, which maps ``ß`` to ``ss``,
    and ``straße.de`` is not ``strasse.de`` (a domain of someone else, since 2010)."""
    labels = unicodedata.normalize("NFC", domain).translate(_IDEOGRAPHIC_DOTS).lower().rstrip(".").split(".")
    found = []
    for label in labels:
        if not label.isascii():
            try:
                label = "xn--" + label.encode("punycode").decode("ascii")
            except UnicodeError:
                return None
        if not 0 < len(label) <= 63:
            return None
        found.append(label)
    return ".".join(found)


def ascii_address(address: str) -> str:
    """``address`` with its domain in ASCII (``ascii_domain``) when its local part is ASCII, so
    that a relay without SMTPUTF8 (RFC 6531) takes it; otherwise, or when the domain cannot be
    converted, unchanged: ``jürgen@…`` has no ASCII form."""
    local, at, domain = address.rpartition("@")
    if not at or address.isascii() or not local.isascii():
        return address
    converted = ascii_domain(domain)
    return f"{local}@{converted}" if converted else address
