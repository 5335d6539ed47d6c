"""What a WhatsApp Cloud API error code means for delivery: resend as template, retry, or give up.

One table for both places errors show up: the Graph API's answer to a send request and a
``failed`` status arriving later by webhook. Meta asks integrators to branch on ``code``, not on
titles or HTTP statuses (Cloud API error code reference).
"""

from __future__ import annotations

from typing import Literal

Outcome = Literal["template", "retry", "permanent"]

REENGAGEMENT = 131047
"""More than 24 hours since the person last wrote: only an approved template may go out."""

BSUID_REFUSED = 131062
"""This kind of message cannot be sent to a business-scoped user id (only to a phone number)."""

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
        133004,  # server temporarily unavailable
    }
)
"""Codes where the same request may succeed later; every other code is permanent."""


def outcome_for_code(code: object) -> Outcome:
    """Classify a Cloud API error code (int or numeric string); unknown codes are permanent."""
    if isinstance(code, bool):
        return "permanent"
    try:
        number = int(code)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return "permanent"
    if number == REENGAGEMENT:
        return "template"
    if number in RETRYABLE_CODES:
        return "retry"
    return "permanent"


def address_failed(code: object) -> bool:
    """Whether a permanent failure with this code says the address itself is bad: not 131062,
    where only this kind of message cannot go to a user id and the next may."""
    return str(code) != str(BSUID_REFUSED)
