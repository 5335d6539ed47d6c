"""The phone channel: Twilio voice webhooks (menu, forward, voicemail, missed calls), SMS in and
out, and vendor-neutral CTI events from any PBX.

Each handler verifies the request, parses it with the pure functions in ``parse``, hands the
message to the core and answers with TwiML. A call is ingested once the caller chose a topic, so
the case reference and the responsible unit are known before the caller is forwarded or asked
for a voicemail.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from urllib.parse import urlencode, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web

from router.hookspecs import (
    Capabilities,
    Channel,
    ChannelContext,
    IngestResult,
    InvalidMessage,
    OutboundMessage,
    PermanentDeliveryError,
    SendResult,
    StorageUnavailable,
    json_error,
)

from . import parse, twiml
from .calls import CallLog
from .numbers import is_mobile, to_e164
from .settings import PhoneSettings
from .signature import HEADER, verify
from .sms import send_sms, shorten_sms

MOBILE_ONLY_KINDS = frozenset({"callback_sms"})
"""Outbound kinds that go by SMS to mobile numbers only (a landline cannot show them). Not the
acknowledgement: a call from a landline is not acknowledged at all (``parse``), so one that
reaches ``send`` answers an SMS, and a number that texted us takes texts whatever
phonenumbers says its range is (VoIP and landline SMS services); it used to fail as
``not_mobile`` and turn into a call-back duty."""


_STAMP = "%Y%m%dT%H%M%SZ"


def _stamp(when: datetime | None) -> str | None:
    """A deadline for a URL query: UTC, nothing that needs quoting."""
    return when.astimezone(UTC).strftime(_STAMP) if when else None


def _unstamp(text: str | None) -> datetime | None:
    try:
        return datetime.strptime(text or "", _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


def _reachable(url: str) -> bool:
    """Whether Twilio could call back ``url``: a host name, or an address on the internet; not
    a loopback (the core's default ``http://127.0.0.1:8080`` when no public base URL is
    configured), private, link-local or unspecified (``0.0.0.0``) address."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost") or not host:
        return False
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return True


def _twiml(document: str) -> web.Response:
    return web.Response(text=document, content_type="text/xml", charset="utf-8")


class PhoneChannel(Channel):
    """Calls and SMS through Twilio, missed calls from a PBX; see ``docs/channels/phone.md``."""

    name = "phone"

    def __init__(self, settings: PhoneSettings) -> None:
        self.settings = settings
        self.capabilities = Capabilities(
            can_reply=settings.twilio_enabled,
            identity_kinds=("phone",) if settings.twilio_enabled else (),
            push=True,
            max_text_length=settings.sms_max_length,
            delivery_receipts=True,  # Twilio's status callbacks report delivered
            threads_by_sender=True,  # SMS and calls carry no thread ids of their own
        )
        self.calls = CallLog()
        self.zone: tzinfo = ZoneInfo("UTC")

    # -- wiring -------------------------------------------------------------------------------

    def setup(self, context: ChannelContext) -> None:
        """Keep the context and choose the timezone times are spoken in: the channel's own
        ``timezone`` when set, else the service's, so that a caller hears the deadline in the
        same local time as the acknowledgement SMS states it. Declare ``status_wait`` once the
        base URL Twilio calls back is known."""
        super().setup(context)
        try:
            self.zone = ZoneInfo(self.settings.timezone or context.timezone)
        except (ZoneInfoNotFoundError, ValueError):  # checked at start; the service's by the core
            self.zone = ZoneInfo("UTC")
        # Status callbacks carry the send's key in their URL (``send``), so after a POST that got
        # no answer the outbox waits ``status_wait`` for one before sending the SMS again (a
        # second SMS: Twilio's Messages resource has no idempotency key). Only where Twilio can
        # call back: without a public base URL no callback comes, and the wait would only delay.
        if self.settings.twilio_enabled and self.settings.status_wait and _reachable(self.base_url):
            wait = timedelta(seconds=self.settings.status_wait)
            self.capabilities = dataclasses.replace(self.capabilities, status_wait=wait)

    def routes(self) -> list[web.AbstractRouteDef]:
        routes: list[web.AbstractRouteDef] = []
        if self.settings.twilio_enabled:
            routes += [
                web.post("/twilio/voice", self.voice),
                web.post("/twilio/menu", self.menu),
                web.post("/twilio/dial-result", self.dial_result),
                web.post("/twilio/screen", self.screen),
                web.post("/twilio/screen-result", self.screen_result),
                web.post("/twilio/recording", self.recording),
                web.post("/twilio/transcription", self.transcription),
                web.post("/twilio/call-status", self.call_status),
                web.post("/twilio/sms", self.sms),
                web.post("/twilio/status", self.sms_status),
            ]
        if self.settings.cti_enabled:
            routes.append(web.post("/cti/{secret}", self.cti))
        return routes

    @property
    def base_url(self) -> str:
        """The public URL Twilio calls: configured, else the core's."""
        return (self.settings.public_base_url or self.context.public_base_url).rstrip("/")

    def url(self, action: str, **query: str | None) -> str:
        """Absolute URL of one of our Twilio routes, with the call's state in the query."""
        values = {key: value for key, value in query.items() if value}
        suffix = f"?{urlencode(values)}" if values else ""
        return f"{self.base_url}/channels/{self.name}/twilio/{action}{suffix}"

    # -- helpers ------------------------------------------------------------------------------

    async def _verified(self, request: web.Request) -> dict[str, str]:
        """The POST parameters of a genuine Twilio request.

        A wrong or missing signature is answered 401 ``invalid_signature`` naming the header, as
        every signed webhook of the service is (Twilio treats any non-2xx alike), and nothing
        is stored."""
        try:
            form = await request.post()
        except ValueError as exc:
            raise web.HTTPBadRequest(text="unreadable form body") from exc
        params: dict[str, list[str]] = {}
        for key, value in form.items():
            if isinstance(value, str):
                params.setdefault(key, []).append(value)
        # The raw request target, byte for byte as Twilio requested it: a re-quoted query
        # (``%3A`` -> ``:``) would no longer match what Twilio signed.
        url = self.base_url + request.raw_path
        if not verify(self.settings.auth_token or "", url, params, request.headers.get(HEADER)):
            self.context.log.warning("refused a Twilio request with a bad signature: %s", request.path)
            raise json_error(web.HTTPUnauthorized, "invalid_signature", f"missing or wrong {HEADER} header")
        return {key: values[0] for key, values in params.items()}

    async def _ingest(self, message: dict[str, Any], *, caller_on_the_line: bool = False) -> IngestResult | None:
        """Hand a message to the core; a message the core refuses is logged, not fatal to a call.

        A database that refuses writes is logged with what it takes to find the call, voicemail
        or SMS again at Twilio. With ``caller_on_the_line`` the call goes on (forwarded, or to
        the voicemail): an error answer would leave the caller with Twilio's "an application
        error has occurred". Otherwise it is answered 503, which Twilio redelivers only where
        its webhook's retry policy says so."""
        try:
            return await self.context.ingest(message)
        except InvalidMessage as exc:
            self.context.log.error("the core refused a %s message at %s: %s", message.get("kind"), exc.path, exc)
            return None
        except StorageUnavailable as exc:
            meta = message.get("meta") or {}
            self.context.log.error(
                "could not store a %s (%s, call %s, from %s, recording %s): %s", message.get("kind"),
                message.get("channel_message_id"), meta.get("call_sid"), message["sender"].get("address"),
                (message.get("attachments") or [{}])[0].get("url"), exc,
            )
            if not caller_on_the_line:
                raise
            return None

    def _is_open(self, unit: str, now: datetime) -> bool:
        """Whether the unit takes calls now: inside its configured business hours."""
        return self.context.is_open(unit, now)

    @staticmethod
    def _language(request: web.Request) -> str:
        return "en" if request.query.get("lang") == "en" else "de"

    def _menu_answer(self, language: str, withheld: bool) -> web.Response:
        return _twiml(
            twiml.greeting_menu(
                action_url=self.url("menu", lang=language),
                menu=sorted(self.settings.menu.items(), key=lambda item: (item[0] == "0", item[0])),
                language=language,
                english_digit=self.settings.english_digit,
                company=self.settings.company_name,
                withheld=withheld,
                labels=self.settings.menu_labels,
                voice=self.settings.voice,
            )
        )

    def _voicemail_answer(
        self, *, language: str, topic: str | None, reference: str | None, deadline: datetime | None,
        withheld: bool,
    ) -> web.Response:
        callback_by = twiml.callback_promise(deadline, language, self.zone, self.context.clock.now())
        return _twiml(
            twiml.voicemail(
                action_url=self.url("recording", lang=language, topic=topic),
                transcribe_callback_url=self.url("transcription"),
                case_reference=reference,
                callback_by=callback_by,
                max_length=self.settings.voicemail_max_length,
                language=language,
                withheld=withheld,
                other_channels=self.settings.other_channels.get(language),
                voice=self.settings.voice,
            )
        )

    def _withheld(self, params: dict[str, str]) -> bool:
        return to_e164(params.get("From"), self.settings.region) is None

    # -- Twilio voice -------------------------------------------------------------------------

    async def voice(self, request: web.Request) -> web.Response:
        """An incoming call: greeting and menu. Nothing is stored until the caller chooses."""
        params = await self._verified(request)
        return self._menu_answer("de", self._withheld(params))

    async def menu(self, request: web.Request) -> web.Response:
        """The caller pressed a key (or none): store the call, then forward or take a voicemail."""
        params = await self._verified(request)
        language = self._language(request)
        digits = params.get("Digits", "")
        withheld = self._withheld(params)
        if digits and digits == self.settings.english_digit and language != "en":
            return self._menu_answer("en", withheld)
        topic = self.settings.menu.get(digits)
        try:
            message = parse.call_message(params, topic=topic, language=language, region=self.settings.region)
        except parse.PayloadError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        now = self.context.clock.now()
        self.calls.note(message["meta"]["call_sid"], now, topic=topic, language=language)
        result = await self._ingest(message, caller_on_the_line=True)
        unit = result.unit if result else None
        number = self.settings.forward_numbers.get(unit) if unit else None
        reference = result.case_reference if result else None
        deadline = result.deadline if result else None
        if unit and number and self._is_open(unit, now):
            action = self.url(
                "dial-result", lang=language, topic=topic, ref=reference,
                by=_stamp(deadline),
            )
            screen = self.url("screen", lang=language, ref=reference, call=message["meta"]["call_sid"]) \
                if self.settings.screen_forwards else None
            return _twiml(
                twiml.forward(
                    number, action_url=action, screen_url=screen, timeout=self.settings.forward_timeout,
                    language=language, voice=self.settings.voice,
                )
            )
        return self._voicemail_answer(
            language=language, topic=topic, reference=reference, deadline=deadline, withheld=withheld
        )

    async def screen(self, request: web.Request) -> web.Response:
        """Someone picked up where the call was put through: tell them what it is, and let them
        take it with 1 (``screen_forwards``)."""
        await self._verified(request)
        language = self._language(request)
        action = self.url("screen-result", lang=language, call=request.query.get("call"))
        return _twiml(twiml.screen(action_url=action, case_reference=request.query.get("ref") or None,
                                   language=language, voice=self.settings.voice))

    async def screen_result(self, request: web.Request) -> web.Response:
        """The key pressed at the screen: 1 takes the call (a person, noted for ``dial_result``),
        anything else, or nothing, hangs up that leg."""
        params = await self._verified(request)
        call_sid = request.query.get("call")
        accepted = params.get("Digits") == "1"
        if accepted and call_sid:
            self.calls.note(call_sid, self.context.clock.now(), taken=True)
        return _twiml(twiml.screened(accepted))

    async def dial_result(self, request: web.Request) -> web.Response:
        """The forward ended: done when answered, else the voicemail.

        With ``screen_forwards``, answered means that someone took the call at the screen (by
        pressing 1): then, and only then, staff spoke with the caller, and the conversation is
        answered. A forward that only a mailbox or an announcement picked up gives the caller
        our voicemail. Without screening an answered forward ends the call and leaves the
        conversation as it was: Twilio's "completed" says that something picked up, not who."""
        params = await self._verified(request)
        language = self._language(request)
        call_sid = params.get("CallSid")
        state = self.calls.state(call_sid) if call_sid else None
        taken = state is not None and state.taken
        if parse.is_answered_dial(params) and (taken or not self.settings.screen_forwards):
            if call_sid:
                self.calls.note(call_sid, self.context.clock.now(), outcome="answered")
                if taken:
                    await self._answered_live(call_sid, params)
            return _twiml(twiml.hangup(language, self.settings.voice))
        return self._voicemail_answer(
            language=language, topic=request.query.get("topic") or None, reference=request.query.get("ref") or None,
            deadline=_unstamp(request.query.get("by")), withheld=self._withheld(params),
        )

    async def _answered_live(self, call_sid: str, params: Mapping[str, Any]) -> None:
        """Staff spoke with the caller: the call's conversation is answered. It stayed open and
        escalated as unanswered. Not stored (the database refuses writes), it still escalates:
        a needless reminder, never a lost caller."""
        duration = parse.dial_duration(params)
        note = "Call put through and answered" + (f" ({duration} s)" if duration is not None else "")
        try:
            await self.context.record_live_answer(call_sid, note)
        except StorageUnavailable as exc:
            self.context.log.error("call %s was answered, but the database did not take it: %s", call_sid, exc)

    async def recording(self, request: web.Request) -> web.Response:
        """The ``<Record>`` ended: store the voicemail (if anything was said) and say goodbye."""
        params = await self._verified(request)
        language = self._language(request)
        try:
            message = parse.voicemail_message(
                params, topic=request.query.get("topic") or None, language=language, region=self.settings.region
            )
        except parse.PayloadError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        if message is not None:
            await self._store_voicemail(message)
        return _twiml(twiml.goodbye(language, thanks=message is not None, voice=self.settings.voice))

    async def _store_voicemail(self, message: dict[str, Any]) -> None:
        """Ingest a voicemail, its outcome announced to the call log before the store begins.

        A caller who hangs up while recording makes Twilio post the recording and the call's end
        at once; the end (``call_status``) waits for this store instead of storing a missed call
        meanwhile. A voicemail that was not stored (the database refused it) leaves the call's
        outcome open, so that its end is still recorded as a missed call."""
        call_sid = message["meta"]["call_sid"]
        token = self.calls.begin(call_sid, self.context.clock.now())
        stored = False
        try:
            stored = await self._ingest(message, caller_on_the_line=True) is not None
        finally:
            self.calls.settle(call_sid, token, self.context.clock.now(), outcome="voicemail" if stored else None)

    async def transcription(self, request: web.Request) -> web.Response:
        """A voicemail's transcript (or its failure) arrived: an edit of the voicemail."""
        params = await self._verified(request)
        try:
            update = parse.transcript_update(params)
        except parse.PayloadError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        await self._ingest(parse.transcript_message(update, region=self.settings.region))
        return _twiml(twiml.empty())

    async def call_status(self, request: web.Request) -> web.Response:
        """The call ended: without an answered forward or a voicemail it is a missed call.

        A voicemail still being stored is waited for (``CallLog.settled``). An answered forward
        needs no wait: ``dial_result`` notes it before it awaits anything."""
        params = await self._verified(request)
        call_sid = params.get("CallSid")
        if call_sid and parse.is_call_over(params):
            state = await self.calls.settled(call_sid)
            if state is None or state.outcome is None:
                # A second report of the same end is a duplicate of its missed call (one id per
                # call), and after a 503 a redelivery stores it.
                message = parse.missed_call_message(
                    params,
                    topic=state.topic if state else None,
                    language=state.language if state else None,
                    region=self.settings.region,
                )
                await self._ingest(message)
        return _twiml(twiml.empty())

    # -- Twilio messaging ---------------------------------------------------------------------

    async def sms(self, request: web.Request) -> web.Response:
        """An incoming SMS; the acknowledgement goes out through the outbox, not in the answer."""
        params = await self._verified(request)
        try:
            message = parse.sms_message(params, region=self.settings.region)
        except parse.PayloadError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        await self._ingest(message)
        return _twiml(twiml.empty())

    async def sms_status(self, request: web.Request) -> web.Response:
        """A status callback for one of our SMS."""
        params = await self._verified(request)
        # No time of its own: stamped on arrival by the core. The key is in the URL we gave
        # Twilio with the send (``send``), which the signature covers.
        update = parse.delivery_update(params, idempotency_key=request.query.get("key"))
        if update is not None:
            await self.context.record_delivery(update)
        return _twiml(twiml.empty())

    # -- CTI ----------------------------------------------------------------------------------

    async def cti(self, request: web.Request) -> web.Response:
        """A PBX event (JSON or form): a missed inbound call becomes a call-back duty.

        The secret in the path is the only credential, so a wrong one is answered exactly as a
        path that does not exist (404 ``not_found``): a 401 would tell whoever tries secrets
        that the endpoint is there and CTI is on. A PBX treats any non-2xx alike.
        """
        given = request.match_info.get("secret", "").encode("utf-8")
        expected = (self.settings.cti_secret or "").encode("utf-8")
        if not expected or not hmac.compare_digest(given, expected):
            raise web.HTTPNotFound()
        try:
            if request.content_type == "application/json":
                event: Any = json.loads((await request.read()).decode("utf-8"))
            else:
                event = {key: value for key, value in (await request.post()).items() if isinstance(value, str)}
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or nesting too deep
            raise web.HTTPBadRequest(text="unreadable event") from exc
        try:
            message = parse.cti_missed_call(event, region=self.settings.region, number_format=self.settings.cti_number_format)
        except parse.PayloadError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        if message is None:
            return web.json_response({"stored": False})
        try:
            result = await self.context.ingest(message)
        except InvalidMessage as exc:
            raise web.HTTPBadRequest(text=f"{exc.path}: {exc.message}") from exc
        return web.json_response(
            {"stored": True, "duplicate": result.duplicate, "case_reference": result.case_reference}
        )

    # -- SMS out ------------------------------------------------------------------------------

    async def send(self, message: OutboundMessage) -> SendResult:
        """Send one SMS. Call-back texts go to mobile numbers only."""
        if not self.settings.twilio_enabled:
            raise PermanentDeliveryError("SMS is not configured for the phone channel", code="not_configured",
                                         address_failed=False)
        if message.to_kind != "phone":
            raise PermanentDeliveryError(f"cannot send an SMS to a {message.to_kind}", code="unsupported_identity",
                                         address_failed=False)
        to = to_e164(message.to, self.settings.region)
        if to is None:
            raise PermanentDeliveryError(f"not a phone number: {message.to!r}", code="invalid_number")
        if message.kind in MOBILE_ONLY_KINDS and not is_mobile(to):
            raise PermanentDeliveryError("the number is not a mobile number", code="not_mobile", address_failed=False)
        sid = await send_sms(
            self.context.http,
            api_url=self.settings.api_url,
            account_sid=self.settings.account_sid or "",
            auth_token=self.settings.auth_token or "",
            to=to,
            from_=self.settings.phone_number or "",
            # An answer in a conversation without SMS (a web form's, a WhatsApp one's fallback)
            # carries the status link: that is where the resident reads the case and writes back.
            body=shorten_sms(message.text, message.status_url, self.settings.sms_max_length,
                             with_link=message.kind == "reply" and not message.thread_refs),
            # Our key in the callback's URL (signed with it) ties each status to this send, also
            # when Twilio's answer never came or named no SID: a status then records the send.
            status_callback=self.url("status", key=message.idempotency_key),
            timeout=self.settings.send_timeout,
        )
        if sid is None:
            self.context.log.warning(
                "Twilio took the SMS of outbox row %s but its answer named no sid: recorded as sent, not sent again;"
                " its status callback will name it", message.outbox_id)
        return SendResult(provider_id=sid or "")
