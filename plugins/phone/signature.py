"""Twilio webhook signature check: every request Twilio makes is signed with the auth token.

``X-Twilio-Signature`` is the base64 HMAC-SHA1 of the full URL Twilio requested (query included)
followed by each POST parameter name and value, names sorted (several values of one name sorted
too). Twilio's own validator also accepts the URL with the default port added or removed, because
Twilio's signing is inconsistent about it; ``verify`` does the same.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

HEADER = "X-Twilio-Signature"

Params = Mapping[str, "str | list[str] | tuple[str, ...]"]


def _values(value: str | list[str] | tuple[str, ...]) -> list[str]:
    if isinstance(value, str):
        return [value]
    return list(value)


def twilio_signature(auth_token: str, url: str, params: Params) -> str:
    """The ``X-Twilio-Signature`` Twilio sends for a POST of ``params`` to ``url``.

    Repeated values of one name are signed once each, sorted, as Twilio's validator does.
    """
    payload = url
    for name in sorted(params):
        for value in sorted(set(_values(params[name]))):
            payload += name + value
    mac = hmac.new(auth_token.encode("utf-8"), payload.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def _port_variants(url: str) -> list[str]:
    """``url`` as given, without its port, and with the scheme's default port."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return [url]
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    default = 443 if parts.scheme == "https" else 80
    without = urlunsplit(parts._replace(netloc=f"{prefix}{host}"))
    with_port = url if port else urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default}"))
    variants = [url]
    for candidate in (without, with_port):
        if candidate not in variants:
            variants.append(candidate)
    return variants


def verify(auth_token: str, url: str, params: Params, signature: str | None) -> bool:
    """True when ``signature`` is Twilio's signature of ``params`` posted to ``url``.

    Constant-time comparison; a missing or empty signature, an empty token or non-ASCII garbage
    is simply False.
    """
    if not signature or not auth_token:
        return False
    try:
        given = signature.strip().encode("ascii")
    except UnicodeEncodeError:
        return False
    matched = False
    for candidate in _port_variants(url):
        expected = twilio_signature(auth_token, candidate, params).encode("ascii")
        # Check every variant so the time taken does not depend on which one matched.
        matched |= hmac.compare_digest(given, expected)
    return matched
