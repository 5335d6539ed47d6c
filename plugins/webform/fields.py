"""Pure validation of a web-form submission into a canonical inbound message.

Every field is checked against a limit; errors are collected per field so the resident sees
all of them at once (HTML) or an integrator gets them as JSON."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import phonenumbers

from router.identity import ascii_domain

FIELDS = ("name", "email", "phone", "street", "postcode", "city", "customer_number", "topic", "message", "form_token", "website")
LIMITS = {"name": 200, "email": 254, "phone": 40, "street": 200, "postcode": 10, "city": 100, "customer_number": 40,
          "topic": 32, "message": 5000, "form_token": 200, "website": 200}
EMAIL_RE = re.compile(r"^[^@\s<>\"]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")
POSTCODE_RE = re.compile(r"^[0-9]{5}$")
CUSTOMER_RE = re.compile(r"^[A-Za-z0-9-]{3,40}$")

MESSAGES = {
    "de": {
        "required": "Bitte ausfüllen.",
        "too_long": "Höchstens {limit} Zeichen.",
        "email": "Bitte eine gültige E-Mail-Adresse angeben.",
        "phone": "Bitte eine gültige Telefonnummer angeben.",
        "postcode": "Bitte eine fünfstellige Postleitzahl angeben.",
        "topic": "Bitte ein Thema wählen.",
        "customer_number": "Kundennummern bestehen aus Buchstaben, Ziffern und Bindestrichen.",
        "type": "Ungültiger Wert.",
    },
    "en": {
        "required": "Please fill this in.",
        "too_long": "At most {limit} characters.",
        "email": "Please enter a valid e-mail address.",
        "phone": "Please enter a valid phone number.",
        "postcode": "Please enter a five-digit postcode.",
        "topic": "Please choose a topic.",
        "customer_number": "Customer numbers consist of letters, digits and hyphens.",
        "type": "Invalid value.",
    },
}


def normalise(raw: str) -> str:
    """A typed text as it is checked and stored: browser line breaks (CRLF) as one newline, no
    NUL, no surrounding blanks. A textarea counts a line break as one character, so a length
    limit is checked after this, or a text the page allowed would be refused."""
    return raw.replace("\r\n", "\n").replace("\x00", "").strip()


def valid_email(address: str) -> bool:
    """Whether ``address`` looks like an e-mail address. An internationalised domain
    (``info@müller-bau.de``) is checked in the ASCII form the answer's mail is sent to
    (``ascii_domain``), so it is accepted as typed; a domain that has no ASCII form (an empty
    or over-long label) is refused."""
    local, at, domain = address.rpartition("@")
    converted = ascii_domain(domain) if at else None
    return converted is not None and EMAIL_RE.match(f"{local}@{converted}") is not None


def clean(data: Mapping[str, Any], *, topics: Iterable[str], language: str) -> tuple[dict[str, str], dict[str, str]]:
    """Strip and check the submitted fields; returns (values, errors by field). A value over its
    limit is kept cut to the limit, so the form shown again still has what was typed."""
    texts = MESSAGES.get(language, MESSAGES["en"])
    values: dict[str, str] = {}
    errors: dict[str, str] = {}
    for field in FIELDS:
        raw = data.get(field, "")
        if raw is None:
            raw = ""
        if not isinstance(raw, str):
            errors[field] = texts["type"]
            continue
        value = normalise(raw)
        if len(value) > LIMITS[field]:
            errors[field] = texts["too_long"].format(limit=LIMITS[field])
            value = value[: LIMITS[field]]
        values[field] = value
    if errors:
        return values, errors
    if not values.get("message"):
        errors["message"] = texts["required"]
    if values.get("topic") not in set(topics):
        errors["topic"] = texts["topic"]
    if values.get("email") and not valid_email(values["email"]):
        errors["email"] = texts["email"]
    if values.get("phone"):
        try:
            number = phonenumbers.parse(values["phone"], "DE")
            if not phonenumbers.is_valid_number(number):
                raise ValueError
            values["phone"] = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        except (phonenumbers.NumberParseException, ValueError):
            errors["phone"] = texts["phone"]
    if values.get("postcode") and not POSTCODE_RE.match(values["postcode"]):
        errors["postcode"] = texts["postcode"]
    if values.get("customer_number") and not CUSTOMER_RE.match(values["customer_number"]):
        errors["customer_number"] = texts["customer_number"]
    return values, errors


def submission_id(prefix: str, nonce: str, entered: str) -> str:
    """The message id of a form or status-page submission: its token's nonce and a hash of what
    was entered. The same page sent twice (a double click, a reload) is one message; another
    submission with the same token (a shared computer's restored page, an integration that
    reuses a token) is a message of its own, not a duplicate answered with the first sender's
    case. A lone surrogate (JSON lets one through) is hashed as it is, not refused with a 500."""
    digest = hashlib.sha256(entered.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{prefix}:{nonce}:{digest}"


def to_message(values: Mapping[str, str], *, nonce: str, language: str) -> dict[str, Any]:
    """The canonical inbound message for a valid submission. The sender is the e-mail address
    if given, else the phone number, else the form session: nobody needs either to be heard."""
    identities = []
    if values.get("email"):
        identities.append({"kind": "email", "address": values["email"].lower()})
    if values.get("phone"):
        identities.append({"kind": "phone", "address": values["phone"]})
    if not identities:
        identities.append({"kind": "webform", "address": f"form:{nonce}"})
    sender: dict[str, Any] = {**identities[0], "display_name": values.get("name") or None}
    if len(identities) > 1:
        sender["other_identities"] = identities[1:]
    address = {k: values.get(k) or None for k in ("street", "postcode", "city")}
    return {
        "channel": "webform",
        "channel_message_id": submission_id(
            "form", nonce, json.dumps({k: values.get(k) or "" for k in sorted(values)}, sort_keys=True)
        ),
        "kind": "message",
        "sender": sender,
        "text": values["message"],
        "language": language,
        "topic": values["topic"],
        "address": address if any(address.values()) else None,
        "customer_number": values.get("customer_number") or None,
    }
