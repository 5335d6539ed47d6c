"""The phone channel against the real core: the whole service on SQLite and a loopback HTTP
server (``CoreHarness``), Twilio's webhooks signed by the ``twilio`` package's own
``RequestValidator``, and a fake Twilio REST API as a real aiohttp server on 127.0.0.1.

Twilio signs the URL it calls: the public one, in front of any proxy. So the service is
configured with ``PUBLIC_BASE_URL`` = ``PUBLIC`` and the tests sign for that URL while the
requests travel to the harness's loopback port, as they would through a reverse proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from twilio.request_validator import RequestValidator

from router.testing import CoreHarness, check_channel_contract

PUBLIC = "https://kontakt.example.org"
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-for-tests"
OUR_NUMBER = "+493099999999"
CTI_SECRET = "cti-secret-for-tests"
MOBILE = "+4915112345678"
LANDLINE = "+493012345678"
BAUHOTLINE_FORWARD = "+493012345670"  # config/contact-router.toml, channels.phone.forward_numbers


# -- fake Twilio REST API -----------------------------------------------------------------------


class FakeTwilio:
    """Twilio's Messages resource: checks HTTP basic auth, records each SMS, answers a SID."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.refused = 0
        self.server: TestServer | None = None
        self.refusal: dict[str, Any] | None = None
        """A Twilio error body (``code``, ``message``, ``status``) to answer every SMS with."""
        self.without_sid = False
        """Take every SMS, but answer 201 with a body that names no sid (cut short by a proxy)."""
        self.answer_after = 0.0
        """Seconds between taking an SMS and answering (longer than the send timeout: the
        answer never comes, though the SMS went)."""
        self.lose_after = 0.0
        """Seconds to hold each SMS request before refusing it with a 503 without taking the
        SMS (longer than the send timeout: no answer comes, and nothing went)."""

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def create_message(self, request: web.Request) -> web.Response:
        try:
            auth = aiohttp.BasicAuth.decode(request.headers.get("Authorization", ""))
        except ValueError:
            auth = None
        if (
            auth is None
            or request.match_info["sid"] != ACCOUNT_SID
            or (auth.login, auth.password) != (ACCOUNT_SID, AUTH_TOKEN)
        ):
            self.refused += 1
            return web.json_response({"code": 20003, "message": "Authenticate", "status": 401}, status=401)
        if self.refusal is not None:
            self.refused += 1
            return web.json_response(self.refusal, status=self.refusal["status"])
        form = {key: value for key, value in (await request.post()).items() if isinstance(value, str)}
        if self.lose_after:
            await asyncio.sleep(self.lose_after)
            return web.json_response({"code": 20500, "message": "Internal error", "status": 503}, status=503)
        sid = f"SM{len(self.messages) + 1:032x}"
        self.messages.append({**form, "sid": sid})
        await asyncio.sleep(self.answer_after)
        if self.without_sid:
            return web.json_response({"status": "queued", "to": form.get("To")}, status=201)
        return web.json_response({"sid": sid, "status": "queued", "to": form.get("To")}, status=201)

    def to(self, number: str) -> list[dict[str, str]]:
        return [m for m in self.messages if m["To"] == number]


@pytest.fixture
async def twilio(aiohttp_server: Any) -> FakeTwilio:
    fake = FakeTwilio()
    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", fake.create_message)
    fake.server = await aiohttp_server(app, host="127.0.0.1")
    return fake


def phone_env(twilio: FakeTwilio, **extra: str) -> dict[str, str]:
    """The environment the example configuration reads for the phone channel."""
    return {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_PHONE_NUMBER": OUR_NUMBER,
        "TWILIO_API_URL": twilio.url,
        "PUBLIC_BASE_URL": PUBLIC,
        "PHONE_CTI_SECRET": CTI_SECRET,
        **extra,
    }


CALLBACK_ATTEMPTS = 2


@pytest.fixture
async def harness(tmp_path: Path, twilio: FakeTwilio) -> AsyncIterator[CoreHarness]:
    async with CoreHarness(
        tmp_path,
        entrypoints=("webform", "phone"),
        env=phone_env(twilio),
        settings={"phone": {"callback_attempts": CALLBACK_ATTEMPTS}},
    ) as started:
        yield started


# -- Twilio's side of the webhooks --------------------------------------------------------------


def sign(url: str, params: Mapping[str, str], token: str = AUTH_TOKEN) -> str:
    """``X-Twilio-Signature`` as Twilio's own library computes it."""
    return RequestValidator(token).compute_signature(url, dict(params))


async def twilio_post(
    harness: CoreHarness, target: str, params: Mapping[str, str], *, signature: str | None = "sign",
    token: str = AUTH_TOKEN,
) -> aiohttp.ClientResponse:
    """POST ``params`` as Twilio does: to ``target`` (a route name like ``voice`` or a full URL
    taken from our TwiML), signed over the public URL."""
    url = target if target.startswith("http") else f"{PUBLIC}/channels/phone/twilio/{target}"
    headers = {}
    if signature == "sign":
        headers["X-Twilio-Signature"] = sign(url, params, token)
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return await harness.client.post(path, data=dict(params), headers=headers)


async def twiml(response: aiohttp.ClientResponse, language: str = "de-DE") -> ET.Element:
    """The TwiML answer: 200, XML, a ``<Response>``, every ``<Say>`` in ``language`` (German
    unless the caller chose English)."""
    body = await response.text()
    assert response.status == 200, body
    assert response.content_type == "text/xml"
    root = ET.fromstring(body)
    assert root.tag == "Response"
    # The German menu's one English sentence is the hint how to switch to English.
    spoken = [
        say for say in root.iter("Say")
        if not (say.get("language") == "en-GB" and (say.text or "").startswith("For English"))
    ]
    assert {say.get("language") for say in spoken} <= {language}, body
    return root


async def say(harness: CoreHarness, target: str, params: Mapping[str, str]) -> ET.Element:
    return await twiml(await twilio_post(harness, target, params))


def call(sid: str, caller: str = MOBILE, **extra: str) -> dict[str, str]:
    """The parameters Twilio posts for an inbound call."""
    return {
        "AccountSid": ACCOUNT_SID, "CallSid": sid, "From": caller, "Caller": caller, "To": OUR_NUMBER,
        "Called": OUR_NUMBER, "Direction": "inbound", "CallStatus": "in-progress", "ApiVersion": "2010-04-01",
        **extra,
    }


async def take(harness: CoreHarness, forward: ET.Element, caller: str = MOBILE, digits: str = "1") -> None:
    """The person a forward reaches picks up, hears the screen and presses ``digits``."""
    number = forward.find("Dial").find("Number")
    leg = call("CA" + "9" * 32, caller=caller, Direction="outbound-dial")
    screen = await say(harness, number.get("url"), leg)
    await say(harness, screen.find("Gather").get("action"), {**leg, "Digits": digits})


def sms(sid: str, body: str, sender: str = MOBILE) -> dict[str, str]:
    """The parameters Twilio posts for an inbound SMS."""
    return {
        "AccountSid": ACCOUNT_SID, "MessageSid": sid, "SmsSid": sid, "From": sender, "To": OUR_NUMBER,
        "Body": body, "NumMedia": "0", "NumSegments": "1", "ApiVersion": "2010-04-01",
    }


async def conversation(harness: CoreHarness, conversation_id: int) -> dict[str, Any]:
    status, body = await harness.api("GET", f"/api/v1/conversations/{conversation_id}")
    assert status == 200, body
    return body


async def only_conversation(harness: CoreHarness) -> dict[str, Any]:
    rows = await harness.rows("SELECT id FROM conversations")
    assert len(rows) == 1, rows
    return await conversation(harness, rows[0]["id"])


def inbound(conv: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [m for m in conv["messages"] if m["direction"] == "in"]


def outbound(conv: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    return [m for m in conv["messages"] if m["direction"] == "out" and m["kind"] == kind]


# -- signatures -------------------------------------------------------------------------------


FORGERIES = {
    "unsigned": {"signature": None},
    "forged": {"signature": "bm90IGEgc2lnbmF0dXJlIGF0IGFsbA=="},
    "wrong token": {"token": "another-accounts-token"},
    "loopback url": {"url": "loopback"},
}


@pytest.mark.parametrize("forgery", FORGERIES.values(), ids=FORGERIES.keys())
async def test_unsigned_or_forged_requests_are_refused_and_nothing_is_stored(harness, forgery):
    sid = "CA" + "f" * 32
    requests = [
        ("voice", call(sid)),
        ("menu?lang=de", call(sid, Digits="1")),
        ("dial-result?lang=de", call(sid, DialCallStatus="no-answer")),
        ("recording?lang=de", call(sid, RecordingSid="RE" + "f" * 32, RecordingUrl="https://api.twilio.com/r",
                                   RecordingDuration="12")),
        ("transcription", call(sid, RecordingSid="RE" + "f" * 32, TranscriptionSid="TR1",
                               TranscriptionStatus="completed", TranscriptionText="Hallo")),
        ("call-status", call(sid, CallStatus="completed")),
        ("sms", sms("SM" + "f" * 32, "Hallo")),
        ("status", {"MessageSid": "SM" + "e" * 32, "MessageStatus": "delivered"}),
    ]
    for route, params in requests:
        target = route
        if forgery.get("url") == "loopback":  # signed, but for a URL Twilio would not call
            loopback = f"{harness.base_url}/channels/phone/twilio/{route}"
            response = await twilio_post(harness, route, params, signature=sign(loopback, params))
        else:
            response = await twilio_post(
                harness, target, params, signature=forgery.get("signature", "sign"),
                token=forgery.get("token", AUTH_TOKEN),
            )
        assert response.status == 401, route
        assert (await response.json())["error"] == {
            "code": "invalid_signature", "message": "missing or wrong X-Twilio-Signature header"}
    for table in ("messages", "contacts", "identities", "conversations", "outbox", "delivery_events"):
        assert await harness.count(table) == 0, table


async def test_a_tampered_parameter_breaks_the_signature(harness):
    params = sms("SM" + "1" * 32, "Hallo")
    signature = sign(f"{PUBLIC}/channels/phone/twilio/sms", params)
    response = await twilio_post(harness, "sms", {**params, "Body": "Hallo, geändert"}, signature=signature)
    assert response.status == 401
    assert await harness.count("messages") == 0
    response = await twilio_post(harness, "sms", params, signature=signature)
    assert response.status == 200
    assert await harness.count("messages", "direction = 'in'") == 1


# -- a whole call ------------------------------------------------------------------------------


async def test_whole_call_ends_as_one_conversation_with_the_transcript_and_an_sms_ack(harness, twilio):
    sid = "CA" + "1" * 32
    greeting = await say(harness, "voice", call(sid, CallStatus="ringing"))
    gather = greeting.find("Gather")
    assert gather is not None and gather.get("numDigits") == "1"
    assert "Für Fragen zu Bauarbeiten drücken Sie die 1." in gather.find("Say").text
    assert await harness.count("messages") == 0  # nothing stored before the caller chose

    forward = await say(harness, gather.get("action"), call(sid, Digits="1"))
    dial = forward.find("Dial")
    assert dial is not None and dial.find("Number").text == BAUHOTLINE_FORWARD  # Monday 09:00: open
    conv = await only_conversation(harness)
    assert conv["unit"] == "bauhotline"
    assert conv["routing"]["rule"] == "construction-outside-area"

    voicemail = await say(harness, dial.get("action"), call(sid, DialCallStatus="no-answer"))
    prompt = voicemail.find("Say").text
    reference = conv["case_reference"]
    assert ", ".join(char for char in reference if char.isalnum()) in prompt
    assert "Wir rufen Sie bis heute um 13:00 Uhr zurück." in prompt  # 09:00 Berlin + 4 office hours
    record = voicemail.find("Record")
    assert record.get("transcribe") == "true" and record.get("maxLength") == "120"

    recording = {"RecordingSid": "RE" + "2" * 32, "RecordingUrl": "https://api.twilio.com/rec/RE2",
                 "RecordingDuration": "31"}
    goodbye = await say(harness, record.get("action"), call(sid, **recording))
    assert goodbye.find("Hangup") is not None
    await say(harness, record.get("transcribeCallback"), call(
        sid, **recording, TranscriptionSid="TR" + "3" * 32, TranscriptionStatus="completed",
        TranscriptionText="Vor meinem Haus ist seit einer Woche die Baugrube offen.",
    ))
    await say(harness, "call-status", call(sid, CallStatus="completed", CallDuration="95"))

    assert await harness.run_outbox() >= 1
    (ack,) = twilio.messages
    assert twilio.refused == 0  # basic auth as Twilio wants it
    assert (ack["To"], ack["From"]) == (MOBILE, OUR_NUMBER)
    assert reference in ack["Body"] and "Bau-Hotline" in ack["Body"]
    (row,) = await harness.rows("SELECT idempotency_key FROM outbox WHERE kind = 'ack'")
    assert ack["StatusCallback"] == f"{PUBLIC}/channels/phone/twilio/status?key={row['idempotency_key']}"

    conv = await only_conversation(harness)
    assert [m["kind"] for m in inbound(conv)] == ["call", "voicemail", "edit"]
    voicemail_message = inbound(conv)[1]
    assert voicemail_message["text"] == "Vor meinem Haus ist seit einer Woche die Baugrube offen."
    assert voicemail_message["attachments"][0]["url"] == "https://api.twilio.com/rec/RE2"
    assert "callback_required" in conv["flags"]
    assert conv["contact"]["identities"][0]["address"] == MOBILE
    assert [m["delivery_status"] for m in outbound(conv, "ack")] == ["sent"]


async def test_a_failed_transcript_keeps_the_recording_for_staff(harness):
    sid = "CA" + "4" * 32
    await say(harness, "menu?lang=de", call(sid, Digits="3"))  # fault desk: no forward number
    recording = {"RecordingSid": "RE" + "4" * 32, "RecordingUrl": "https://api.twilio.com/rec/RE4",
                 "RecordingDuration": "20"}
    await say(harness, "recording?lang=de&topic=fault", call(sid, **recording))
    await say(harness, "transcription", call(sid, **recording, TranscriptionSid="TR" + "4" * 32,
                                               TranscriptionStatus="failed"))
    conv = await only_conversation(harness)
    assert conv["unit"] == "stoerung"
    voicemail, edit = inbound(conv)[1:]
    assert voicemail["kind"] == "voicemail"
    assert voicemail["attachments"][0]["url"] == "https://api.twilio.com/rec/RE4"
    assert edit["kind"] == "edit" and "transcription_failed" in edit["flags"]
    assert {"callback_required", "transcription_failed"} <= set(conv["flags"])


async def test_a_late_failed_transcript_does_not_erase_the_transcript(harness):
    sid = "CA" + "5" * 32
    recording = {"RecordingSid": "RE" + "5" * 32, "RecordingUrl": "https://api.twilio.com/rec/RE5",
                 "RecordingDuration": "20"}
    await say(harness, "menu?lang=de", call(sid, Digits="3"))
    await say(harness, "recording?lang=de&topic=fault", call(sid, **recording))
    await say(harness, "transcription", call(sid, **recording, TranscriptionSid="TR" + "5" * 32,
                                               TranscriptionStatus="completed", TranscriptionText="Kein Internet"))
    await say(harness, "transcription", call(sid, **recording, TranscriptionSid="TR" + "6" * 32,
                                               TranscriptionStatus="failed"))
    voicemail = inbound(await only_conversation(harness))[1]
    assert voicemail["text"] == "Kein Internet"


async def test_outside_business_hours_the_call_goes_straight_to_the_voicemail(harness):
    harness.clock.advance(timedelta(hours=12))  # Monday 21:00 in Berlin
    answer = await say(harness, "menu?lang=de", call("CA" + "7" * 32, Digits="1"))
    assert answer.find("Dial") is None and answer.find("Record") is not None
    assert "morgen um" in answer.find("Say").text  # the bauhotline's deadline falls tomorrow


# -- missed calls and call-back duty -----------------------------------------------------------


async def test_hang_up_before_the_menu_is_a_call_back_duty_that_escalates_and_a_reached_call_back_answers_it(
    harness, twilio,
):
    sid = "CA" + "8" * 32
    await say(harness, "voice", call(sid, CallStatus="ringing"))
    await say(harness, "call-status", call(sid, CallStatus="completed", CallDuration="4"))

    conv = await only_conversation(harness)
    assert [m["kind"] for m in inbound(conv)] == ["missed_call"]
    assert "callback_required" in conv["flags"]
    assert conv["deadline"] and not conv["overdue"]
    await harness.run_outbox()
    assert len(twilio.to(MOBILE)) == 1  # the caller learns the case reference by SMS

    assert await harness.escalate() == []  # not yet due
    harness.clock.set(datetime.fromisoformat(conv["deadline"]) + timedelta(minutes=1))
    escalated = await harness.escalate()
    assert [e["conversation"]["id"] for e in escalated] == [conv["id"]]
    conv = await conversation(harness, conv["id"])
    assert conv["overdue"] and conv["escalation_level"] == 1 and len(conv["escalations"]) == 1

    status, body = await harness.api(
        "POST", f"/api/v1/conversations/{conv['id']}/callbacks", json={"outcome": "reached", "note": "Termin vereinbart"}
    )
    assert status == 201 and body["answered"] is True
    conv = await conversation(harness, conv["id"])
    assert conv["state"] == "answered" and not conv["overdue"]
    assert "callback_required" not in conv["flags"]
    assert [c["outcome"] for c in conv["callbacks"]] == ["reached"]


async def test_forward_not_answered_and_no_voicemail_is_a_missed_call_that_escalates_along_the_chain(harness):
    sid = "CA" + "9" * 32
    forward = await say(harness, "menu?lang=de", call(sid, Digits="1"))
    await say(harness, forward.find("Dial").get("action"), call(sid, DialCallStatus="busy"))
    await say(harness, "call-status", call(sid, CallStatus="completed"))  # hung up at the prompt

    conv = await only_conversation(harness)
    assert [m["kind"] for m in inbound(conv)] == ["call", "missed_call"]
    assert conv["unit"] == "bauhotline" and "callback_required" in conv["flags"]
    harness.clock.set(datetime.fromisoformat(conv["deadline"]) + timedelta(seconds=1))
    await harness.escalate()
    conv = await conversation(harness, conv["id"])
    assert conv["unit"] == "kundenservice"
    assert conv["escalations"][0]["from_unit"] == "bauhotline"


async def test_answered_forward_leaves_no_call_back_duty(harness):
    sid = "CA" + "a" * 32
    forward = await say(harness, "menu?lang=de", call(sid, Digits="1"))
    await take(harness, forward)
    await say(harness, forward.find("Dial").get("action"), call(sid, DialCallStatus="completed"))
    await say(harness, "call-status", call(sid, CallStatus="completed"))
    await say(harness, "call-status", call(sid, CallStatus="completed"))  # Twilio reports the end again
    conv = await only_conversation(harness)
    assert [m["kind"] for m in inbound(conv)] == ["call"]  # the second report made it a missed call
    assert "callback_required" not in conv["flags"]


async def test_a_forward_staff_picked_up_answers_the_call_and_never_escalates(harness):
    """The conversation stayed open after staff had spoken with the caller, and escalated as
    unanswered."""
    sid = "CA" + "d" * 32
    forward = await say(harness, "menu?lang=de", call(sid, Digits="1"))
    await take(harness, forward)
    for _ in range(2):  # Twilio may post the dial's end again
        await say(harness, forward.find("Dial").get("action"), call(sid, DialCallStatus="completed", DialCallDuration="95"))
    await say(harness, "call-status", call(sid, CallStatus="completed"))
    conv = await only_conversation(harness)
    assert conv["state"] == "answered" and conv["deadline"] is None
    assert [m["text"] for m in conv["messages"] if m["kind"] == "callback"] == ["Call put through and answered (95 s)"]
    harness.clock.advance(timedelta(days=3))
    assert await harness.escalate() == []


async def test_a_forward_only_a_mailbox_picked_up_leaves_the_case_open_and_the_caller_gets_our_voicemail(harness):
    """Twilio says "completed" when anything picks up: a staff phone's mailbox answered the
    conversation, which then never escalated."""
    sid = "CA" + "c" * 31 + "2"
    forward = await say(harness, "menu?lang=de", call(sid, Digits="1"))
    await take(harness, forward, digits="")  # the mailbox presses nothing
    voicemail = await say(harness, forward.find("Dial").get("action"), call(sid, DialCallStatus="completed",
                                                                               DialCallDuration="31"))
    assert voicemail.find("Record") is not None
    await say(harness, "call-status", call(sid, CallStatus="completed"))
    conv = await only_conversation(harness)
    assert conv["state"] != "answered" and conv["deadline"] is not None
    assert "callback_required" in conv["flags"]


async def test_without_screening_an_answered_forward_ends_the_call_and_answers_nothing(tmp_path, twilio):
    async with CoreHarness(tmp_path, entrypoints=("webform", "phone"), env=phone_env(twilio),
                           settings={"phone": {"screen_forwards": False}}) as harness:
        sid = "CA" + "c" * 31 + "3"
        forward = await say(harness, "menu?lang=de", call(sid, Digits="1"))
        assert forward.find("Dial").find("Number").get("url") is None
        answer = await say(harness, forward.find("Dial").get("action"), call(sid, DialCallStatus="completed"))
        assert answer.find("Hangup") is not None
        await say(harness, "call-status", call(sid, CallStatus="completed"))
        conv = await only_conversation(harness)
        assert [m["kind"] for m in inbound(conv)] == ["call"] and conv["state"] != "answered"


async def test_a_transcript_that_comes_before_its_voicemail_shows_in_the_call(harness):
    """Twilio's two callbacks race: a transcript that came first was stored with no
    conversation at all, and the caller's words showed nowhere."""
    sid = "CA" + "7" * 32
    forward = await say(harness, "menu?lang=de", call(sid, Digits="1"))
    voicemail = await say(harness, forward.find("Dial").get("action"), call(sid, DialCallStatus="no-answer"))
    record = voicemail.find("Record")
    recording = {"RecordingSid": "RE" + "7" * 32, "RecordingUrl": "https://api.twilio.com/rec/RE7",
                 "RecordingDuration": "20"}
    await say(harness, record.get("transcribeCallback"), call(
        sid, **recording, TranscriptionSid="TR" + "7" * 32, TranscriptionStatus="completed",
        TranscriptionText="Die Ampel an der Ecke ist seit gestern aus.",
    ))
    await say(harness, record.get("action"), call(sid, **recording))
    conv = await only_conversation(harness)
    assert "Die Ampel an der Ecke ist seit gestern aus." in [m["text"] for m in inbound(conv)]
    assert await harness.count("messages", "conversation_id IS NULL") == 0


async def test_a_missed_call_refused_by_the_database_is_logged_and_stored_from_a_redelivery(harness, caplog):
    """The call was marked ended before its missed call was stored: after a 503, a redelivery
    of the same end report (Twilio's retry policy with 5xx) was answered 200 and ignored, and
    the missed call was lost. Without a redelivery, the log names the call and the caller."""
    sid = "CA" + "b" * 32
    await say(harness, "menu?lang=de", call(sid, Digits="1"))
    with harness.refusing_writes(), caplog.at_level(logging.ERROR):
        response = await twilio_post(harness, "call-status", call(sid, CallStatus="completed"))
        assert response.status == 503
    assert any(sid in r.getMessage() and MOBILE in r.getMessage() for r in caplog.records)
    await say(harness, "call-status", call(sid, CallStatus="completed"))  # the redelivery
    assert await harness.count("messages", "kind = 'missed_call'") == 1


async def test_an_sms_from_a_landline_number_is_acknowledged_by_sms(harness, twilio):
    """A number that texted us takes texts (a landline or VoIP SMS service), whatever range it
    is in: the acknowledgement failed as not_mobile and became a call-back duty."""
    response = await twilio_post(harness, "sms", sms("SM" + "d" * 32, "Wann ist die Straße wieder frei?", sender=LANDLINE))
    assert response.status == 200
    await harness.run_outbox()
    (ack,) = twilio.messages
    assert ack["To"] == LANDLINE
    conv = await only_conversation(harness)
    assert "callback_required" not in conv["flags"] and "undeliverable" not in conv["flags"]


async def missed_call_from(harness: CoreHarness, caller: str, sid: str) -> dict[str, Any]:
    await say(harness, "voice", call(sid, caller=caller))
    await say(harness, "call-status", call(sid, caller=caller, CallStatus="completed"))
    await harness.run_outbox()
    return await only_conversation(harness)


async def log_callback(harness: CoreHarness, conversation_id: int, outcome: str) -> dict[str, Any]:
    status, body = await harness.api(
        "POST", f"/api/v1/conversations/{conversation_id}/callbacks", json={"outcome": outcome}
    )
    assert status == 201, body
    return body


async def test_after_the_configured_failed_call_backs_the_duty_escalates(harness):
    conv = await missed_call_from(harness, MOBILE, "CA" + "b" * 32)
    assert conv["unit"] == "kundenservice"
    for attempt in range(1, CALLBACK_ATTEMPTS):
        assert (await log_callback(harness, conv["id"], "not_reached"))["escalated"] is False, attempt
    assert (await log_callback(harness, conv["id"], "not_reached"))["escalated"] is True
    conv = await conversation(harness, conv["id"])
    assert len(conv["escalations"]) == 1 and "callback_failed" in conv["flags"]
    assert [c["outcome"] for c in conv["callbacks"]] == ["not_reached"] * CALLBACK_ATTEMPTS


async def test_after_the_configured_failed_call_backs_an_sms_goes_to_the_mobile_number(harness, twilio):
    conv = await missed_call_from(harness, MOBILE, "CA" + "c" * 32)
    assert len(twilio.to(MOBILE)) == 1  # the acknowledgement
    for _ in range(1, CALLBACK_ATTEMPTS):
        await log_callback(harness, conv["id"], "not_reached")
        await harness.run_outbox()
    assert len(twilio.to(MOBILE)) == 1  # nothing before the last attempt
    await log_callback(harness, conv["id"], "not_reached")
    await harness.run_outbox()
    assert len(twilio.to(MOBILE)) == 2
    assert conv["case_reference"] in twilio.to(MOBILE)[-1]["Body"]


# -- landlines ---------------------------------------------------------------------------------


def suppressed_acks(conv: Mapping[str, Any]) -> list[str]:
    return [e["data"].get("reason", "") for e in conv["events"] if e["kind"] == "ack_suppressed"]


async def test_a_landline_caller_gets_no_sms_ack_and_the_conversation_shows_it(harness, twilio):
    sid = "CA" + "d" * 32
    voicemail = await say(harness, "menu?lang=de", call(sid, caller=LANDLINE, Digits="3"))  # fault desk
    await say(harness, voicemail.find("Record").get("action"), call(
        sid, caller=LANDLINE, RecordingSid="RE" + "d" * 32, RecordingUrl="https://api.twilio.com/rec/REd",
        RecordingDuration="15",
    ))
    await harness.run_outbox()
    assert twilio.messages == []

    conv = await only_conversation(harness)
    spelled = ", ".join(char for char in conv["case_reference"] if char.isalnum())
    assert spelled in voicemail.find("Say").text  # the caller heard the case reference instead
    assert [m["kind"] for m in inbound(conv)] == ["call", "voicemail"]
    assert outbound(conv, "ack") == []
    assert [reason for reason in suppressed_acks(conv) if "landline" in reason]
    assert "callback_required" in conv["flags"] and "undeliverable" not in conv["flags"]
    assert conv["contact"]["identities"] == [
        {"kind": "phone", "address": LANDLINE, "last_inbound_at": conv["contact"]["identities"][0]["last_inbound_at"],
         "failed": False, "claimed": False}
    ]


async def test_an_answered_call_from_a_landline_leaves_no_call_back_duty(harness, twilio):
    sid = "CA" + "e" * 31 + "1"
    forward = await say(harness, "menu?lang=de", call(sid, caller=LANDLINE, Digits="1"))
    await take(harness, forward, caller=LANDLINE)
    await say(harness, forward.find("Dial").get("action"), call(sid, caller=LANDLINE, DialCallStatus="completed"))
    await say(harness, "call-status", call(sid, caller=LANDLINE, CallStatus="completed"))
    await harness.run_outbox()
    assert twilio.messages == []
    conv = await only_conversation(harness)
    assert conv["flags"] == []
    assert suppressed_acks(conv)


# -- CTI events --------------------------------------------------------------------------------


async def cti(harness: CoreHarness, event: Mapping[str, str], secret: str = CTI_SECRET) -> aiohttp.ClientResponse:
    return await harness.client.post(f"/channels/phone/cti/{secret}", json=dict(event))


async def test_an_unreadable_cti_event_gets_its_reason_in_the_json_error(harness, twilio):
    response = await harness.client.post(f"/channels/phone/cti/{CTI_SECRET}", data=b'{"event": "hang',
                                         headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["error"] == {"code": "bad_request", "message": "unreadable event"}


async def test_cti_hangups_with_no_answer_become_call_back_duties(harness, twilio):
    base = {"direction": "in", "to": "030 99999999"}
    for event in ("newCall", "answer"):
        response = await cti(harness, {**base, "event": event, "from": "030 12345678", "callId": "pbx-1"})
        assert response.status == 200 and (await response.json())["stored"] is False
    response = await cti(harness, {**base, "event": "hangup", "cause": "noAnswer", "from": "030 12345678", "callId": "pbx-1"})
    assert (await response.json())["stored"] is True
    response = await cti(harness, {**base, "event": "hangup", "cause": "noAnswer", "from": "anonymous", "callId": "pbx-2"})
    answer = await response.json()
    assert answer["stored"] is True
    again = await cti(harness, {**base, "event": "hangup", "cause": "noAnswer", "from": "anonymous", "callId": "pbx-2"})
    assert (await again.json())["duplicate"] is True

    rows = await harness.rows("SELECT id FROM conversations ORDER BY id")
    assert len(rows) == 2
    landline, withheld = [await conversation(harness, row["id"]) for row in rows]
    assert [m["kind"] for m in inbound(landline)] == ["missed_call"]
    assert landline["contact"]["identities"][0]["address"] == LANDLINE
    assert "callback_required" in landline["flags"] and landline["deadline"]
    assert withheld["case_reference"] == answer["case_reference"]
    assert {"callback_required", "no_number"} <= set(withheld["flags"]) and withheld["deadline"]
    assert outbound(withheld, "ack") == []  # nobody to send it to
    assert outbound(landline, "ack") == [] and suppressed_acks(landline)  # a landline takes no SMS

    await harness.run_outbox()
    assert twilio.messages == []


async def test_cti_with_a_wrong_secret_stores_nothing_and_looks_like_no_endpoint(harness):
    response = await cti(harness, {"event": "hangup", "cause": "noAnswer", "from": "030 12345678", "callId": "x"},
                         secret="guessed")
    assert response.status == 404
    assert await harness.count("messages") == 0
    nowhere = await harness.client.post("/channels/phone/nothing-here/guessed", json={"event": "hangup"})
    assert (nowhere.status, await nowhere.json()) == (404, await response.json())


@pytest.mark.parametrize("secret", [CTI_SECRET + "x", CTI_SECRET[:-1], CTI_SECRET.upper(), CTI_SECRET[:4]])
async def test_cti_with_a_secret_that_is_nearly_right_is_refused(harness, secret):
    response = await cti(harness, {"event": "hangup", "cause": "noAnswer", "from": "030 12345678", "callId": "x"},
                         secret=secret)
    assert response.status == 404
    assert await harness.count("messages") == 0


async def test_a_sipgate_hangup_that_reached_nobody_is_a_missed_call_from_the_international_number(harness, twilio):
    """sipgate.io posts numbers as digits without "+" and says notFound or congestion when the
    caller reached nobody: the number became +4949..., and those causes were dropped."""
    form = {"event": "hangup", "cause": "notFound", "callId": "sg-1", "from": "4915791234567",
            "to": "493099999999", "direction": "in", "user[]": "Alice"}  # as sipgate posts it: a form
    response = await harness.client.post(f"/channels/phone/cti/{CTI_SECRET}", data=form)
    assert response.status == 200 and (await response.json())["stored"] is True
    response = await harness.client.post(f"/channels/phone/cti/{CTI_SECRET}",
                                         data={**form, "callId": "sg-2", "cause": "congestion"})
    assert (await response.json())["stored"] is True
    response = await harness.client.post(f"/channels/phone/cti/{CTI_SECRET}",
                                         data={**form, "callId": "sg-3", "cause": "normalClearing"})
    assert (await response.json())["stored"] is False

    conv = await only_conversation(harness)
    assert [m["kind"] for m in inbound(conv)] == ["missed_call", "missed_call"]
    assert [i["address"] for i in conv["contact"]["identities"]] == ["+4915791234567"]
    await harness.run_outbox()
    assert [m["To"] for m in twilio.messages] == ["+4915791234567"]  # the acknowledgement, by SMS to the mobile


async def test_a_pbx_writing_international_numbers_says_so_and_a_caller_from_abroad_is_read_right(tmp_path, twilio):
    """Without the setting an Austrian caller's digits (436641234567) cannot be told from a
    German number; sipgate.io writes every number internationally."""
    async with CoreHarness(tmp_path, entrypoints=("webform", "phone"), env=phone_env(twilio),
                           settings={"phone": {"cti_number_format": "international"}}) as harness:
        form = {"event": "hangup", "cause": "noAnswer", "callId": "sg-at", "from": "436641234567",
                "to": "493099999999", "direction": "in"}
        response = await harness.client.post(f"/channels/phone/cti/{CTI_SECRET}", data=form)
        assert (await response.json())["stored"] is True
        conv = await only_conversation(harness)
        assert [i["address"] for i in conv["contact"]["identities"]] == ["+436641234567"]


async def test_our_own_sender_refused_by_twilio_keeps_the_sms_queued_and_the_residents_number_good(
    harness, twilio, caplog,
):
    twilio.refusal = {"code": 21212, "message": "The 'From' number +493099999999 is not a valid phone number",
                      "more_info": "https://www.twilio.com/docs/errors/21212", "status": 400}
    assert (await twilio_post(harness, "sms", sms("SM" + "1" * 32, "Hallo"))).status == 200
    with caplog.at_level(logging.ERROR):
        await harness.run_outbox()
    assert twilio.refused == 1
    # logged where every channel's refusal of its settings is: by the outbox, naming the channel
    assert any("21212" in r.getMessage() and "channel phone" in r.getMessage() and r.levelname == "ERROR"
               for r in caplog.records)
    conv = await only_conversation(harness)
    assert conv["contact"]["identities"][0]["failed"] is False
    assert "undeliverable" not in conv["flags"] and "callback_required" not in conv["flags"]
    (row,) = await harness.rows("SELECT state, last_error FROM outbox")
    assert row["state"] == "pending" and "21212" in row["last_error"]

    twilio.refusal = None  # the operator fixed phone_number: the acknowledgement goes out
    harness.clock.advance(timedelta(hours=1))
    await harness.run_outbox()
    assert [m["To"] for m in twilio.messages] == [MOBILE]


async def test_a_refused_recipient_marks_the_number_failed(harness, twilio):
    twilio.refusal = {"code": 21614, "message": "'To' number is not a valid mobile number", "status": 400}
    assert (await twilio_post(harness, "sms", sms("SM" + "2" * 32, "Hallo"))).status == 200
    await harness.run_outbox()
    conv = await only_conversation(harness)
    assert conv["contact"]["identities"][0]["failed"] is True


async def test_a_caller_about_an_overdue_case_hears_no_call_back_time_that_has_passed(harness, twilio):
    """The caller rings again at 20:00 about a missed call due at 17:00 and heard "Wir rufen Sie
    bis heute um 17:00 Uhr zurück"."""
    conv = await missed_call_from(harness, MOBILE, "CA" + "1" * 32)
    harness.clock.set(datetime.fromisoformat(conv["deadline"]) + timedelta(hours=3))
    await harness.escalate()
    answer = await say(harness, "menu?lang=de", call("CA" + "2" * 32))  # no key: the same case
    conv = await only_conversation(harness)
    assert datetime.fromisoformat(conv["deadline"]) < harness.clock.now()  # overdue
    text = answer.find("Say").text
    assert "Wir rufen Sie so bald wie möglich zurück." in text and "Wir rufen Sie bis" not in text


# -- one contact across channels ---------------------------------------------------------------


def whatsapp_webhook(sender: str, message_id: str, text: str, phone_number_id: str) -> dict[str, Any]:
    """A WhatsApp Cloud API webhook body with one text message."""
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA1", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": OUR_NUMBER.lstrip("+"), "phone_number_id": phone_number_id},
            "contacts": [{"profile": {"name": "Erika Muster"}, "wa_id": sender.lstrip("+")}],
            "messages": [{"from": sender.lstrip("+"), "id": message_id, "timestamp": "1764489600",
                          "type": "text", "text": {"body": text}}],
        }}]}],
    }


async def test_the_same_number_by_sms_call_cti_and_whatsapp_is_one_contact(tmp_path, twilio):
    app_secret = "whatsapp-app-secret"
    env = phone_env(
        twilio, WHATSAPP_APP_SECRET=app_secret, WHATSAPP_VERIFY_TOKEN="verify", WHATSAPP_ACCESS_TOKEN="access",
        WHATSAPP_PHONE_NUMBER_ID="1122334455", WHATSAPP_GRAPH_URL=twilio.url,
    )
    async with CoreHarness(tmp_path, entrypoints=("webform", "phone", "whatsapp"), env=env) as harness:
        assert "whatsapp" in harness.core.channels
        assert (await twilio_post(harness, "sms", sms("SM" + "1" * 32, "Wann wird die Straße wieder zu?"))).status == 200
        await say(harness, "menu?lang=de", call("CA" + "e" * 32, Digits="2"))
        response = await cti(harness, {"event": "hangup", "cause": "busy", "direction": "in",
                                       "from": "0151 12345678", "callId": "pbx-9"})
        assert response.status == 200
        body = json.dumps(whatsapp_webhook(MOBILE, "wamid.HBgM1", "Hallo, ich habe noch eine Frage", "1122334455"))
        digest = hmac.new(app_secret.encode(), body.encode(), hashlib.sha256).hexdigest()
        response = await harness.client.post(
            "/channels/whatsapp/webhook", data=body,
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"},
        )
        assert response.status == 200, await response.text()

        rows = await harness.rows("SELECT channel, kind, contact_id FROM messages WHERE direction = 'in' ORDER BY id")
        assert [(r["channel"], r["kind"]) for r in rows] == [
            ("phone", "message"), ("phone", "call"), ("phone", "missed_call"), ("whatsapp", "message"),
        ]
        assert len({r["contact_id"] for r in rows}) == 1
        phones = await harness.rows("SELECT address FROM identities WHERE kind = 'phone'")
        assert phones == [{"address": MOBILE}]


# -- TwiML -------------------------------------------------------------------------------------


async def test_every_twiml_answer_parses_as_xml_and_speaks_german_by_default(harness):
    sid = "CA" + "2" * 32
    recording = {"RecordingSid": "RE" + "6" * 32, "RecordingUrl": "https://api.twilio.com/rec/RE6",
                 "RecordingDuration": "9"}
    spoken_routes = {
        "voice": call(sid, CallStatus="ringing"),
        "voice (withheld)": call("CA" + "3" * 32, caller="+266696687", CallStatus="ringing"),
        "menu?lang=de": call(sid, Digits="1"),
        "menu?lang=de (no key)": call("CA" + "5" * 32),
        "dial-result?lang=de": call(sid, DialCallStatus="no-answer"),
        "dial-result?lang=de (answered)": call("CA" + "6" * 32, DialCallStatus="completed"),
        "screen?lang=de&ref=K-7F3Q9A&call=CA1": call("CA" + "7" * 32, Direction="outbound-dial"),
        "recording?lang=de&topic=construction": call(sid, **recording),
        "recording?lang=de (nothing said)": call("CA" + "5" * 32, RecordingDuration="0"),
    }
    for route, params in spoken_routes.items():
        answer = await say(harness, route.split(" ")[0], params)
        says = list(answer.iter("Say"))
        assert says, route
        assert says[0].get("language") == "de-DE", route
    silent_routes = {
        "transcription": call(sid, **recording, TranscriptionSid="TR9", TranscriptionStatus="completed",
                              TranscriptionText="Hallo"),
        "call-status": call(sid, CallStatus="completed"),
        "sms": sms("SM" + "9" * 32, "Hallo"),
        "status": {"MessageSid": "SM" + "8" * 32, "MessageStatus": "sent"},
    }
    for route, params in silent_routes.items():
        answer = await say(harness, route, params)
        assert list(answer) == [], route


async def test_the_english_key_switches_the_whole_call_to_english(harness):
    sid = "CA" + "f" * 31 + "0"
    menu = await twiml(await twilio_post(harness, "menu?lang=de", call(sid, Digits="9")), "en-GB")
    voicemail = await twiml(
        await twilio_post(harness, menu.find("Gather").get("action"), call(sid, Digits="3")), "en-GB"
    )
    assert "Your case reference is" in voicemail.find("Say").text


# -- SMS out and delivery statuses -------------------------------------------------------------


async def test_sms_status_callbacks_become_delivery_statuses_in_the_inbox(harness, twilio):
    assert (await twilio_post(harness, "sms", sms("SM" + "a" * 32, "Hallo, wer repariert den Gehweg?"))).status == 200
    await harness.run_outbox()
    (ack,) = twilio.messages
    conv = await only_conversation(harness)
    assert outbound(conv, "ack")[0]["delivery_status"] == "sent"

    for status in ("delivered", "sent"):  # a late "sent" does not undo "delivered"
        await say(harness, "status", {"MessageSid": ack["sid"], "MessageStatus": status, "To": MOBILE})
    conv = await conversation(harness, conv["id"])
    assert outbound(conv, "ack")[0]["delivery_status"] == "delivered"

    status, _ = await harness.api("POST", f"/api/v1/conversations/{conv['id']}/replies", json={"text": "Wir kümmern uns."})
    assert status == 201
    await harness.run_outbox()
    reply_sid = twilio.messages[-1]["sid"]
    await say(harness, "status", {"MessageSid": reply_sid, "MessageStatus": "undelivered", "ErrorCode": "30005",
                                  "ErrorMessage": "Unknown destination handset"})
    conv = await conversation(harness, conv["id"])
    (reply,) = outbound(conv, "reply")
    assert reply["delivery_status"] == "failed"
    assert conv["state"] != "answered"  # an undelivered answer is no answer
    assert "callback_required" in conv["flags"]

    assert "30005" in reply["deliveries"][0]["last_error"]


async def test_a_status_callback_twilio_sends_again_is_recorded_once(harness, twilio):
    """Twilio retries a callback it got no 2xx for; its callbacks carry no time, so each was
    stamped on arrival and stored as one more delivery event: a duplicate changed something."""
    assert (await twilio_post(harness, "sms", sms("SM" + "c" * 32, "Hallo, wer repariert den Gehweg?"))).status == 200
    await harness.run_outbox()
    (ack,) = twilio.messages
    for _ in range(2):
        await say(harness, "status", {"MessageSid": ack["sid"], "MessageStatus": "delivered", "To": MOBILE})
        harness.clock.advance(timedelta(seconds=30))
    await say(harness, "status", {"MessageSid": ack["sid"], "MessageStatus": "read", "To": MOBILE})
    events = await harness.rows("SELECT status FROM delivery_events WHERE provider_id = ? ORDER BY id", (ack["sid"],))
    assert [e["status"] for e in events] == ["delivered", "read"]


async def test_a_delivered_staff_reply_answers_the_conversation(harness, twilio):
    await twilio_post(harness, "sms", sms("SM" + "b" * 32, "Hallo"))
    conv = await only_conversation(harness)
    await harness.api("POST", f"/api/v1/conversations/{conv['id']}/replies", json={"text": "Erledigt."})
    await harness.run_outbox()
    await say(harness, "status", {"MessageSid": twilio.messages[-1]["sid"], "MessageStatus": "delivered"})
    conv = await conversation(harness, conv["id"])
    assert conv["state"] == "answered"


async def test_an_sms_twilio_took_without_naming_its_sid_is_not_sent_twice(harness, twilio, caplog):
    """Twilio answered 201 but its answer named no sid (cut short on the way). The send was
    retried: a second SMS, since Twilio's Messages API has no idempotency key. A 2xx means
    Twilio took it: it is recorded as sent, and its status callback, whose URL carries our key,
    gives it its sid, so that "delivered" answers the conversation."""
    await twilio_post(harness, "sms", sms("SM" + "d" * 32, "Hallo, wer repariert den Gehweg?"))
    await harness.run_outbox()
    conv = await only_conversation(harness)
    twilio.without_sid = True
    status, reply = await harness.api("POST", f"/api/v1/conversations/{conv['id']}/replies", json={"text": "Erledigt."})
    assert status == 201
    with caplog.at_level(logging.WARNING, logger="contact_router"):
        await harness.run_outbox()
        for _ in range(3):
            harness.clock.advance(timedelta(minutes=10))
            await harness.run_outbox()
    assert len(twilio.messages) == 2  # the acknowledgement and the answer, once
    assert any("named no sid" in r.getMessage() for r in caplog.records)
    (row,) = await harness.rows("SELECT state, provider_id, idempotency_key FROM outbox WHERE kind = 'reply'")
    assert (row["state"], row["provider_id"]) == ("sent", None)
    answer = twilio.messages[-1]
    assert answer["StatusCallback"] == f"{PUBLIC}/channels/phone/twilio/status?key={row['idempotency_key']}"
    await say(harness, answer["StatusCallback"], {"MessageSid": answer["sid"], "MessageStatus": "delivered", "To": MOBILE})
    conv = await conversation(harness, conv["id"])
    assert conv["state"] == "answered"
    (sent,) = outbound(conv, "reply")
    assert sent["delivery_status"] == "delivered"
    (row,) = await harness.rows("SELECT provider_id, delivery_status FROM outbox WHERE kind = 'reply'")
    assert row == {"provider_id": answer["sid"], "delivery_status": "delivered"}


async def test_a_late_delivered_sms_the_outbox_gave_up_on_counts(tmp_path, twilio):
    """Twilio took the answer, but its answer never came back in time, and the outbox gave up:
    the case went on the call-back list. Twilio's "delivered" came afterwards; it named a sid we
    never had and was dropped. Its callback URL carries our key: the answer counts."""
    from router.outbox import OutboxPolicy

    policy = OutboxPolicy(base_delay=0.01, max_delay=0.05, poll_seconds=0.05, send_timeout=5, max_attempts=1,
                          retry_seconds=0)
    async with CoreHarness(tmp_path, entrypoints=("webform", "phone"), env=phone_env(twilio), outbox_policy=policy,
                           settings={"phone": {"send_timeout": 0.3}}) as harness:
        await twilio_post(harness, "sms", sms("SM" + "e" * 32, "Hallo, wer repariert den Gehweg?"))
        await harness.run_outbox()
        conv = await only_conversation(harness)
        await harness.api("POST", f"/api/v1/conversations/{conv['id']}/replies", json={"text": "Erledigt."})
        twilio.answer_after = 1.0
        await harness.run_outbox()
        # No attempts left: one more look for its status after status_wait, then given up.
        twilio.answer_after = 0.0
        harness.clock.advance(timedelta(seconds=60))
        await harness.run_outbox()
        conv = await conversation(harness, conv["id"])
        assert {"undeliverable", "callback_required"} <= set(conv["flags"])
        answer = twilio.messages[-1]
        await say(harness, answer["StatusCallback"], {"MessageSid": answer["sid"], "MessageStatus": "delivered", "To": MOBILE})
        conv = await conversation(harness, conv["id"])
        assert (conv["state"], conv["flags"]) == ("answered", [])
        assert len(twilio.messages) == 2


async def _answer_whose_send_timed_out(harness: CoreHarness, twilio: FakeTwilio, *, taken: bool) -> dict[str, Any]:
    """An SMS conversation acknowledged, then a staff answer whose POST to Twilio got no answer
    within ``send_timeout`` (Twilio took the SMS, or did not); returns the conversation."""
    await twilio_post(harness, "sms", sms("SM" + "7" * 32, "Hallo, wer repariert den Gehweg?"))
    await harness.run_outbox()
    conv = await only_conversation(harness)
    await harness.api("POST", f"/api/v1/conversations/{conv['id']}/replies", json={"text": "Erledigt."})
    if taken:
        twilio.answer_after = 1.0
    else:
        twilio.lose_after = 1.0
    await harness.run_outbox()
    twilio.answer_after = twilio.lose_after = 0.0
    (row,) = await harness.rows("SELECT state, last_error FROM outbox WHERE kind = 'reply'")
    assert row["state"] == "pending" and "Twilio" in row["last_error"]
    return conv


async def test_an_sms_twilio_took_whose_answer_timed_out_is_not_sent_twice(tmp_path, twilio):
    """Twilio took the answer, but its answer to the POST never came within ``send_timeout``.
    The retry came after the backoff, a second or two later: a second SMS, since Twilio's
    Messages API has no idempotency key. The retry now waits ``status_wait`` for a status
    callback naming the send's key (its URL carries it), and that callback records the send."""
    async with CoreHarness(tmp_path, entrypoints=("webform", "phone"), env=phone_env(twilio),
                           settings={"phone": {"send_timeout": 0.3}}) as harness:
        conv = await _answer_whose_send_timed_out(harness, twilio, taken=True)
        assert len(twilio.messages) == 2
        harness.clock.advance(timedelta(seconds=5))  # past the backoff, below status_wait
        await harness.run_outbox()
        assert len(twilio.messages) == 2
        answer = twilio.messages[-1]
        await say(harness, answer["StatusCallback"], {"MessageSid": answer["sid"], "MessageStatus": "sent", "To": MOBILE})
        harness.clock.advance(timedelta(seconds=60))  # past status_wait
        await harness.run_outbox()
        assert len(twilio.messages) == 2  # the acknowledgement and the answer, once
        (row,) = await harness.rows("SELECT state, provider_id FROM outbox WHERE kind = 'reply'")
        assert row == {"state": "sent", "provider_id": answer["sid"]}
        await say(harness, answer["StatusCallback"], {"MessageSid": answer["sid"], "MessageStatus": "delivered", "To": MOBILE})
        assert (await conversation(harness, conv["id"]))["state"] == "answered"


async def test_an_sms_twilio_did_not_take_is_sent_again_after_the_status_wait(tmp_path, twilio):
    """The POST got no answer and Twilio had not taken the SMS: no callback comes, and the
    answer goes again once ``status_wait`` has passed."""
    async with CoreHarness(tmp_path, entrypoints=("webform", "phone"), env=phone_env(twilio),
                           settings={"phone": {"send_timeout": 0.3}}) as harness:
        conv = await _answer_whose_send_timed_out(harness, twilio, taken=False)
        assert len(twilio.messages) == 1  # the acknowledgement only
        harness.clock.advance(timedelta(seconds=5))
        await harness.run_outbox()
        assert len(twilio.messages) == 1  # waiting for a status that may prove the send went
        harness.clock.advance(timedelta(seconds=60))
        await harness.run_outbox()
        assert len(twilio.messages) == 2
        assert twilio.messages[-1]["Body"].startswith("Erledigt.")
        (row,) = await harness.rows("SELECT state, provider_id FROM outbox WHERE kind = 'reply'")
        assert row == {"state": "sent", "provider_id": twilio.messages[-1]["sid"]}
        assert "undeliverable" not in (await conversation(harness, conv["id"]))["flags"]


async def test_an_answer_in_an_sms_conversation_goes_without_the_status_link(harness, twilio):
    """The resident writes back by SMS: the link is for answers whose conversation is elsewhere
    (a web form's), and on every SMS answer it made a short text two or three segments."""
    await twilio_post(harness, "sms", sms("SM" + "9" * 32, "Hallo"))
    conv = await only_conversation(harness)
    await harness.api("POST", f"/api/v1/conversations/{conv['id']}/replies", json={"text": "Die Grube wird am Freitag geschlossen."})
    await harness.run_outbox()
    assert twilio.messages[-1]["Body"] == "Die Grube wird am Freitag geschlossen."


async def test_long_sms_texts_are_shortened_with_the_status_link(harness, twilio):
    await twilio_post(harness, "sms", sms("SM" + "c" * 32, "Hallo"))
    conv = await only_conversation(harness)
    text = "Sehr geehrte Frau Muster, " + " ".join(["wir haben Ihr Anliegen geprüft und die Baustelle besichtigt."] * 40)
    assert len(text) > 1600
    status, _ = await harness.api("POST", f"/api/v1/conversations/{conv['id']}/replies", json={"text": text})
    assert status == 201
    await harness.run_outbox()
    body = twilio.messages[-1]["Body"]
    assert len(body) <= 1600
    assert body.endswith(conv["status_url"]) and conv["status_url"].startswith(f"{PUBLIC}/channels/webform/status/")
    assert body.startswith("Sehr geehrte Frau Muster, wir haben Ihr Anliegen geprüft")
    conv = await conversation(harness, conv["id"])
    assert outbound(conv, "reply")[0]["text"] == text  # the inbox keeps the whole answer


# -- the contract test kit ---------------------------------------------------------------------


async def test_the_phone_channel_keeps_the_channel_contract(harness, twilio):
    async def deliver(harness: CoreHarness, key: str) -> None:
        response = await twilio_post(harness, "sms", sms(f"SM{key}", "Hallo, bitte um Rückruf"))
        assert response.status == 200

    conv = await check_channel_contract(harness, "phone", deliver, sender=("phone", MOBILE))
    assert [m["To"] for m in twilio.messages] == [MOBILE, MOBILE]  # the acknowledgement and the reply
    assert conv["channel"] == "phone"



async def test_a_database_that_refuses_writes_leaves_the_caller_with_the_voicemail_not_an_error(harness, caplog):
    """An error answer to Twilio during a call makes it say "an application error has
    occurred" and hang up. The caller goes on to the voicemail instead, and the log names the
    recording to fetch from Twilio; an SMS, which Twilio keeps in its logs, is answered 503."""
    sid = "CA" + "e" * 32
    with harness.refusing_writes():
        voicemail = await say(harness, "menu?lang=de", call(sid, Digits="1"))
        assert voicemail.find("Dial") is None and voicemail.find("Record") is not None
        with caplog.at_level(logging.ERROR):
            goodbye = await say(harness, "recording?lang=de", call(
                sid, RecordingSid="RE" + "e" * 32, RecordingUrl="https://api.twilio.com/rec/REe", RecordingDuration="12"))
        assert goodbye.find("Say") is not None and goodbye.find("Hangup") is not None
        assert any("https://api.twilio.com/rec/REe" in r.getMessage() for r in caplog.records)
        response = await twilio_post(harness, "sms", sms("SM" + "e" * 32, "Hallo"))
        assert response.status == 503 and response.headers["Retry-After"] == "5"
    assert await harness.count("messages") == 0
    # The voicemail was not stored, so the call's end is still a missed call with a call-back duty.
    await say(harness, "call-status", call(sid, CallStatus="completed", CallDuration="40"))
    assert await harness.count("messages", "kind = 'missed_call'") == 1


async def _form(harness: CoreHarness, *, email: str = "", phone: str = "") -> dict[str, Any]:
    token = (await (await harness.client.get("/channels/webform/token")).json())["form_token"]
    harness.clock.advance(timedelta(seconds=5))
    response = await harness.client.post("/channels/webform/", json={
        "name": "Erna Beispiel", "email": email, "phone": phone, "street": "", "postcode": "", "city": "",
        "customer_number": "", "topic": "other", "message": "Wann bekomme ich Glasfaser?", "form_token": token, "website": ""})
    assert response.status == 201
    return await response.json()


async def test_a_web_form_resident_who_left_only_a_mobile_number_gets_the_answer_by_sms(harness, twilio):
    """Staff answers were only on the status page: a resident who left a mobile number and had
    closed the page was never told, and the case counted as answered."""
    form = await _form(harness, phone="0151 12345678")
    await harness.run_outbox()
    assert twilio.messages == []  # the acknowledgement is the status page
    status, _ = await harness.api("POST", f"/api/v1/conversations/{form['conversation_id']}/replies",
                                  json={"text": "Ihr Anschluss kommt im März."})
    assert status == 201
    await harness.run_outbox()
    [copy] = twilio.to("+4915112345678")
    assert copy["Body"].startswith("Ihr Anschluss kommt im März.") and form["status_url"] in copy["Body"]
    # An SMS back joins that case (a case of its own, with a new reference, before), and is answered there
    await twilio_post(harness, "sms", sms("SM" + "e" * 32, "Danke! Welcher Tag im März?", sender="+4915112345678"))
    rows = await harness.rows("SELECT conversation_id, channel FROM messages WHERE direction = 'in' ORDER BY id")
    assert [(r["conversation_id"], r["channel"]) for r in rows] == [(form["conversation_id"], "webform"),
                                                                  (form["conversation_id"], "phone")]
    assert await harness.count("conversations") == 1
    (conv,) = await harness.rows("SELECT state, deadline FROM conversations")
    assert conv["state"] != "answered" and conv["deadline"] is not None  # waiting for our answer again

    # With an e-mail address the mail tells them (the e-mail plugin's copy); a landline takes no SMS.
    for email, phone in (("erna@example.net", "0151 22345678"), ("", "030 12345678")):
        form = await _form(harness, email=email, phone=phone)
        status, _ = await harness.api("POST", f"/api/v1/conversations/{form['conversation_id']}/replies",
                                      json={"text": "Ihr Anschluss kommt im März."})
        assert status == 201
        assert not await harness.rows("SELECT 1 FROM outbox WHERE conversation_id = ? AND channel = 'phone'",
                                      (form["conversation_id"],))


async def test_no_sms_copy_goes_to_a_number_that_refused_sms(harness, twilio):
    """The core passed the plugin no failed flag: a number Twilio refused for good (STOP, 21610)
    got a copy of every later answer."""
    form = await _form(harness, phone="0151 12345678")
    await harness.core.store.write(lambda conn: conn.execute(
        "UPDATE identities SET failed_at = '2026-11-30T08:00:00.000000Z' WHERE address = '+4915112345678'"))
    status, _ = await harness.api("POST", f"/api/v1/conversations/{form['conversation_id']}/replies",
                                  json={"text": "Ihr Anschluss kommt im März."})
    assert status == 201
    assert not await harness.rows("SELECT 1 FROM outbox WHERE channel = 'phone'")


async def test_without_twilio_a_web_form_answer_queues_no_sms(tmp_path, twilio):
    """A phone channel for a PBX's missed calls alone sends no SMS: a copy queued for it would
    wait for ever."""
    env = {k: v for k, v in phone_env(twilio).items() if not k.startswith("TWILIO_")}
    async with CoreHarness(tmp_path, entrypoints=("webform", "phone"), env=env) as harness:
        assert "phone" in harness.core.channels
        form = await _form(harness, phone="0151 12345678")
        status, _ = await harness.api("POST", f"/api/v1/conversations/{form['conversation_id']}/replies",
                                      json={"text": "Ihr Anschluss kommt im März."})
        assert status == 201
        assert not await harness.rows("SELECT 1 FROM outbox WHERE channel = 'phone'")


async def _answer(harness: CoreHarness, conversation_id: int, text: str = "Ihr Anschluss kommt im März.") -> None:
    status, _ = await harness.api("POST", f"/api/v1/conversations/{conversation_id}/replies", json={"text": text})
    assert status == 201
    await harness.run_outbox()


async def test_a_resident_whose_mail_bounced_for_good_gets_the_answer_by_sms(harness, twilio):
    """Dropping the copy to the refused mail address while the SMS copy stood back for it (the
    contact had an address) left them with nothing but the status page."""
    form = await _form(harness, email="erna@example.net", phone="0151 12345678")
    await harness.core.store.write(lambda conn: conn.execute(
        "UPDATE identities SET failed_at = '2026-11-30T08:00:00.000000Z' WHERE kind = 'email'"))
    await _answer(harness, form["conversation_id"])
    assert [m["To"] for m in twilio.messages] == ["+4915112345678"]


async def test_an_sms_back_joins_the_case_whose_copy_came_last_and_only_that(harness, twilio):
    """It joined the newest open case, whatever its copy; a call with a menu choice for another
    unit was pulled in too; a case closed an hour ago was missed; one settled months ago caught
    a new matter."""
    a = await _form(harness, phone="0151 12345678")
    b = await _form(harness, phone="0151 12345678")
    await _answer(harness, b["conversation_id"])
    await _answer(harness, a["conversation_id"])  # the later copy: the SMS answers this one
    await twilio_post(harness, "sms", sms("SM" + "1" * 32, "Danke, und wann genau?", sender="+4915112345678"))
    (row,) = await harness.rows("SELECT conversation_id FROM messages WHERE channel = 'phone' AND direction = 'in'")
    assert row["conversation_id"] == a["conversation_id"]

    # closed an hour ago: joined and reopened
    status, _ = await harness.api("POST", f"/api/v1/conversations/{a['conversation_id']}/close")
    assert status == 200
    harness.clock.advance(timedelta(hours=1))
    await twilio_post(harness, "sms", sms("SM" + "2" * 32, "Noch eine Frage", sender="+4915112345678"))
    (conv,) = await harness.rows("SELECT state FROM conversations WHERE id = ?", (a["conversation_id"],))
    assert conv["state"] != "closed" and await harness.count("conversations") == 2

    # a call is no text back to the copy, with a menu choice or without
    plain = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA" + "5" * 32, "kind": "call",
                                       "sender": {"kind": "phone", "address": "+4915112345678"}})
    assert plain.conversation_id != a["conversation_id"]
    status, _ = await harness.api("POST", f"/api/v1/conversations/{plain.conversation_id}/close")
    assert status == 200
    # a call whose menu choice goes to another unit is a matter of its own
    call = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA" + "3" * 32, "kind": "call",
                                      "sender": {"kind": "phone", "address": "+4915112345678"}, "topic": "fault"})
    assert call.conversation_id not in (a["conversation_id"], b["conversation_id"], plain.conversation_id)
    assert await harness.count("conversations") == 4

    # months after the answers (and the closes): routed afresh, linked to nothing
    for conversation_id in (a["conversation_id"], call.conversation_id):
        status, _ = await harness.api("POST", f"/api/v1/conversations/{conversation_id}/close")
        assert status == 200
    harness.clock.advance(timedelta(days=200))
    await twilio_post(harness, "sms", sms("SM" + "4" * 32, "Störung: seit heute kein Internet", sender="+4915112345678"))
    assert await harness.count("conversations") == 5
    (new,) = await harness.rows("SELECT unit, linked_to, routing_rule FROM conversations ORDER BY id DESC LIMIT 1")
    assert (new["unit"], new["linked_to"]) == ("stoerung", None), dict(new)


async def test_an_sms_back_exactly_at_the_end_of_the_reopen_window_still_joins(harness, twilio):
    """The copy lookup dropped a case closed exactly ``reopen_days`` ago, which the reopen rule
    still reopens."""
    form = await _form(harness, phone="0151 12345678")
    await _answer(harness, form["conversation_id"])
    status, _ = await harness.api("POST", f"/api/v1/conversations/{form['conversation_id']}/close")
    assert status == 200
    harness.clock.advance(timedelta(days=harness.config.reopen_days))
    await twilio_post(harness, "sms", sms("SM" + "6" * 32, "Noch eine Frage dazu", sender="+4915112345678"))
    (row,) = await harness.rows("SELECT conversation_id FROM messages WHERE channel = 'phone' AND direction = 'in'")
    assert row["conversation_id"] == form["conversation_id"]


async def test_an_sms_back_on_the_last_day_of_the_reopen_window_joins_after_the_clocks_went_back(tmp_path, twilio):
    """The copy lookup compared stored stamps with ``reopen_days`` times 24 hours before now:
    a case closed at noon two weeks before the clocks went back was missed at 11:30 on the last
    day of its window, and the SMS opened a case of its own."""
    noon = datetime(2026, 10, 11, 10, 0, tzinfo=UTC)  # Sunday 12:00 in Berlin, summer time
    async with CoreHarness(tmp_path, entrypoints=("webform", "phone"), env=phone_env(twilio), start=noon) as harness:
        assert harness.config.reopen_days == 14
        form = await _form(harness, phone="0151 12345678")
        await _answer(harness, form["conversation_id"])
        status, _ = await harness.api("POST", f"/api/v1/conversations/{form['conversation_id']}/close")
        assert status == 200
        harness.clock.set(datetime(2026, 10, 25, 10, 30, tzinfo=UTC))  # Sunday 11:30, winter time
        await twilio_post(harness, "sms", sms("SM" + "7" * 32, "Noch eine Frage dazu", sender="+4915112345678"))
        (row,) = await harness.rows("SELECT conversation_id FROM messages WHERE channel = 'phone' AND direction = 'in'")
        assert row["conversation_id"] == form["conversation_id"]
