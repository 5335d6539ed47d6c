"""SMS out through Twilio's Messages REST resource, and what its answers mean for the outbox.

``POST {api_url}/2010-04-01/Accounts/{sid}/Messages.json``, form-encoded, HTTP basic auth with the
account SID and auth token. Rate limits, server errors and timeouts are retryable; a refused
recipient (invalid number, landline, opted out) is permanent and fails the address, so the outbox
tries another channel. No answer in time, or a connection lost after the request went out, leaves it
unknown whether Twilio took the SMS (``outcome_unknown``): the channel's ``status_wait`` then
holds the retry back until a status callback could have proved it. A refusal of our own settings (the sender number, the credentials) says
nothing about the recipient: the message waits until the settings are fixed.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import aiohttp

from router.hookspecs import (
    NOT_CONFIGURED,
    DeliveryError,
    PermanentDeliveryError,
    RetryableDeliveryError,
    parse_retry_after,
    read_provider_json,
)
from router.text import cluster_start

MAX_SMS_LENGTH = 1600
"""Twilio's limit for one message body (it splits it into segments itself)."""

RETRYABLE_API_CODES = frozenset({20429, 20500, 20503, 21611, 30001, 30008, 30017})
"""Twilio error codes where the same request may succeed later (too many requests, internal
error, service unavailable, the sender's queue is full, queue overflow, unknown error, carrier
congestion)."""

RECIPIENT_API_CODES = frozenset({21211, 21265, 21610, 21612, 21614, 21635})
"""The only codes that say the resident's number cannot take our SMS, so the address is marked
failed and the contact's other channels are tried: invalid 'To' (21211), a short code (21265),
unsubscribed with STOP (21610), no route to the number (21612), not a mobile number (21614), a
landline (21635). Every other refusal leaves the address alone."""

SETTINGS_API_CODES = frozenset({20003, 20404, 21210, 21212, 21601, 21603, 21606, 21616, 21659, 21660, 21661})
"""Codes that refuse our own settings, whoever the recipient: credentials (20003), no such
account (20404), and the sender: not verified, invalid, missing, not ours or not SMS-capable,
ambiguous, not in this account (21210, 21212, 21601, 21603, 21606, 21616, 21659, 21660,
21661). Every SMS fails alike until an operator fixes ``account_sid``, ``auth_token`` or
``phone_number``, and then every one of them can go: so they are kept queued (``NOT_CONFIGURED``)
rather than given up, which would have marked every resident's number failed, or flagged every
conversation for a call-back, for a typo in our configuration."""


ELLIPSIS = "..."
"""What ends a cut text: "…" is not in the GSM-7 alphabet, and made a German text that is (ä, ö,
ü and ß are) go as UCS-2, 67 characters a segment instead of 153: 24 segments for 1,600
characters instead of 11."""


def sms_length(text: str) -> int:
    """``text``'s length as Twilio counts it for its limit of 1,600: in UTF-16 code units, so an
    emoji outside the Basic Multilingual Plane counts twice. Counted in characters, an answer
    with emoji came out over the limit, and Twilio refused it for good (21617)."""
    return len(text.encode("utf-16-le")) // 2


def _head(text: str, units: int) -> str:
    """The longest start of ``text`` within ``units`` UTF-16 code units that ends where a
    character a reader sees ends (no emoji or accented letter cut in two)."""
    count = 0
    for index, char in enumerate(text):
        count += 2 if ord(char) > 0xFFFF else 1
        if count > units:
            return text[: cluster_start(text, index)]
    return text


def shorten_sms(text: str, status_url: str | None = None, limit: int = MAX_SMS_LENGTH, *, with_link: bool = False) -> str:
    """``text`` cut to ``limit`` (``sms_length``) at a word boundary, ending with the status link.

    Short texts come back unchanged, or with the link on a line of its own when ``with_link``
    (an answer whose conversation is elsewhere: the status page is where to read and write back).
    A long text without a status link ends with ``ELLIPSIS``; a link longer than the limit is
    left out rather than cut.
    """
    text = text or ""
    if limit <= 0:
        return ""
    fits = bool(status_url) and sms_length(status_url or "") + len(ELLIPSIS) + 1 <= limit
    wanted = with_link and fits and status_url not in text  # a link that never fits is not wanted
    if wanted and sms_length(text) + 1 + sms_length(status_url or "") <= limit:
        return f"{text}\n{status_url}"
    if sms_length(text) <= limit and not wanted:
        return text
    suffix = f"{ELLIPSIS} {status_url}" if fits else ELLIPSIS
    head = _head(text, max(limit - sms_length(suffix), 0))
    cut = head.rfind(" ")
    if cut > len(head) // 2:
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
    anything else; the error's ``code`` is Twilio's error code when there is one (``http_<status>``
    without), except for a refusal of our settings: ``not_configured``, Twilio's code in the text.
    Only ``RECIPIENT_API_CODES`` fail the address.
    """
    api_code = body.get("code") if isinstance(body, Mapping) else None
    if not isinstance(api_code, int) or isinstance(api_code, bool):
        api_code = None
    message = body.get("message") if isinstance(body, Mapping) else None
    code = str(api_code) if api_code is not None else f"http_{status}"
    text = f"Twilio answered {status}: {message or 'no details'}"
    if status == 429 or status >= 500 or api_code in RETRYABLE_API_CODES:
        return RetryableDeliveryError(text, code=code, retry_after=parse_retry_after((headers or {}).get("Retry-After")))
    if status in (401, 403, 404) or api_code in SETTINGS_API_CODES:
        # Our configuration (a 404: no Messages resource at our account SID or api_url), not the
        # recipient: the message waits until it is fixed.
        return RetryableDeliveryError(f"{text} (Twilio error {code}: check the phone channel's settings)",
                                      code=NOT_CONFIGURED)
    # Anything else refused this message (too long, empty) or its destination from our account
    # (21408: SMS to that country not enabled; 21608: a trial account's unverified recipient).
    # Sending it again changes nothing, so the outbox tries the contact's other channels now;
    # but only a recipient code says the number itself is bad.
    return PermanentDeliveryError(text, code=code, address_failed=api_code in RECIPIENT_API_CODES)


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
) -> str | None:
    """Send one SMS and return Twilio's message SID; raise a ``DeliveryError`` when refused.

    None when Twilio took the message (a 2xx) but its answer named no SID (cut short, changed
    by a proxy): the SMS is on its way, and sending it again would send it twice, since the
    Messages resource has no idempotency key. Its status callbacks name the SID."""
    form = {"To": to, "From": from_, "Body": body}
    if status_callback:
        form["StatusCallback"] = status_callback
    try:
        async with http.post(
            messages_url(api_url, account_sid),
            data=form,
            headers={"Authorization": basic_auth(account_sid, auth_token)},
            # A connect of its own, shorter limit: under ``total`` alone a connection that never
            # opened timed out like an unanswered request, as if Twilio might have taken the SMS.
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=timeout / 2),
        ) as response:
            answer = await read_provider_json(response)
            if response.status >= 300:
                raise error_for_response(response.status, answer, response.headers)
    except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:  # no connection: nothing was sent
        raise RetryableDeliveryError(f"Twilio not reachable: {exc!r}", code="network") from exc
    except (TimeoutError, aiohttp.ClientError) as exc:
        # No answer in time, or the connection broke after the request went: Twilio may have
        # taken the SMS, and its status callback (which names our key) may yet prove it.
        raise RetryableDeliveryError(f"Twilio not reachable: {exc!r}", code="network", outcome_unknown=True) from exc
    sid = answer.get("sid") if isinstance(answer, Mapping) else None
    return sid if isinstance(sid, str) and sid else None
