"""SMS out through Twilio's Messages REST resource, and what its answers mean for the outbox.

``POST {api_url}/2010-04-01/Accounts/{sid}/Messages.json``, form-encoded, HTTP basic auth with the
account SID and auth token. Rate limits, server errors and timeouts are retryable; a refused
recipient (invalid number, landline, opted out) is permanent, so the outbox tries another channel.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import aiohttp

from router.hookspecs import (
    DeliveryError,
    PermanentDeliveryError,
    RetryableDeliveryError,
    parse_retry_after,
    read_provider_json,
)

MAX_SMS_LENGTH = 1600
"""Twilio's limit for one message body (it splits it into segments itself)."""

RETRYABLE_API_CODES = frozenset({20429, 20500, 20503, 30001, 30008, 30017})
"""Twilio error codes where the same request may succeed later (too many requests, internal
error, service unavailable, queue overflow, unknown error, carrier congestion)."""


def shorten_sms(text: str, status_url: str | None = None, limit: int = MAX_SMS_LENGTH) -> str:
    """``text`` cut to ``limit`` characters at a word boundary, ending with the status link.

    Short texts come back unchanged. A long text without a status link ends with an ellipsis;
    a link longer than the limit is left out rather than cut.
    """
    text = text or ""
    if limit <= 0:
        return ""
    if len(text) <= limit:
        return text
    suffix = f"… {status_url}" if status_url and len(status_url) + 2 <= limit else "…"
    room = limit - len(suffix)
    head = text[:room]
    cut = head.rfind(" ")
    if cut > room // 2:
        head = head[:cut]
    return head.rstrip() + suffix


def messages_url(api_url: str, account_sid: str) -> str:
    """The Messages resource of one account."""
    return f"{api_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"


def basic_auth(user: str, password: str) -> str:
    """An HTTP basic ``Authorization`` header value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def error_for_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> DeliveryError:
    """The delivery error for a non-2xx answer from the Messages resource.

    ``body`` is the decoded JSON (Twilio sends ``{"code", "message", "more_info", "status"}``) or
    anything else; the error's ``code`` is Twilio's error code when there is one.
    """
    api_code = body.get("code") if isinstance(body, Mapping) else None
    message = body.get("message") if isinstance(body, Mapping) else None
    code = str(api_code) if isinstance(api_code, int) and not isinstance(api_code, bool) else f"http_{status}"
    text = f"Twilio answered {status}: {message or 'no details'}"
    if status == 429 or status >= 500 or api_code in RETRYABLE_API_CODES:
        return RetryableDeliveryError(text, code=code, retry_after=parse_retry_after((headers or {}).get("Retry-After")))
    if status in (401, 403):
        # Bad credentials are our problem, not the recipient's: keep the message for later.
        return RetryableDeliveryError(text, code=code)
    return PermanentDeliveryError(text, code=code)


async def send_sms(
    http: aiohttp.ClientSession,
    *,
    api_url: str,
    account_sid: str,
    auth_token: str,
    to: str,
    from_: str,
    body: str,
    status_callback: str | None = None,
    timeout: float = 15.0,
) -> str:
    """Send one SMS and return Twilio's message SID; raise a ``DeliveryError`` when refused."""
    form = {"To": to, "From": from_, "Body": body}
    if status_callback:
        form["StatusCallback"] = status_callback
    try:
        async with http.post(
            messages_url(api_url, account_sid),
            data=form,
            headers={"Authorization": basic_auth(account_sid, auth_token)},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            answer = await read_provider_json(response)
            if response.status >= 300:
                raise error_for_response(response.status, answer, response.headers)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise RetryableDeliveryError(f"Twilio not reachable: {exc!r}", code="network") from exc
    sid = answer.get("sid") if isinstance(answer, Mapping) else None
    if not isinstance(sid, str) or not sid:
        raise RetryableDeliveryError("Twilio accepted the message but sent no sid", code="no_sid")
    return sid
