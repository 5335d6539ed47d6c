"""The WhatsApp channel: webhook routes in, Graph API messages out.

The POST handler only verifies, parses, hands over and answers: the signature is checked on the
raw body before anything is parsed, and 200 goes back only after every message and status of
the body has been committed by the core, because Meta redelivers anything not answered 200.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web

from router.hookspecs import (
    BodyTooLarge,
    Capabilities,
    Channel,
    DeliveryUpdate,
    InvalidMessage,
    OutboundMessage,
    PermanentDeliveryError,
    RetryableDeliveryError,
    SendResult,
    json_error,
    parse_retry_after,
    read_limited_body,
    read_provider_json,
)

from . import graph, media
from .errors import is_settings_code
from .parse import parse_webhook
from .settings import BusinessNumber, WhatsAppSettings
from .signature import verify_signature

SIGNATURE_HEADER = "X-Hub-Signature-256"
# Webhook bodies being ingested at once before new ones are refused with 503 and Retry-After.
# At capacity (about 1,300 bodies/s on one core) 256 in flight already means about 200 ms of
# queueing; beyond that every extra body only adds latency for all of them (measured at a fixed
# 2,000/s: p99 of many seconds, and answers so late that the accepted rate fell far below
# capacity). Meta redelivers anything not answered 2xx, so a refusal loses nothing, and the
# refusal itself costs little: it comes before the body is parsed (after it is read and its
# signature checked, a few microseconds, so that slow or forged senders cannot fill the slots).
MAX_IN_FLIGHT = 256
RETRY_AFTER_SECONDS = 1
# The parts of long texts Meta took, remembered for this many outbox rows at most and this long
# after the last part taken: a reply's retries after a definite refusal come within minutes,
# and beyond 24 hours free text cannot go anyway (the template goes instead, in one message).
# Some hundred bytes a row: 10,000 rows is a few megabytes at most.
MAX_REMEMBERED_SENDS = 10_000
REMEMBER_PARTS_FOR = timedelta(hours=25)


class AcceptedParts:
    """Which parts of a long text Meta took, by the outbox row's idempotency key: for each, the
    fingerprint of the part's payload and the id Meta gave it, in order.

    In memory, bounded in size (the oldest row goes first) and age. After a restart, or with
    the retry claimed by another instance, it is empty and the text goes again from its first
    part: a part the person reads twice is the lesser evil beside one they never get."""

    def __init__(self, max_sends: int = MAX_REMEMBERED_SENDS, max_age: timedelta = REMEMBER_PARTS_FOR) -> None:
        self.max_sends = max_sends
        self.max_age = max_age
        self._sends: OrderedDict[str, tuple[datetime, list[tuple[str, str]]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sends)

    def taken(self, key: str, now: datetime) -> list[tuple[str, str]]:
        """The ``(fingerprint, provider id)`` of each part taken so far, first part first."""
        self._expire(now)
        entry = self._sends.get(key)
        return list(entry[1]) if entry else []

    def resume(self, key: str, fingerprints: list[str], now: datetime) -> list[str]:
        """The provider ids of the first parts taken, as far as they are the parts of the text
        now (``fingerprints``, first part first): a retry goes on after them."""
        ids = []
        for (fingerprint, provider_id), expected in zip(self.taken(key, now), fingerprints, strict=False):
            if fingerprint != expected:
                break
            ids.append(provider_id)
        return ids

    def add(self, key: str, part: int, fingerprint: str, provider_id: str, now: datetime) -> None:
        """Meta took part ``part`` (from 1) of the text sent under ``key``; what was remembered
        for that part and after it is replaced."""
        self._expire(now)
        _, parts = self._sends.pop(key, (now, []))
        parts = [*parts[: part - 1], (fingerprint, provider_id)]
        self._sends[key] = (now, parts)  # the most recently used last
        while len(self._sends) > self.max_sends:
            self._sends.popitem(last=False)

    def _expire(self, now: datetime) -> None:
        while self._sends:
            key, (last, _) = next(iter(self._sends.items()))
            if now - last < self.max_age:
                return
            del self._sends[key]


def _fingerprint(phone_number_id: str, payload: dict[str, Any]) -> str:
    """What one part's payload is, from which number: a remembered part counts only for the
    same payload (not for the template the retry may have become)."""
    return hashlib.sha256(json.dumps([phone_number_id, payload], sort_keys=True).encode()).hexdigest()[:32]


class WhatsAppChannel(Channel):
    """WhatsApp Business Cloud API: any WhatsApp user can write to any configured number."""

    name = "whatsapp"
    capabilities = Capabilities(
        can_reply=True,
        identity_kinds=graph.ADDRESS_KINDS,
        push=True,
        reply_window=timedelta(hours=24),
        max_text_length=graph.MAX_TEXT_LENGTH,
        delivery_receipts=True,
        threads_by_sender=True,
    )

    def __init__(self, settings: WhatsAppSettings) -> None:
        self.settings = settings
        # Meta echoes biz_opaque_callback_data (the idempotency key) in every status.
        wait = timedelta(seconds=settings.status_wait) if settings.status_wait else None
        self.capabilities = dataclasses.replace(type(self).capabilities, status_wait=wait)
        self.in_flight = 0
        self.max_in_flight = MAX_IN_FLIGHT
        self.refused = 0
        self.accepted_parts = AcceptedParts()

    def routes(self) -> list[web.AbstractRouteDef]:
        return [
            web.get("/webhook", self.verify_subscription, allow_head=False),
            web.post("/webhook", self.receive),
        ]

    # ---------------------------------------------------------------------------------------
    # Inbound
    # ---------------------------------------------------------------------------------------

    async def verify_subscription(self, request: web.Request) -> web.Response:
        """Meta's subscription check: echo ``hub.challenge`` when the verify token matches."""
        query = request.query
        token = query.get("hub.verify_token", "")
        challenge = query.get("hub.challenge")
        if (
            query.get("hub.mode") == "subscribe"
            and challenge is not None
            and hmac.compare_digest(token.encode(), self.settings.verify_token.encode())
        ):
            return web.Response(text=challenge, content_type="text/plain")
        raise json_error(web.HTTPForbidden, "forbidden", "verification token does not match")

    async def receive(self, request: web.Request) -> web.Response:
        """A webhook body: verify, parse, ingest every message and status, then answer 200.

        Beyond ``MAX_IN_FLIGHT`` genuine bodies in work at once, answer 503 at once
        (backpressure). A body counts once it has arrived and its signature holds: a sender
        that trickles its body or forges it holds no slot, or 256 such connections would keep
        every real webhook out."""
        try:
            body = await read_limited_body(request, self.settings.max_body_bytes)
        except BodyTooLarge as exc:
            raise json_error(
                web.HTTPRequestEntityTooLarge, "body_too_large", f"body exceeds {exc.limit} bytes",
                max_size=exc.limit, actual_size=exc.size,
            ) from None
        if not verify_signature(body, request.headers.get(SIGNATURE_HEADER), self.settings.app_secret):
            raise json_error(
                web.HTTPUnauthorized, "invalid_signature", f"missing or wrong {SIGNATURE_HEADER} header"
            )
        if self.in_flight >= self.max_in_flight:
            self.refused += 1
            raise json_error(
                web.HTTPServiceUnavailable, "overloaded", "too many webhooks in progress; retry later",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.in_flight += 1
        try:
            return await self._ingest_body(body)
        finally:
            self.in_flight -= 1

    async def _ingest_body(self, body: bytes) -> web.Response:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # bad UTF-8 or JSON, or nesting too deep
            raise json_error(web.HTTPBadRequest, "invalid_json", "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise json_error(web.HTTPBadRequest, "invalid_json", "body is not a JSON object")

        parsed = parse_webhook(data)
        for note in parsed.notes:
            self.context.log.info("webhook: %s", note)
        for error in parsed.errors:
            self.context.log.warning("webhook error entry: %s", error)
            await self.context.record_event("provider_error", error)
        for kind, event in parsed.events:
            await self.context.record_event(kind, event)
        if self.settings.download_media:
            await media.attach_downloads(
                self.context.http, self.settings, self.context.data_dir, parsed.messages, self.context.log
            )
        refused = []
        for message in parsed.messages:
            self._apply_number_defaults(message)
            try:
                await self.context.ingest(message)
            except InvalidMessage as exc:
                # Answering 400 would make Meta resend the whole body for days, and the messages
                # and statuses after this one would never be read: it is kept as an event instead.
                entry = {"id": message.get("channel_message_id"), "field": exc.path or "message", "error": exc.message}
                self.context.log.warning("webhook message refused: %s", entry)
                await self.context.record_event("invalid_message", entry)
                refused.append(entry)
        for update in parsed.statuses:
            self._log_failure(update)
            await self.context.record_delivery(update)
        answer: dict[str, Any] = {"messages": len(parsed.messages) - len(refused), "statuses": len(parsed.statuses)}
        if refused:
            answer["refused"] = refused
        return web.json_response(answer)

    def _log_failure(self, update: DeliveryUpdate) -> None:
        """Say where operators look what the core cannot show: a failure of our own account or
        credentials, and a failure of an earlier part of a long answer (its status names no
        message: the answer is counted by its last part)."""
        if update.status != "failed":
            return
        if is_settings_code(update.error_code):
            self.context.log.error(
                "Meta refused our WhatsApp account or credentials (error %s: %s); check the channel's settings",
                update.error_code, update.error_title or update.error_detail or "no details",
            )
        elif graph.is_earlier_part(update.idempotency_key):
            self.context.log.warning(
                "an earlier part of a long WhatsApp answer failed (%s, error %s: %s); the answer counts by its last part",
                update.idempotency_key, update.error_code, update.error_title or update.error_detail or "no details",
            )

    def _apply_number_defaults(self, message: dict[str, Any]) -> None:
        """The business number written to supplies the unit hint, and the language when the
        message has no text to tell it from (a location, a photo without caption).

        A message with text is left to the core's language guess, so an English text to a
        German number is acknowledged in English: the acknowledgement goes out in the sender's
        language, and the number's language is only the default.
        """
        number = self.settings.number(message.get("recipient"))
        if number is None:
            return
        if number.unit and not message.get("unit_hint"):
            message["unit_hint"] = number.unit
        if number.language and not message.get("language") and not message.get("text"):
            message["language"] = number.language

    # ---------------------------------------------------------------------------------------
    # Outbound
    # ---------------------------------------------------------------------------------------

    async def send(self, message: OutboundMessage) -> SendResult:
        """Free text inside the 24-hour window, else the approved template; typed errors. A
        phone number or, for a person whose number Meta does not share, their BSUID."""
        if message.to_kind not in graph.ADDRESS_KINDS:
            raise PermanentDeliveryError(f"cannot send WhatsApp messages to a {message.to_kind!r} address", address_failed=False)
        number = self.settings.number(message.recipient) or self.settings.numbers[0]
        now = self.context.clock.now()
        # The window counts from when the person sent their latest message, by Meta's clock: one
        # Meta delivered late (it retries webhooks for days) opened less of it than its arrival says.
        written = message.last_inbound_sent_at or message.last_inbound_at
        use_template = message.hint == "template" or not graph.within_window(written, now)
        if use_template:
            payloads = [self._template_payload(message, number)]
        else:
            payloads = graph.text_payloads(message.to, message.text, to_kind=message.to_kind)
            if not payloads:
                raise PermanentDeliveryError("the message has no text", code="empty_text", address_failed=False)
        # A long text goes as several messages, posted in order, each once the one before was
        # taken. The parts Meta took (it answered with their id) are remembered under the
        # outbox row's key, so that a retry after a later part failed resumes with the first
        # part that has no id instead of sending the person the beginning again.
        for part, payload in enumerate(payloads, start=1):
            payload["biz_opaque_callback_data"] = graph.part_key(message.idempotency_key, part, len(payloads))
        # Only a text of several parts needs remembering (a fingerprint cost every acknowledgement
        # about 3 % of its webhook's instructions, measured by callgrind).
        fingerprints = [_fingerprint(number.phone_number_id, p) for p in payloads] if len(payloads) > 1 else None
        provider_ids = self.accepted_parts.resume(message.idempotency_key, fingerprints, now) if fingerprints else []
        for part in range(len(provider_ids) + 1, len(payloads) + 1):
            try:
                provider_id = await self._post(number.phone_number_id, payloads[part - 1])
            except RetryableDeliveryError as exc:
                if part < len(payloads):  # the last part, whose status would tell, never went
                    exc.outcome_unknown = False
                raise
            if not provider_id:
                # Meta took it (a 2xx) without naming its id (cut short, changed by a proxy):
                # posted again, the person would read it twice. A part is taken all the same,
                # and the last part's status, which carries our key, gives the message its id.
                self.context.log.warning(
                    "Meta took part %d of %d of the WhatsApp message of outbox row %s but named no id: not sent again",
                    part, len(payloads), message.outbox_id)
            provider_ids.append(provider_id)
            if fingerprints:
                self.accepted_parts.add(message.idempotency_key, part, fingerprints[part - 1], provider_id, now)
        # The last part's id is the message's (empty: taken without one): its delivery means the
        # whole answer arrived, and its failure is the message's. The first part's id is kept as
        # a thread key, so that a reply quoting the beginning of the answer finds its conversation.
        first = provider_ids[0] if len(provider_ids) > 1 and provider_ids[0] else None
        return SendResult(provider_id=provider_ids[-1], thread_key=first)

    def _template_payload(self, message: OutboundMessage, number: BusinessNumber) -> dict[str, Any]:
        template = self.settings.template
        if template is None:
            raise PermanentDeliveryError(
                "outside the 24-hour window and no WhatsApp template is configured", code="no_template", address_failed=False
            )
        # The conversation's language if the template has it, else the number's, else the first.
        language, code = template.choose(message.language, number.language)
        return graph.template_payload(
            message.to,
            to_kind=message.to_kind,
            name=template.name,
            language_code=code,
            case_reference=message.case_reference,
            answer=message.text,
            prompt=template.prompt(language),
            max_parameter_chars=template.max_parameter_chars,
        )

    async def _post(self, phone_number_id: str, payload: dict[str, Any]) -> str:
        """POST one message payload; its provider id (empty when Meta took it, a 2xx, but its
        answer named none), or the typed error for the answer."""
        settings = self.settings
        url = f"{settings.graph_url}/{settings.api_version}/{phone_number_id}/messages"
        headers = {"Authorization": f"Bearer {settings.access_token}"}
        try:
            async with self.context.http.post(
                url, json=payload, headers=headers,
                # A connect of its own, shorter limit: under ``total`` alone a connection that
                # never opened timed out as an unanswered request, as if Meta might have taken it.
                timeout=aiohttp.ClientTimeout(total=settings.timeout, sock_connect=settings.timeout / 2),
            ) as response:
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                body = await read_provider_json(response)
        except aiohttp.ConnectionTimeoutError:  # no connection in time: nothing was sent
            raise RetryableDeliveryError("Graph API could not be reached in time", code="connection") from None
        except TimeoutError:
            raise RetryableDeliveryError("Graph API did not answer in time", code="timeout", outcome_unknown=True) from None
        except aiohttp.ClientConnectorError as exc:  # no connection (refused, DNS, TLS): nothing was sent
            raise RetryableDeliveryError(f"Graph API unreachable: {exc}", code="connection") from None
        except aiohttp.ClientError as exc:  # the connection broke, perhaps after Meta took the request
            raise RetryableDeliveryError(f"Graph API unreachable: {exc}", code="connection", outcome_unknown=True) from None
        if 200 <= status < 300:
            # A 2xx is Meta taking the message, also when its answer cannot be read (cut short,
            # changed by a proxy): the message is on its way, and its statuses carry our key. As
            # a permanent failure the person was flagged for a call-back; as a retry, a status
            # slower than ``status_wait`` sent it twice.
            return graph.provider_message_id(body) or ""
        raise graph.classify_error(status, body if isinstance(body, dict) else None, retry_after=retry_after)
