"""Outbound Graph API: request payloads for free text and templates, and what an error means.

Pure functions, no I/O. ``WhatsAppChannel.send`` builds a payload here, posts it and hands a
failed answer to ``classify_error``, which turns it into the typed error the outbox acts on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from router.hookspecs import (
    NOT_CONFIGURED,
    DeliveryError,
    PermanentDeliveryError,
    ResendAsDeliveryError,
    RetryableDeliveryError,
)
from router.text import cluster_start

from .errors import address_failed, outcome_for_code

MAX_TEXT_LENGTH = 4096
"""Longest ``text.body`` the Cloud API accepts."""

MAX_TEMPLATE_PARAMETER = 700
"""Default budget for the answer parameter: an approved body may be 1024 characters in all,
fixed text included, so the answer gets what the template's own words leave over."""

_SPACE_RUN = re.compile(r"\s+")


def to_address(phone: str) -> str:
    """The ``to`` field: the phone number in international form without ``+``, as WhatsApp ids are."""
    return phone.strip().removeprefix("+")


ADDRESS_KINDS = ("phone", "whatsapp_user")
"""The identity kinds a message can go to: a phone number, or a business-scoped user id (BSUID,
``US.13491208655302741918``) for a person who uses a WhatsApp username and whose number Meta
does not share."""


def addressee(to_kind: str, to: str) -> dict[str, str]:
    """Whom a payload goes to: ``to`` with a phone number, ``recipient`` with a BSUID, sent back
    exactly as it came (Meta's field for business-scoped user ids; ``to`` would win if both
    were given, and a BSUID is no number)."""
    if to_kind == "whatsapp_user":
        return {"recipient": to.strip()}
    return {"to": to_address(to)}


PART_SUFFIX = ".part-"
"""What the keys of the earlier parts of a long text end in, before the part's number."""


def part_key(idempotency_key: str, part: int, parts: int) -> str:
    """The ``biz_opaque_callback_data`` of one part of a text sent as ``parts`` messages: the
    message's own key for the last part, ``<key>.part-N`` for the others. Meta echoes it in
    every status of the part, and a status carrying the message's own key tells the outbox
    that a send whose answer never came went through: only the last part, posted after every
    other part was taken, may tell that."""
    key = idempotency_key if part == parts else f"{idempotency_key}{PART_SUFFIX}{part}"
    return key[:512]


def is_earlier_part(key: str | None) -> bool:
    """Whether a status's ``biz_opaque_callback_data`` names an earlier part of a long text."""
    if not key or PART_SUFFIX not in key:
        return False
    return key.rsplit(PART_SUFFIX, 1)[1].isdigit()


def split_text(text: str, limit: int = MAX_TEXT_LENGTH) -> list[str]:
    """Split a text into parts of at most ``limit`` characters, at a paragraph, line or word
    break where one is near the end, so a long answer arrives whole and readable. Where there
    is none, the cut goes back to the start of the character as a reader sees it
    (``cluster_start``), so that no emoji or accented letter is cut in two."""
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        hard = cluster_start(rest, limit)
        cut = hard
        for separator in ("\n\n", "\n", " "):
            index = rest.rfind(separator, limit // 2, limit)
            if index > 0:
                cut = index
                break
        part = rest[:cut].rstrip()
        parts.append(part or rest[:hard])
        rest = rest[len(part) if part else hard :].lstrip()
    if rest.strip():
        parts.append(rest)
    return parts


def text_payloads(
    to: str, text: str, *, limit: int = MAX_TEXT_LENGTH, to_kind: str = "phone"
) -> list[dict[str, Any]]:
    """Free-text message payloads for ``text``: one, or several when it exceeds ``limit``."""
    return [
        {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            **addressee(to_kind, to),
            "type": "text",
            "text": {"body": part, "preview_url": False},
        }
        for part in split_text(text, limit)
    ]


def template_parameter(text: str, limit: int) -> str:
    """A text as a template body parameter: WhatsApp refuses new lines, tabs and runs of more
    than four spaces there, so all white space collapses to single spaces; clipped to ``limit``
    with an ellipsis."""
    flat = _SPACE_RUN.sub(" ", text).strip()
    if len(flat) > limit:
        flat = flat[: cluster_start(flat, max(limit - 1, 0))].rstrip() + "…"
    return flat


def template_payload(
    to: str,
    *,
    name: str,
    language_code: str,
    case_reference: str | None,
    answer: str,
    prompt: str,
    max_parameter_chars: int = MAX_TEMPLATE_PARAMETER,
    to_kind: str = "phone",
) -> dict[str, Any]:
    """A template message with two body parameters: ``{{1}}`` the case reference and ``{{2}}``
    the answer, or, when the answer does not fit, its beginning followed by ``prompt`` (asking
    the person to reply, which opens the window for the full text)."""
    flat_answer = _SPACE_RUN.sub(" ", answer).strip()
    flat_prompt = template_parameter(prompt, max_parameter_chars)
    if flat_answer and len(flat_answer) <= max_parameter_chars:
        second = flat_answer
    else:
        room = max_parameter_chars - len(flat_prompt) - 1
        preview = template_parameter(flat_answer, room) if room > 20 and flat_answer else ""
        second = f"{preview} {flat_prompt}".strip()
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        **addressee(to_kind, to),
        "type": "template",
        "template": {
            "name": name,
            "language": {"code": language_code},
            "components": [
                {
                    "type": "body",
                    "parameters": [
                        {"type": "text", "text": template_parameter(case_reference or "-", 60)},
                        {"type": "text", "text": second},
                    ],
                }
            ],
        },
    }


def provider_message_id(body: Any) -> str | None:
    """``messages[0].id`` of a successful send answer, or None."""
    if not isinstance(body, Mapping):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], Mapping):
        message_id = messages[0].get("id")
        if isinstance(message_id, str) and message_id:
            return message_id
    return None


def classify_error(
    http_status: int, body: Mapping[str, Any] | None, *, retry_after: float | None = None
) -> DeliveryError:
    """The typed delivery error for a failed Graph API answer.

    131047 (outside the 24-hour window) asks for the template; rate limits (130429, 131056 and
    the others in ``errors.RETRYABLE_CODES``), 429, 5xx and ``http_status`` 0 (no answer: a
    timeout or connection error) are retried. A refusal of our own access token, permissions,
    number or account (190, 10, 131042 and the others in ``errors.SETTINGS_CODES``, or a 401 or
    403 without a code) keeps the message queued until an operator fixes it
    (``not_configured``, Meta's code in the text). Everything else, an invalid recipient
    (131026, 131030), a bad parameter (100, 131008, 131009) or a template problem, is
    permanent; only the recipient codes (``errors.RECIPIENT_CODES``) fail the address, so
    131062 (a message of this kind cannot go to a business-scoped user id) does not either.
    """
    error = body.get("error") if isinstance(body, Mapping) else None
    error = error if isinstance(error, Mapping) else {}
    code = error.get("code")
    error_data = error.get("error_data") if isinstance(error.get("error_data"), Mapping) else {}
    details = error_data.get("details")
    text = str(error.get("message") or (f"HTTP {http_status}" if http_status else "no answer"))
    if details:
        text = f"{text}: {details}"
    code_text = str(code) if code is not None and not isinstance(code, bool) else None
    outcome = outcome_for_code(code) if code_text else None
    if outcome == "template":
        return ResendAsDeliveryError(text, hint="template", code=code_text)
    if outcome == "not_configured" or (code_text is None and http_status in (401, 403)):
        return RetryableDeliveryError(
            f"{text} (Meta error {code_text or f'HTTP {http_status}'}: check the WhatsApp channel's access token,"
            " permissions, number and account)",
            code=NOT_CONFIGURED,
            retry_after=retry_after,
        )
    if outcome == "retry" or http_status == 0 or http_status == 429 or http_status >= 500:
        return RetryableDeliveryError(text, code=code_text or str(http_status), retry_after=retry_after)
    return PermanentDeliveryError(text, code=code_text or str(http_status), address_failed=address_failed(code_text))


def within_window(last_inbound_at: datetime | None, now: datetime, hours: float = 24) -> bool:
    """True while free text may be sent: less than ``hours`` since the person last wrote.

    Naive datetimes are taken as UTC. No inbound message at all means outside the window.
    """
    if last_inbound_at is None:
        return False
    if last_inbound_at.tzinfo is None:
        last_inbound_at = last_inbound_at.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now - last_inbound_at < timedelta(hours=hours)
