"""Recognise bounces: RFC 3464 delivery status notifications (``multipart/report;
report-type=delivery-status``) and the common non-standard ones that only quote the original
headers in their text, so that the outbound message they report can be marked failed.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from email import policy
from email.message import Message
from email.parser import HeaderParser

from .addresses import addresses_of
from .limits import MAX_BOUNCE_TEXT, MAX_DSN_GROUPS, MAX_MIME_PARTS
from .text import html_to_text, part_text


@dataclasses.dataclass(frozen=True, slots=True)
class Bounce:
    """What a bounce says about one of our outbound messages.

    ``original_message_id`` is the reported message's Message-ID with angle brackets (None when
    the bounce does not quote it); ``status`` an RFC 3463 code like ``5.1.1`` or an SMTP code;
    ``permanent`` is False only for temporary (4.x.x) failures.
    """

    original_message_id: str | None
    recipient: str | None
    status: str | None
    reason: str | None
    permanent: bool = True

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


_MESSAGE_ID = re.compile(r"<[^<>\s]+@[^<>\s]+>")
_INLINE_MESSAGE_ID = re.compile(r"^[ \t>]*Message-ID:[ \t]*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)
_ENHANCED_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
_SMTP_CODE = re.compile(r"\b([45]\d\d)[ \-]")
# Starts only where a run of local-part characters starts: otherwise a long run without "@" is
# rescanned from each of its characters (quadratic).
_ADDRESS = re.compile(
    r"(?<![A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-])[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+"
)
# Leading blanks without newlines, possessive blanks after the colon: linear on blank lines.
_FINAL_RECIPIENT = re.compile(r"^[^\S\n]*Final-Recipient:\s*+(?:rfc822;\s*+)?(\S+)", re.IGNORECASE | re.MULTILINE)
_NONSTANDARD_SUBJECT = re.compile(
    r"delivery status notification|undelivered mail|undeliverable|unzustellbar|nicht zustellbar|"
    r"mail delivery (?:failed|failure|system)|delivery failure|failure notice|returned mail|"
    r"non[- ]?delivery|unable to deliver|zustellung fehlgeschlagen|fehler bei der zustellung",
    re.IGNORECASE,
)
_DAEMONS = ("mailer-daemon", "mailerdaemon", "postmaster", "mail-daemon")


def _get(msg: Message, name: str) -> str | None:
    try:
        value = msg.get(name)
    except Exception:  # noqa: BLE001
        return None
    return None if value is None else " ".join(str(value).split())


def _strip_type(value: str | None) -> str | None:
    """``rfc822; user@example.org`` -> ``user@example.org``; ``smtp; 550 ...`` -> ``550 ...``."""
    if not value:
        return None
    _, sep, rest = value.partition(";")
    return (rest if sep else value).strip().strip("<>").strip() or None


def _dsn_groups(part: Message) -> list[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        return list(itertools.islice((p for p in payload if isinstance(p, Message)), MAX_DSN_GROUPS + 1))
    text = part_text(part)[:MAX_BOUNCE_TEXT] if isinstance(payload, str) else ""
    parser = HeaderParser(policy=policy.default)
    blocks = (block for block in re.split(r"\n\s*\n", text) if block.strip())
    return [parser.parsestr(block.strip() + "\n") for block in itertools.islice(blocks, MAX_DSN_GROUPS + 1)]


def _original_message_id(report: Message) -> str | None:
    for part in itertools.islice(report.walk(), MAX_MIME_PARTS):
        ctype = part.get_content_type()
        # The parser reads every message/* part as a message, message/rfc822-headers too.
        if ctype in ("message/rfc822", "message/rfc822-headers"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner:
                found = _get(inner[0], "Message-ID")
                if found and _MESSAGE_ID.search(found):
                    return _MESSAGE_ID.search(found).group(0)
            text = inner if isinstance(inner, str) else ""
            if match := _INLINE_MESSAGE_ID.search(text):
                return match.group(1)
        elif ctype == "text/rfc822-headers":
            if match := _INLINE_MESSAGE_ID.search(part_text(part)):
                return match.group(1)
    return None


def _status_permanent(status: str | None) -> bool:
    return not (status or "").startswith("4")


def _parse_dsn(msg: Message) -> Bounce | None:
    parts = itertools.islice(msg.walk(), MAX_MIME_PARTS)
    status_part = next((p for p in parts if p.get_content_type() == "message/delivery-status"), None)
    if status_part is None:
        return None
    for group in _dsn_groups(status_part):
        action = (_get(group, "Action") or "").lower()
        if action != "failed":
            continue
        status = _get(group, "Status")
        status = _ENHANCED_STATUS.search(status).group(1) if status and _ENHANCED_STATUS.search(status) else status
        recipient = _strip_type(_get(group, "Final-Recipient")) or _strip_type(_get(group, "Original-Recipient"))
        reason = _strip_type(_get(group, "Diagnostic-Code")) or (f"status {status}" if status else "delivery failed")
        return Bounce(
            original_message_id=_original_message_id(msg),
            recipient=recipient.lower() if recipient else None,
            status=status,
            reason=reason[:1000],
            permanent=_status_permanent(status),
        )
    return None


def _is_daemon(msg: Message) -> bool:
    for name in ("From", "Sender", "Return-Path"):
        value = _get(msg, name)
        if not value:
            continue
        if name == "Return-Path" and value.strip() == "<>":
            return True
        for _, address in addresses_of(value):
            if address.split("@")[0].lower() in _DAEMONS:
                return True
    return False


def _body_text(msg: Message) -> str:
    """The text of a non-standard bounce: its first ``MAX_MIME_PARTS`` parts, at most
    ``MAX_BOUNCE_TEXT`` characters (the failure is described at the top)."""
    texts = []
    size = 0
    for part in itertools.islice(msg.walk(), MAX_MIME_PARTS):
        ctype = part.get_content_type()
        parsed = isinstance(part.get_payload(), list)
        if ctype in ("text/plain", "text/rfc822-headers") or (ctype == "message/rfc822-headers" and not parsed):
            texts.append(part_text(part))
        elif ctype == "text/html":
            texts.append(html_to_text(part_text(part)[: 4 * MAX_BOUNCE_TEXT]))
        elif ctype in ("message/rfc822", "message/rfc822-headers") and parsed:
            inner = part.get_payload()[0]
            texts.append("\n".join(f"{k}: {v}" for k, v in inner.raw_items()))
        else:
            continue
        size += len(texts[-1]) + 1
        if size >= MAX_BOUNCE_TEXT:
            break
    return "\n".join(texts)[:MAX_BOUNCE_TEXT]


def _parse_nonstandard(msg: Message) -> Bounce | None:
    subject = _get(msg, "Subject") or ""
    if not (_is_daemon(msg) and _NONSTANDARD_SUBJECT.search(subject)):
        return None
    text = _body_text(msg)
    match = _INLINE_MESSAGE_ID.search(text)
    original = match.group(1) if match else None
    # Only the part before the quoted original headers describes the failure.
    head = text[: match.start()] if match else text
    recipient = None
    if found := _FINAL_RECIPIENT.search(head):
        recipient = found.group(1).strip("<>")
    elif found := re.search(r"<(" + _ADDRESS.pattern + r")>\s*:", head):
        recipient = found.group(1)
    else:
        candidates = [a for a in _ADDRESS.findall(head) if a.split("@")[0].lower() not in _DAEMONS]
        recipient = candidates[0] if candidates else None
    status = None
    reason = None
    if found := _ENHANCED_STATUS.search(head):
        status = found.group(1)
    elif found := _SMTP_CODE.search(head):
        status = found.group(1)
    if status:
        line = next((ln.strip() for ln in head.splitlines() if status in ln), "")
        reason = line[:1000] or None
    return Bounce(
        original_message_id=original,
        recipient=recipient.lower() if recipient else None,
        status=status,
        reason=reason or subject[:1000] or "delivery failed",
        permanent=_status_permanent(status),
    )


def parse_bounce(msg: Message) -> Bounce | None:
    """The bounce this mail reports, or None when it is not a (failure) bounce.

    A delivery status notification counts only when a recipient's ``Action`` is ``failed``
    (``delayed`` reports mean the mail is still being tried). Never raises.
    """
    try:
        if msg.get_content_type() == "multipart/report" and (
            str(msg.get_param("report-type", "")).lower() == "delivery-status"
        ):
            found = _parse_dsn(msg)
            if found is not None:
                return found
            if any(p.get_content_type() == "message/delivery-status" for p in itertools.islice(msg.walk(), MAX_MIME_PARTS)):
                return None
        return _parse_nonstandard(msg)
    except Exception:  # noqa: BLE001 - a broken bounce is stored as an ordinary mail
        return None
