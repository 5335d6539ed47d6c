"""What a WhatsApp Cloud API error code means for delivery: resend as template, retry, wait for
our own configuration to be fixed, or give up; and whether it says the resident's address is bad.

One table for both places errors show up: the Graph API's answer to a send request and a
``failed`` status arriving later by webhook. Meta asks integrators to branch on ``code``, not on
titles or HTTP statuses (Cloud API error code reference).
"""

from __future__ import annotations

from typing import Literal

Outcome = Literal["template", "retry", "not_configured", "permanent"]

REENGAGEMENT = 131047
"""More than 24 hours since the person last wrote: only an approved template may go out."""

RETRYABLE_CODES: frozenset[int] = frozenset(
    {
        1,  # API unknown: possibly a server error
        2,  # API service: temporary downtime or overload
        4,  # API too many calls (app rate limit)
        17,  # API user too many calls
        341,  # application limit reached
        80007,  # WhatsApp Business Account rate limit
        130429,  # Cloud API throughput reached
        131000,  # something went wrong: Meta advises to retry
        131016,  # service unavailable
        131048,  # spam rate limit: restrictions on this number, lifted over time
        131056,  # (business, consumer) pair rate limit: wait, then retry this recipient
        131057,  # business account in maintenance mode (a throughput upgrade): passes by itself
        133004,  # server temporarily unavailable
    }
)
"""Codes where the same request may succeed later."""

SETTINGS_CODES: frozenset[int] = frozenset(
    {
        0,  # AuthException: the access token cannot be validated
        3,  # API method: the app lacks the capability
        10,  # permission denied (permission not granted, or removed)
        33,  # our business phone number has been deleted
        190,  # the access token has expired or was invalidated
        368,  # our business account is temporarily blocked for policy violations
        131005,  # access denied: the token lacks whatsapp_business_messaging
        131031,  # our business account has been locked
        131037,  # our number needs an approved display name
        131042,  # business eligibility payment issue (no valid payment method, unpaid invoices)
        131045,  # our number is not registered (incorrect certificate)
        133000,  # our number's deregistration is incomplete
        133006,  # our number needs to be verified again
        133010,  # our number is not registered on the Cloud API
    }
    | set(range(200, 300))  # API permission: the token lacks a permission
)
"""Codes that refuse our own account, credentials or number, whoever the recipient: every
message fails alike until an operator fixes the access token, the app's permissions, the
number's registration or the account (payment, a block), and then every one can go. So a send
refused with one of them is kept queued (``NOT_CONFIGURED``, never given up) and logged as an
error, rather than given up: that marked every resident's number failed, or flagged every
conversation for a call-back, for an expired token of ours."""

RECIPIENT_CODES: frozenset[int] = frozenset(
    {
        131021,  # the recipient is our own business number
        131026,  # undeliverable: not a WhatsApp user, an outdated app, terms not accepted
        131030,  # not in the allowed list (an app in development mode reaches listed numbers only)
    }
)
"""The only codes that say the resident's address cannot take our WhatsApp messages, so the
address is marked failed and later replies prefer the contact's other identities. Every other
refusal (a bad parameter, a template problem, a marketing limit, 131062 for a user id, a code
we do not know) leaves the address alone: it says nothing against it."""


def _number(code: object) -> int | None:
    if isinstance(code, bool):
        return None
    try:
        return int(code)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def outcome_for_code(code: object) -> Outcome:
    """Classify a Cloud API error code (int or numeric string); unknown codes are permanent."""
    number = _number(code)
    if number is None:
        return "permanent"
    if number == REENGAGEMENT:
        return "template"
    if number in RETRYABLE_CODES:
        return "retry"
    if number in SETTINGS_CODES:
        return "not_configured"
    return "permanent"


def is_settings_code(code: object) -> bool:
    """Whether the code refuses our own account, credentials or number (``SETTINGS_CODES``)."""
    return _number(code) in SETTINGS_CODES


def address_failed(code: object) -> bool:
    """Whether a permanent failure with this code says the address itself is bad: only the
    ``RECIPIENT_CODES``. Not 131062 (only this kind of message cannot go to a user id, the next
    may), nor an error on our side or in our message."""
    return _number(code) in RECIPIENT_CODES
