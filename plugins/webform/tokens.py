"""Signed form tokens: when a form was handed out and a random nonce, under an HMAC.

A token proves the form came from us, lets the server refuse submissions that are too fast
(bots) or too old, and its nonce makes a double submit the same message (deduplicated)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime


class TokenError(ValueError):
    """A form token that is forged, malformed, too young or too old; ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FormToken:
    issued: int
    nonce: str
    scope: str


def _sign(secret: bytes, payload: str) -> str:
    digest = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


def issue(secret: bytes, now: datetime, scope: str = "form") -> str:
    """A new token for a form (``scope`` binds it to one page, e.g. a status page)."""
    issued = int(now.timestamp())
    nonce = secrets.token_urlsafe(12)
    payload = f"{issued}.{nonce}"
    return f"{payload}.{_sign(secret, payload + '|' + scope)}"


def check(secret: bytes, token: str, now: datetime, *, min_age: float, max_age: float, scope: str = "form") -> FormToken:
    """Verify a token; raises ``TokenError`` with code forged, too_fast or expired."""
    if not token or len(token) > 200:
        raise TokenError("invalid_token", "the form token is missing")
    if not token.isascii():  # we issue ASCII only; anything else is no token of ours (and no str to compare in constant time)
        raise TokenError("invalid_token", "the form token is malformed")
    parts = token.split(".")
    if len(parts) != 3 or not parts[0].isdigit():
        raise TokenError("invalid_token", "the form token is malformed")
    payload = f"{parts[0]}.{parts[1]}"
    if not hmac.compare_digest(_sign(secret, payload + "|" + scope), parts[2]):
        raise TokenError("invalid_token", "the form token is not valid")
    issued = int(parts[0])
    age = now.timestamp() - issued
    if age < min_age:
        raise TokenError("too_fast", "the form was sent too quickly; please wait a moment and send it again")
    if age > max_age:
        raise TokenError("token_expired", "the form has expired; please reload the page")
    return FormToken(issued=issued, nonce=parts[1], scope=scope)
