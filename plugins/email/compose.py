"""Outbound mail: one ``OutboundMessage`` -> one ``EmailMessage``, ready for the relay.

Pure: the Message-ID comes from the outbox row's idempotency key, so a retried delivery carries
the same Message-ID and a resident's client threads (and deduplicates) it as one mail. After a
temporary bounce the row gets a new key, and the next attempt a new Message-ID.
"""

from __future__ import annotations

import hashlib
import html
import re
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr

from router.hookspecs import OutboundMessage

_REPLY_PREFIX = re.compile(r"^\s*(?:re|aw|antw|sv|wg|fwd?)\s*:", re.IGNORECASE)
_MSGID = re.compile(r"<[^<>\s]+>")
_OWN_ID = re.compile(r"<[0-9a-f]{32}\.cr@([^<>\s]+)>")
_MAX_REFERENCES = 20

_DEFAULT_SUBJECT = {"de": "Ihre Anfrage", "en": "Your request"}
_STATUS_LABEL = {"de": "Stand Ihrer Anfrage", "en": "Status of your request"}


def message_id_for(idempotency_key: str, domain: str) -> str:
    """Our Message-ID for an outbox row: stable across retries, revealing nothing internal."""
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]
    return f"<{digest}.cr@{domain}>"


def is_own_message_id(message_id: str, domain: str) -> bool:
    """Whether ``message_id`` is one ``message_id_for`` made for ``domain``.

    The exact form, not just the domain: colleagues' own mail servers in the same domain
    write Message-IDs there too, and their mail deserves an acknowledgement.
    """
    match = _OWN_ID.fullmatch(message_id.strip())
    return bool(match) and match.group(1).lower() == domain.lower().rstrip(".")


def _one_line(value: str) -> str:
    return " ".join(value.split())


def subject_for(message: OutboundMessage) -> str:
    """The subject: the conversation's, "Re: " when answering a mail, with ``[#<case>]``."""
    lang = message.language if message.language in _DEFAULT_SUBJECT else "en"
    subject = _one_line(message.subject or "") or _DEFAULT_SUBJECT[lang]
    if message.thread_refs and message.subject and not _REPLY_PREFIX.match(subject):
        subject = f"Re: {subject}"
    if message.case_reference and f"[#{message.case_reference}]" not in subject:
        subject = f"{subject} [#{message.case_reference}]"
    return subject[:900]


def _thread_ids(refs: tuple[str, ...]) -> list[str]:
    ids: list[str] = []
    for ref in refs:
        found = _MSGID.findall(ref) or ([f"<{ref.strip().strip('<>')}>"] if "@" in ref else [])
        ids.extend(mid for mid in found if mid not in ids)
    return ids


def body_text(message: OutboundMessage) -> str:
    """The plain text, with the status page link appended when the text does not carry it."""
    text = message.text.replace("\r\n", "\n").rstrip()
    if message.status_url and message.status_url not in text:
        label = _STATUS_LABEL.get(message.language, _STATUS_LABEL["en"])
        text = f"{text}\n\n{label}: {message.status_url}"
    return text + "\n"


def html_alternative(text: str) -> str:
    """A minimal HTML rendering of plain text: escaped, paragraphs and line breaks kept."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    body = "\n".join("<p>" + html.escape(p).replace("\n", "<br>\n") + "</p>" for p in paragraphs)
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n{body}\n</body></html>\n'


def build_mail(message: OutboundMessage, *, from_addr: str, from_name: str | None, domain: str, now: datetime) -> EmailMessage:
    """Build the mail for one outbox row.

    ``thread_refs`` are Message-IDs of the thread, oldest first, as in a References header; the
    last one is the mail answered (In-Reply-To). Acknowledgements and notifications are marked
    as automatic (RFC 3834 ``Auto-Submitted``, Exchange's ``X-Auto-Response-Suppress``) so that
    auto-responders do not answer them; staff replies get an HTML alternative.
    """
    mail = EmailMessage()
    mail["Message-ID"] = message_id_for(message.idempotency_key, domain)
    mail["Date"] = format_datetime(now)
    mail["From"] = formataddr((_one_line(from_name), from_addr)) if from_name else from_addr
    mail["To"] = message.to
    mail["Subject"] = subject_for(message)
    refs = _thread_ids(message.thread_refs)
    if refs:
        mail["In-Reply-To"] = refs[-1]
        mail["References"] = " ".join(refs[-_MAX_REFERENCES:])
    if message.kind == "ack":
        mail["Auto-Submitted"] = "auto-replied"
    elif message.kind != "reply":
        mail["Auto-Submitted"] = "auto-generated"
    if message.kind != "reply":
        mail["X-Auto-Response-Suppress"] = "All"
    text = body_text(message)
    mail.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
    if message.kind == "reply":
        mail.add_alternative(html_alternative(text), subtype="html", charset="utf-8", cte="quoted-printable")
    if message.language and re.fullmatch(r"[a-z]{2}", message.language):
        mail["Content-Language"] = message.language  # after set_content, which clears Content-*
    return mail
