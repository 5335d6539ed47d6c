from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from twilio.request_validator import RequestValidator

from plugins.phone import PhoneChannel, PhoneSettings
from router.clock import FrozenClock
from router.hookspecs import ChannelContext, IngestResult, OutboundMessage, PermanentDeliveryError, StorageUnavailable

PUBLIC = "https://contact.example.org"
TOKEN = "twilio-auth-token"
NOW = datetime(2025, 5, 13, 8, 0, tzinfo=UTC)
CALLER = {"CallSid": "CA" + "1" * 32, "AccountSid": "AC1", "From": "+4915112345678", "To": "+4930999999"}
UNITS = {"construction": "tiefbau-muster", "fault": "stoerung"}


class FakeCore:
    """Stands in for the core: stores messages, deduplicates, routes by topic."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.deliveries: list = []
        self.http: aiohttp.ClientSession | None = None
        self.deadline = NOW + timedelta(hours=4)

    async def ingest(self, message: dict) -> IngestResult:
        duplicate = any(m["channel_message_id"] == message["channel_message_id"] for m in self.messages)
        if not duplicate:
            self.messages.append(message)
        return IngestResult(
            message_id=len(self.messages), conversation_id=1, case_reference="K-7F3QX2", status_token="tok",
            status_url=None, unit=UNITS.get(message.get("topic"), "kundenservice"), unit_name=None,
            deadline=self.deadline, language="de", acknowledged=True, duplicate=duplicate,
        )

    async def record_delivery(self, channel: str, update) -> bool:
        self.deliveries.append(update)
        return True

    def kinds(self) -> list[str]:
        return [m["kind"] for m in self.messages]


def make_channel(core: FakeCore, *, is_open=None, service_timezone: str = "Europe/Berlin", **overrides) -> PhoneChannel:
    settings = PhoneSettings.from_config(
        {
            "account_sid": "AC1", "auth_token": TOKEN, "phone_number": "+4930999999", "public_base_url": PUBLIC,
            "cti_secret": "cti-secret", "forward_numbers": {"tiefbau-muster": "+4930111111"}, **overrides,
        }
    )
    channel = PhoneChannel(settings)
    channel.setup(
        ChannelContext(
            name="phone", settings={}, data_dir=Path("."), public_base_url="http://127.0.0.1:8080",
            clock=FrozenClock(NOW), ingest=core.ingest, record_delivery=core.record_delivery,
            conversation_view=None, http=lambda: core.http, render=lambda *a, **k: "", units={},
            is_open=is_open, timezone=service_timezone,
        )
    )
    return channel


@pytest.fixture
def core() -> FakeCore:
    return FakeCore()


@pytest.fixture
async def client_for(aiohttp_client):
    async def build(channel: PhoneChannel):
        app = web.Application()
        sub = web.Application()
        sub.add_routes(channel.routes())
        app.add_subapp("/channels/phone", sub)
        return await aiohttp_client(app)

    return build


@pytest.fixture
async def client(core, client_for):
    return await client_for(make_channel(core))


async def twilio_post(client, path_qs: str, params: dict, *, token: str = TOKEN, signature: str | None = "sign"):
    """POST as Twilio would, signed by Twilio's own validator over the public URL."""
    if not path_qs.startswith("http"):
        path_qs = f"{PUBLIC}/channels/phone/twilio/{path_qs}"
    headers = {}
    if signature == "sign":
        headers["X-Twilio-Signature"] = RequestValidator(token).compute_signature(path_qs, params)
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    parts = urlsplit(path_qs)
    return await client.post(parts.path + (f"?{parts.query}" if parts.query else ""), data=params, headers=headers)


async def twiml_of(response) -> ET.Element:
    assert response.status == 200, await response.text()
    assert response.content_type == "text/xml"
    return ET.fromstring(await response.text())


# -- signatures -------------------------------------------------------------------------------


async def assert_invalid_signature(response) -> None:
    """401 with the service's JSON error naming the header, as for every forged webhook."""
    assert response.status == 401
    error = (await response.json())["error"]
    assert error["code"] == "invalid_signature" and "X-Twilio-Signature" in error["message"]


@pytest.mark.parametrize("signature", [None, "forged", "token"])
async def test_unsigned_or_forged_requests_are_refused_and_store_nothing(client, core, signature):
    token = "wrong-token" if signature == "token" else TOKEN
    for path in ("voice", "menu", "recording", "sms", "call-status"):
        response = await twilio_post(
            client, path, {**CALLER, "Digits": "1", "Body": "x", "MessageSid": "SM1", "CallStatus": "completed"},
            token=token, signature="sign" if signature == "token" else signature,
        )
        await assert_invalid_signature(response)
    assert core.messages == []


async def test_signature_covers_the_query(client, core):
    signed_for = f"{PUBLIC}/channels/phone/twilio/menu?lang=de"
    headers = {"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(signed_for, {**CALLER, "Digits": "1"})}
    response = await client.post("/channels/phone/twilio/menu?lang=en", data={**CALLER, "Digits": "1"}, headers=headers)
    await assert_invalid_signature(response)


# -- calls ------------------------------------------------------------------------------------


async def test_whole_call_forward_not_answered_voicemail_and_transcript(client, core):
    greeting = await twiml_of(await twilio_post(client, "voice", CALLER))
    assert greeting.find("Gather/Say").get("language") == "de-DE"
    menu_url = greeting.find("Gather").get("action")

    forward = await twiml_of(await twilio_post(client, menu_url, {**CALLER, "Digits": "1"}))
    assert core.kinds() == ["call"]
    assert core.messages[0]["topic"] == "construction"
    assert forward.find("Dial/Number").text == "+4930111111"
    assert forward.find("Dial").get("timeout") == "20"

    voicemail = await twiml_of(
        await twilio_post(client, forward.find("Dial").get("action"), {**CALLER, "DialCallStatus": "no-answer"})
    )
    assert "K, 7, F, 3, Q, X, 2" in voicemail.find("Say").text
    assert "heute um 14:00 Uhr" in voicemail.find("Say").text  # deadline 12:00 UTC, Berlin summer time
    record = voicemail.find("Record")
    assert record.get("transcribe") == "true"

    recording = {**CALLER, "RecordingSid": "RE" + "2" * 32, "RecordingUrl": "https://api.twilio.com/rec", "RecordingDuration": "31"}
    bye = await twiml_of(await twilio_post(client, record.get("action"), recording))
    assert bye.find("Hangup") is not None
    transcript = {**recording, "TranscriptionSid": "TR1", "TranscriptionStatus": "completed", "TranscriptionText": "Baugrube offen"}
    await twiml_of(await twilio_post(client, record.get("transcribeCallback"), transcript))
    await twiml_of(await twilio_post(client, "call-status", {**CALLER, "CallStatus": "completed"}))

    assert core.kinds() == ["call", "voicemail", "edit"]
    voicemail_message, edit = core.messages[1:]
    assert voicemail_message["topic"] == "construction"
    assert voicemail_message["attachments"][0]["url"] == "https://api.twilio.com/rec"
    assert edit["target_message_id"] == voicemail_message["channel_message_id"]
    assert edit["text"] == "Baugrube offen"


async def test_hang_up_before_the_menu_is_a_missed_call(client, core):
    await twiml_of(await twilio_post(client, "voice", CALLER))
    await twiml_of(await twilio_post(client, "call-status", {**CALLER, "CallStatus": "completed"}))
    assert core.kinds() == ["missed_call"]
    assert core.messages[0]["flags"] == ["callback_required"]


async def test_hang_up_at_the_voicemail_prompt_is_a_missed_call_with_the_topic(client, core):
    await twiml_of(await twilio_post(client, "menu?lang=de", {**CALLER, "Digits": "3"}))  # fault: no forward number
    await twiml_of(await twilio_post(client, "recording?lang=de&topic=fault", {**CALLER, "RecordingDuration": "0"}))
    await twiml_of(await twilio_post(client, "call-status", {**CALLER, "CallStatus": "completed"}))
    assert core.kinds() == ["call", "missed_call"]
    assert core.messages[1]["topic"] == "fault"


async def _take_at_the_screen(client, forward, digits: str = "1"):
    """Twilio's side of the screen: the person the call goes to picks up and presses ``digits``."""
    number = forward.find("Dial").find("Number")
    leg = {**CALLER, "CallSid": "CA" + "f" * 32, "ParentCallSid": CALLER["CallSid"], "Direction": "outbound-dial"}
    screen = await twiml_of(await twilio_post(client, number.get("url"), leg))
    return await twiml_of(await twilio_post(client, screen.find("Gather").get("action"), {**leg, "Digits": digits}))


async def test_answered_forward_is_not_a_missed_call(client, core):
    forward = await twiml_of(await twilio_post(client, "menu?lang=de", {**CALLER, "Digits": "1"}))
    await _take_at_the_screen(client, forward)
    answer = await twiml_of(await twilio_post(client, forward.find("Dial").get("action"),
                                              {**CALLER, "DialCallStatus": "completed"}))
    assert answer.find("Hangup") is not None
    await twilio_post(client, "call-status", {**CALLER, "CallStatus": "completed"})
    assert core.kinds() == ["call"]


async def test_whoever_picks_up_a_forward_hears_the_case_and_takes_the_call_with_1(client, core):
    """Twilio's "completed" says that something picked up: a staff phone's mailbox or a queue's
    announcement counted as staff speaking with the caller."""
    forward = await twiml_of(await twilio_post(client, "menu?lang=de", {**CALLER, "Digits": "1"}))
    number = forward.find("Dial").find("Number")
    assert number.get("url").startswith("https://") and "/twilio/screen?" in number.get("url")
    leg = {**CALLER, "CallSid": "CA" + "f" * 32}
    screen = await twiml_of(await twilio_post(client, number.get("url"), leg))
    gather = screen.find("Gather")
    assert gather.get("numDigits") == "1" and "Drücken Sie die 1" in gather.find("Say").text
    assert screen.find("Hangup") is not None  # nothing pressed: that leg hangs up
    taken = await twiml_of(await twilio_post(client, gather.get("action"), {**leg, "Digits": "1"}))
    assert list(taken) == []  # nothing more: Twilio connects the two
    refused = await twiml_of(await twilio_post(client, gather.get("action"), {**leg, "Digits": "2"}))
    assert refused.find("Hangup") is not None


async def test_a_forward_that_only_a_mailbox_picked_up_gives_the_caller_our_voicemail(client, core):
    forward = await twiml_of(await twilio_post(client, "menu?lang=de", {**CALLER, "Digits": "1"}))
    answer = await twiml_of(await twilio_post(client, forward.find("Dial").get("action"),
                                              {**CALLER, "DialCallStatus": "completed"}))
    assert answer.find("Record") is not None


async def test_a_deadline_that_has_passed_is_not_promised(client, core):
    # A caller who rings again about an overdue case: the conversation's deadline is behind us.
    core.deadline = NOW - timedelta(hours=3)
    answer = await twiml_of(await twilio_post(client, "menu?lang=de", {**CALLER, "Digits": "3"}))
    text = answer.find("Say").text
    assert "so bald wie möglich" in text and "heute um" not in text
    # The same after a forward nobody answered (the deadline travels in the action URL).
    forward = await twiml_of(await twilio_post(client, "menu?lang=de", {**CALLER, "Digits": "1"}))
    voicemail = await twiml_of(
        await twilio_post(client, forward.find("Dial").get("action"), {**CALLER, "DialCallStatus": "no-answer"})
    )
    assert "so bald wie möglich" in voicemail.find("Say").text


@pytest.mark.parametrize(
    ("deadline", "lang", "spoken"),
    [
        (datetime(2026, 10, 25, 0, 30, tzinfo=UTC), "de", "Wir rufen Sie bis Sonntag, den 25. Oktober, um 02:30 Uhr Sommerzeit zurück."),
        (datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "de", "Wir rufen Sie bis Sonntag, den 25. Oktober, um 02:30 Uhr Winterzeit zurück."),
        (datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "en", "We will call you back by Sunday 25 October at 02:30 standard time."),
    ],
)
async def test_a_call_back_time_the_clocks_show_twice_is_told_as_summer_or_standard_time(client, core, deadline, lang, spoken):
    """The voicemail prompt promised "02:30" on the night the clocks go back, when 02:30 comes
    twice an hour apart."""
    core.deadline = deadline
    answer = await twiml_of(await twilio_post(client, f"menu?lang={lang}", {**CALLER, "Digits": "3"}))
    assert spoken in answer.find("Say").text


@pytest.mark.parametrize(
    ("service_zone", "channel_zone", "spoken"),
    [
        ("America/New_York", None, "heute um 08:00 Uhr"),  # the service's, like the acknowledgement
        ("Europe/Berlin", None, "heute um 14:00 Uhr"),
        ("America/New_York", "Europe/Berlin", "heute um 14:00 Uhr"),  # the channel's own, when set
    ],
)
async def test_callback_times_are_spoken_in_the_services_timezone_unless_the_channel_has_its_own(
    core, client_for, service_zone, channel_zone, spoken
):
    overrides = {"timezone": channel_zone} if channel_zone else {}
    client = await client_for(make_channel(core, service_timezone=service_zone, **overrides))
    answer = await twiml_of(await twilio_post(client, "menu?lang=de", {**CALLER, "Digits": "3"}))  # deadline 12:00 UTC
    assert spoken in answer.find("Say").text


class GatedCore(FakeCore):
    """A core whose voicemail commits wait for ``release``, so a test can deliver the call's end
    while the voicemail is being stored (Twilio posts both at once when the caller hangs up)."""

    def __init__(self, fail_voicemail: bool = False) -> None:
        super().__init__()
        self.storing = asyncio.Event()
        self.release = asyncio.Event()
        self.fail_voicemail = fail_voicemail

    async def ingest(self, message: dict) -> IngestResult:
        if message["kind"] == "voicemail":
            self.storing.set()
            await self.release.wait()
            if self.fail_voicemail:
                raise StorageUnavailable("disk full")
        return await super().ingest(message)


async def _hang_up_while_the_voicemail_is_stored(core: GatedCore, client) -> None:
    await twiml_of(await twilio_post(client, "menu?lang=de", {**CALLER, "Digits": "3"}))
    recording = {**CALLER, "RecordingSid": "RE" + "7" * 32, "RecordingUrl": "https://api.twilio.com/rec",
                 "RecordingDuration": "25", "Digits": "hangup"}
    voicemail = asyncio.create_task(twilio_post(client, "recording?lang=de&topic=fault", recording))
    await asyncio.wait_for(core.storing.wait(), 5)
    ended = asyncio.create_task(twilio_post(client, "call-status", {**CALLER, "CallStatus": "completed"}))
    await asyncio.sleep(0.05)  # the call's end is in, and waits
    core.release.set()
    for response in await asyncio.gather(voicemail, ended):
        await twiml_of(response)


async def test_a_call_that_ends_while_its_voicemail_is_stored_is_no_missed_call(client_for):
    core = GatedCore()
    await _hang_up_while_the_voicemail_is_stored(core, await client_for(make_channel(core)))
    assert core.kinds() == ["call", "voicemail"]


async def test_a_call_whose_voicemail_could_not_be_stored_is_still_a_missed_call(client_for):
    core = GatedCore(fail_voicemail=True)
    await _hang_up_while_the_voicemail_is_stored(core, await client_for(make_channel(core)))
    assert core.kinds() == ["call", "missed_call"]


async def test_closed_unit_goes_straight_to_voicemail(core, client_for):
    asked = []

    def is_open(unit, now):
        asked.append((unit, now))
        return False

    client = await client_for(make_channel(core, is_open=is_open))
    answer = await twiml_of(await twilio_post(client, "menu?lang=de", {**CALLER, "Digits": "1"}))
    assert answer.find("Dial") is None and answer.find("Record") is not None
    assert asked == [("tiefbau-muster", NOW)]


async def test_english_on_nine(client, core):
    menu = await twiml_of(await twilio_post(client, "menu?lang=de", {**CALLER, "Digits": "9"}))
    assert {say.get("language") for say in menu.iter("Say")} == {"en-GB"}
    assert core.messages == []
    answer = await twiml_of(await twilio_post(client, menu.find("Gather").get("action"), {**CALLER, "Digits": "3"}))
    assert core.messages[0]["language"] == "en"
    assert answer.find("Say").get("language") == "en-GB"


async def test_withheld_caller_is_asked_for_a_number(client, core):
    anonymous = {**CALLER, "From": "+266696687"}
    greeting = await twiml_of(await twilio_post(client, "voice", anonymous))
    assert "nicht übertragen" in greeting.find("Gather/Say").text
    answer = await twiml_of(await twilio_post(client, "menu?lang=de", {**anonymous, "Digits": "3"}))
    assert "WhatsApp" in answer.find("Say").text
    assert core.messages[0]["sender"]["kind"] == "anonymous"
    assert core.messages[0]["flags"] == ["no_number"]


# -- SMS --------------------------------------------------------------------------------------


async def test_sms_in_and_status_callback(client, core):
    sms = {"MessageSid": "SM1", "From": "+4915112345678", "To": "+4930999999", "Body": "Hallo"}
    answer = await twiml_of(await twilio_post(client, "sms", sms))
    assert len(answer) == 0
    assert core.messages[0]["sender"]["address"] == CALLER["From"]
    await twilio_post(client, "status", {"MessageSid": "SM9", "MessageStatus": "undelivered", "ErrorCode": "30005"})
    (update,) = core.deliveries
    assert (update.provider_id, update.status, update.permanent) == ("SM9", "failed", True)


def outbound(kind: str, to: str, text: str = "Ihr Anliegen K-7F3QX2 ist bei uns.") -> OutboundMessage:
    return OutboundMessage(
        outbox_id=1, channel="phone", kind=kind, to_kind="phone", to=to, text=text, language="de",
        idempotency_key="k1", status_url="https://contact.example.org/channels/webform/status/t",
    )


async def test_a_call_back_text_to_a_landline_is_not_sent(core):
    # (a call from a landline is not acknowledged at all; an SMS from one is, see test_integration)
    with pytest.raises(PermanentDeliveryError) as caught:
        await make_channel(core).send(outbound("callback_sms", "+493012345678"))
    assert caught.value.code == "not_mobile"


async def test_sms_out_through_the_rest_api(core, aiohttp_server):
    received = []

    async def messages(request):
        received.append(dict(await request.post()))
        return web.json_response({"sid": "SMabc"}, status=201)

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/AC1/Messages.json", messages)
    server = await aiohttp_server(app)
    channel = make_channel(core, api_url=str(server.make_url("")))
    async with aiohttp.ClientSession() as core.http:
        result = await channel.send(outbound("ack", "0151 12345678", text="x " * 1000))
    assert result.provider_id == "SMabc"
    (form,) = received
    assert form["To"] == "+4915112345678" and form["From"] == "+4930999999"
    assert len(form["Body"]) <= 1600 and form["Body"].endswith("/channels/webform/status/t")
    assert form["StatusCallback"] == f"{PUBLIC}/channels/phone/twilio/status?key=k1"  # its statuses name the send


@pytest.mark.parametrize(
    "overrides, service_url, wait",
    [
        ({}, "http://127.0.0.1:8080", timedelta(seconds=30)),  # its own public base URL
        ({"status_wait": 12}, "http://127.0.0.1:8080", timedelta(seconds=12)),
        ({"status_wait": 0}, "http://127.0.0.1:8080", None),  # off: backoff alone
        ({"public_base_url": None}, "http://127.0.0.1:8080", None),  # Twilio cannot call back
        ({"public_base_url": None}, "https://kontakt.example.org", timedelta(seconds=30)),  # the core's
        ({"public_base_url": None}, "http://0.0.0.0:8080", None),  # every interface: no address
        ({"public_base_url": None}, "http://192.168.1.20:8080", None),  # a private network's
        ({"public_base_url": None}, "http://[fd00::5]:8080", None),
    ],
)
def test_status_wait_only_where_twilio_can_call_back(core, overrides, service_url, wait):
    """Status callbacks carry the send's key: after a POST that got no answer the outbox waits
    for one before a second SMS. Without a public URL no callback comes, and a wait only delays."""
    settings = PhoneSettings.from_config(
        {"account_sid": "AC1", "auth_token": TOKEN, "phone_number": "+4930999999", "public_base_url": PUBLIC, **overrides}
    )
    channel = PhoneChannel(settings)
    channel.setup(
        ChannelContext(
            name="phone", settings={}, data_dir=Path("."), public_base_url=service_url, clock=FrozenClock(NOW),
            ingest=core.ingest, record_delivery=core.record_delivery, conversation_view=None, http=lambda: core.http,
            render=lambda *a, **k: "", units={}, timezone="Europe/Berlin",
        )
    )
    assert channel.capabilities.status_wait == wait


# -- CTI --------------------------------------------------------------------------------------


async def test_cti_wrong_secret_is_not_found(client, core):
    response = await client.post("/channels/phone/cti/guess", json={"event": "hangup", "cause": "noAnswer"})
    assert response.status == 404
    assert core.messages == []


async def test_cti_missed_and_answered_calls(client, core):
    missed = {"event": "hangup", "cause": "noAnswer", "from": "030 12345678", "to": "030 999999", "direction": "in", "callId": "c1"}
    response = await client.post("/channels/phone/cti/cti-secret", json=missed)
    assert (await response.json())["stored"] is True
    answered = {**missed, "cause": "normalClearing", "callId": "c2"}
    response = await client.post("/channels/phone/cti/cti-secret", data=answered)  # form-encoded, as sipgate posts
    assert (await response.json())["stored"] is False
    assert core.kinds() == ["missed_call"]
    assert core.messages[0]["sender"]["address"] == "+493012345678"


async def test_cti_garbage_is_a_bad_request(client, core):
    response = await client.post(
        "/channels/phone/cti/cti-secret", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    response = await client.post("/channels/phone/cti/cti-secret", json=["hangup"])
    assert response.status == 400
