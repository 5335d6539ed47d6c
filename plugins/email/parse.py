"""Raw RFC 5322 bytes -> the canonical inbound message (channel ``email``).

Pure functions: no I/O, and no exception for any input. Malformed mail becomes best-effort
text, because a resident's message that cannot be parsed exactly must still reach a person.
The attachments' bytes are not part of the message; ``parse_mail()`` returns them beside it
(from the same walk of the MIME tree) so the channel can store them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Collection, Iterator, Mapping
from datetime import UTC
from email import errors, policy
from email.feedparser import BytesFeedParser
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from typing import Any

from router.identity import canonical_email

from .addresses import addresses_of
from .authentication import failed_check
from .bounces import parse_bounce
from .limits import MAX_ATTACHMENTS, MAX_HTML, MAX_META_TEXT, MAX_MIME_DEPTH, MAX_MIME_ENTITIES, MAX_MIME_PARTS, MAX_TEXT
from .loops import classify, relayed_sender
from .text import decode_bytes, decode_encoded_words, fix_surrogates, html_to_text, part_text, split_reply, utf8_encoded_words

CHANNEL = "email"
MAX_REFS = 100
SELECTED_HEADERS = (
    "From", "Sender", "Reply-To", "To", "Cc", "Delivered-To", "Subject", "Date", "Message-ID",
    "In-Reply-To", "References", "Return-Path", "Auto-Submitted", "Precedence", "List-Id",
    "X-Auto-Response-Suppress", "Content-Type", "Content-Language", "User-Agent", "X-Mailer",
)

_MSGID = re.compile(r"<[^<>\s]+>")
_LANG = re.compile(r"^\s*([a-zA-Z]{2})(?:[-_][a-zA-Z0-9]+)*\s*(?:,|$)")


@dataclasses.dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment's bytes and what the canonical message says about it. ``sha256`` is
    computed once, here: it names the stored file as well as describing the attachment."""

    name: str | None
    content_type: str
    data: bytes = dataclasses.field(repr=False)
    sha256: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.data).hexdigest())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "content_type": self.content_type[:200], "size": len(self.data), "sha256": self.sha256}


class _HeadersOfOneMail(HeaderRegistry):
    """``policy.default``'s header factory, parsing each header of one mail once.

    The stdlib parses a header again on every access (``msg.get``, and every
    ``get_content_type``, ``get_param`` or ``get_filename`` of a part) and builds a new class
    each time: that was about half the CPU an inbound mail cost. Parsing is a pure function of
    name and value, so the cached header is the one the stdlib would have built. One instance
    per mail, so the cache lives and dies with the message.

    One difference: RFC 2047 encoded words are first decoded with the charset fallback bodies
    get (``utf8_encoded_words``), so a name in UTF-8 under an ``iso-8859-1`` label reads as the
    sender wrote it, not as mojibake (nor Latin-1 under ``utf-8`` as U+FFFD)."""

    def __init__(self) -> None:
        super().__init__()
        self._parsed: dict[tuple[str, str], BaseHeader] = {}

    def __getitem__(self, name: str) -> type:
        return _header_class(self.registry.get(name.lower(), self.default_class), self.base_class)

    def __call__(self, name: str, value: str) -> BaseHeader:
        key = (name, value)
        found = self._parsed.get(key)
        if found is None:
            relabelled = utf8_encoded_words(value)
            try:
                found = self[name](name, relabelled)
            except RecursionError:
                # The stdlib parses comments and groups recursively: a From with a few thousand
                # nested "(" (2.8 KB) exhausted the stack, and the mail was answered 451 for
                # ever. Such a header is kept as plain text.
                found = _header_class(self.default_class, self.base_class)(name, relabelled)
            self._parsed[key] = found
        return found


@functools.cache
def _header_class(specialised: type, base: type) -> type:
    """What ``HeaderRegistry.__getitem__`` builds, built once per header kind."""
    return type("_" + specialised.__name__, (specialised, base), {})


class MimeTooDeepDefect(errors.MessageDefect):
    """Parts were nested deeper than ``MAX_MIME_DEPTH``; the deepest kept part holds the rest
    of its subtree unparsed, as its payload."""


class MimeTooManyEntitiesDefect(errors.MessageDefect):
    """More than ``MAX_MIME_ENTITIES`` entities: only the headers were parsed, and the whole body
    is one opaque payload."""


class _TooManyEntities(Exception):
    """Raised by the parser at the entity over ``MAX_MIME_ENTITIES``."""


class _DepthLimitedParser(BytesFeedParser):
    """The stdlib's parser, but an entity nested deeper than ``MAX_MIME_DEPTH`` gets only its
    headers parsed and keeps its body as opaque text.

    The stdlib parses each nested part in a nested generator, and about 1000 levels (a 68 KB
    mail) raised RecursionError. Headers-only parsing is the stdlib's own mode for an entity
    whose body is not to be parsed; it is switched on for the entities below the limit only.
    """

    def __init__(self, *, policy: policy.Policy) -> None:
        super().__init__(policy=policy)
        self._depth = 0
        self._entities = 0
        self.too_deep = False  # a multipart or message/* was left unparsed: its parts are lost to the reading

    def _parsegen(self) -> Iterator[object]:
        self._entities += 1
        if self._entities > MAX_MIME_ENTITIES:
            raise _TooManyEntities
        self._depth += 1
        opaque = self._depth > MAX_MIME_DEPTH and not self._headersonly
        if opaque:
            self._headersonly = True
        try:
            yield from super()._parsegen()
            # The entity just read is still the current one (its caller pops it): a text part
            # left unparsed lost nothing, and is read as usual.
            if opaque and self._cur.get_content_maintype() in ("multipart", "message"):
                self.too_deep = True
        finally:
            self._depth -= 1
            if opaque:
                self._headersonly = False


def read_message(raw: bytes) -> EmailMessage:
    """Parse raw bytes with ``email.policy.default`` (each header parsed at most once, see
    ``_HeadersOfOneMail``); never raises.

    Parts nested deeper than ``MAX_MIME_DEPTH`` stay unparsed, and the root's ``defects`` then
    hold a ``MimeTooDeepDefect``. Should the stdlib still recurse too deeply, only the headers
    are parsed and the whole body is one opaque payload, with the same defect; so too beyond
    ``MAX_MIME_ENTITIES`` entities, with a ``MimeTooManyEntitiesDefect``.
    """
    mail_policy = policy.default.clone(header_factory=_HeadersOfOneMail())
    parser = _DepthLimitedParser(policy=mail_policy)
    try:
        parser.feed(raw)
        msg = parser.close()
    except (RecursionError, _TooManyEntities) as exc:
        msg = BytesParser(policy=mail_policy).parsebytes(raw, headersonly=True)
        msg.defects.append(MimeTooDeepDefect() if isinstance(exc, RecursionError) else MimeTooManyEntitiesDefect())
        return msg
    if parser.too_deep:
        msg.defects.append(MimeTooDeepDefect())
    return msg


def header(msg: Message, name: str) -> str | None:
    """A header's decoded text (RFC 2047 words, stray 8-bit bytes repaired), or None."""
    raw = next((str(v) for k, v in msg.raw_items() if k.lower() == name.lower()), None)
    if raw is None:
        return None
    if any("\udc80" <= ch <= "\udcff" for ch in raw):
        # Unencoded 8-bit bytes: the stdlib would turn them into U+FFFD; decode them instead,
        # and the encoded words beside them (an unencoded "AW:" before an encoded subject).
        return " ".join(decode_encoded_words(fix_surrogates(raw)).split())
    try:
        text = str(msg.get(name))
    except Exception:  # noqa: BLE001 - fall back to the raw value of a header the stdlib cannot parse
        text = raw
    return " ".join(text.split())


def _addresses(msg: Message, name: str) -> list[tuple[str, str]]:
    """(display name, lower-cased address) pairs of an address header. An address in raw UTF-8
    (SMTPUTF8 mail, RFC 6532) is decoded like the display name: left as the parser's escaped
    bytes it was no valid address, and such mail imported over IMAP had no sender."""
    try:
        value = msg.get(name)
        if value is not None and hasattr(value, "addresses"):
            found = [(fix_surrogates(a.display_name or ""), fix_surrogates(a.addr_spec).lower()) for a in value.addresses]
            return [(n, a) for n, a in found if "@" in a]
    except Exception:  # noqa: BLE001
        pass
    text = header(msg, name)
    if not text:
        return []
    return [(n, a.lower()) for n, a in addresses_of(text) if "@" in a]


def message_ids(value: str | None) -> list[str]:
    """Message-IDs in a header value, in order; bare ids without brackets are wrapped."""
    if not value:
        return []
    found = _MSGID.findall(value)
    if not found:
        found = [f"<{token.strip('<>')}>" for token in value.split() if "@" in token]
    return [mid for mid in found if len(mid) <= 998]


def _leaves(msg: Message) -> tuple[list[Message], bool]:
    """The leaf parts in order, treating message/* parts (forwarded mail, delivery reports) as
    leaves, and whether the walk stopped early: it visits at most ``MAX_MIME_PARTS`` parts
    (containers included), since every leaf is decoded and hashed. Iterative, so that no
    nesting can exhaust the stack."""
    found: list[Message] = []
    pending = [msg]
    visited = 0
    while pending:
        visited += 1
        if visited > MAX_MIME_PARTS:
            return found, True
        part = pending.pop()
        payload = part.get_payload() if part.is_multipart() and part.get_content_maintype() != "message" else None
        if isinstance(payload, list):
            pending.extend(reversed([sub for sub in payload if isinstance(sub, Message)]))
        else:
            found.append(part)
    return found, False


def _leaf_bytes(part: Message) -> bytes:
    if part.get_content_maintype() == "message":
        payload = part.get_payload()
        if isinstance(payload, list):
            return b"\n".join(p.as_bytes() for p in payload if isinstance(p, Message))
        return str(payload).encode("utf-8", "surrogateescape")
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _is_attachment(part: Message) -> bool:
    try:
        disposition = part.get_content_disposition()
        filename = part.get_filename()
    except Exception:  # noqa: BLE001
        disposition, filename = None, None
    if disposition == "attachment" or filename:
        return True
    return part.get_content_type() not in ("text/plain", "text/html")


def attachments(msg: Message | bytes) -> list[Attachment]:
    """Every attachment's name, type and bytes (inline images included) among the first
    ``MAX_MIME_PARTS`` parts, best-effort."""
    if isinstance(msg, (bytes, bytearray)):
        msg = read_message(bytes(msg))
    return _attachments(msg, _leaves(msg)[0])


def _attachments(msg: Message, leaves: list[Message]) -> list[Attachment]:
    """The attachments among ``leaves``, the leaf parts of ``msg``."""
    found: list[Attachment] = []
    for part in leaves:
        if part is msg and msg.get_content_maintype() in ("text", "multipart"):
            continue
        try:
            if not _is_attachment(part):
                continue
            name = part.get_filename()
            if name is None and part.get_content_type() == "message/rfc822":
                name = "message.eml"
            found.append(Attachment(name=fix_surrogates(name)[:500] if name else None,
                                    content_type=part.get_content_type(), data=_leaf_bytes(part)))
        except Exception:  # noqa: BLE001 - skip a part we cannot read, keep the others
            continue
    return found


@dataclasses.dataclass(frozen=True, slots=True)
class _Piece:
    """The text of one body part, whether it was HTML, and whether that HTML was cut."""

    text: str
    html: bool = False
    cut: bool = False


class _BodyReader:
    """Reads the text a person wrote out of a MIME tree, in the tree's order.

    A multipart/alternative gives one of its parts (text/plain preferred, else the HTML as
    text); any other multipart gives the text of all its parts that are not attachments, in
    order: Apple Mail sends text, an inline image and more text as three parts of a
    multipart/mixed, and the text after the image used to be dropped. Where such a multipart
    holds both text/plain and text/html parts side by side (a mailer that forgot the
    multipart/alternative), the HTML ones are taken for copies of the plain text.

    Only ``leaves`` (the leaf parts ``_leaves`` visited) are read, and no more than
    ``MAX_HTML`` characters of HTML in all, so the work stays bounded.
    """

    def __init__(self, root: Message, leaves: list[Message]) -> None:
        self.root = root
        self.leaves = {id(part) for part in leaves}
        self.html_left = MAX_HTML
        self.visits = 0

    def read(self, part: Message) -> list[_Piece]:
        """The non-empty pieces of text in ``part``, in order."""
        self.visits += 1
        if self.visits > MAX_MIME_PARTS:
            return []  # containers too: no further than ``_leaves`` went
        if id(part) in self.leaves:
            return self._leaf(part)
        payload = part.get_payload() if part.is_multipart() else None
        children = [sub for sub in payload if isinstance(sub, Message)] if isinstance(payload, list) else []
        if part.get_content_subtype() == "alternative":
            return self._one_of(children)
        if self._has_text(children, "text/plain"):
            children = [sub for sub in children if not (id(sub) in self.leaves and sub.get_content_type() == "text/html")]
        return [piece for sub in children for piece in self.read(sub)]

    def _has_text(self, parts: list[Message], ctype: str) -> bool:
        return any(id(p) in self.leaves and p.get_content_type() == ctype and not _is_attachment(p) for p in parts)

    def _one_of(self, children: list[Message]) -> list[_Piece]:
        """The first alternative with text, text/plain ones first (HTML is read only when needed)."""
        for sub in sorted(children, key=lambda p: p.get_content_type() != "text/plain"):
            found = self.read(sub)
            if found:
                return found
        return []

    def _leaf(self, part: Message) -> list[_Piece]:
        if part is not self.root and _is_attachment(part):
            return []
        ctype = part.get_content_type()
        if ctype == "text/plain":
            text = part_text(part)
            return [_Piece(text)] if text.strip() else []
        if ctype != "text/html" or self.html_left <= 0:
            return []
        html = part_text(part)
        read = html[: self.html_left]
        self.html_left -= len(read)
        text = html_to_text(read)
        return [_Piece(text, html=True, cut=len(read) < len(html))] if text.strip() else []


def _body(msg: Message, leaves: list[Message]) -> tuple[str, bool, bool]:
    """The body as text (see ``_BodyReader``), whether any of it came from HTML, and whether
    HTML was longer than ``MAX_HTML`` and only its beginning was read. ``leaves`` are the leaf
    parts of ``msg``."""
    try:
        pieces = _BodyReader(msg, leaves).read(msg)
    except Exception:  # noqa: BLE001
        pieces = []
    if len(pieces) == 1:
        return pieces[0].text, pieces[0].html, pieces[0].cut
    if pieces:
        text = "\n\n".join(piece.text.strip("\n") for piece in pieces)
        return text, any(p.html for p in pieces), any(p.cut for p in pieces)
    if not msg.is_multipart() and msg.get_content_maintype() in ("text", "multipart"):
        return part_text(msg), False, False
    return "", False, False


def _raw_body_text(raw: bytes) -> str:
    """Best-effort text of a mail whose MIME structure could not be used: the bytes after the
    header block, decoded."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        if sep in raw:
            raw = raw.split(sep, 1)[1]
            break
    return decode_bytes(raw[:MAX_TEXT * 2], None).replace("\r\n", "\n")


def _sent_at(msg: Message) -> str | None:
    value = header(msg, "Date")
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC).isoformat()
    except (ValueError, OverflowError):
        return None


def _language(msg: Message) -> str | None:
    match = _LANG.match(header(msg, "Content-Language") or "")
    return match.group(1).lower() if match else None


def _recipient(
    msg: Message, envelope_to: list[str] | None, addresses: Mapping[str, Mapping[str, Any]]
) -> str | None:
    ours = {canonical_email(a) for a in addresses}
    candidates = [a.strip().strip("<>") for a in envelope_to or []]
    for name in ("Delivered-To", "X-Original-To", "To", "Cc"):
        candidates.extend(a for _, a in _addresses(msg, name))
    return next((a for a in map(canonical_email, candidates) if a in ours), None)


_NOT_IN_ADDRESS = frozenset('<>()[],;:"\\')


def _valid_address(address: str) -> bool:
    """An address a reply can go to: ``local@domain``, at most 320 characters, without spaces,
    control characters or header punctuation. Letters beyond ASCII are fine: the listener offers
    SMTPUTF8 (RFC 6531), and ``jürgen@exämple.de`` is somebody, not an anonymous sender."""
    local, at, domain = address.partition("@")
    if not (at and local and domain and "@" not in domain and len(address) <= 320):
        return False
    return not any(ch.isspace() or ch < " " or ch in _NOT_IN_ADDRESS or "\ud800" <= ch <= "\udfff" for ch in address)


DEDUPE_DIGEST_CHARS = 16


def dedupe_key(message_id: str | None, from_address: str, sent_at: str | None, raw: bytes) -> str:
    """The ``channel_message_id`` of a mail, the key the core de-duplicates on: the Message-ID,
    a space, and the first 16 hex digits of a SHA-256 of the From address (lower-cased, as
    ``_addresses`` gives it) and the Date (``sent_at``).

    The Message-ID alone was not enough: scanners and PHP forms send every mail as
    ``<1@localhost>``, and a second resident's mail was answered 250 and dropped as a
    duplicate of the first. The Date tells apart the mails of a form that also sends each from
    the same address (its own). Both inputs are read from the mail's own headers, never from the
    envelope, so the same mail over SMTP, over IMAP or retried still gets the same key. The
    bare Message-ID stays the mail's thread key (``thread_keys``) for the replies that name it,
    and ``compose`` takes it out of this key again for outbound References. A mail without a
    Message-ID, or with one too long for the key (512 characters), is keyed by the SHA-256 of
    its bytes."""
    if message_id:
        material = f"{from_address}\n{sent_at or ''}".encode("utf-8", "surrogatepass")
        key = f"{message_id} {hashlib.sha256(material).hexdigest()[:DEDUPE_DIGEST_CHARS]}"
        if len(key) <= 512:
            return key
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def anonymous_address(channel_message_id: str) -> str:
    """The sender address of a mail that names nobody (no usable From, no envelope sender):
    unique to the mail, of the kind the core treats as unreachable (``anonymous``), as the
    phone channel does for a withheld number. Such mail used to be filed under one contact,
    ``unknown@invalid``, threaded together and acknowledged to that address."""
    return "anonymous:email-" + hashlib.sha256(channel_message_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _clip(value: str | None, limit: int) -> str | None:
    return None if value is None else value[:limit]


def parse_message(
    raw: bytes,
    *,
    envelope_from: str | None,
    envelope_to: list[str] | None,
    addresses: Mapping[str, Mapping[str, Any]],
    own_domain: str,
    trusted_authserv_ids: Collection[str] = (),
) -> dict[str, Any]:
    """The canonical inbound message for one raw mail (see ``parse_mail``)."""
    return parse_mail(
        read_message(raw), raw, envelope_from=envelope_from, envelope_to=envelope_to,
        addresses=addresses, own_domain=own_domain, trusted_authserv_ids=trusted_authserv_ids,
    ).inbound


@dataclasses.dataclass(frozen=True, slots=True)
class ParsedMail:
    """The canonical inbound message and the attachments it describes, in the same order
    (``inbound["attachments"][i]`` describes ``attachments[i]``)."""

    inbound: dict[str, Any]
    attachments: list[Attachment]


def parse_mail(
    msg: Message,
    raw: bytes,
    *,
    envelope_from: str | None,
    envelope_to: list[str] | None,
    addresses: Mapping[str, Mapping[str, Any]],
    own_domain: str,
    trusted_authserv_ids: Collection[str] = (),
) -> ParsedMail:
    """The canonical inbound message for a parsed mail, with the bytes of the attachments it
    describes, so the MIME tree is walked for attachments once.

    ``addresses`` maps our lower-cased addresses to ``{"unit": ..., "language": ...}``; the
    first of them found in the envelope, Delivered-To, To or Cc is the recipient and gives the
    unit hint. ``envelope_from`` is the SMTP MAIL FROM (``""`` for a null return path) or None
    when unknown. ``meta.bounce`` is set when the mail is a bounce of one of our messages.
    A trusted mail server's finding that the From domain failed DMARC (``trusted_authserv_ids``,
    see ``authentication``) flags the message ``unverified_sender``: the core then treats it as
    from someone who may not be who they say, as a web form's.
    """
    flags: list[str] = []
    message_id = next(iter(message_ids(header(msg, "Message-ID"))), None)
    senders = _addresses(msg, "From")
    sent_at = _sent_at(msg)
    channel_message_id = dedupe_key(message_id, senders[0][1] if senders else "", sent_at, raw)

    reply_to = _addresses(msg, "Reply-To")
    display_name, address = senders[0] if senders else ("", "")
    relayed_for = relayed_sender(msg)
    if relayed_for is not None:
        # A portal's noreply sender relaying a person's message: the person is the sender,
        # acknowledged and answered at their own address.
        display_name, address = next(((n, a) for n, a in reply_to if a == relayed_for), ("", relayed_for))
    if not _valid_address(address):
        fallback = (envelope_from or "").strip().strip("<>").lower()
        address = fallback if _valid_address(fallback) else ""
    # One form of the address (its domain as IDNA writes it in Unicode), as the core keeps it:
    # the rate limit of acknowledgements counts info@xn--mller-bau-q9a.de and info@müller-bau.de
    # as the one mailbox they are.
    address = canonical_email(address) if address else ""
    sender: dict[str, Any] = {"kind": "email", "address": address[:320], "display_name": _clip(display_name or None, 200)}
    if not address:
        sender.update(kind="anonymous", address=anonymous_address(channel_message_id))
        flags.append("no_sender")

    recipient = _recipient(msg, envelope_to, addresses)
    entry = addresses.get(recipient, {}) if recipient else {}
    # The core guesses the language from the text; the mail's Content-Language, else the
    # address's language, is only the default for a text that does not tell. The address's
    # decided (an English mail to a German address was answered in German), and so would the
    # header: mail programs set up in English send "en-US" with a German text.
    language = _language(msg) or entry.get("language")

    defects = list(getattr(msg, "defects", []) or [])
    too_deep = any(isinstance(d, MimeTooDeepDefect) for d in defects)
    too_many = any(isinstance(d, MimeTooManyEntitiesDefect) for d in defects)
    try:
        leaves, parts_left_out = _leaves(msg)
    except Exception:  # noqa: BLE001
        leaves, parts_left_out = [msg], False
    try:
        body, from_html, cut = _body(msg, leaves)
    except Exception:  # noqa: BLE001
        body, from_html, cut = "", False, False
    found_attachments = _attachments_safe(msg, leaves)
    if not body.strip() and (too_deep or too_many or not found_attachments) and raw:
        body = _raw_body_text(raw)
        flags.append("malformed")
    if too_deep:
        flags.append("mime_too_deep")
    if parts_left_out or too_many:
        flags.append("mime_too_many_parts")
    if cut or len(body) > MAX_TEXT:
        body = body[:MAX_TEXT]
        flags.append("text_truncated")
    text, quoted, signature = split_reply(body)

    refs: list[str] = []
    for name in ("In-Reply-To", "References"):
        for mid in message_ids(header(msg, name)):
            if mid not in refs and mid != message_id:
                refs.append(mid)

    meta: dict[str, Any] = {}
    if quoted:
        meta["quoted"] = quoted[:MAX_META_TEXT]
    if signature:
        meta["signature"] = signature[:MAX_META_TEXT]
    if from_html:
        meta["html"] = True
    described = found_attachments[:MAX_ATTACHMENTS]
    if len(found_attachments) > MAX_ATTACHMENTS:
        meta["attachments_omitted"] = len(found_attachments) - MAX_ATTACHMENTS
    if reply_to and reply_to[0][1] != address:
        meta["reply_to"] = reply_to[0][1]
    if relayed_for is not None:
        # Whoever filled in the portal's form typed that address: it vouches for nobody, as our
        # own web form does not.
        flags.append("unverified_sender")
        if senders:
            meta["relayed_by"] = senders[0][1]
    if defects:
        meta["mime_defects"] = len(defects)
    failed = failed_check(
        (str(v) for k, v in msg.raw_items() if k.lower() == "authentication-results"), trusted_authserv_ids)
    if failed:
        if "unverified_sender" not in flags:
            flags.append("unverified_sender")
        meta["authentication"] = failed

    suppressed = classify(msg, envelope_from=envelope_from, own_domain=own_domain, relayed=relayed_for is not None)
    bounce = parse_bounce(msg)
    if bounce is not None:
        meta["bounce"] = bounce.as_dict()
        # The bounce belongs with the message it reports, not in a case of its own.
        reported = bounce.original_message_id
        if reported and reported != message_id:
            refs = [reported, *(r for r in refs if r != reported)]
        suppressed = ("bounce", f"bounce for {bounce.original_message_id or 'an unknown message'}")
    if suppressed:
        meta["ack_suppressed_detail"] = suppressed[1][:500]

    selected = {}
    for name in SELECTED_HEADERS:
        value = header(msg, name)
        if value is not None:
            selected[name] = value[:2000]

    inbound: dict[str, Any] = {
        "channel": CHANNEL,
        "channel_message_id": channel_message_id,
        "kind": "message",
        "sender": sender,
        "recipient": recipient,
        "sent_at": sent_at,
        "subject": _clip(header(msg, "Subject"), 1000),
        "text": text[:MAX_TEXT] if text else None,
        "language": None,
        "default_language": language if language and re.fullmatch(r"[a-z]{2}", language) else None,
        "unit_hint": entry.get("unit"),
        "thread": {"refs": refs[:MAX_REFS]},
        "thread_keys": [message_id] if message_id else [],
        "ack_suppressed": suppressed[0] if suppressed else None,
        "flags": flags,
        "attachments": [a.describe() for a in described],
        "meta": meta,
        "raw": {"message_id": message_id, "size": len(raw), "headers": selected},
    }
    return ParsedMail(inbound, described)


def _attachments_safe(msg: Message, leaves: list[Message]) -> list[Attachment]:
    """``_attachments`` that returns an empty list instead of raising on a broken structure."""
    try:
        return _attachments(msg, leaves)
    except Exception:  # noqa: BLE001
        return []
