"""The WhatsApp channel against the real core: webhooks in through the service's own HTTP
server, messages out to a fake Graph API.

The fake Graph API is a real aiohttp server on 127.0.0.1 that records every request, answers
like the Cloud API does, and can be told to fail (an HTTP status with a Cloud API error body,
or no answer in time). The core runs on a real SQLite file with a frozen clock; the tests drive
the outbox (``harness.run_outbox``) and move time (``harness.clock.advance``).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from plugins.whatsapp.parse import parse_webhook
from plugins.whatsapp.signature import sign
from router.testing import DEFAULT_START, CoreHarness, check_channel_contract

from .conftest import fixture_cases

SECRET = "integration-app-secret"
ACCESS_TOKEN = "integration-access-token"
VERIFY_TOKEN = "integration-verify-token"
PHONE_NUMBER_ID = "1122334455667"  # the business number the recorded payloads were sent to
WEBHOOK = "/channels/whatsapp/webhook"
SENDER = "4917612345678"
SENDER_E164 = "+4917612345678"
TIMESTAMP = str(int(DEFAULT_START.timestamp()))
# The channel's timeout for the fake Graph API: its answers come in time even on a busy machine.
# Tests of a send that times out use the short one, with the fake answering a second after it.
TIMEOUT = 10.0
SHORT_TIMEOUT = 3.0
LATE = SHORT_TIMEOUT + 1.0


class FakeGraph:
    """A Graph API stand-in: ``POST /{version}/{phone_number_id}/messages`` and the media
    endpoints, each request recorded.

    ``fail(...)`` queues answers for the next send requests; without one a send is accepted
    with a fresh ``wamid``, as the Cloud API answers.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.media_requests: list[dict[str, Any]] = []
        self.answers: list[tuple[int, dict[str, Any] | None, float]] = []
        self.media: dict[str, tuple[bytes, str]] = {}
        self.wrong_checksum: set[str] = set()
        self.stated_sizes: dict[str, int | None] = {}  # file_size the media endpoint states (None: none)
        self.media_urls: dict[str, str] = {}  # download URLs other than its own
        self.redirects: dict[str, str] = {}  # GET /redirect/{name} answers 302 to this URL
        self.info_redirects: dict[str, str] = {}  # the media endpoint answers 302 for these ids
        self.base_url = ""
        self._count = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{version}/{phone_number_id}/messages", self.send)
        app.router.add_get("/{version}/{media_id}", self.media_info)
        app.router.add_get("/download/{media_id}", self.media_bytes)
        app.router.add_get("/redirect/{name}", self.redirect)
        return app

    async def redirect(self, request: web.Request) -> web.Response:
        self.media_requests.append({"path": request.path, "authorization": request.headers.get("Authorization")})
        raise web.HTTPFound(self.redirects[request.match_info["name"]])

    def fail(self, status: int, code: int | None = None, *, delay: float = 0.0, message: str = "error") -> None:
        """Answer the next send with ``status`` and a Cloud API error ``code`` (or, with a
        ``delay`` beyond the channel's timeout, not in time)."""
        body = None
        if code is not None or status >= 400:
            body = {
                "error": {
                    "message": message,
                    "type": "OAuthException",
                    "code": code if code is not None else status,
                    "error_data": {"messaging_product": "whatsapp", "details": message},
                    "fbtrace_id": "AbCdEf",
                }
            }
        self.answers.append((status, body, delay))

    def hang(self, seconds: float) -> None:
        """Let the next send wait ``seconds`` before it is accepted."""
        self.answers.append((200, None, seconds))

    async def send(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self.requests.append(
            {
                "version": request.match_info["version"],
                "phone_number_id": request.match_info["phone_number_id"],
                "authorization": request.headers.get("Authorization"),
                "json": payload,
            }
        )
        status, body, delay = self.answers.pop(0) if self.answers else (200, None, 0.0)
        if delay:
            await asyncio.sleep(delay)
        if status == 200 and body is None:
            self._count += 1
            to = payload.get("to", "")
            contact = {"input": to, "wa_id": to} if to else {"input": payload.get("recipient"), "user_id": payload.get("recipient")}
            body = {
                "messaging_product": "whatsapp",
                "contacts": [contact],
                "messages": [{"id": f"wamid.OUT{self._count:04d}"}],
            }
        return web.json_response(body, status=status)

    async def media_info(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        self.media_requests.append({"path": request.path, "authorization": request.headers.get("Authorization")})
        if request.headers.get("Authorization") != f"Bearer {ACCESS_TOKEN}":
            return web.json_response({"error": {"code": 190, "message": "Invalid OAuth access token"}}, status=401)
        if media_id in self.info_redirects:
            raise web.HTTPFound(self.info_redirects[media_id])
        if media_id not in self.media:
            return web.json_response({"error": {"code": 100, "message": "Unsupported get request"}}, status=400)
        data, mime_type = self.media[media_id]
        info = {
            "messaging_product": "whatsapp",
            "url": self.media_urls.get(media_id, f"{self.base_url}/download/{media_id}"),
            "mime_type": mime_type,
            "sha256": hashlib.sha256(data if media_id not in self.wrong_checksum else b"other").hexdigest(),
            "file_size": self.stated_sizes.get(media_id, len(data)),
            "id": media_id,
        }
        return web.json_response({k: v for k, v in info.items() if v is not None})

    async def media_bytes(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        self.media_requests.append({"path": request.path, "authorization": request.headers.get("Authorization")})
        if request.headers.get("Authorization") != f"Bearer {ACCESS_TOKEN}" or media_id not in self.media:
            raise web.HTTPNotFound()
        data, mime_type = self.media[media_id]
        return web.Response(body=data, content_type=mime_type)

    @property
    def sent(self) -> list[dict[str, Any]]:
        """The message payloads posted so far."""
        return [r["json"] for r in self.requests]


@pytest.fixture
async def graph(aiohttp_server: Any) -> FakeGraph:
    fake = FakeGraph()
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


def make_harness(tmp_path: Path, graph: FakeGraph, **settings: Any) -> CoreHarness:
    """The service with the web form and WhatsApp, configured through the example config's
    environment variables, sending to the fake Graph API."""
    env = {
        "WHATSAPP_APP_SECRET": SECRET,
        "WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN,
        "WHATSAPP_ACCESS_TOKEN": ACCESS_TOKEN,
        "WHATSAPP_PHONE_NUMBER_ID": PHONE_NUMBER_ID,
        "WHATSAPP_GRAPH_URL": graph.base_url,
    }
    return CoreHarness(
        tmp_path / "data",
        entrypoints=("webform", "whatsapp"),
        settings={"whatsapp": {"timeout": TIMEOUT, **settings}},
        env=env,
    )


@pytest.fixture
async def wa(tmp_path: Path, graph: FakeGraph) -> AsyncIterator[CoreHarness]:
    async with make_harness(tmp_path, graph) as harness:
        yield harness


@pytest.fixture
async def slow_wa(tmp_path: Path, graph: FakeGraph) -> AsyncIterator[CoreHarness]:
    """The service waiting ``SHORT_TIMEOUT`` for the Graph API, for sends that time out."""
    async with make_harness(tmp_path, graph, timeout=SHORT_TIMEOUT) as harness:
        yield harness


# -------------------------------------------------------------------------------------------
# Webhook bodies
# -------------------------------------------------------------------------------------------


def envelope(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": value}]}],
    }


def inbound(message: dict[str, Any], *, sender: str = SENDER, name: str = "Erika Mustermann") -> dict[str, Any]:
    """A webhook body carrying one message from ``sender``."""
    return envelope(
        {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "4930123456", "phone_number_id": PHONE_NUMBER_ID},
            "contacts": [{"profile": {"name": name}, "wa_id": sender}],
            "messages": [{"from": sender, "timestamp": TIMESTAMP, **message}],
        }
    )


def text_body(message_id: str, text: str, *, sender: str = SENDER, **extra: Any) -> dict[str, Any]:
    return inbound({"id": message_id, "type": "text", "text": {"body": text}, **extra}, sender=sender)


def status_body(
    provider_id: str, status: str, *, code: int | None = None, recipient: str = SENDER, callback_data: str | None = None
) -> dict[str, Any]:
    """A webhook body with one delivery status for one of our outbound messages (with the
    ``biz_opaque_callback_data`` the send carried, as Meta echoes it)."""
    entry: dict[str, Any] = {"id": provider_id, "status": status, "timestamp": TIMESTAMP, "recipient_id": recipient}
    if callback_data is not None:
        entry["biz_opaque_callback_data"] = callback_data
    if code is not None:
        entry["errors"] = [
            {"code": code, "title": f"error {code}", "message": f"error {code}", "error_data": {"details": f"details {code}"}}
        ]
    return envelope(
        {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "4930123456", "phone_number_id": PHONE_NUMBER_ID},
            "statuses": [entry],
        }
    )


async def post(harness: CoreHarness, body: dict[str, Any], *, secret: str | None = SECRET) -> tuple[int, Any]:
    """POST a webhook body the way Meta does: raw JSON bytes, signed with ``secret`` (unsigned
    when None)."""
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Hub-Signature-256"] = sign(raw, secret)
    response = await harness.client.post(WEBHOOK, data=raw, headers=headers)
    answer = await response.json() if response.content_type == "application/json" else await response.text()
    return response.status, answer


async def only_conversation(harness: CoreHarness) -> dict[str, Any]:
    """The one conversation there is, as the inbox API shows it in detail."""
    status, listing = await harness.api("GET", "/api/v1/conversations")
    assert status == 200
    assert len(listing["items"]) == 1, listing
    status, detail = await harness.api("GET", f"/api/v1/conversations/{listing['items'][0]['id']}")
    assert status == 200
    return detail


async def reply(harness: CoreHarness, conversation_id: int, text: str) -> None:
    status, body = await harness.api("POST", f"/api/v1/conversations/{conversation_id}/replies", json={"text": text})
    assert status == 201, body


def messages_of(detail: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [m for m in detail["messages"] if m["kind"] == kind]


# -------------------------------------------------------------------------------------------
# Recorded provider payloads
# -------------------------------------------------------------------------------------------


def with_own_ids(file: str, case: str, body: dict[str, Any]) -> dict[str, Any]:
    """The recorded body with message and status ids of its own (the recordings share ids)."""
    body = copy.deepcopy(body)
    n = 0
    for entry in body["entry"]:
        for change in entry["changes"]:
            for item in change["value"].get("messages", []) + change["value"].get("statuses", []):
                n += 1
                item["id"] = f"wamid.{file}.{case}.{n}"
    return body


STORED_KIND = {"reaction": "reaction", "edit": "edit", "revoke": "deletion", "deleted": "deletion"}
MEDIA = {"image", "video", "audio", "voice", "document", "sticker"}


@pytest.mark.parametrize("file, case, recorded", fixture_cases())
async def test_recorded_case_is_refused_unsigned_and_stored_as_what_it_is_when_signed(
    tmp_path: Path, graph: FakeGraph, file: str, case: str, recorded: dict[str, Any]
) -> None:
    body = with_own_ids(file, case, recorded)
    values = [c["value"] for e in body["entry"] for c in e["changes"]]
    raw_messages = [m for v in values for m in v.get("messages", [])]
    raw_statuses = [s for v in values for s in v.get("statuses", [])]
    async with make_harness(tmp_path, graph) as harness:
        raw = json.dumps(body).encode()
        for headers in (
            {},  # no signature at all
            {"X-Hub-Signature-256": sign(raw, "not-the-app-secret")},
            {"X-Hub-Signature-256": sign(raw + b" ", SECRET)},  # signed other bytes
            {"X-Hub-Signature-256": "sha256="},
        ):
            response = await harness.client.post(WEBHOOK, data=raw, headers={"Content-Type": "application/json", **headers})
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_signature"
        for table in ("messages", "delivery_events", "contacts", "conversations", "outbox"):
            assert await harness.count(table) == 0, f"a refused body stored something in {table}"

        status, answer = await post(harness, body)
        assert status == 200, answer
        assert answer == {"messages": len(raw_messages), "statuses": len(raw_statuses)}

        parsed = parse_webhook(body)
        rows = await harness.rows("SELECT * FROM messages WHERE direction = 'in' ORDER BY id")
        assert [r["channel_message_id"] for r in rows] == [m["id"] for m in raw_messages]
        ack_expected = 0
        for row, raw_message, message in zip(rows, raw_messages, parsed.messages, strict=True):
            assert row["channel"] == "whatsapp"
            assert row["kind"] == STORED_KIND.get(raw_message["type"], "message")
            payload = json.loads(row["payload"]) if row["payload"] else {}
            if row["kind"] == "reaction":
                emoji = raw_message["reaction"].get("emoji") or None
                assert row["text"] == emoji
                assert payload["meta"]["removed"] is (emoji is None)
            else:
                assert row["text"] == message.get("text")
            if raw_message["type"] in MEDIA:
                part = raw_message[raw_message["type"]]
                (attachment,) = payload["attachments"]
                assert attachment.get("media_id") == part.get("id")
                assert attachment["content_type"] == part["mime_type"]
            if raw_message["type"] == "location":
                location = raw_message["location"]
                assert (payload["location"]["lat"], payload["location"]["lon"]) == (
                    float(location["latitude"]),
                    float(location["longitude"]),
                )
            assert payload.get("flags", []) == message.get("flags", [])
            assert payload.get("raw") == raw_message
            if row["kind"] == "message":
                ack_expected += 1
                assert row["conversation_id"] is not None
            else:  # annotations of messages this installation never saw: kept, no conversation
                assert row["conversation_id"] is None
        acks = await harness.rows("SELECT to_kind, to_address, channel FROM outbox WHERE kind = 'ack'")
        assert len(acks) == ack_expected
        for ack in acks:
            assert ack == {"to_kind": "phone", "to_address": "+972987654321", "channel": "whatsapp"}
        if any("unsupported" in (m.get("flags") or []) for m in parsed.messages):
            (conversation,) = await harness.rows("SELECT flags FROM conversations")
            assert "unsupported" in json.loads(conversation["flags"])

        events = await harness.rows("SELECT provider_id, status, outbox_id, error_code FROM delivery_events ORDER BY id")
        expected_status = {"played": "read"}
        assert [(e["provider_id"], e["status"]) for e in events] == [
            (s["id"], expected_status.get(s["status"], s["status"])) for s in raw_statuses
        ]
        # statuses for messages this installation never sent: recorded, nothing else
        assert all(e["outbox_id"] is None for e in events)
        for event, raw_status in zip(events, raw_statuses, strict=True):
            errors = raw_status.get("errors") or [{}]
            assert event["error_code"] == (str(errors[0]["code"]) if "code" in errors[0] else None)

        # the provider redelivers: still 200, nothing new
        status, _ = await post(harness, body)
        assert status == 200
        assert await harness.count("messages", "direction = 'in'") == len(raw_messages)


async def test_subscription_check_through_the_service(wa: CoreHarness) -> None:
    params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
    response = await wa.client.get(WEBHOOK, params=params)
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert await response.text() == "1158201444"
    response = await wa.client.get(WEBHOOK, params={**params, "hub.verify_token": "guess"})
    assert response.status == 403


# -------------------------------------------------------------------------------------------
# Anyone can write: acknowledgement and routing
# -------------------------------------------------------------------------------------------


async def test_text_from_an_unknown_number_is_acknowledged_on_whatsapp_and_routed(wa: CoreHarness, graph: FakeGraph) -> None:
    text = "Vor unserem Haus in der Hauptstraße 7 ist seit zwei Wochen eine Baustelle und niemand sagt uns etwas."
    status, _ = await post(wa, text_body("wamid.IN1", text))
    assert status == 200

    detail = await only_conversation(wa)
    assert detail["channel"] == "whatsapp"
    assert detail["unit"] == "bauhotline"  # construction, outside the contractor's area
    assert detail["routing"]["rule"] == "construction-outside-area"
    assert detail["contact"]["is_customer"] is False
    assert detail["contact"]["display_name"] == "Erika Mustermann"
    assert {"kind": "phone", "address": SENDER_E164} in [
        {"kind": i["kind"], "address": i["address"]} for i in detail["contact"]["identities"]
    ]
    assert detail["deadline"] is not None
    (incoming,) = [m for m in detail["messages"] if m["direction"] == "in"]
    assert incoming["text"] == text

    assert await wa.run_outbox() == 1
    (request,) = graph.requests
    assert request["phone_number_id"] == PHONE_NUMBER_ID
    assert request["version"] == "v21.0"
    assert request["authorization"] == f"Bearer {ACCESS_TOKEN}"
    payload = request["json"]
    assert payload["messaging_product"] == "whatsapp"
    assert payload["to"] == SENDER  # WhatsApp ids: the number without "+"
    assert payload["type"] == "text"
    assert detail["case_reference"] in payload["text"]["body"]
    assert "Bau-Hotline" in payload["text"]["body"]
    assert "Fallnummer" in payload["text"]["body"]  # German text, German acknowledgement

    detail = await only_conversation(wa)
    assert detail["state"] == "acknowledged"
    (ack,) = messages_of(detail, "ack")
    assert ack["direction"] == "out" and ack["channel"] == "whatsapp"
    assert ack["delivery_status"] == "sent"


async def test_a_lone_surrogate_escape_is_kept_as_a_replacement_character(wa: CoreHarness, graph: FakeGraph) -> None:
    """JSON may spell half a UTF-16 pair ("\\ud83d" without its partner, a client cutting an
    emoji in two). The message is kept and acknowledged; SQLite never sees the half pair."""
    status, _ = await post(wa, text_body("wamid.HALF", "Baustelle \ud83d vor dem Haus"))
    assert status == 200
    detail = await only_conversation(wa)
    (incoming,) = [m for m in detail["messages"] if m["direction"] == "in"]
    assert incoming["text"] == "Baustelle \ufffd vor dem Haus"
    assert await wa.run_outbox() == 1


async def test_the_acknowledgement_is_in_the_senders_language(wa: CoreHarness, graph: FakeGraph) -> None:
    text = "Hello, there is a construction site in front of my house and nobody answers the phone. Can you help me?"
    await post(wa, text_body("wamid.EN1", text))
    await wa.run_outbox()
    (payload,) = graph.sent
    assert "Your case reference is" in payload["text"]["body"]


@pytest.mark.parametrize(
    "latitude, longitude, unit, rule",
    [
        (52.5230, 13.4080, "tiefbau-muster", "location-in-area"),  # about 390 m from the point
        (52.5500, 13.4500, "kundenservice", "entry-point"),  # about 4.5 km away: the number's unit
    ],
)
async def test_a_shared_location_routes_by_area(
    wa: CoreHarness, graph: FakeGraph, latitude: float, longitude: float, unit: str, rule: str
) -> None:
    location = {"latitude": latitude, "longitude": longitude, "name": "Baugrube", "address": "Musterstadt"}
    status, _ = await post(wa, inbound({"id": "wamid.LOC1", "type": "location", "location": location}))
    assert status == 200
    detail = await only_conversation(wa)
    assert detail["unit"] == unit
    assert detail["routing"]["rule"] == rule
    (incoming,) = [m for m in detail["messages"] if m["direction"] == "in"]
    assert incoming["location"]["lat"] == latitude and incoming["location"]["lon"] == longitude
    await wa.run_outbox()
    (payload,) = graph.sent
    assert payload["to"] == SENDER and detail["case_reference"] in payload["text"]["body"]


async def test_the_same_body_three_times_is_one_message_and_one_acknowledgement(wa: CoreHarness, graph: FakeGraph) -> None:
    body = text_body("wamid.TWICE", "Wann wird bei uns der Gehweg wieder geöffnet?")
    for _ in range(3):
        status, _ = await post(wa, body)
        assert status == 200
    assert await wa.count("messages", "direction = 'in'") == 1
    assert await wa.count("conversations") == 1
    assert await wa.count("outbox", "kind = 'ack'") == 1
    await wa.run_outbox()
    for _ in range(3):
        await post(wa, body)
    await wa.run_outbox()
    assert len(graph.requests) == 1


async def test_the_same_message_twice_in_one_body_is_one_message_and_one_acknowledgement(
    wa: CoreHarness, graph: FakeGraph
) -> None:
    """Meta may batch a redelivery with the original: the second copy is the same message."""
    body = text_body("wamid.TWICE", "Wann wird bei uns der Gehweg wieder geöffnet?")
    value = body["entry"][0]["changes"][0]["value"]
    value["messages"] *= 2
    status, answer = await post(wa, body)
    assert status == 200, answer
    assert await wa.count("messages", "direction = 'in'") == 1
    assert await wa.count("outbox", "kind = 'ack'") == 1
    await wa.run_outbox()
    assert len(graph.requests) == 1


async def test_later_messages_from_the_same_number_join_its_conversation(wa: CoreHarness, graph: FakeGraph) -> None:
    await post(wa, text_body("wamid.A", "Bei uns ist seit gestern der Gehweg aufgegraben."))
    await wa.run_outbox()
    wa.clock.advance(timedelta(hours=2))
    await post(wa, text_body("wamid.B", "Und heute steht auch noch der Bagger vor der Einfahrt."))
    await post(wa, inbound({"id": "wamid.C", "type": "image", "image": {"id": "998877", "mime_type": "image/jpeg", "sha256": "abc"}}))
    await wa.run_outbox()

    detail = await only_conversation(wa)
    incoming = [m for m in detail["messages"] if m["direction"] == "in"]
    assert [m["text"] for m in incoming[:2]] == [
        "Bei uns ist seit gestern der Gehweg aufgegraben.",
        "Und heute steht auch noch der Bagger vor der Einfahrt.",
    ]
    assert incoming[2]["attachments"][0]["media_id"] == "998877"
    assert len(messages_of(detail, "ack")) == 1  # one case, one acknowledgement
    assert len(graph.requests) == 1

    # another number is another person: a conversation of its own
    await post(wa, text_body("wamid.D", "Auch bei mir ist der Gehweg aufgegraben.", sender="4915112345678"))
    assert await wa.count("conversations") == 2


async def test_reactions_edits_and_deletions_are_kept_against_their_message(wa: CoreHarness, graph: FakeGraph) -> None:
    await post(wa, text_body("wamid.ORIG", "Die Baustelle ist seit Montag offen."))
    await post(wa, inbound({"id": "wamid.R1", "type": "reaction", "reaction": {"message_id": "wamid.ORIG", "emoji": "\U0001f44d"}}))
    await post(
        wa,
        inbound(
            {
                "id": "wamid.E1",
                "type": "edit",
                "edit": {
                    "original_message_id": "wamid.ORIG",
                    "message": {"type": "text", "text": {"body": "Die Baustelle ist seit Dienstag offen."}},
                },
            }
        ),
    )
    detail = await only_conversation(wa)
    (original,) = [m for m in detail["messages"] if m["kind"] == "message"]
    assert original["text"] == "Die Baustelle ist seit Dienstag offen." and original["edited_at"] is not None
    (edit,) = messages_of(detail, "edit")
    assert edit["previous_text"] == "Die Baustelle ist seit Montag offen."
    (reaction,) = messages_of(detail, "reaction")
    assert reaction["text"] == "\U0001f44d" and reaction["target_message_id"] == original["id"]
    assert len(messages_of(detail, "ack")) == 1

    await post(wa, inbound({"id": "wamid.R2", "type": "reaction", "reaction": {"message_id": "wamid.ORIG", "emoji": ""}}))
    await post(wa, inbound({"id": "wamid.D1", "type": "revoke", "revoke": {"original_message_id": "wamid.ORIG"}}))
    detail = await only_conversation(wa)
    assert [m["text"] for m in messages_of(detail, "reaction")] == [None]  # the reaction was taken back
    (original,) = [m for m in detail["messages"] if m["kind"] == "message"]
    assert original["deleted_at"] is not None
    assert len(messages_of(detail, "ack")) == 1
    await wa.run_outbox()
    assert len(graph.requests) == 1


def reaction(message_id: str, emoji: str, sent: int) -> dict[str, Any]:
    return inbound({"id": message_id, "type": "reaction", "timestamp": str(sent),
                    "reaction": {"message_id": "wamid.ORIG", "emoji": emoji}})


def edit(message_id: str, text: str, sent: int) -> dict[str, Any]:
    return inbound({"id": message_id, "type": "edit", "timestamp": str(sent), "edit": {
        "original_message_id": "wamid.ORIG", "message": {"type": "text", "text": {"body": text}}}})


async def test_a_retried_reaction_does_not_replace_the_one_that_replaced_it(wa: CoreHarness) -> None:
    await post(wa, text_body("wamid.ORIG", "Die Baustelle ist seit Montag offen."))
    sent = int(TIMESTAMP)
    await post(wa, reaction("wamid.R1", "\U0001f44d", sent + 10))
    await post(wa, reaction("wamid.R2", "\u2764\ufe0f", sent + 20))
    status, answer = await post(wa, reaction("wamid.R1", "\U0001f44d", sent + 10))  # Meta's retry
    assert status == 200, answer

    detail = await only_conversation(wa)
    assert [m["text"] for m in messages_of(detail, "reaction")] == ["\u2764\ufe0f"]
    assert await wa.count("messages", "kind = 'reaction'") == 2  # the replaced one is kept, hidden


async def test_an_edit_without_text_does_not_hide_an_earlier_edit_that_arrives_late(wa: CoreHarness) -> None:
    await post(wa, text_body("wamid.ORIG", "Die Baustelle ist seit Montag offen."))
    sent = int(TIMESTAMP)
    empty = inbound({"id": "wamid.E2", "type": "edit", "timestamp": str(sent + 40), "edit": {
        "original_message_id": "wamid.ORIG", "message": {"type": "audio", "audio": {"id": "m1", "mime_type": "audio/ogg"}}}})
    await post(wa, empty)
    await post(wa, edit("wamid.E1", "Die Baustelle ist seit Dienstag offen.", sent + 30))
    detail = await only_conversation(wa)
    (original,) = [m for m in detail["messages"] if m["kind"] == "message"]
    assert original["text"] == "Die Baustelle ist seit Dienstag offen."


async def test_the_new_wording_of_an_edited_message_is_found_by_search(wa: CoreHarness) -> None:
    await post(wa, text_body("wamid.ORIG", "Die Baustelle ist seit Montag offen."))
    await post(wa, edit("wamid.E1", "Die Grube ist seit Dienstag offen.", int(TIMESTAMP) + 30))
    for word, found in (("Dienstag", 1), ("Grube", 1), ("Montag", 1), ("Mittwoch", 0)):
        status, listing = await wa.api("GET", f"/api/v1/conversations?q={word}")
        assert status == 200 and len(listing["items"]) == found, word


async def test_reactions_and_edits_arriving_out_of_order_leave_the_later_one_in_force(wa: CoreHarness) -> None:
    await post(wa, text_body("wamid.ORIG", "Die Baustelle ist seit Montag offen."))
    sent = int(TIMESTAMP)
    await post(wa, reaction("wamid.R2", "\u2764\ufe0f", sent + 20))
    await post(wa, reaction("wamid.R1", "\U0001f44d", sent + 10))  # sent first, arrives last
    await post(wa, edit("wamid.E2", "Die Baustelle ist seit Mittwoch offen.", sent + 40))
    await post(wa, edit("wamid.E1", "Die Baustelle ist seit Dienstag offen.", sent + 30))

    detail = await only_conversation(wa)
    assert [m["text"] for m in messages_of(detail, "reaction")] == ["\u2764\ufe0f"]
    (original,) = [m for m in detail["messages"] if m["kind"] == "message"]
    assert original["text"] == "Die Baustelle ist seit Mittwoch offen."
    assert [(m["text"], m["previous_text"]) for m in messages_of(detail, "edit")] == [
        ("Die Baustelle ist seit Mittwoch offen.", "Die Baustelle ist seit Montag offen.")
    ]
    # a later reaction still replaces the one in force
    await post(wa, reaction("wamid.R3", "\U0001f64f", sent + 50))
    detail = await only_conversation(wa)
    assert [m["text"] for m in messages_of(detail, "reaction")] == ["\U0001f64f"]


# -------------------------------------------------------------------------------------------
# Replies: the 24-hour window and templates
# -------------------------------------------------------------------------------------------


async def open_case(harness: CoreHarness, text: str = "Der Gehweg vor unserem Haus ist seit Tagen gesperrt.") -> dict[str, Any]:
    """A conversation opened by WhatsApp with its acknowledgement delivered."""
    await post(harness, text_body("wamid.OPEN", text))
    await harness.run_outbox()
    return await only_conversation(harness)


def template_parameters(payload: dict[str, Any]) -> list[str]:
    (component,) = payload["template"]["components"]
    assert component["type"] == "body"
    return [p["text"] for p in component["parameters"]]


async def test_a_reply_inside_the_window_is_free_text_and_after_25_hours_the_template(
    wa: CoreHarness, graph: FakeGraph
) -> None:
    case = await open_case(wa)
    wa.clock.advance(timedelta(hours=23))
    await reply(wa, case["id"], "Wir sind morgen früh vor Ort.")
    await wa.run_outbox()
    payload = graph.sent[-1]
    assert payload["type"] == "text" and payload["text"]["body"] == "Wir sind morgen früh vor Ort."

    wa.clock.advance(timedelta(hours=2))  # 25 hours after the person last wrote
    await reply(wa, case["id"], "Der Gehweg ist wieder frei.")
    await wa.run_outbox()
    payload = graph.sent[-1]
    assert payload["type"] == "template"
    assert payload["to"] == SENDER
    assert payload["template"]["name"] == "case_update"
    assert payload["template"]["language"] == {"code": "de"}
    assert template_parameters(payload) == [case["case_reference"], "Der Gehweg ist wieder frei."]
    assert len(graph.requests) == 3  # acknowledgement, free text, template: nothing tried twice
    detail = await only_conversation(wa)
    assert [m["delivery_status"] for m in messages_of(detail, "reply")] == ["sent", "sent"]


def sent_ago(harness: CoreHarness, ago: timedelta) -> str:
    """A webhook ``timestamp``: when the person sent the message, ``ago`` before now."""
    return str(int((harness.clock.now() - ago).timestamp()))


async def test_a_message_meta_delivered_late_opens_no_window_it_did_not_open(wa: CoreHarness, graph: FakeGraph) -> None:
    """The window was counted from when the message reached us: one Meta delivered 30 hours
    after the person sent it (it retries webhooks for days) was acknowledged in free text,
    which Meta refuses outside the window (131047), so the acknowledgement failed first."""
    await post(wa, text_body("wamid.LATE", "Der Gehweg ist gesperrt.", timestamp=sent_ago(wa, timedelta(hours=30))))
    await wa.run_outbox()
    assert [p["type"] for p in graph.sent] == ["template"]  # at the first attempt
    case = await only_conversation(wa)
    assert template_parameters(graph.sent[0])[0] == case["case_reference"]
    (row,) = await wa.rows("SELECT attempts, state FROM outbox WHERE kind = 'ack'")
    assert (row["attempts"], row["state"]) == (1, "sent")


async def test_a_reply_after_a_late_message_counts_the_window_from_when_the_person_sent_it(
    wa: CoreHarness, graph: FakeGraph
) -> None:
    """Sent 23 hours before it reached us, the message left us an hour's window by Meta's
    count; we counted 24 from its arrival, and a reply two hours later went as free text."""
    await post(wa, text_body("wamid.LATE", "Der Gehweg ist gesperrt.", timestamp=sent_ago(wa, timedelta(hours=23))))
    await wa.run_outbox()
    assert [p["type"] for p in graph.sent] == ["text"]  # the acknowledgement, inside the window
    case = await only_conversation(wa)
    wa.clock.advance(timedelta(hours=2))
    await reply(wa, case["id"], "Wir sind morgen früh vor Ort.")
    await wa.run_outbox()
    assert [p["type"] for p in graph.sent] == ["text", "template"]
    assert len(graph.requests) == 2  # nothing refused and sent again


async def test_the_window_counts_from_the_latest_message_sent_not_the_latest_to_arrive(
    wa: CoreHarness, graph: FakeGraph
) -> None:
    """A message Meta delivers late arrives after a later one: the later one's send time opens
    the window, whatever came last."""
    await post(wa, text_body("wamid.NEW", "Ist der Gehweg wieder frei?", timestamp=sent_ago(wa, timedelta(hours=1))))
    await post(wa, text_body("wamid.OLD", "Der Gehweg ist gesperrt.", timestamp=sent_ago(wa, timedelta(hours=30))))
    await wa.run_outbox()
    case = await only_conversation(wa)
    wa.clock.advance(timedelta(hours=20))  # 21 hours after the later message was sent
    await reply(wa, case["id"], "Ja, seit heute Morgen.")
    await wa.run_outbox()
    assert graph.sent[-1]["type"] == "text" and graph.sent[-1]["text"]["body"] == "Ja, seit heute Morgen."


async def test_a_131047_failed_status_for_free_text_sends_the_template(wa: CoreHarness, graph: FakeGraph) -> None:
    case = await open_case(wa)
    await reply(wa, case["id"], "Wir melden uns morgen.")
    await wa.run_outbox()
    first = graph.requests[-1]
    assert first["json"]["type"] == "text"
    (row,) = await wa.rows("SELECT provider_id FROM outbox WHERE kind = 'reply'")
    free_text_id = row["provider_id"]

    status, _ = await post(wa, status_body(free_text_id, "failed", code=131047))
    assert status == 200
    await wa.run_outbox()
    payload = graph.sent[-1]
    assert payload["type"] == "template"
    assert template_parameters(payload) == [case["case_reference"], "Wir melden uns morgen."]
    assert len(graph.requests) == 3
    (row,) = await wa.rows("SELECT provider_id, state, hint FROM outbox WHERE kind = 'reply'")
    assert row["state"] == "sent" and row["hint"] == "template" and row["provider_id"] != free_text_id
    detail = await only_conversation(wa)
    assert "undeliverable" not in detail["flags"]


async def test_a_131047_answer_to_the_send_request_sends_the_template(wa: CoreHarness, graph: FakeGraph) -> None:
    case = await open_case(wa)
    graph.fail(400, 131047, message="Re-engagement message")
    await reply(wa, case["id"], "Wir melden uns morgen.")
    await wa.run_outbox()
    assert [p["type"] for p in graph.sent] == ["text", "text", "template"]
    detail = await only_conversation(wa)
    assert messages_of(detail, "reply")[0]["delivery_status"] == "sent"


# -------------------------------------------------------------------------------------------
# Errors: retries, permanent failures
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(lambda g: g.fail(500), id="http-500"),
        pytest.param(lambda g: g.fail(503, 131016, message="Service unavailable"), id="service-unavailable"),
        pytest.param(lambda g: g.fail(400, 130429, message="Rate limit hit"), id="throughput-130429"),
        pytest.param(lambda g: g.fail(400, 131056, message="Pair rate limit hit"), id="pair-rate-limit-131056"),
        pytest.param(lambda g: g.hang(LATE), id="timeout"),
    ],
)
async def test_a_passing_failure_is_retried_and_then_succeeds(slow_wa: CoreHarness, graph: FakeGraph, failure: Any) -> None:
    wa = slow_wa
    failure(graph)
    await post(wa, text_body("wamid.RETRY", "Seit heute früh wird vor unserem Haus gebaggert."))
    await wa.run_outbox()
    assert len(graph.requests) == 1
    (row,) = await wa.rows("SELECT state, attempts, last_error FROM outbox WHERE kind = 'ack'")
    assert row["state"] == "pending" and row["attempts"] == 1 and row["last_error"]

    wa.clock.advance(timedelta(seconds=5))  # past the backoff
    await wa.run_outbox()
    if row["last_error"] == "Graph API did not answer in time":
        # Meta may have taken it: the retry waits status_wait (30 s) for a status proving it.
        assert len(graph.requests) == 1
        wa.clock.advance(timedelta(seconds=33))
        await wa.run_outbox()
    assert len(graph.requests) == 2
    assert graph.requests[0]["json"] == graph.requests[1]["json"]  # the same message again
    (row,) = await wa.rows("SELECT state, attempts, provider_id FROM outbox WHERE kind = 'ack'")
    assert row["state"] == "sent" and row["attempts"] == 2 and row["provider_id"].startswith("wamid.OUT")
    detail = await only_conversation(wa)
    assert detail["state"] == "acknowledged"
    assert not {"undeliverable", "callback_required"} & set(detail["flags"])


async def test_a_send_that_timed_out_but_went_through_is_not_sent_again(slow_wa: CoreHarness, graph: FakeGraph) -> None:
    """Meta took the acknowledgement after the channel had stopped waiting for the answer; its
    status echoes the idempotency key (``biz_opaque_callback_data``), so the retry is not sent."""
    wa = slow_wa
    graph.hang(LATE)
    await post(wa, text_body("wamid.SLOW", "Seit heute früh wird vor unserem Haus gebaggert."))
    await wa.run_outbox()
    (row,) = await wa.rows("SELECT state, idempotency_key FROM outbox WHERE kind = 'ack'")
    assert row["state"] == "pending"
    [request] = graph.requests
    assert request["json"]["biz_opaque_callback_data"] == row["idempotency_key"]
    # Meta took it all the same: its status, which echoes the key, says so.
    status, _ = await post(wa, status_body("wamid.OUT0001", "delivered", callback_data=row["idempotency_key"]))
    assert status == 200

    wa.clock.advance(timedelta(seconds=40))  # past status_wait
    await wa.run_outbox()
    assert len(graph.requests) == 1
    (row,) = await wa.rows("SELECT state, provider_id, delivery_status FROM outbox WHERE kind = 'ack'")
    assert row == {"state": "sent", "provider_id": "wamid.OUT0001", "delivery_status": "delivered"}
    assert (await only_conversation(wa))["state"] == "acknowledged"


async def test_a_long_reply_whose_last_part_timed_out_is_sent_again_whatever_its_first_part_reports(
    slow_wa: CoreHarness, graph: FakeGraph
) -> None:
    """A text beyond 4,096 characters goes as several messages. The first part's status says
    nothing about the last one: only the last part carries the message's own key."""
    wa = slow_wa
    case = await open_case(wa)
    graph.hang(0.0)  # the first part is taken at once
    graph.hang(LATE)  # the last part's answer does not come in time
    await reply(wa, case["id"], "Zum Stand der Bauarbeiten: " + "Der Gehweg bleibt gesperrt. " * 200)
    await wa.run_outbox()
    first, last = graph.requests[1:]
    (row,) = await wa.rows("SELECT state, idempotency_key FROM outbox WHERE kind = 'reply'")
    assert row["state"] == "pending"
    assert last["json"]["biz_opaque_callback_data"] == row["idempotency_key"]
    status, _ = await post(wa, status_body("wamid.OUT0002", "delivered", callback_data=first["json"]["biz_opaque_callback_data"]))
    assert status == 200

    wa.clock.advance(timedelta(seconds=40))  # past status_wait
    await wa.run_outbox()
    # The last part again: it may never have gone out. Not the first: Meta took it (its id came).
    assert len(graph.requests) == 4
    assert graph.requests[3]["json"] == last["json"]
    assert first["json"]["biz_opaque_callback_data"] == f"{row['idempotency_key']}.part-1"
    (row,) = await wa.rows("SELECT state FROM outbox WHERE kind = 'reply'")
    assert row["state"] == "sent"


async def test_a_long_reply_whose_first_part_timed_out_is_sent_again_after_the_backoff(
    slow_wa: CoreHarness, graph: FakeGraph
) -> None:
    """Its last part never went, so no status can show the message went through: waiting
    ``status_wait`` for one would only delay the answer."""
    wa = slow_wa
    case = await open_case(wa)
    graph.hang(LATE)  # the first part's answer does not come in time
    await reply(wa, case["id"], "Zum Stand der Bauarbeiten: " + "Der Gehweg bleibt gesperrt. " * 200)
    await wa.run_outbox()
    assert len(graph.requests) == 2  # the acknowledgement, and the first part only
    wa.clock.advance(timedelta(seconds=5))  # past the backoff, far below status_wait
    await wa.run_outbox()
    assert len(graph.requests) == 4
    (row,) = await wa.rows("SELECT state FROM outbox WHERE kind = 'reply'")
    assert row["state"] == "sent"


LONG_ANSWER = "Zum Stand der Bauarbeiten: " + "Der Gehweg bleibt gesperrt. " * 200  # two parts


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param(lambda g: g.fail(503, 131016, message="Service unavailable"), id="service-unavailable-131016"),
        pytest.param(lambda g: g.fail(429, 130429, message="Rate limit hit"), id="rate-limit-429"),
        pytest.param(lambda g: g.fail(500), id="http-500"),
    ],
)
async def test_a_long_reply_whose_later_part_was_refused_for_now_resumes_with_that_part(
    wa: CoreHarness, graph: FakeGraph, refusal: Any
) -> None:
    """Meta took the first part (its id came back); the last got a definite "not now", so
    nothing of it went. The retry began again with the first part: the resident read it twice."""
    case = await open_case(wa)
    graph.hang(0.0)  # the first part is taken
    refusal(graph)  # the last part is refused for now
    await reply(wa, case["id"], LONG_ANSWER)
    await wa.run_outbox()
    wa.clock.advance(timedelta(seconds=10))  # past the backoff
    await wa.run_outbox()
    _, first, refused, again = graph.sent
    assert refused == again and first["text"]["body"] != again["text"]["body"]
    (row,) = await wa.rows("SELECT state, provider_id FROM outbox WHERE kind = 'reply'")
    assert row == {"state": "sent", "provider_id": "wamid.OUT0003"}  # the last part's id


@pytest.mark.parametrize("last_part", ["delivered", "failed"])
async def test_a_long_reply_counts_by_its_last_part(wa: CoreHarness, graph: FakeGraph, last_part: str) -> None:
    """Only the first part's id was the reply's: a failure of the last part was "a status for a
    message never sent", and staff saw half an answer as delivered and the case answered."""
    case = await open_case(wa)
    await reply(wa, case["id"], LONG_ANSWER)
    await wa.run_outbox()
    first, last = graph.requests[1:]
    (row,) = await wa.rows("SELECT provider_id, idempotency_key FROM outbox WHERE kind = 'reply'")
    assert row["provider_id"] == "wamid.OUT0003" and last["json"]["biz_opaque_callback_data"] == row["idempotency_key"]

    # The first part arrived: that says nothing about the answer as a whole.
    await post(wa, status_body("wamid.OUT0002", "delivered", callback_data=first["json"]["biz_opaque_callback_data"]))
    detail = await only_conversation(wa)
    assert messages_of(detail, "reply")[0]["delivery_status"] == "sent" and detail["state"] != "answered"
    (event,) = await wa.rows("SELECT outbox_id FROM delivery_events WHERE provider_id = 'wamid.OUT0002'")
    assert event["outbox_id"] is None  # kept as a status of no message of ours, shown nowhere

    code = 131026 if last_part == "failed" else None
    await post(wa, status_body("wamid.OUT0003", last_part, code=code, callback_data=row["idempotency_key"]))
    await wa.run_outbox()
    if last_part == "delivered":
        detail = await only_conversation(wa)
        assert messages_of(detail, "reply")[0]["delivery_status"] == "delivered" and detail["state"] == "answered"
    else:
        detail = await assert_flagged_for_callback(wa)
        assert messages_of(detail, "reply")[0]["delivery_status"] == "failed" and detail["state"] != "answered"
    # A reply quoting the first part still finds the conversation.
    (key,) = await wa.rows("SELECT conversation_id FROM thread_keys WHERE key = 'wamid.OUT0002'")
    assert key["conversation_id"] == case["id"]


async def assert_flagged_for_callback(harness: CoreHarness) -> dict[str, Any]:
    status, listing = await harness.api("GET", "/api/v1/conversations")
    assert status == 200
    (item,) = listing["items"]
    assert {"undeliverable", "callback_required"} <= set(item["flags"])
    detail = await only_conversation(harness)
    assert "undeliverable" in [e["kind"] for e in detail["events"]]
    return detail


@pytest.mark.parametrize(
    "status, code, address_failed",
    [(400, 131026, True), (400, 131030, True), (400, 100, False), (400, 132001, False)],
    ids=["undeliverable-131026", "not-allowed-recipient-131030", "invalid-parameter-100", "no-such-template-132001"],
)
async def test_a_permanent_error_flags_the_conversation_for_a_callback(
    wa: CoreHarness, graph: FakeGraph, status: int, code: int, address_failed: bool
) -> None:
    graph.fail(status, code, message="Message undeliverable")
    await post(wa, text_body("wamid.PERM", "Bitte rufen Sie mich wegen der Baustelle zurück."))
    await wa.run_outbox()
    wa.clock.advance(timedelta(minutes=5))
    await wa.run_outbox()
    assert len(graph.requests) == 1  # permanent: never retried
    detail = await assert_flagged_for_callback(wa)
    (ack,) = messages_of(detail, "ack")
    assert ack["delivery_status"] == "failed"
    assert ack["deliveries"][0]["state"] == "failed" and "Message undeliverable" in ack["deliveries"][0]["last_error"]
    # Only a refusal of the recipient marks their number failed; our parameters or template do not.
    assert await wa.count("identities", "failed_at IS NOT NULL") == int(address_failed)


async def test_an_expired_access_token_keeps_the_message_queued_and_the_residents_number_good(
    wa: CoreHarness, graph: FakeGraph, caplog: pytest.LogCaptureFixture
) -> None:
    """Our token expired (401, code 190): the acknowledgement was given up as permanent, the
    resident's number marked failed and the conversation flagged for a call-back."""
    for _ in range(10):  # more than the outbox's attempts: it waits for the fix, however long
        graph.fail(401, 190, message="Error validating access token: Session has expired")
    await post(wa, text_body("wamid.T190", "Bitte rufen Sie mich zurück."))
    with caplog.at_level("ERROR", logger="contact_router.outbox"):
        for _ in range(10):
            await wa.run_outbox()
            wa.clock.advance(timedelta(minutes=20))
    assert any("channel whatsapp cannot send" in r.getMessage() and "Meta error 190" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")
    (row,) = await wa.rows("SELECT state, last_error FROM outbox WHERE kind = 'ack'")
    assert row["state"] == "pending" and "Meta error 190" in row["last_error"]
    await wa.run_outbox()  # the token was renewed meanwhile
    assert len(graph.requests) == 11
    (row,) = await wa.rows("SELECT state FROM outbox WHERE kind = 'ack'")
    assert row["state"] == "sent"
    assert await wa.count("identities", "failed_at IS NOT NULL") == 0
    assert not {"undeliverable", "callback_required"} & set((await only_conversation(wa))["flags"])


async def test_a_failed_status_for_our_unpaid_account_is_retried_and_the_number_stays_good(
    wa: CoreHarness, graph: FakeGraph
) -> None:
    """Meta reports 131042 (business eligibility payment issue) in the status, not in the
    answer to the send: it marked the resident's number failed."""
    await post(wa, text_body("wamid.PAY", "Bitte rufen Sie mich zurück."))
    await wa.run_outbox()
    status, _ = await post(wa, status_body("wamid.OUT0001", "failed", code=131042))
    assert status == 200
    wa.clock.advance(timedelta(seconds=40))  # past the least wait after a failed status
    await wa.run_outbox()
    assert len(graph.requests) == 2
    (row,) = await wa.rows("SELECT state, provider_id FROM outbox WHERE kind = 'ack'")
    assert row == {"state": "sent", "provider_id": "wamid.OUT0002"}
    assert await wa.count("identities", "failed_at IS NOT NULL") == 0
    assert "undeliverable" not in (await only_conversation(wa))["flags"]


async def test_a_permanent_failed_status_after_sending_flags_the_conversation(wa: CoreHarness, graph: FakeGraph) -> None:
    case = await open_case(wa)
    await reply(wa, case["id"], "Bitte schicken Sie uns ein Foto.")
    await wa.run_outbox()
    (row,) = await wa.rows("SELECT provider_id FROM outbox WHERE kind = 'reply'")
    status, _ = await post(wa, status_body(row["provider_id"], "failed", code=131026))
    assert status == 200
    await wa.run_outbox()
    assert len(graph.requests) == 2  # acknowledgement and reply, no resend
    detail = await assert_flagged_for_callback(wa)
    assert messages_of(detail, "reply")[0]["delivery_status"] == "failed"
    assert detail["state"] != "answered"


async def test_the_statuses_of_one_webhook_give_the_same_result_in_either_order(tmp_path: Path, graph: FakeGraph) -> None:
    """Two answers; Meta reports the first delivered and the second failed (131026) in one
    webhook. Listed failure first, the case came out answered; listed delivery first, waiting
    for an answer again, with a new deadline: the order of a list decided the case."""
    outcomes = []
    for order in ((0, 1), (1, 0)):
        async with make_harness(tmp_path / f"order-{order[0]}", graph) as harness:
            case = await open_case(harness)
            for text in ("Ab Montag ist der Gehweg frei.", "Korrektur: ab Dienstag."):
                await reply(harness, case["id"], text)
            await harness.run_outbox()
            rows = await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'reply' ORDER BY id")
            reports = [status_body(rows[0]["provider_id"], "delivered"),
                       status_body(rows[1]["provider_id"], "failed", code=131026)]
            statuses = [r["entry"][0]["changes"][0]["value"]["statuses"][0] for r in reports]
            body = envelope({**reports[0]["entry"][0]["changes"][0]["value"], "statuses": [statuses[i] for i in order]})
            status, _ = await post(harness, body)  # one webhook, both statuses, in this order
            assert status == 200
            detail = await only_conversation(harness)
            outcomes.append({"state": detail["state"], "deadline": detail["deadline"], "flags": detail["flags"],
                             "events": sorted(e["kind"] for e in detail["events"] if e["kind"] in ("answered", "answer_lost")),
                             "replies": [m["delivery_status"] for m in messages_of(detail, "reply")]})
    assert outcomes[0] == outcomes[1]
    assert outcomes[0]["state"] == "acknowledged" and outcomes[0]["deadline"] is not None
    assert outcomes[0]["events"] == ["answer_lost", "answered"] and outcomes[0]["replies"] == ["delivered", "failed"]


# -------------------------------------------------------------------------------------------
# People who use a WhatsApp username: a business-scoped user id, perhaps no number
# -------------------------------------------------------------------------------------------

USER_ID = "DE.13491208655302741918"


def user_id_body(message_id: str, text: str, *, phone: str | None = None) -> dict[str, Any]:
    """A message as Meta sends it from a person with a username: their BSUID always, their
    number only when Meta shares it."""
    contact: dict[str, Any] = {"profile": {"name": "Erika Mustermann", "username": "erika.m"}, "user_id": USER_ID}
    message: dict[str, Any] = {"from_user_id": USER_ID, "id": message_id, "timestamp": TIMESTAMP, "type": "text",
                               "text": {"body": text}}
    if phone:
        contact["wa_id"] = message["from"] = phone
    return envelope({
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "4930123456", "phone_number_id": PHONE_NUMBER_ID},
        "contacts": [contact],
        "messages": [message],
    })


async def test_a_sender_without_a_number_is_acknowledged_and_answered_at_their_user_id(
    wa: CoreHarness, graph: FakeGraph
) -> None:
    status, _ = await post(wa, user_id_body("wamid.U1", "Seit Montag ist unsere Straße ohne Ankündigung gesperrt."))
    assert status == 200
    assert await wa.run_outbox() == 1
    (ack,) = graph.sent
    assert ack["recipient"] == USER_ID and "to" not in ack
    detail = await only_conversation(wa)
    assert detail["case_reference"] in ack["text"]["body"]
    assert detail["state"] == "acknowledged"
    assert not {"undeliverable", "callback_required", "no_number"} & set(detail["flags"])

    await reply(wa, detail["id"], "Die Sperrung endet am Freitag.")
    await wa.run_outbox()
    answer = graph.sent[-1]
    assert answer["recipient"] == USER_ID and answer["text"]["body"] == "Die Sperrung endet am Freitag."


async def test_a_reply_goes_to_the_number_once_the_person_shares_it(wa: CoreHarness, graph: FakeGraph) -> None:
    """Known by the user id alone at first, then writing with the number beside it: one
    contact and one case, and the reply goes to the number, where they last wrote from (Meta
    asks for the number where there is one)."""
    await post(wa, user_id_body("wamid.U1", "Seit Montag ist unsere Straße ohne Ankündigung gesperrt."))
    wa.clock.advance(timedelta(minutes=5))
    await post(wa, user_id_body("wamid.U2", "Meine Nummer, falls Sie anrufen wollen.", phone=SENDER))
    detail = await only_conversation(wa)
    await reply(wa, detail["id"], "Die Sperrung endet am Freitag.")
    await wa.run_outbox()
    answer = graph.sent[-1]
    assert answer["to"] == SENDER and "recipient" not in answer


@pytest.mark.parametrize("refused_by", ["answer", "status"])
async def test_a_message_refused_for_the_user_id_goes_to_the_number_and_the_user_id_stays_good(
    wa: CoreHarness, graph: FakeGraph, refused_by: str
) -> None:
    """131062 in the answer to the send, or later in a failed status."""
    await post(wa, user_id_body("wamid.U1", "Seit Montag ist unsere Straße ohne Ankündigung gesperrt.", phone=SENDER))
    await wa.run_outbox()
    wa.clock.advance(timedelta(minutes=5))
    await post(wa, user_id_body("wamid.U2", "Und wann kommt jemand?"))  # the number hidden now
    detail = await only_conversation(wa)
    if refused_by == "answer":
        graph.fail(400, 131062, message="Business-scoped User ID recipients are not supported for this message")
    await reply(wa, detail["id"], "Morgen um acht.")
    await wa.run_outbox()
    if refused_by == "status":
        (row,) = await wa.rows("SELECT provider_id FROM outbox WHERE kind = 'reply'")
        status, _ = await post(wa, status_body(row["provider_id"], "failed", code=131062, recipient=USER_ID))
        assert status == 200
    await wa.run_outbox()
    refused, delivered = graph.sent[-2:]
    assert refused["recipient"] == USER_ID
    assert delivered["to"] == SENDER and delivered["text"]["body"] == "Morgen um acht."
    (identity,) = await wa.rows("SELECT failed_at FROM identities WHERE kind = 'whatsapp_user'")
    assert identity["failed_at"] is None
    assert "undeliverable" not in (await only_conversation(wa))["flags"]


# -------------------------------------------------------------------------------------------
# Delivery statuses
# -------------------------------------------------------------------------------------------


async def test_delivered_and_read_statuses_show_on_the_conversation(wa: CoreHarness, graph: FakeGraph) -> None:
    case = await open_case(wa)
    (ack_row,) = await wa.rows("SELECT provider_id FROM outbox WHERE kind = 'ack'")
    for status in ("delivered", "read"):
        code, _ = await post(wa, status_body(ack_row["provider_id"], status))
        assert code == 200
        detail = await only_conversation(wa)
        assert messages_of(detail, "ack")[0]["delivery_status"] == status
    # a late "delivered" never takes a message back from "read"
    await post(wa, status_body(ack_row["provider_id"], "delivered"))
    assert messages_of(await only_conversation(wa), "ack")[0]["delivery_status"] == "read"

    await reply(wa, case["id"], "Die Absperrung wird heute abgebaut.")
    await wa.run_outbox()
    detail = await only_conversation(wa)
    assert messages_of(detail, "reply")[0]["delivery_status"] == "sent"
    # WhatsApp reports delivery: accepted by the provider is not yet answered
    assert detail["state"] != "answered" and detail["first_answered_at"] is None

    (reply_row,) = await wa.rows("SELECT provider_id FROM outbox WHERE kind = 'reply'")
    await post(wa, status_body(reply_row["provider_id"], "delivered"))
    detail = await only_conversation(wa)
    assert messages_of(detail, "reply")[0]["delivery_status"] == "delivered"
    assert detail["state"] == "answered" and detail["first_answered_at"] is not None
    await post(wa, status_body(reply_row["provider_id"], "read"))
    assert messages_of(await only_conversation(wa), "reply")[0]["delivery_status"] == "read"


async def test_a_chat_opened_for_the_first_time_is_no_message(wa: CoreHarness, graph: FakeGraph) -> None:
    """``request_welcome`` (Meta's welcome messages): the person opened the chat and wrote
    nothing. It became an unsupported message that opened a case, with a case reference and an
    answer deadline sent to them."""
    status, answer = await post(wa, inbound({"id": "wamid.WELCOME", "type": "request_welcome"}))
    assert status == 200 and answer == {"messages": 0, "statuses": 0}
    await wa.run_outbox()
    assert graph.sent == []
    assert await wa.count("messages") == 0 and await wa.count("conversations") == 0
    (event,) = await wa.rows("SELECT kind, data, conversation_id FROM events")
    assert event["kind"] == "whatsapp:request_welcome" and "wamid.WELCOME" in event["data"]
    assert SENDER not in event["data"]  # nobody to know about yet

    # What they then write opens the case, as any first message does.
    await post(wa, text_body("wamid.FIRST", "Wann wird der Gehweg wieder geöffnet?"))
    await wa.run_outbox()
    assert len(graph.sent) == 1 and (await only_conversation(wa))["state"] == "acknowledged"


async def test_a_status_for_an_unknown_message_is_recorded_and_ignored(wa: CoreHarness) -> None:
    status, answer = await post(wa, status_body("wamid.NOT_OURS", "delivered"))
    assert status == 200 and answer == {"messages": 0, "statuses": 1}
    (event,) = await wa.rows("SELECT provider_id, status, outbox_id FROM delivery_events")
    assert event == {"provider_id": "wamid.NOT_OURS", "status": "delivered", "outbox_id": None}
    assert await wa.count("messages") == 0 and await wa.count("conversations") == 0


# -------------------------------------------------------------------------------------------
# The contract test kit
# -------------------------------------------------------------------------------------------


async def test_the_channel_keeps_the_contract(wa: CoreHarness, graph: FakeGraph) -> None:
    async def deliver(harness: CoreHarness, key: str) -> None:
        status, answer = await post(harness, text_body(f"wamid.{key}", "Hallo, ich habe eine Frage zur Baustelle."))
        assert status == 200, answer

    capabilities = wa.core.channels["whatsapp"].capabilities
    assert capabilities.threads_by_sender is True and capabilities.delivery_receipts is True
    conversation = await check_channel_contract(wa, "whatsapp", deliver, sender=("phone", SENDER_E164))
    assert conversation["channel"] == "whatsapp"
    assert [p["to"] for p in graph.sent] == [SENDER, SENDER]  # the acknowledgement and the reply
    assert graph.sent[-1]["text"]["body"] == "Antwort vom Team"


# -------------------------------------------------------------------------------------------
# Media download (an option, off by default)
# -------------------------------------------------------------------------------------------

PHOTO = b"\xff\xd8\xff\xe0" + b"a photo of the trench" * 50


def image_body(message_id: str, media_id: str, caption: str = "So sieht es vor unserem Haus aus") -> dict[str, Any]:
    image = {"id": media_id, "mime_type": "image/jpeg", "sha256": "base64+hash=", "caption": caption}
    return inbound({"id": message_id, "type": "image", "image": image})


async def test_media_is_not_downloaded_by_default(wa: CoreHarness, graph: FakeGraph) -> None:
    graph.media["4711"] = (PHOTO, "image/jpeg")
    status, _ = await post(wa, image_body("wamid.IMG", "4711"))
    assert status == 200
    assert graph.media_requests == []
    (incoming,) = [m for m in (await only_conversation(wa))["messages"] if m["direction"] == "in"]
    assert incoming["attachments"] == [
        {"media_id": "4711", "content_type": "image/jpeg", "sha256": "base64+hash=", "caption": "So sieht es vor unserem Haus aus"}
    ]
    assert not (wa.data_dir / "media").exists()


async def test_media_download_fetches_through_the_graph_media_endpoint_into_the_data_folder(
    tmp_path: Path, graph: FakeGraph
) -> None:
    graph.media["4711"] = (PHOTO, "image/jpeg")
    async with make_harness(tmp_path, graph, download_media=True) as harness:
        status, _ = await post(harness, image_body("wamid.IMG", "4711"))
        assert status == 200
        assert [r["path"] for r in graph.media_requests] == ["/v21.0/4711", "/download/4711"]
        assert all(r["authorization"] == f"Bearer {ACCESS_TOKEN}" for r in graph.media_requests)
        (incoming,) = [m for m in (await only_conversation(harness))["messages"] if m["direction"] == "in"]
        (attachment,) = incoming["attachments"]
        assert attachment["media_id"] == "4711" and attachment["caption"] == "So sieht es vor unserem Haus aus"
        assert attachment["path"] == "media/whatsapp/4711.jpg"
        assert (harness.data_dir / attachment["path"]).read_bytes() == PHOTO

        # a redelivery neither stores the message again nor fetches the file again
        await post(harness, image_body("wamid.IMG", "4711"))
        assert len(graph.media_requests) == 2
        assert await harness.count("messages", "direction = 'in'") == 1


@pytest.mark.parametrize(
    "prepare, settings",
    [
        pytest.param(lambda g: None, {}, id="unknown-media-id"),
        pytest.param(lambda g: g.media.update({"4711": (PHOTO, "image/jpeg")}), {"max_media_bytes": 100}, id="too-large"),
        pytest.param(lambda g: g.media.update({"4711": (PHOTO, "image/jpeg")}), {"access_token": "revoked"}, id="refused"),
        pytest.param(
            lambda g: (g.media.update({"4711": (PHOTO, "image/jpeg")}), g.wrong_checksum.add("4711")), {}, id="checksum-mismatch"
        ),
    ],
)
async def test_a_failed_media_download_keeps_the_message(
    tmp_path: Path, graph: FakeGraph, prepare: Any, settings: dict[str, Any]
) -> None:
    prepare(graph)
    async with make_harness(tmp_path, graph, download_media=True, **settings) as harness:
        status, _ = await post(harness, image_body("wamid.IMG", "4711"))
        assert status == 200
        assert graph.media_requests, "the download should have been tried"
        detail = await only_conversation(harness)
        (incoming,) = [m for m in detail["messages"] if m["direction"] == "in"]
        (attachment,) = incoming["attachments"]
        assert attachment["media_id"] == "4711" and "path" not in attachment
        assert [p for p in (harness.data_dir / "media").rglob("*") if p.is_file()] == []
        assert await harness.count("outbox", "kind = 'ack'") == 1


async def test_media_stated_larger_than_max_media_bytes_is_not_downloaded_at_all(tmp_path: Path, graph: FakeGraph) -> None:
    graph.media["4711"] = (PHOTO, "image/jpeg")
    async with make_harness(tmp_path, graph, download_media=True, max_media_bytes=100) as harness:
        status, _ = await post(harness, image_body("wamid.IMG", "4711"))
        assert status == 200
        assert [r["path"] for r in graph.media_requests] == ["/v21.0/4711"]  # the bytes are never asked for
        (incoming,) = [m for m in (await only_conversation(harness))["messages"] if m["direction"] == "in"]
        assert "path" not in incoming["attachments"][0]
        assert await harness.count("outbox", "kind = 'ack'") == 1


async def test_media_of_exactly_max_media_bytes_is_downloaded(tmp_path: Path, graph: FakeGraph) -> None:
    """``max_media_bytes`` is the largest item fetched, not the first size refused."""
    graph.media["4711"] = (PHOTO, "image/jpeg")
    async with make_harness(tmp_path, graph, download_media=True, max_media_bytes=len(PHOTO)) as harness:
        status, _ = await post(harness, image_body("wamid.IMG", "4711"))
        assert status == 200
        (incoming,) = [m for m in (await only_conversation(harness))["messages"] if m["direction"] == "in"]
        assert (harness.data_dir / incoming["attachments"][0]["path"]).read_bytes() == PHOTO


@pytest.mark.parametrize("stated", [None, 50], ids=["no-size-stated", "size-understated"])
async def test_media_larger_than_max_media_bytes_is_cut_off_as_it_arrives_whatever_size_was_stated(
    tmp_path: Path, graph: FakeGraph, stated: int | None
) -> None:
    """``file_size`` is the Graph API's word, and may be missing or wrong: the bytes themselves
    are counted, and the download stops past the limit."""
    graph.media["4711"] = (PHOTO, "image/jpeg")
    graph.stated_sizes["4711"] = stated
    async with make_harness(tmp_path, graph, download_media=True, max_media_bytes=1000) as harness:
        status, _ = await post(harness, image_body("wamid.IMG", "4711"))
        assert status == 200
        assert [r["path"] for r in graph.media_requests] == ["/v21.0/4711", "/download/4711"]
        (incoming,) = [m for m in (await only_conversation(harness))["messages"] if m["direction"] == "in"]
        assert "path" not in incoming["attachments"][0]
        assert not (harness.data_dir / "media").exists() or not any(p.is_file() for p in (harness.data_dir / "media").rglob("*"))
        assert await harness.count("outbox", "kind = 'ack'") == 1


async def test_a_download_url_that_is_not_metas_gets_no_request_and_no_token(tmp_path: Path, graph: FakeGraph) -> None:
    """The Graph API's answer named the URL, and the service fetched it with the business's
    token, whatever it was: an answer forged on the way (or a compromised proxy) could send the
    token to any host, or make the service read an internal address."""
    inside: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        inside.append({"path": request.path, "authorization": request.headers.get("Authorization")})
        return web.Response(body=b"secret", content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    from aiohttp.test_utils import TestServer

    async with TestServer(app, host="127.0.0.1") as internal:
        graph.media["4711"] = (PHOTO, "image/jpeg")
        graph.media_urls["4711"] = str(internal.make_url("/latest/meta-data/iam"))
        async with make_harness(tmp_path, graph, download_media=True) as harness:
            status, _ = await post(harness, image_body("wamid.IMG", "4711"))
            assert status == 200
            assert inside == []
            (incoming,) = [m for m in (await only_conversation(harness))["messages"] if m["direction"] == "in"]
            assert "path" not in incoming["attachments"][0]
            assert not (harness.data_dir / "media").exists() or not any((harness.data_dir / "media").rglob("*.jpg"))
            assert await harness.count("outbox", "kind = 'ack'") == 1


@pytest.fixture
async def elsewhere(aiohttp_server: Any) -> tuple[list[dict[str, Any]], str]:
    """Another origin (plain http, standing in for 169.254.169.254 or an internal service): the
    requests it got, and its base URL."""
    hits: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        hits.append({"path": request.path, "authorization": request.headers.get("Authorization")})
        return web.Response(body=PHOTO, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    server = await aiohttp_server(app, host="127.0.0.1")
    return hits, str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize("hop", ["download", "media-endpoint"])
async def test_a_redirect_to_a_url_that_is_not_metas_is_not_followed(
    tmp_path: Path, graph: FakeGraph, elsewhere: tuple[list[dict[str, Any]], str], hop: str
) -> None:
    """``may_fetch`` checked only the URL the Graph API named; aiohttp then followed a redirect
    from it, or from the media endpoint itself, to any scheme and host."""
    hits, other = elsewhere
    graph.media["4711"] = (PHOTO, "image/jpeg")
    if hop == "download":
        graph.media_urls["4711"] = f"{graph.base_url}/redirect/4711"
        graph.redirects["4711"] = f"{other}/latest/meta-data/iam"
    else:
        graph.info_redirects["4711"] = f"{other}/latest/meta-data/iam"
    async with make_harness(tmp_path, graph, download_media=True) as harness:
        status, _ = await post(harness, image_body("wamid.IMG", "4711"))
        assert status == 200
        assert hits == []
        (incoming,) = [m for m in (await only_conversation(harness))["messages"] if m["direction"] == "in"]
        assert "path" not in incoming["attachments"][0]
        assert await harness.count("outbox", "kind = 'ack'") == 1


async def test_a_redirect_on_the_graph_apis_own_origin_is_followed_a_few_times(tmp_path: Path, graph: FakeGraph) -> None:
    graph.media["4711"] = (PHOTO, "image/jpeg")
    graph.media["4712"] = (PHOTO, "image/jpeg")
    graph.media_urls["4711"] = f"{graph.base_url}/redirect/a"
    graph.redirects.update({"a": f"{graph.base_url}/redirect/b", "b": "/download/4711"})  # relative, too
    graph.media_urls["4712"] = f"{graph.base_url}/redirect/loop"
    graph.redirects["loop"] = f"{graph.base_url}/redirect/loop"
    async with make_harness(tmp_path, graph, download_media=True) as harness:
        await post(harness, image_body("wamid.IMG1", "4711"))
        assert [r["path"] for r in graph.media_requests] == ["/v21.0/4711", "/redirect/a", "/redirect/b", "/download/4711"]
        assert all(r["authorization"] == f"Bearer {ACCESS_TOKEN}" for r in graph.media_requests)
        assert (harness.data_dir / "media/whatsapp/4711.jpg").read_bytes() == PHOTO
        await post(harness, image_body("wamid.IMG2", "4712"))
        assert [r["path"] for r in graph.media_requests[4:]] == ["/v21.0/4712"] + ["/redirect/loop"] * 4
        assert not (harness.data_dir / "media/whatsapp/4712.jpg").exists()


async def test_a_redirect_to_another_origin_gets_no_token(
    tmp_path: Path, graph: FakeGraph, elsewhere: tuple[list[dict[str, Any]], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another https host passes ``may_fetch`` (tests have no https): it is asked without the
    business's token, which goes only to the origin the Graph API named."""
    from plugins.whatsapp import media

    hits, other = elsewhere
    monkeypatch.setattr(media, "may_fetch", lambda url, graph_url: True)  # as if it were https
    graph.media["4711"] = (PHOTO, "image/jpeg")
    graph.media_urls["4711"] = f"{graph.base_url}/redirect/4711"
    graph.redirects["4711"] = f"{other}/cdn/4711"
    async with make_harness(tmp_path, graph, download_media=True) as harness:
        await post(harness, image_body("wamid.IMG", "4711"))
        assert hits == [{"path": "/cdn/4711", "authorization": None}]
        assert graph.media_requests[-1] == {"path": "/redirect/4711", "authorization": f"Bearer {ACCESS_TOKEN}"}
        assert (harness.data_dir / "media/whatsapp/4711.jpg").read_bytes() == PHOTO


async def test_error_entry_without_message_is_kept_for_staff(wa):
    harness = wa
    body = envelope(
        {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "4930123456", "phone_number_id": PHONE_NUMBER_ID},
            "errors": [{"code": 131000, "title": "Something went wrong", "message": "Something went wrong"}],
        }
    )
    status, _ = await post(harness, body)
    assert status == 200
    events = await harness.rows("SELECT kind, data FROM events WHERE kind = 'whatsapp:provider_error'")
    assert len(events) == 1 and "131000" in events[0]["data"]
    assert await harness.count("messages") == 0


async def test_overload_is_refused_with_retry_after_and_nothing_stored(wa):
    from plugins.whatsapp.channel import MAX_IN_FLIGHT

    channel = wa.core.channels["whatsapp"]
    assert channel.max_in_flight == MAX_IN_FLIGHT
    channel.in_flight = MAX_IN_FLIGHT  # as if that many bodies were being ingested right now
    raw = json.dumps(text_body("wamid.busy", "Hallo")).encode()
    response = await wa.client.post(
        WEBHOOK, data=raw, headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(raw, SECRET)}
    )
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert (await response.json())["error"]["code"] == "overloaded"
    assert await wa.count("messages") == 0
    channel.in_flight = 0
    status, _ = await post(wa, text_body("wamid.busy", "Hallo"))  # the provider's retry
    assert status == 200 and await wa.count("messages", "direction = 'in'") == 1


async def test_slow_or_forged_bodies_hold_no_slot_that_real_webhooks_need(wa):
    """A slot was taken before the body was read: as many connections as there are slots,
    each sending a signed webhook's headers and then nothing, kept every real webhook out with
    503 until they went away (no deadline on a body either). Now a body counts once it has
    arrived and its signature holds."""
    channel = wa.core.channels["whatsapp"]
    channel.max_in_flight = 2
    raw = json.dumps(text_body("wamid.stalled", "Hallo")).encode()
    stalled = [
        await wa.stalled_request(WEBHOOK, raw[:40], declared=len(raw), headers={"X-Hub-Signature-256": sign(raw, SECRET)})
        for _ in range(channel.max_in_flight)
    ]
    try:
        status, answer = await post(wa, text_body("wamid.forged", "Hallo"), secret="not-the-app-secret")
        assert status == 401 and answer["error"]["code"] == "invalid_signature"
        status, answer = await post(wa, text_body("wamid.real", "Die Baustelle blockiert unsere Einfahrt."))
        assert status == 200 and answer["messages"] == 1
        assert channel.in_flight == 0 and channel.refused == 0
    finally:
        for _, writer in stalled:
            writer.close()
    assert await wa.count("messages", "direction = 'in'") == 1


async def test_a_database_that_refuses_writes_answers_503_and_the_retry_is_stored_once(wa, graph):
    """Disk full or read-only: the webhook was answered 500 ("internal error"). It is the
    service that cannot store, not the body that is wrong: 503 with Retry-After, nothing
    written; Meta's retry after the database is back is stored and acknowledged once."""
    wa.refuse_writes()
    raw = json.dumps(text_body("wamid.DISKFULL", "Die Einfahrt ist seit Tagen zugeparkt.")).encode()
    response = await wa.client.post(
        WEBHOOK, data=raw, headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(raw, SECRET)}
    )
    assert response.status == 503 and response.headers["Retry-After"] == "5"
    assert (await response.json())["error"]["code"] == "unavailable"
    wa.refuse_writes(False)
    assert await wa.count("messages") == 0 and await wa.count("outbox") == 0

    status, _ = await post(wa, text_body("wamid.DISKFULL", "Die Einfahrt ist seit Tagen zugeparkt."))
    assert status == 200
    await wa.run_outbox()
    assert await wa.count("messages", "direction = 'in'") == 1
    assert len(graph.requests) == 1 and (await only_conversation(wa))["state"] == "acknowledged"


async def test_a_200_without_a_message_id_is_taken_and_its_status_gives_it_the_id(tmp_path, graph: FakeGraph):
    """Meta took the message but its answer named no id (cut short, changed by a proxy): it was
    a permanent failure, the person flagged for a call-back, and the status proving delivery
    that came a moment later was ignored. A 2xx is Meta taking it: recorded as sent without an
    id, and its status, which carries our key, gives it the id."""
    graph.answers.append((200, {"messaging_product": "whatsapp"}, 0.0))
    async with make_harness(tmp_path, graph) as wa:
        await post(wa, text_body("wamid.IN1", "Seit heute früh wird vor unserem Haus gebaggert."))
        await wa.run_outbox()
        (row,) = await wa.rows("SELECT state, provider_id, idempotency_key FROM outbox WHERE kind = 'ack'")
        assert (row["state"], row["provider_id"]) == ("sent", None)
        status, _ = await post(wa, status_body("wamid.OUT9", "delivered", callback_data=row["idempotency_key"]))
        assert status == 200
        (row,) = await wa.rows("SELECT state, provider_id, delivery_status FROM outbox WHERE kind = 'ack'")
        assert row == {"state": "sent", "provider_id": "wamid.OUT9", "delivery_status": "delivered"}
        detail = await only_conversation(wa)
        assert not {"undeliverable", "callback_required"} & set(detail["flags"])
        assert len(graph.sent) == 1  # not sent again


async def test_a_200_without_a_message_id_is_not_sent_again_when_no_status_comes_in_time(
    wa: CoreHarness, graph: FakeGraph
) -> None:
    """Its status came later than ``status_wait`` (Meta's statuses lag in an incident): the
    message was sent again, and the person had it twice. A 2xx is Meta taking it."""
    case = await open_case(wa)
    graph.answers.append((200, {"messaging_product": "whatsapp", "messages": [{}]}, 0.0))
    await reply(wa, case["id"], "Die Baustelle ist ab Montag geräumt.")
    await wa.run_outbox()
    for _ in range(3):
        wa.clock.advance(timedelta(minutes=5))
        await wa.run_outbox()
    assert len(graph.sent) == 2  # the acknowledgement and the answer, once
    (row,) = await wa.rows("SELECT state, provider_id, idempotency_key FROM outbox WHERE kind = 'reply'")
    assert (row["state"], row["provider_id"]) == ("sent", None)
    assert (await only_conversation(wa))["state"] == "acknowledged"  # not answered until delivered
    await post(wa, status_body("wamid.LATE", "delivered", callback_data=row["idempotency_key"]))
    assert (await only_conversation(wa))["state"] == "answered"


@pytest.mark.parametrize("part", [1, 2], ids=["first-part", "last-part"])
async def test_a_part_of_a_long_answer_taken_without_an_id_is_not_sent_again(
    wa: CoreHarness, graph: FakeGraph, part: int
) -> None:
    """A long answer goes as two messages. One answered 200 without an id: it was retried, the
    first part after the backoff (the person read it twice), the last after ``status_wait``."""
    case = await open_case(wa)
    if part == 2:
        graph.answers.append((200, None, 0.0))  # the first part, taken with its id
    graph.answers.append((200, {"messaging_product": "whatsapp"}, 0.0))
    await reply(wa, case["id"], LONG_ANSWER)
    await wa.run_outbox()
    for _ in range(3):
        wa.clock.advance(timedelta(minutes=5))
        await wa.run_outbox()
    assert len(graph.sent) == 3  # the acknowledgement and the two parts, each once
    (row,) = await wa.rows("SELECT state, provider_id, idempotency_key FROM outbox WHERE kind = 'reply'")
    assert row["state"] == "sent"
    assert await wa.count("thread_keys", "key = ''") == 0  # no empty id kept to find the case by
    if part == 2:
        assert row["provider_id"] is None
        await post(wa, status_body("wamid.LAST", "delivered", callback_data=row["idempotency_key"]))
        (row,) = await wa.rows("SELECT provider_id FROM outbox WHERE kind = 'reply'")
        assert row["provider_id"] == "wamid.LAST"
    else:
        assert row["provider_id"].startswith("wamid.OUT")
