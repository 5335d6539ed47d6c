"""The e-mail channel: an SMTP listener and an HTTP route for raw mail in, a relay out.

Every inbound path (SMTP, HTTP, IMAP) goes through ``EmailChannel.receive``: parse, keep
the original bytes, hand the message to the core, and only then answer the sender, so what was
accepted is committed. Bounces also mark the outbound message they report as failed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

from router.files import write_durably
from router.hookspecs import (
    NOT_CONFIGURED,
    BodyTooLarge,
    Capabilities,
    Channel,
    DeliveryUpdate,
    IngestResult,
    InvalidMessage,
    OutboundMessage,
    PermanentDeliveryError,
    RetryableDeliveryError,
    SendResult,
    StorageUnavailable,
    json_error,
    read_limited_body,
)
from router.identity import canonical_email

from .addresses import ascii_address
from .compose import build_mail
from .imap import ImapPoller, imap_mailboxes
from .limits import MAX_RECIPIENTS
from .loops import AckRateLimiter
from .parse import Attachment, ParsedMail, parse_mail, read_message
from .settings import EmailSettings


class EmailChannel(Channel):
    """Mail in over SMTP (and ``POST /channels/email/inbound``), out through a relay."""

    name = "email"
    capabilities = Capabilities(identity_kinds=("email",), push=True)

    def __init__(self, settings: EmailSettings) -> None:
        self.settings = settings
        self.limiter = AckRateLimiter(settings.ack_per_hour) if settings.ack_per_hour > 0 else None
        self.smtp_port: int | None = None
        self.imap_mailboxes = imap_mailboxes(settings.imap)
        self.imap_pollers: list[ImapPoller] = []
        self._tls: ssl.SSLContext | None = None
        self._tls_stamp: tuple[int, int] | None = None

    # -- inbound --------------------------------------------------------------------------

    async def receive(self, raw: bytes, *, envelope_from: str | None, envelope_to: list[str] | None) -> IngestResult:
        """Hand one raw mail to the core; returns after the commit.

        Raises ``InvalidMessage`` when the core refuses the message; other errors mean "try
        again later" to the caller.
        """
        # Parsing is bounded and linear (plugins/email/limits.py), but a mail of 25 MiB full of
        # tiny parts or headers still costs seconds of CPU: not on the event loop.
        parsed = await asyncio.to_thread(self._parse, raw, envelope_from, envelope_to)
        inbound = parsed.inbound
        sender = inbound["sender"]["address"]
        now = self.context.clock.now()
        if not inbound["ack_suppressed"] and self.limiter and not self.limiter.allowed(sender, now):
            inbound["ack_suppressed"] = "rate-limit"
        if self.settings.store_files:
            await asyncio.to_thread(self._store_files, raw, inbound, parsed.attachments)
        result = await self.context.ingest(inbound)
        if result.acknowledged and not result.duplicate and self.limiter:
            self.limiter.record(sender, now)
        bounce = inbound["meta"].get("bounce")
        if bounce and bounce.get("original_message_id"):
            await self.context.record_delivery(
                DeliveryUpdate(
                    provider_id=bounce["original_message_id"],
                    status="failed",
                    at=now,
                    error_code=bounce.get("status"),
                    error_detail=bounce.get("reason"),
                    permanent=bool(bounce.get("permanent", True)),
                    raw={"recipient": bounce.get("recipient"),
                         "bounce_message_id": inbound["raw"]["message_id"] or inbound["channel_message_id"]},
                )
            )
        return result

    def _parse(self, raw: bytes, envelope_from: str | None, envelope_to: list[str] | None) -> ParsedMail:
        """``parse_mail`` with this channel's addresses and domain (runs in a worker thread)."""
        return parse_mail(
            read_message(raw), raw, envelope_from=envelope_from, envelope_to=envelope_to,
            addresses=self.settings.addresses, own_domain=self.settings.domain,
            trusted_authserv_ids=self.settings.trusted_authserv_ids,
        )

    def _store_files(self, raw: bytes, inbound: dict[str, Any], found: list[Attachment]) -> None:
        """Keep the original mail and the attachments under the data folder, named by content
        hash (so names from the mail never become paths, and a retry writes nothing new).
        ``found`` are the attachments ``inbound["attachments"]`` describes, in its order."""
        base = Path(self.context.data_dir)
        raw_rel = f"email/raw/{hashlib.sha256(raw).hexdigest()}.eml"
        _write_once(base / raw_rel, raw)
        inbound["raw"]["path"] = raw_rel
        for described, attachment in zip(inbound["attachments"], found, strict=True):
            rel = f"email/attachments/{attachment.sha256}"
            _write_once(base / rel, attachment.data)
            described["path"] = rel

    # -- SMTP listener ---------------------------------------------------------------------

    def services(self) -> list[Any]:
        """The SMTP listener (unless ``listen = false``) and one poller per IMAP mailbox."""
        found: list[Any] = [self._smtp_service] if self.settings.listen else []
        state_dir = Path(self.context.data_dir) / "email" / "imap"
        self.imap_pollers = [
            ImapPoller(box, self._receive_imported, state_dir, self.context.log,
                       on_set_aside=functools.partial(self.context.record_event, "unprocessable_mail"),
                       max_message_bytes=self.settings.max_message_bytes)
            for box in self.imap_mailboxes
        ]
        found.extend(poller.service for poller in self.imap_pollers)
        return found

    async def _receive_imported(self, raw: bytes, envelope_to: list[str] | None) -> None:
        """A mail from an IMAP mailbox. One the core refuses is logged and skipped (it would
        be refused again on every poll); other errors stop the import until the next try, and
        after ``max_attempts`` the poller sets the mail aside as unprocessable."""
        try:
            await self.receive(raw, envelope_from=None, envelope_to=envelope_to)
        except InvalidMessage as exc:
            self.context.log.warning("IMAP: skipped a mail the core refused: %s %s", exc.path, exc.message)

    def _tls_files_stamp(self) -> tuple[int, int] | None:
        """When ``tls_cert`` and ``tls_key`` last changed; ``None`` while one is unreadable."""
        cert, key = self.settings.tls_cert, self.settings.tls_key
        if not (cert and key):
            return None
        try:
            return (os.stat(cert).st_mtime_ns, os.stat(key).st_mtime_ns)
        except OSError:
            return None

    def _load_tls_context(self) -> ssl.SSLContext | None:
        """The listener's STARTTLS context from ``tls_cert``/``tls_key``; raises when the files
        cannot be read or do not fit, so a broken certificate stops the start."""
        if not (self.settings.tls_cert and self.settings.tls_key):
            return None
        stamp = self._tls_files_stamp()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        self._tls, self._tls_stamp = context, stamp
        return context

    def _tls_context(self) -> ssl.SSLContext | None:
        """The context for a new connection: loaded once at start, loaded again when the files
        change (a renewed certificate needs no restart). If the new files cannot be used, the
        previous certificate stays in use and the problem is logged."""
        if self._tls is None:
            return None
        stamp = self._tls_files_stamp()
        if stamp is not None and stamp != self._tls_stamp:
            try:
                self._load_tls_context()
            except (OSError, ssl.SSLError) as exc:
                self._tls_stamp = stamp  # log once per change, not once per connection
                self.context.log.warning(
                    "SMTP listener: cannot load the changed certificate, keeping the old one: %s", exc
                )
        return self._tls

    def smtp_factory(self) -> SMTP:
        """One aiosmtpd protocol instance per connection, on the running loop."""
        return SMTP(
            SMTPHandler(self),
            data_size_limit=self.settings.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.settings.hostname or self.settings.domain,
            tls_context=self._tls_context(),
            loop=asyncio.get_running_loop(),
        )

    async def _smtp_service(self) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load_tls_context)
        server = await loop.create_server(self.smtp_factory, self.settings.listen_host, self.settings.listen_port)
        self.smtp_port = server.sockets[0].getsockname()[1]
        self.context.log.info("SMTP listener on %s:%s", self.settings.listen_host, self.smtp_port)
        try:
            yield
        finally:
            server.close()
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except TimeoutError:
                self.context.log.warning("SMTP listener: sessions still open at shutdown")

    # -- HTTP route ------------------------------------------------------------------------

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.post("/inbound", self._inbound)]

    async def _inbound(self, request: web.Request) -> web.Response:
        """Raw RFC 5322 from a gateway, authenticated by ``Authorization: Bearer <secret>``.

        Optional ``X-Envelope-From`` / ``X-Envelope-To`` headers carry the gateway's envelope.
        """
        secret = self.settings.inbound_secret
        if not secret:
            raise json_error(web.HTTPNotFound, "not_enabled", "inbound mail over HTTP is not configured")
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, f"Bearer {secret}".encode()):
            raise json_error(web.HTTPUnauthorized, "unauthorized", "missing or wrong bearer token",
                         headers={"WWW-Authenticate": "Bearer"})
        limit = self.settings.max_message_bytes
        try:
            raw = await read_limited_body(request, limit)
        except BodyTooLarge as exc:
            raise json_error(web.HTTPRequestEntityTooLarge, "too_large", f"mail larger than {limit} bytes",
                             max_size=limit, actual_size=exc.size) from None
        if not raw.strip():
            raise json_error(web.HTTPBadRequest, "empty", "the body must be a raw RFC 5322 message")
        envelope_to = [a.strip() for a in request.headers.get("X-Envelope-To", "").split(",") if a.strip()]
        try:
            result = await self.receive(
                raw, envelope_from=request.headers.get("X-Envelope-From"), envelope_to=envelope_to or None
            )
        except InvalidMessage as exc:
            raise json_error(web.HTTPBadRequest, "invalid_message", f"{exc.path}: {exc.message}" if exc.path else exc.message) from None
        return web.json_response(
            {
                "message_id": result.message_id,
                "conversation_id": result.conversation_id,
                "case_reference": result.case_reference,
                "duplicate": result.duplicate,
            },
            status=200 if result.duplicate else 202,
        )

    # -- outbound --------------------------------------------------------------------------

    def sender_for(self, message: OutboundMessage) -> str:
        """Our address the mail comes from: the one the person wrote to, else ``from_address``.

        It came from the unit's own address (a contractor's ``dispo@tiefbau-muster.example``):
        a resident's answer to it went to the unit's mailbox and never joined the case, and the
        mail went through our relay under a domain that is not ours. The unit's name stays the
        sender's name. A unit's notification comes from ``from_address`` too, with ``Reply-To``
        its own address (``reply_to_for``)."""
        if message.kind == "notification":
            return self.settings.from_address
        recipient = canonical_email(message.recipient or "")
        return recipient if recipient in self.settings.addresses else self.settings.from_address

    def reply_to_for(self, message: OutboundMessage) -> str | None:
        """Where an answer to the mail goes, when not to its sender: a unit's answer to its
        notification goes to its own mailbox, not into the service as a new case opened by the
        unit (which got an acknowledgement)."""
        return message.unit_email if message.kind == "notification" else None

    async def send(self, message: OutboundMessage) -> SendResult:
        """Deliver through the relay. 4xx, timeouts and connection errors are retryable; 5xx
        refusals are permanent. Without a relay the mail stays queued.

        The mail goes to the address with its domain in ASCII where its local part allows
        (``ascii_address``); aiosmtplib asks for SMTPUTF8 where an address still needs it
        (``jürgen@…``), and one through a relay without it is a permanent failure of this
        message, not of the address (see ``_utf8_refused``)."""
        settings = self.settings
        if not settings.relay_host:
            raise RetryableDeliveryError("no relay configured", code=NOT_CONFIGURED)
        sender = ascii_address(self.sender_for(message))
        recipient = ascii_address(message.to)
        notification = message.kind == "notification"
        mail = build_mail(
            message,
            from_addr=sender,
            # A unit is told about its case by the service, not by itself.
            from_name=settings.from_name if notification else message.unit_name or settings.from_name,
            domain=settings.domain,
            now=self.context.clock.now(),
            reply_to=self.reply_to_for(message),
        )
        message_id = str(mail["Message-ID"])
        try:
            await asyncio.wait_for(
                aiosmtplib.send(
                    mail,
                    sender=sender,
                    recipients=[recipient],
                    hostname=settings.relay_host,
                    port=settings.relay_port,
                    username=settings.relay_user,
                    password=settings.relay_password,
                    use_tls=settings.relay_tls == "tls",
                    start_tls=True if settings.relay_tls == "starttls" else False,
                    timeout=settings.relay_timeout,
                ),
                timeout=settings.relay_timeout * 4,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            if codes and all(400 <= c < 500 for c in codes):
                raise RetryableDeliveryError(detail, code=str(codes[0])) from exc
            raise PermanentDeliveryError(detail, code=str(codes[0]) if codes else None) from exc
        except aiosmtplib.SMTPNotSupported as exc:
            if "smtputf8" in str(exc).lower():
                raise _utf8_refused(recipient, exc) from exc
            raise RetryableDeliveryError(f"relay unreachable: {exc}", code="relay_unreachable") from exc
        except aiosmtplib.SMTPAuthenticationError as exc:
            # Our credentials are wrong: not the recipient's fault, so keep the mail queued.
            raise RetryableDeliveryError(f"relay authentication failed: {exc.code} {exc.message}", code="relay_auth") from exc
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                raise RetryableDeliveryError(f"{exc.code} {exc.message}", code=str(exc.code)) from exc
            if exc.code >= 500:
                raise PermanentDeliveryError(f"{exc.code} {exc.message}", code=str(exc.code)) from exc
            raise RetryableDeliveryError(f"{exc.code} {exc.message}", code=str(exc.code)) from exc
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise RetryableDeliveryError(f"relay unreachable: {exc}", code="relay_unreachable") from exc
        return SendResult(provider_id=message_id, thread_key=message_id)


def _utf8_refused(recipient: str, exc: Exception) -> PermanentDeliveryError:
    """The relay does not offer SMTPUTF8 (RFC 6531), and ``recipient`` has no ASCII form (its
    local part is beyond ASCII). Retrying changes nothing until the relay is changed, so the
    outbox stops and tries the contact's other identities (or flags a call-back) at once;
    before, this was "relay unreachable", retried for a day.

    ``address_failed`` is False: the address is fine, our relay cannot carry it. Marked failed,
    the contact's address would look wrong to staff and be passed over by later replies even
    after the relay learnt SMTPUTF8; as it is, each later message to it fails at once in the
    same way and falls back the same way."""
    return PermanentDeliveryError(
        f"the relay does not support SMTPUTF8, needed for {recipient}: {exc}", code="smtputf8_not_supported",
        address_failed=False,
    )


class SMTPHandler:
    """aiosmtpd handler: refuse unknown recipients at RCPT, and more than ``MAX_RECIPIENTS``;
    answer 250 only after the commit."""

    def __init__(self, channel: EmailChannel) -> None:
        self.channel = channel

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]) -> str:
        if canonical_email(address.strip().strip("<>")) not in self.channel.settings.addresses:
            return f"550 5.1.1 <{address}>: recipient unknown here"
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            # RFC 5321 4.5.3.1.10: the client sends the others in another transaction
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        try:
            await self.channel.receive(raw, envelope_from=envelope.mail_from or "", envelope_to=list(envelope.rcpt_tos))
        except InvalidMessage as exc:
            self.channel.context.log.warning("refused mail: %s %s", exc.path, exc.message)
            return "554 5.6.0 message refused: " + " ".join(exc.message.split())[:200]
        except StorageUnavailable as exc:  # the store logged the cause; the sender retries
            self.channel.context.log.warning("could not store mail (%s); answered 451", exc)
            return "451 4.3.0 temporary failure, please try again later"
        except Exception:  # noqa: BLE001 - the sender keeps the mail and retries; we log the cause
            self.channel.context.log.exception("could not store mail; answered 451")
            return "451 4.3.0 temporary failure, please try again later"
        return "250 OK"


def _write_once(path: Path, data: bytes) -> None:
    """Named by content: a file that exists already holds these bytes."""
    if not path.exists():
        write_durably(path, data)
