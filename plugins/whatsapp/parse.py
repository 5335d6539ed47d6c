"""Turn a WhatsApp Cloud API webhook body into canonical inbound messages and delivery updates.

Pure functions, no I/O: the HTTP handler verifies the signature, calls ``parse_webhook`` and hands
the results to the core. Meta batches (several entries, changes and messages per body), so every
one is read. Malformed parts never raise: they are skipped with a note, or kept as a message
flagged ``provider_error`` / ``unsupported`` so that nothing a person sent is lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import phonenumbers

from router.hookspecs import DeliveryUpdate

from .errors import address_failed, outcome_for_code

CHANNEL = "whatsapp"

MEDIA_TYPES = ("image", "video", "audio", "voice", "document", "sticker")
STATUS_MAP = {"sent": "sent", "delivered": "delivered", "read": "read", "played": "read", "failed": "failed"}

# Field limits of the canonical inbound message schema.
_MAX_ID = 512
_MAX_REF = 998
_MAX_NAME = 200
_MAX_ADDRESS = 320
_MAX_TEXT = 200_000
_MAX_SHORT = 500
_MAX_CAPTION = 5000
_MAX_ATTACHMENTS = 50


@dataclasses.dataclass(slots=True)
class ParsedWebhook:
    """Everything one webhook body carries.

    ``messages``: canonical inbound messages. ``statuses``: updates on our outbound messages.
    ``errors``: error entries of a change (``entry.changes.value.errors``), each with its
    ``phone_number_id``. ``events``: provider events that are no message, as ``(kind, data)``
    (``request_welcome``: someone opened a chat with us for the first time). ``notes``: what
    was skipped and why, for the log.
    """

    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    statuses: list[DeliveryUpdate] = dataclasses.field(default_factory=list)
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def parse_webhook(body: Mapping[str, Any]) -> ParsedWebhook:
    """Parse a whole webhook body: every entry, change, message and status."""
    result = ParsedWebhook()
    if not isinstance(body, Mapping):
        result.notes.append("body is not a JSON object")
        return result
    if body.get("object") != "whatsapp_business_account":
        result.notes.append(f"object {body.get('object')!r} ignored")
        return result
    for entry in _mappings(body.get("entry")):
        for change in _mappings(entry.get("changes")):
            if change.get("field") != "messages":
                result.notes.append(f"change field {change.get('field')!r} ignored")
                continue
            value = change.get("value")
            if isinstance(value, Mapping):
                _parse_value(value, result)
            else:
                result.notes.append("change without a value object ignored")
    return result


def _parse_value(value: Mapping[str, Any], result: ParsedWebhook) -> None:
    metadata = value.get("metadata") if isinstance(value.get("metadata"), Mapping) else {}
    phone_number_id = _str(metadata.get("phone_number_id"), _MAX_ADDRESS)
    contacts = list(_mappings(value.get("contacts")))
    change_errors = [_error(e) for e in _mappings(value.get("errors"))]
    for error in change_errors:
        result.errors.append({"phone_number_id": phone_number_id, **error})

    for raw in _list(value.get("messages")):
        if isinstance(raw, Mapping) and raw.get("type") == REQUEST_WELCOME:
            result.events.append((REQUEST_WELCOME, welcome_event(raw, phone_number_id)))
            result.notes.append(f"request_welcome {_short_repr(raw.get('id'))}: a chat opened, no message")
            continue
        try:
            message = parse_message(raw, contacts=contacts, recipient=phone_number_id)
        except Exception as exc:  # a parser bug must not lose the message or fail the batch
            message = _fallback_message(raw, phone_number_id, f"{type(exc).__name__}: {exc}")
        if change_errors:
            _add_flag(message, "provider_error")
            message.setdefault("meta", {}).setdefault("errors", []).extend(change_errors)
        result.messages.append(message)

    for raw in _list(value.get("statuses")):
        update = parse_status(raw)
        if update is None:
            result.notes.append(f"status ignored: {_short_repr(raw)}")
        else:
            result.statuses.append(update)


# -------------------------------------------------------------------------------------------
# Messages
# -------------------------------------------------------------------------------------------

REQUEST_WELCOME = "request_welcome"
"""The type of the "message" WhatsApp sends when a person opens a chat with a business number
for the first time, with Meta's welcome messages (Conversational Components) switched on:
``{"from", "id", "timestamp", "type": "request_welcome"}`` and nothing else. The person has not
written anything yet (what they write comes as a message of its own), so it is no message: no
case, no acknowledgement, nothing in a conversation."""


def welcome_event(raw: Mapping[str, Any], recipient: str | None) -> dict[str, Any]:
    """What is kept of a ``request_welcome``: the business number, the id and the time; not who
    it was, since the person has told us nothing and may never write."""
    event = {
        "phone_number_id": recipient,
        "id": _str(raw.get("id"), _MAX_ID),
        "sent_at": rfc3339(raw.get("timestamp")),
    }
    return {k: v for k, v in event.items() if v is not None}


def parse_message(
    raw: Any, *, contacts: list[Mapping[str, Any]] | None = None, recipient: str | None = None
) -> dict[str, Any]:
    """One element of ``value.messages`` as a canonical inbound message.

    ``contacts`` is the change's ``value.contacts`` (profile names, user ids); ``recipient`` its
    ``metadata.phone_number_id``: the business number the person wrote to.
    """
    if not isinstance(raw, Mapping):
        return _fallback_message(raw, recipient, "message is not an object")
    message: dict[str, Any] = {
        "channel": CHANNEL,
        "channel_message_id": _message_id(raw),
        "kind": "message",
        "sender": {},
        "recipient": recipient,
        "sent_at": rfc3339(raw.get("timestamp")),
        "text": None,
        "flags": [],
        "attachments": [],
        "meta": {},
        "raw": dict(raw),
    }
    message["sender"] = _sender(raw, contacts or [], message)

    msg_type = raw.get("type")
    if msg_type == "reaction":
        _reaction(_mapping(raw.get("reaction")), message)
    elif msg_type == "edit":
        edit = _mapping(raw.get("edit"))
        message["kind"] = "edit"
        message["target_message_id"] = _str(edit.get("original_message_id"), _MAX_ID)
        inner = _mapping(edit.get("message"))
        inner_type = inner.get("type")
        message["meta"]["edited_type"] = _str(inner_type, _MAX_SHORT)
        _content(inner_type, inner, message)
    elif msg_type in ("revoke", "deleted"):
        deleted = _mapping(raw.get(msg_type))
        message["kind"] = "deletion"
        message["target_message_id"] = _str(
            deleted.get("original_message_id") or deleted.get("message_id"), _MAX_ID
        )
    else:
        _content(msg_type, raw, message)

    _context(_mapping(raw.get("context")), message)
    if isinstance(raw.get("referral"), Mapping):
        message["meta"]["referral"] = dict(raw["referral"])
    errors = [_error(e) for e in _mappings(raw.get("errors"))]
    if errors:
        _add_flag(message, "provider_error")
        message["meta"]["errors"] = errors
    return _prune(message)


def _content(msg_type: Any, obj: Mapping[str, Any], message: dict[str, Any]) -> None:
    """Fill text, attachments, location and meta from the type-specific part of a message."""
    meta = message["meta"]
    part = obj.get(msg_type) if isinstance(msg_type, str) else None
    if msg_type == "text":
        message["text"] = _str(_mapping(part).get("body"), _MAX_TEXT)
    elif msg_type in MEDIA_TYPES and isinstance(part, Mapping):
        attachment = {
            "media_id": _str(part.get("id"), _MAX_SHORT),
            "content_type": _str(part.get("mime_type"), 200),
            "sha256": _str(part.get("sha256"), 128),
            "caption": _str(part.get("caption"), _MAX_CAPTION),
            "name": _str(part.get("filename"), _MAX_SHORT),
            "url": _str(part.get("url"), 2000),
        }
        message["attachments"].append({k: v for k, v in attachment.items() if v is not None})
        message["text"] = attachment["caption"]
        media = {"type": "audio" if msg_type == "voice" else msg_type}
        if msg_type == "voice" or part.get("voice") is True:
            media["voice"] = True
        if isinstance(part.get("animated"), bool):
            media["animated"] = part["animated"]
        meta["media"] = media
    elif msg_type == "location" and isinstance(part, Mapping):
        _location(part, message)
    elif msg_type == "contacts" and isinstance(obj.get("contacts"), list):
        shared = list(_mappings(obj["contacts"]))
        meta["contacts"] = [dict(c) for c in shared]
        message["text"] = _str("\n".join(_contact_line(c) for c in shared), _MAX_TEXT)
    elif msg_type == "interactive" and isinstance(part, Mapping):
        _interactive(part, message)
    elif msg_type == "button" and isinstance(part, Mapping):
        message["text"] = _str(part.get("text"), _MAX_TEXT)
        meta["button"] = {"text": _str(part.get("text"), _MAX_SHORT), "payload": _str(part.get("payload"), 4096)}
    elif msg_type == "order" and isinstance(part, Mapping):
        meta["order"] = dict(part)
        message["text"] = _str(part.get("text"), _MAX_TEXT) or _order_summary(part)
    elif msg_type == "system" and isinstance(part, Mapping):
        # "User A changed from number X to Y" and the like: kept for staff, never acknowledged.
        meta["system"] = dict(part)
        message["text"] = _str(part.get("body"), _MAX_TEXT)
        message["ack_suppressed"] = "system notice"
        _add_flag(message, "system")
    else:
        unsupported = _mapping(obj.get("unsupported"))
        meta["unsupported_type"] = _str(unsupported.get("type") or msg_type, _MAX_SHORT)
        _add_flag(message, "unsupported")


def _location(part: Mapping[str, Any], message: dict[str, Any]) -> None:
    lat, lon = _number(part.get("latitude")), _number(part.get("longitude"))
    if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180):
        message["meta"]["location"] = dict(part)
        _add_flag(message, "provider_error")
        return
    name, address = _str(part.get("name"), _MAX_SHORT), _str(part.get("address"), _MAX_SHORT)
    message["location"] = {"lat": lat, "lon": lon, "name": name, "address": address}
    if isinstance(part.get("url"), str):
        message["meta"]["location_url"] = part["url"]
    described = ", ".join(p for p in (name, address) if p)
    message["text"] = f"Location: {described} ({lat}, {lon})" if described else f"Location: {lat}, {lon}"


def _interactive(part: Mapping[str, Any], message: dict[str, Any]) -> None:
    kind = part.get("type")
    reply = _mapping(part.get(kind)) if isinstance(kind, str) else {}
    if kind in ("button_reply", "list_reply") and reply:
        title = _str(reply.get("title"), _MAX_TEXT)
        description = _str(reply.get("description"), _MAX_SHORT)
        message["text"] = "\n".join(p for p in (title, description) if p) or None
        info = {"type": kind, "id": _str(reply.get("id"), _MAX_SHORT), "title": title}
        if description:
            info["description"] = description
        message["meta"]["interactive"] = info
    elif kind == "nfm_reply" and reply:
        # A WhatsApp Flow's answer: the form data is JSON in response_json.
        message["text"] = _str(reply.get("body"), _MAX_TEXT) or _str(reply.get("name"), _MAX_SHORT)
        message["meta"]["interactive"] = {
            "type": kind,
            "name": _str(reply.get("name"), _MAX_SHORT),
            "response_json": _str(reply.get("response_json"), _MAX_TEXT),
        }
    else:
        message["meta"]["unsupported_type"] = _str(f"interactive:{kind}" if kind else "interactive", _MAX_SHORT)
        _add_flag(message, "unsupported")


def _reaction(part: Mapping[str, Any], message: dict[str, Any]) -> None:
    message["kind"] = "reaction"
    message["target_message_id"] = _str(part.get("message_id"), _MAX_ID)
    emoji = part.get("emoji")
    if isinstance(emoji, str) and emoji:
        message["meta"]["emoji"] = emoji[:_MAX_SHORT]
        message["meta"]["removed"] = False
    else:  # WhatsApp sends an empty or missing emoji when the reaction is taken back
        message["meta"]["emoji"] = None
        message["meta"]["removed"] = True


def _context(context: Mapping[str, Any], message: dict[str, Any]) -> None:
    """Replies become thread refs; forwards become flags. Edits carry their own inner context."""
    if context.get("forwarded") is True or context.get("frequently_forwarded") is True:
        _add_flag(message, "forwarded")
    if context.get("frequently_forwarded") is True:
        _add_flag(message, "frequently_forwarded")
    ref = _str(context.get("id"), _MAX_REF)
    if ref and message["kind"] == "message":
        message["thread"] = {"refs": [ref]}
    if isinstance(context.get("referred_product"), Mapping):
        message["meta"]["referred_product"] = dict(context["referred_product"])


def _contact_line(contact: Mapping[str, Any]) -> str:
    name = _mapping(contact.get("name"))
    label = name.get("formatted_name") or " ".join(
        str(name[k]) for k in ("first_name", "last_name") if isinstance(name.get(k), str)
    )
    numbers = (p.get("phone") or p.get("wa_id") for p in _mappings(contact.get("phones")))
    phones = [str(number) for number in numbers if number]
    emails = [str(e["email"]) for e in _mappings(contact.get("emails")) if e.get("email")]
    details = ", ".join(phones + emails)
    return f"Shared contact: {label or 'unnamed'}" + (f" ({details})" if details else "")


def _order_summary(order: Mapping[str, Any]) -> str:
    items = []
    for item in _mappings(order.get("product_items")):
        items.append(f"{item.get('quantity', '?')} x {item.get('product_retailer_id', '?')}")
    return "Order: " + (", ".join(items) if items else "no items")


# -------------------------------------------------------------------------------------------
# Sender identity
# -------------------------------------------------------------------------------------------


def normalise_wa_id(wa_id: Any) -> tuple[str | None, bool]:
    """A WhatsApp id (country code and number, digits only) as E.164, and whether phonenumbers
    considers it a possible number (cached: parsing costs ~130 us, and a body names its sender
    twice).

    Returns ``(None, False)`` for anything that is not 8 to 15 digits. Mexican ids keep the old
    mobile ``1`` after ``52`` (``521...``); it is dropped when that gives a possible number, so
    WhatsApp, SMS and calls from one phone resolve to one contact.
    """
    if isinstance(wa_id, int) and not isinstance(wa_id, bool):
        wa_id = str(wa_id)
    if not isinstance(wa_id, str) or len(wa_id) > 32:
        return None, False
    digits = wa_id.strip().removeprefix("+")
    if not digits.isascii() or not digits.isdigit() or not 8 <= len(digits) <= 15 or digits[0] == "0":
        return None, False
    if not (digits.startswith("521") and len(digits) == 13) and _country_code_length(digits):
        # Already E.164 digits with a country code that exists: phonenumbers (about 130 us a
        # number) would only confirm it. Not cached: the check costs about a microsecond, and a
        # cache entry per sender only grew the process under load.
        return "+" + digits, True
    return _parse_digits(digits)


@lru_cache(maxsize=4096)
def _parse_digits(digits: str) -> tuple[str | None, bool]:
    """The phonenumbers path (about 130 us): only ids without a known country code and old
    Mexican mobile ids get here, so a small cache holds the senders that write again."""
    candidates = [digits]
    if digits.startswith("521") and len(digits) == 13:
        candidates.insert(0, "52" + digits[3:])
    for candidate in candidates:
        try:
            number = phonenumbers.parse("+" + candidate, None)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_possible_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), True
    return "+" + digits, False


def _country_code_length(digits: str) -> int:
    """How many leading digits are a country calling code (0 when none is), with a national
    number of a plausible length (4 to 14 digits) behind it."""
    for size in (1, 2, 3):
        if int(digits[:size]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE and 4 <= len(digits) - size <= 14:
            return size
    return 0


def _sender(raw: Mapping[str, Any], contacts: list[Mapping[str, Any]], message: dict[str, Any]) -> dict[str, Any]:
    """The sender: the phone number (E.164) when there is one, else the WhatsApp user id."""
    phone, possible = normalise_wa_id(raw.get("from"))
    by_phone = {normalise_wa_id(c.get("wa_id"))[0]: c for c in contacts}
    contact = by_phone.get(phone) if phone else None
    if phone is None and len(contacts) == 1:
        # "from" is missing or not a number: the change's only contact is the sender.
        contact = contacts[0]
        phone, possible = normalise_wa_id(contact.get("wa_id"))
    contact = contact or {}
    user_id = _str(raw.get("from_user_id") or contact.get("user_id"), _MAX_ADDRESS)
    display_name = _str(_mapping(contact.get("profile")).get("name"), _MAX_NAME)

    if phone:
        if not possible:
            _add_flag(message, "unverified_number")
        sender: dict[str, Any] = {"kind": "phone", "address": phone, "display_name": display_name}
        if user_id:
            sender["other_identities"] = [{"kind": "whatsapp_user", "address": user_id}]
        return sender
    if user_id:
        return {"kind": "whatsapp_user", "address": user_id, "display_name": display_name}
    _add_flag(message, "no_number")
    return {"kind": "anonymous", "address": "unknown", "display_name": display_name}


# -------------------------------------------------------------------------------------------
# Statuses and errors
# -------------------------------------------------------------------------------------------


def parse_status(raw: Any) -> DeliveryUpdate | None:
    """One element of ``value.statuses`` as a ``DeliveryUpdate``; None when it has no id or an
    unknown status. ``played`` (a voice message was listened to) counts as ``read``. A failure
    is classified as a refused send is (``errors``): only a recipient code fails the address."""
    if not isinstance(raw, Mapping):
        return None
    provider_id = _str(raw.get("id"), _MAX_ID)
    status = STATUS_MAP.get(raw.get("status")) if isinstance(raw.get("status"), str) else None
    if not provider_id or status is None:
        return None
    errors = [_error(e) for e in _mappings(raw.get("errors"))]
    first = errors[0] if errors else {}
    permanent, resend_hint = True, None
    if status == "failed":
        # A refusal of our own account or credentials (131042 unpaid, 131031 locked, 190) is
        # not permanent: the message is sent again, with backoff, and when the attempts run out
        # given up without marking the resident's address failed (a status has no way to keep
        # it queued for ever, as a refused send request is).
        outcome = outcome_for_code(first.get("code"))
        permanent = outcome == "permanent"
        resend_hint = "template" if outcome == "template" else None
    code = first.get("code")
    return DeliveryUpdate(
        provider_id=provider_id,
        status=status,
        at=_datetime(raw.get("timestamp")),
        error_code=str(code) if code is not None else None,
        error_title=first.get("title"),
        error_detail=first.get("details") or first.get("message"),
        permanent=permanent,
        resend_hint=resend_hint,
        raw=dict(raw),
        idempotency_key=_str(raw.get("biz_opaque_callback_data"), 512),
        address_failed=address_failed(code),
    )


def _error(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A Cloud API error object reduced to code, title, message and details."""
    code = raw.get("code")
    error = {
        "code": code if isinstance(code, (int, str)) and not isinstance(code, bool) else None,
        "title": _str(raw.get("title"), _MAX_SHORT),
        "message": _str(raw.get("message"), 2000),
        "details": _str(_mapping(raw.get("error_data")).get("details"), 2000),
    }
    return {k: v for k, v in error.items() if v is not None}


# -------------------------------------------------------------------------------------------
# Small helpers
# -------------------------------------------------------------------------------------------


def rfc3339(timestamp: Any) -> str | None:
    """A Unix timestamp (seconds, as string or number) as RFC 3339 UTC, or None."""
    moment = _datetime(timestamp)
    # isoformat, not strftime: %Y does not pad years below 1000 to four digits on every platform
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment else None


def _datetime(timestamp: Any) -> datetime | None:
    if isinstance(timestamp, bool):
        return None
    try:
        seconds = float(timestamp)
        if not math.isfinite(seconds):
            return None
        return datetime.fromtimestamp(int(seconds), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _message_id(raw: Mapping[str, Any]) -> str:
    """The provider's message id; a body without one gets a stable id from its content, so a
    redelivery is still recognised as the same message."""
    given = _str(raw.get("id"), _MAX_ID)
    if given:
        return given
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()
    return f"noid:{digest[:40]}"


def _fallback_message(raw: Any, recipient: str | None, reason: str) -> dict[str, Any]:
    """A message that could not be read, kept and flagged for staff rather than dropped."""
    mapping = raw if isinstance(raw, Mapping) else {"value": raw}
    message: dict[str, Any] = {
        "channel": CHANNEL,
        "channel_message_id": _message_id(mapping),
        "kind": "message",
        "recipient": recipient,
        "flags": ["provider_error"],
        "meta": {"parse_error": reason[:2000]},
        "raw": json.loads(json.dumps(mapping, default=str)),
    }
    phone, _ = normalise_wa_id(mapping.get("from"))
    user_id = _str(mapping.get("from_user_id"), _MAX_ADDRESS)
    if phone:
        message["sender"] = {"kind": "phone", "address": phone}
    elif user_id:  # a person with a username: answerable at their user id
        message["sender"] = {"kind": "whatsapp_user", "address": user_id}
    else:
        message["sender"] = {"kind": "anonymous", "address": "unknown"}
        message["flags"].append("no_number")
    return message


def _prune(message: dict[str, Any]) -> dict[str, Any]:
    """Drop empty optional fields, keep the message small and readable."""
    message["sender"] = {k: v for k, v in message["sender"].items() if v is not None}
    message["attachments"] = message["attachments"][:_MAX_ATTACHMENTS]
    return {k: v for k, v in message.items() if v not in (None, [], {}) or k in ("sender",)}


def _add_flag(message: dict[str, Any], flag: str) -> None:
    flags = message.setdefault("flags", [])
    if flag not in flags and len(flags) < 20:
        flags.append(flag)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _str(value: Any, limit: int) -> str | None:
    """A non-empty string clipped to the schema's limit; numbers (ids) become strings."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        return None
    return value[:limit]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
