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
from email import policy as email_policy
from email.headerregistry import Address, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage
from email.utils import format_datetime

from router.hookspecs import OutboundMessage

from .addresses import ascii_address

_REPLY_PREFIX = re.compile(r"^\s*(?:re|aw|antw|sv|wg|fwd?)\s*:", re.IGNORECASE)
_MSGID = re.compile(r"<[^<>\s]+>")
_OWN_ID = re.compile(r"<[0-9a-f]{32}\.cr@([^<>\s]+)>")
_MAX_REFERENCES = 20
# A msg-id longer than this would not fit on one header line (998 characters) after the name.
_MAX_ID_CHARS = 900


class MessageIdsHeader(UnstructuredHeader):
    """In-Reply-To and References: msg-ids written as they are, folded between ids only.

    The standard library folds these as unstructured text at 78 characters, and an id longer
    than a line (Exchange Online's are about 90) became an RFC 2047 encoded word, which no
    client reads as a msg-id (RFC 5322 3.6.4): Outlook did not thread our acknowledgements and
    replies. An id longer than a line stays on a line of its own, up to 998 characters."""

    def fold(self, *, policy: email_policy.Policy) -> str:
        limit = policy.max_line_length or 0
        lines = [f"{self.name}:"]
        for mid in str(self).split():
            if limit and len(lines[-1]) > len(self.name) + 1 and len(lines[-1]) + 1 + len(mid) > limit:
                lines.append("")
            lines[-1] += " " + mid
        return policy.linesep.join(lines) + policy.linesep


def _header_registry() -> HeaderRegistry:
    registry = HeaderRegistry()
    registry.map_to_type("in-reply-to", MessageIdsHeader)
    registry.map_to_type("references", MessageIdsHeader)
    return registry


MAIL_POLICY = email_policy.default.clone(header_factory=_header_registry())
"""``policy.default`` with ``MessageIdsHeader`` for In-Reply-To and References."""

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
    subject = _one_line(message.subject or "")
    if not subject or (message.case_reference and subject == f"[#{message.case_reference}]"):
        # A subject of the reference alone (a web-form case's answer by mail) says nothing.
        subject = _DEFAULT_SUBJECT[lang]
    if message.thread_refs and message.subject and not _REPLY_PREFIX.match(subject):
        subject = f"Re: {subject}"
    if message.case_reference and f"[#{message.case_reference}]" not in subject:
        subject = f"{subject} [#{message.case_reference}]"
    return subject[:900]


def _thread_ids(refs: tuple[str, ...]) -> list[str]:
    """The msg-ids in the thread's references, in order, each once.

    A reference is an inbound mail's ``channel_message_id`` (``<id> <digest>``, see
    ``parse.dedupe_key``; or the bare ``<id>`` it was before) or our own Message-ID: the
    ``<...>`` in it is the Message-ID. Ids beyond ASCII (only valid in SMTPUTF8 mail) or longer
    than a header line are left out, since they cannot be written as a msg-id."""
    ids: list[str] = []
    for ref in refs:
        found = _MSGID.findall(ref) or ([f"<{ref.strip().strip('<>')}>"] if "@" in ref and " " not in ref.strip() else [])
        ids.extend(mid for mid in found if mid not in ids and mid.isascii() and len(mid) <= _MAX_ID_CHARS)
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


def build_mail(
    message: OutboundMessage, *, from_addr: str, from_name: str | None, domain: str, now: datetime, reply_to: str | None = None
) -> EmailMessage:
    """Build the mail for one outbox row.

    ``thread_refs`` are Message-IDs of the thread, oldest first, as in a References header; the
    last one is the mail answered (In-Reply-To). Acknowledgements and notifications are marked
    as automatic (RFC 3834 ``Auto-Submitted``, Exchange's ``X-Auto-Response-Suppress``) so that
    auto-responders do not answer them; staff replies get an HTML alternative. Addresses are
    written with ASCII domains where the local part allows (``ascii_address``), as the
    envelope is. In-Reply-To and References fold between their msg-ids (``MessageIdsHeader``),
    whatever writes the mail out.
    """
    mail = EmailMessage(policy=MAIL_POLICY)
    mail["Message-ID"] = message_id_for(message.idempotency_key, domain)
    mail["Date"] = format_datetime(now)
    sender = ascii_address(from_addr)
    # An Address, not formataddr(): the header's folding read "Störungsannahme (Strom)" back as a
    # name and a comment, and a comma in the name as a second address.
    mail["From"] = Address(display_name=_one_line(from_name), addr_spec=sender) if from_name else sender
    mail["To"] = ascii_address(message.to)
    if reply_to:
        mail["Reply-To"] = ascii_address(reply_to)
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
