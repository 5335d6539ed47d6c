"""Webhook signature check: Meta signs every webhook body with the app secret.

The ``X-Hub-Signature-256`` header is ``sha256=`` followed by the hex HMAC-SHA256 of the raw
request body. It is checked on the bytes as received, before anything is parsed.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "sha256="


def sign(body: bytes, app_secret: str) -> str:
    """The header value Meta would send for ``body`` (used by tests and fake providers)."""
    digest = hmac.new(app_secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return PREFIX + digest


def verify_signature(body: bytes, header: str | None, app_secret: str) -> bool:
    """True when ``header`` is a valid signature of ``body``; constant-time comparison.

    A missing header, another algorithm, non-hex garbage or an empty secret is simply False.
    """
    if not header or not app_secret:
        return False
    header = header.strip()
    if not header[: len(PREFIX)].lower() == PREFIX:
        return False
    given = header[len(PREFIX) :].strip().lower()
    expected = sign(body, app_secret)[len(PREFIX) :]
    # compare_digest on ASCII bytes; non-ASCII input cannot match and must not raise.
    try:
        given_bytes = given.encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(given_bytes, expected.encode("ascii"))
