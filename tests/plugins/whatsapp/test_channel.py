"""The channel's HTTP side on its own: webhook routes on a bare app, sends to a fake Graph API.

The core is stood in for by a small recorder that validates messages against the canonical
schema, as the real ``ingest`` does; the Graph API is a real aiohttp server on loopback.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from plugins.whatsapp import WhatsAppChannel, register_channels
from plugins.whatsapp.channel import AcceptedParts
from plugins.whatsapp.settings import WhatsAppSettings, WhatsAppSettingsError
from plugins.whatsapp.signature import sign
from router.app import MAX_BODY_BYTES
from router.clock import FrozenClock
from router.hookspecs import (
    NOT_CONFIGURED,
    ChannelContext,
    DeliveryUpdate,
    IngestResult,
    InvalidMessage,
    OutboundMessage,
    PermanentDeliveryError,
    ResendAsDeliveryError,
    RetryableDeliveryError,
)
from router.testing import unopened_connections

from .conftest import fixture_cases, schema_errors

UNITS = dict.fromkeys(["kundenservice", "bauhotline", "stoerung", "vertrieb", "tiefbau-muster"], {})
"""The example organisation's units, as the core hands them to ``register_channels``."""

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "app-secret"

SETTINGS: dict[str, Any] = {
    "app_secret": SECRET,
    "verify_token": "verify-me",
    "access_token": "token-123",
    "api_version": "v21.0",
    "numbers": [
        {"phone_number_id": "1122334455667", "unit": "bauhotline", "language": "de"},
        {"phone_number_id": "106540352242922", "unit": "kundenservice", "language": "en"},
    ],
    "template": {"name": "case_update", "languages": {"de": "de", "en": "en_US"}},
    "max_body_bytes": 64 * 1024,
    "timeout": 10.0,  # an answer of the fake Graph API comes in time even on a busy machine
}


class RecordingCore:
    """What the channel hands to the core, validated the way the core validates it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.updates: list[DeliveryUpdate] = []
        self.refusal: InvalidMessage | None = None
        self.refuse_ids: set[str] = set()  # refuse only these message ids (else every one)
        self.events: list[tuple[str, str, Any]] = []

    async def ingest(self, message: dict[str, Any]) -> IngestResult:
        if self.refusal and (not self.refuse_ids or message["channel_message_id"] in self.refuse_ids):
            raise self.refusal
        errors = schema_errors(message)
        if errors:
            raise InvalidMessage(errors[0], path=errors[0].split(":")[0])
        self.messages.append(message)
        return IngestResult(
            message_id=len(self.messages),
            conversation_id=1,
            case_reference="K-7F3QX2",
            status_token=None,
            status_url=None,
            unit=message.get("unit_hint"),
            unit_name=None,
            deadline=None,
            language=message.get("language") or "de",
            acknowledged=True,
        )

    async def record_delivery(self, channel: str, update: DeliveryUpdate) -> bool:
        self.updates.append(update)
        return True

    async def record_event(self, channel: str, kind: str, data: Any) -> None:
        self.events.append((channel, kind, dict(data)))


class FakeGraph:
    """A Graph API stand-in: records each request and answers from a queue (default: accepted)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: list[tuple[int, Any]] = []
        self.headers: dict[str, str] = {}  # sent with every answer
        self.delay = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            {
                "path": request.path,
                "authorization": request.headers.get("Authorization"),
                "json": await request.json(),
            }
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        status, body = self.answers.pop(0) if self.answers else (200, None)
        if body is None and status == 200:
            body = {"messaging_product": "whatsapp", "messages": [{"id": f"wamid.out{len(self.requests)}"}]}
        return web.json_response(body, status=status, headers=self.headers)


@pytest.fixture
def core() -> RecordingCore:
    return RecordingCore()


@pytest.fixture
async def graph(aiohttp_server: Any) -> tuple[FakeGraph, str]:
    fake = FakeGraph()
    app = web.Application()
    app.router.add_post("/{version}/{phone_number_id}/messages", fake.handle)
    server = await aiohttp_server(app)
    return fake, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def make_channel(
    core: RecordingCore, session: aiohttp.ClientSession, tmp_path: Path, **overrides: Any
) -> WhatsAppChannel:
    section = {**SETTINGS, **overrides}
    settings = WhatsAppSettings.from_mapping(section)
    assert settings is not None
    channel = WhatsAppChannel(settings)
    channel.setup(
        ChannelContext(
            name="whatsapp",
            settings=section,
            data_dir=tmp_path,
            public_base_url="http://127.0.0.1:8080",
            clock=FrozenClock(NOW),
            ingest=core.ingest,
            record_delivery=core.record_delivery,
            conversation_view=_no_conversation,
            http=lambda: session,
            render=lambda template, language, **values: template,
            units={},
            record_event=core.record_event,
        )
    )
    return channel


async def _no_conversation(**_: Any) -> None:
    return None


@pytest.fixture
async def client(aiohttp_client: Any, core: RecordingCore, session: aiohttp.ClientSession, tmp_path: Path) -> Any:
    channel = make_channel(core, session, tmp_path)
    routes = web.Application()
    routes.add_routes(channel.routes())
    app = web.Application()
    app.add_subapp("/channels/whatsapp", routes)
    return await aiohttp_client(app)


def _signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"X-Hub-Signature-256": sign(body, secret), "Content-Type": "application/json"}


# -------------------------------------------------------------------------------------------
# Subscription check
# -------------------------------------------------------------------------------------------


async def test_subscription_check_echoes_the_challenge(client: Any) -> None:
    params = {"hub.mode": "subscribe", "hub.verify_token": "verify-me", "hub.challenge": "1158201444"}
    response = await client.get("/channels/whatsapp/webhook", params=params)
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert await response.text() == "1158201444"


@pytest.mark.parametrize(
    "params",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": "verify-me", "hub.challenge": "1"},
        {"hub.verify_token": "verify-me", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": "verify-me"},
    ],
)
async def test_subscription_check_refuses_anything_else(client: Any, params: dict[str, str]) -> None:
    response = await client.get("/channels/whatsapp/webhook", params=params)
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "forbidden"


# -------------------------------------------------------------------------------------------
# Webhook bodies
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file, case, body", fixture_cases())
async def test_recorded_case_is_accepted_signed_and_refused_unsigned(
    client: Any, core: RecordingCore, file: str, case: str, body: dict
) -> None:
    raw = json.dumps(body).encode()
    for headers in ({"Content-Type": "application/json"}, _signed(raw, "not-the-secret")):
        response = await client.post("/channels/whatsapp/webhook", data=raw, headers=headers)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_signature"
    assert core.messages == [] and core.updates == []

    response = await client.post("/channels/whatsapp/webhook", data=raw, headers=_signed(raw))
    assert response.status == 200
    values = [c["value"] for e in body["entry"] for c in e["changes"]]
    assert len(core.messages) == sum(len(v.get("messages", [])) for v in values)
    assert len(core.updates) == sum(len(v.get("statuses", [])) for v in values)
    for message in core.messages:
        number = {n["phone_number_id"]: n for n in SETTINGS["numbers"]}.get(message["recipient"])
        if number:
            assert message["unit_hint"] == number["unit"]
            # the number's language is the default for messages without text to guess from
            assert message.get("language") == (None if message.get("text") else number["language"])
        else:
            assert "unit_hint" not in message and "language" not in message


async def test_signature_is_checked_on_the_raw_bytes(client: Any, core: RecordingCore) -> None:
    raw = b'{"object": "whatsapp_business_account", "entry": []}'
    reformatted = json.dumps(json.loads(raw), separators=(",", ":")).encode()  # same JSON, other bytes
    assert reformatted != raw
    response = await client.post("/channels/whatsapp/webhook", data=reformatted, headers=_signed(raw))
    assert response.status == 401


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 50_000])
async def test_signed_body_that_is_not_a_json_object_is_a_400(client: Any, raw: bytes) -> None:
    response = await client.post("/channels/whatsapp/webhook", data=raw, headers=_signed(raw))
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_json"


async def test_body_over_the_size_limit_is_refused(client: Any, core: RecordingCore) -> None:
    raw = json.dumps({"object": "whatsapp_business_account", "pad": "x" * 70_000}).encode()
    response = await client.post("/channels/whatsapp/webhook", data=raw, headers=_signed(raw))
    assert response.status == 413


async def test_body_over_the_size_limit_is_answered_with_the_channels_error(client: Any, core: RecordingCore) -> None:
    response = await client.post("/channels/whatsapp/webhook", data=b"{" + b" " * 64 * 1024 + b"}")
    assert response.status == 413
    assert (await response.json()) == {"error": {"code": "body_too_large", "message": "body exceeds 65536 bytes"}}


async def test_chunked_body_without_length_over_the_limit_is_refused(client: Any, core: RecordingCore) -> None:
    raw = json.dumps({"object": "whatsapp_business_account", "entry": [], "pad": "x" * 70_000}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 10_000):
            yield raw[start:start + 10_000]

    response = await client.post("/channels/whatsapp/webhook", data=chunks(), headers=_signed(raw))
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "body_too_large"
    assert core.messages == []


async def _app_client(aiohttp_client: Any, channel: WhatsAppChannel) -> Any:
    """The channel's routes in an application with the service's own request size cap."""
    routes = web.Application()
    routes.add_routes(channel.routes())
    app = web.Application(client_max_size=MAX_BODY_BYTES)  # as create_app builds it
    app.add_subapp("/channels/whatsapp", routes)
    return await aiohttp_client(app)


async def test_body_within_the_channel_limit_but_over_the_services_cap_is_taken(
    aiohttp_client: Any, core: RecordingCore, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """``max_body_bytes`` (3 MB by default) is the channel's limit, not aiohttp's 1 MiB cap for
    bodies read whole: a big batch of statuses must not be refused (Meta would drop it)."""
    client = await _app_client(aiohttp_client, make_channel(core, session, tmp_path, max_body_bytes=3 * 1024 * 1024))
    raw = json.dumps({"object": "whatsapp_business_account", "entry": [], "pad": "x" * 1_500_000}).encode()
    assert len(raw) > MAX_BODY_BYTES
    response = await client.post("/channels/whatsapp/webhook", data=raw, headers=_signed(raw))
    assert response.status == 200


async def test_compressed_body_is_limited_by_its_inflated_size(
    aiohttp_client: Any, core: RecordingCore, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    client = await _app_client(aiohttp_client, make_channel(core, session, tmp_path))  # limit 64 KiB
    raw = json.dumps({"object": "whatsapp_business_account", "entry": [], "pad": "x" * 600_000}).encode()
    packed = gzip.compress(raw)
    assert len(packed) < 64 * 1024
    response = await client.post("/channels/whatsapp/webhook", data=packed,
                                 headers={**_signed(raw), "Content-Encoding": "gzip"})
    assert response.status == 413


async def test_a_message_the_core_refuses_is_named_and_the_rest_of_the_webhook_is_handled(
    client: Any, core: RecordingCore
) -> None:
    """A 400 would make Meta resend the whole body for days while the messages and statuses
    after the refused one were never read: they are handled, the refusal is named and kept."""
    core.refusal = InvalidMessage("too long", path="sender.address")
    core.refuse_ids = {"m2"}
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"changes": [{"field": "messages", "value": {
            "messages": [
                {"from": "491701234567", "id": f"m{i}", "timestamp": "1700000000", "type": "text", "text": {"body": "x"}}
                for i in (1, 2, 3)
            ],
            "statuses": [{"id": "wamid.out1", "status": "delivered", "timestamp": "1700000001", "recipient_id": "491701234567"}],
        }}]}],
    }  # fmt: skip
    raw = json.dumps(body).encode()
    response = await client.post("/channels/whatsapp/webhook", data=raw, headers=_signed(raw))
    assert response.status == 200
    answer = await response.json()
    assert answer["messages"] == 2 and answer["statuses"] == 1
    assert answer["refused"] == [{"id": "m2", "field": "sender.address", "error": "too long"}]
    assert [m["channel_message_id"] for m in core.messages] == ["m1", "m3"]
    assert [u.provider_id for u in core.updates] == ["wamid.out1"]
    assert core.events == [("whatsapp", "invalid_message", {"id": "m2", "field": "sender.address", "error": "too long"})]


# -------------------------------------------------------------------------------------------
# Sending
# -------------------------------------------------------------------------------------------


def outbound(**overrides: Any) -> OutboundMessage:
    values: dict[str, Any] = {
        "outbox_id": 1,
        "channel": "whatsapp",
        "kind": "reply",
        "to_kind": "phone",
        "to": "+491701234567",
        "text": "Die Baustelle ist am Freitag fertig.",
        "language": "en",
        "idempotency_key": "outbox-1",
        "case_reference": "K-7F3QX2",
        "recipient": "106540352242922",
        "last_inbound_at": NOW - timedelta(hours=2),
    }
    values.update(overrides)
    return OutboundMessage(**values)


@pytest.fixture
def sender(
    core: RecordingCore, session: aiohttp.ClientSession, tmp_path: Path, graph: tuple[FakeGraph, str]
) -> WhatsAppChannel:
    return make_channel(core, session, tmp_path, graph_url=graph[1])


async def test_inside_the_window_free_text_goes_to_the_number_written_to(
    sender: WhatsAppChannel, graph: tuple[FakeGraph, str]
) -> None:
    fake, _ = graph
    result = await sender.send(outbound())
    assert result.provider_id == "wamid.out1"
    (request,) = fake.requests
    assert request["path"] == "/v21.0/106540352242922/messages"
    assert request["authorization"] == "Bearer token-123"
    assert request["json"]["type"] == "text"
    assert request["json"]["to"] == "491701234567"
    assert request["json"]["text"]["body"] == "Die Baustelle ist am Freitag fertig."


async def test_after_25_hours_the_template_goes_out_in_the_contacts_language(
    sender: WhatsAppChannel, graph: tuple[FakeGraph, str]
) -> None:
    fake, _ = graph
    await sender.send(outbound(last_inbound_at=NOW - timedelta(hours=25)))
    payload = fake.requests[0]["json"]
    assert payload["type"] == "template"
    assert payload["template"]["name"] == "case_update"
    assert payload["template"]["language"] == {"code": "en_US"}
    assert [p["text"] for p in payload["template"]["components"][0]["parameters"]] == [
        "K-7F3QX2",
        "Die Baustelle ist am Freitag fertig.",
    ]


async def test_template_hint_forces_the_template_and_unknown_recipient_uses_the_first_number(
    sender: WhatsAppChannel, graph: tuple[FakeGraph, str]
) -> None:
    fake, _ = graph
    await sender.send(outbound(hint="template", recipient=None, language="fr"))
    request = fake.requests[0]
    assert request["path"] == "/v21.0/1122334455667/messages"
    assert request["json"]["type"] == "template"
    assert request["json"]["template"]["language"] == {"code": "de"}  # the first number's language


@pytest.mark.parametrize(
    "status, body, error_type",
    [
        (400, {"error": {"code": 131047, "message": "Re-engagement message"}}, ResendAsDeliveryError),
        (500, {"error": {"code": 1, "message": "Unknown"}}, RetryableDeliveryError),
        (400, {"error": {"code": 130429, "message": "Rate limit hit"}}, RetryableDeliveryError),
        (400, {"error": {"code": 131026, "message": "Message undeliverable"}}, PermanentDeliveryError),
    ],
)
async def test_graph_errors_become_typed_delivery_errors(
    sender: WhatsAppChannel, graph: tuple[FakeGraph, str], status: int, body: Any, error_type: type
) -> None:
    graph[0].answers.append((status, body))
    with pytest.raises(error_type):
        await sender.send(outbound())


async def test_a_500_then_success_is_retryable_then_sent(sender: WhatsAppChannel, graph: tuple[FakeGraph, str]) -> None:
    graph[0].answers.append((500, {"error": {"code": 2, "message": "Service"}}))
    with pytest.raises(RetryableDeliveryError) as caught:
        await sender.send(outbound())
    assert caught.value.outcome_unknown is False  # Meta answered: it did not take the message
    assert (await sender.send(outbound())).provider_id == "wamid.out2"


@pytest.mark.parametrize(
    "header, seconds",
    [("30", 30.0), ("-5", None), ("90000", None), ("Wed, 21 Oct 2015 07:28:00 GMT", None)],
)
async def test_retry_after_of_a_rate_limit_is_passed_on_when_usable(
    sender: WhatsAppChannel, graph: tuple[FakeGraph, str], header: str, seconds: float | None
) -> None:
    graph[0].answers.append((429, {"error": {"code": 130429, "message": "Rate limit hit"}}))
    graph[0].headers = {"Retry-After": header}
    with pytest.raises(RetryableDeliveryError) as caught:
        await sender.send(outbound())
    assert caught.value.retry_after == seconds


async def test_timeout_is_retryable(
    core: RecordingCore, session: aiohttp.ClientSession, tmp_path: Path, graph: tuple[FakeGraph, str]
) -> None:
    channel = make_channel(core, session, tmp_path, graph_url=graph[1], timeout=0.5)
    graph[0].delay = 2  # the fake answers on the same event loop, after the channel's timer
    with pytest.raises(RetryableDeliveryError) as caught:
        await channel.send(outbound())
    assert caught.value.code == "timeout"
    assert caught.value.outcome_unknown is True  # Meta may have taken it: its status will tell


async def test_a_connection_lost_after_the_request_leaves_the_outcome_unknown(
    core: RecordingCore, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async def read_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(read_then_hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        channel = make_channel(core, session, tmp_path, graph_url=f"http://127.0.0.1:{port}")
        with pytest.raises(RetryableDeliveryError) as caught:
            await channel.send(outbound())
    finally:
        server.close()
        await server.wait_closed()
    assert caught.value.code == "connection" and caught.value.outcome_unknown is True


async def test_a_connection_that_never_opens_is_known_not_sent(
    core: RecordingCore, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Only a total timeout was set for the POST: a connection that never opened (a firewall
    dropping packets) timed out as an unanswered request did, as if Meta might have taken the
    message, and each retry waited ``status_wait`` for a status that could not come."""
    with unopened_connections() as url:
        if url is None:
            pytest.skip("this system completes connections to a full accept queue")
        channel = make_channel(core, session, tmp_path, graph_url=url, timeout=0.6)
        with pytest.raises(RetryableDeliveryError) as caught:
            await channel.send(outbound())
    assert caught.value.code == "connection"
    assert caught.value.outcome_unknown is False  # the request never went: no reason to wait for a status


async def test_unreachable_graph_is_retryable(
    core: RecordingCore, session: aiohttp.ClientSession, tmp_path: Path, unused_tcp_port: int
) -> None:
    channel = make_channel(core, session, tmp_path, graph_url=f"http://127.0.0.1:{unused_tcp_port}")
    with pytest.raises(RetryableDeliveryError) as caught:
        await channel.send(outbound())
    assert caught.value.code == "connection"
    assert caught.value.outcome_unknown is False  # no connection, so nothing was sent


async def test_outside_the_window_without_a_template_is_permanent(
    core: RecordingCore, session: aiohttp.ClientSession, tmp_path: Path, graph: tuple[FakeGraph, str]
) -> None:
    channel = make_channel(core, session, tmp_path, graph_url=graph[1], template=None)
    with pytest.raises(PermanentDeliveryError):
        await channel.send(outbound(last_inbound_at=None))
    assert graph[0].requests == []


@pytest.mark.parametrize(
    "languages, conversation, code, prompt",
    [
        ({"de": "de"}, "en", "de", "um die vollständige Antwort zu lesen."),  # no English template: all German
        ({"de": "de", "en": "en_US"}, "en", "en_US", "to read the full answer."),
        ({"en": "en_US", "de": "de"}, "fr", "de", "um die vollständige Antwort zu lesen."),  # the number's (de)
    ],
)
async def test_the_template_prompt_is_in_the_language_of_the_template_that_goes_out(
    core: RecordingCore, session: aiohttp.ClientSession, tmp_path: Path, graph: tuple[FakeGraph, str],
    languages: dict[str, str], conversation: str, code: str, prompt: str,
) -> None:
    """The prompt followed the conversation: an English conversation answered with the German
    template (no English one approved) asked in English, in the middle of German, to reply."""
    channel = make_channel(core, session, tmp_path, graph_url=graph[1], template={"name": "case_update", "languages": languages})
    await channel.send(outbound(text="Lange Antwort. " * 100, language=conversation, recipient="1122334455667",
                                last_inbound_at=NOW - timedelta(hours=25)))
    payload = graph[0].requests[0]["json"]
    assert payload["template"]["language"] == {"code": code}
    assert payload["template"]["components"][0]["parameters"][1]["text"].endswith(prompt)


LONG = "Zum Stand der Bauarbeiten: " + "Der Gehweg bleibt gesperrt. " * 200  # two parts


@pytest.mark.parametrize(
    "refusal",
    [(503, {"error": {"code": 131016, "message": "Service unavailable"}}),
     (429, {"error": {"code": 130429, "message": "Rate limit hit"}}),
     (500, None)],
    ids=["service-unavailable-131016", "rate-limit-429", "http-500"],
)
async def test_a_long_text_resumes_with_the_part_meta_has_not_taken(
    sender: WhatsAppChannel, graph: tuple[FakeGraph, str], refusal: tuple[int, Any]
) -> None:
    """Part 1 was taken, part 2 refused for now (a definite answer: nothing of it went). The
    retry posted part 1 again, and the person read the beginning twice."""
    fake, _ = graph
    fake.answers += [(200, None), refusal]
    with pytest.raises(RetryableDeliveryError) as caught:
        await sender.send(outbound(text=LONG))
    assert caught.value.outcome_unknown is False
    result = await sender.send(outbound(text=LONG))
    first, refused, again = (r["json"] for r in fake.requests)
    assert refused == again and first != again  # only the part without an id went again
    assert [r["biz_opaque_callback_data"] for r in (first, again)] == ["outbox-1.part-1", "outbox-1"]
    # The message is its last part: its status tells whether the whole answer arrived.
    assert (result.provider_id, result.thread_key) == ("wamid.out3", "wamid.out1")

    # Sent again under the same key (its outcome was not recorded, say): nothing goes twice.
    assert (await sender.send(outbound(text=LONG))).provider_id == "wamid.out3"
    assert len(fake.requests) == 3
    # Another outbox row is a send of its own; so is the template the retry may have become.
    await sender.send(outbound(text=LONG, idempotency_key="outbox-2"))
    assert len(fake.requests) == 5
    await sender.send(outbound(text=LONG, last_inbound_at=NOW - timedelta(hours=25)))
    assert len(fake.requests) == 6 and fake.requests[-1]["json"]["type"] == "template"


def test_the_parts_taken_are_remembered_for_a_bounded_number_of_rows_and_time() -> None:
    parts = AcceptedParts(max_sends=2, max_age=timedelta(hours=1))
    for n, key in enumerate(("k1", "k2", "k3")):
        parts.add(key, 1, "f1", f"wamid.{n}", NOW)
    assert len(parts) == 2 and parts.taken("k1", NOW) == []  # the oldest row went first
    assert parts.taken("k3", NOW) == [("f1", "wamid.2")]
    parts.add("k3", 2, "f2", "wamid.3", NOW + timedelta(minutes=50))
    assert parts.taken("k2", NOW + timedelta(minutes=61)) == []  # an hour after its last part
    assert parts.taken("k3", NOW + timedelta(minutes=61)) == [("f1", "wamid.2"), ("f2", "wamid.3")]
    assert len(parts) == 1
    parts.add("k3", 1, "f9", "wamid.4", NOW + timedelta(minutes=62))  # sent again from its first part
    assert parts.taken("k3", NOW + timedelta(minutes=62)) == [("f9", "wamid.4")]


def test_a_retry_resumes_only_after_the_parts_that_are_still_the_same() -> None:
    """A part Meta took counts for the retry only while it is the same payload: a part that is
    another text now (or goes from another number) is sent, and so is every part after it."""
    parts = AcceptedParts()
    parts.add("k1", 1, "f1", "wamid.1", NOW)
    parts.add("k1", 2, "f2", "wamid.2", NOW)
    assert parts.resume("k1", ["f1", "f2", "f3"], NOW) == ["wamid.1", "wamid.2"]
    assert parts.resume("k1", ["f1", "g2", "g3"], NOW) == ["wamid.1"]
    assert parts.resume("k1", ["g1", "f2", "f3"], NOW) == []
    assert parts.resume("k2", ["f1", "f2"], NOW) == []


async def test_a_refusal_of_our_token_keeps_the_message_queued(sender: WhatsAppChannel, graph: tuple[FakeGraph, str]) -> None:
    """(The outbox logs it as an ERROR: test_integration's expired token.)"""
    graph[0].answers.append((401, {"error": {"code": 190, "message": "Error validating access token"}}))
    with pytest.raises(RetryableDeliveryError) as caught:
        await sender.send(outbound())
    assert caught.value.code == NOT_CONFIGURED and "Meta error 190" in caught.value.message


async def test_a_failed_status_of_our_account_or_of_an_earlier_part_is_logged(
    client: Any, core: RecordingCore, caplog: pytest.LogCaptureFixture
) -> None:
    statuses = [
        {"id": "wamid.a", "status": "failed", "timestamp": "1700000001", "recipient_id": "491701234567",
         "errors": [{"code": 131042, "title": "Business eligibility payment issue"}]},
        {"id": "wamid.b", "status": "failed", "timestamp": "1700000001", "recipient_id": "491701234567",
         "biz_opaque_callback_data": "k1.part-1", "errors": [{"code": 131000, "title": "Something went wrong"}]},
    ]
    body = {"object": "whatsapp_business_account",
            "entry": [{"changes": [{"field": "messages", "value": {"statuses": statuses}}]}]}
    raw = json.dumps(body).encode()
    with caplog.at_level("WARNING", logger="contact_router.channel.whatsapp"):
        response = await client.post("/channels/whatsapp/webhook", data=raw, headers=_signed(raw))
    assert response.status == 200 and len(core.updates) == 2
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert any(level == "ERROR" and "131042" in text for level, text in logged)
    assert any(level == "WARNING" and "k1.part-1" in text for level, text in logged)


async def test_request_welcome_is_kept_as_an_event_and_handed_over_as_no_message(client: Any, core: RecordingCore) -> None:
    body = {"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages", "value": {
        "metadata": {"phone_number_id": "1122334455667"},
        "contacts": [{"profile": {"name": "Erika"}, "wa_id": "491701234567"}],
        "messages": [{"from": "491701234567", "id": "wamid.W", "timestamp": "1700000000", "type": "request_welcome"}],
    }}]}]}  # fmt: skip
    raw = json.dumps(body).encode()
    response = await client.post("/channels/whatsapp/webhook", data=raw, headers=_signed(raw))
    assert response.status == 200 and await response.json() == {"messages": 0, "statuses": 0}
    assert core.messages == []
    assert core.events == [("whatsapp", "request_welcome", {"phone_number_id": "1122334455667", "id": "wamid.W",
                                                             "sent_at": "2023-11-14T22:13:20Z"})]


# -------------------------------------------------------------------------------------------
# Registration
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["app_secret", "verify_token", "access_token", "numbers"])
def test_channel_is_off_without_credentials(missing: str) -> None:
    section = {**SETTINGS, missing: None}
    assert register_channels(settings={"whatsapp": section}, env={}, units=UNITS) is None


def test_channel_is_off_when_a_number_has_no_id() -> None:
    numbers = [*SETTINGS["numbers"], {"phone_number_id": None, "unit": "vertrieb"}]
    assert register_channels(settings={"whatsapp": {**SETTINGS, "numbers": numbers}}, env={}, units=UNITS) is None
    assert register_channels(settings={}, env={}, units=UNITS) is None


def test_channel_is_on_with_complete_settings() -> None:
    (channel,) = register_channels(settings={"whatsapp": SETTINGS}, env={}, units=UNITS)
    assert channel.name == "whatsapp"
    assert channel.capabilities.identity_kinds == ("phone", "whatsapp_user")
    assert channel.capabilities.reply_window == timedelta(hours=24)
    assert channel.capabilities.status_wait == timedelta(seconds=30)  # statuses echo the key
    assert channel.settings.graph_url == "https://graph.facebook.com"


@pytest.mark.parametrize("value, seconds", [(5, 5.0), ("12.5", 12.5), (0, None), ("0", None), (None, 30.0), ("", 30.0)])
def test_the_wait_for_the_status_of_an_unanswered_send_is_configurable(value: Any, seconds: float | None) -> None:
    (channel,) = register_channels(settings={"whatsapp": {**SETTINGS, "status_wait": value}}, env={}, units=UNITS)
    assert channel.capabilities.status_wait == (None if seconds is None else timedelta(seconds=seconds))  # 0: off
    assert "app-secret" not in repr(channel.settings) and "token-123" not in repr(channel.settings)


@pytest.mark.parametrize(("key", "value"), [
    ("status_wait", -1), ("status_wait", "soon"), ("status_wait", True), ("status_wait", "inf"),
    ("timeout", 0), ("timeout", "10s"), ("max_body_bytes", 1.5), ("max_media_bytes", "viel"),
    ("download_media", "ja"), ("download_media", "ture"), ("download_media", 2),
])
def test_a_setting_given_but_unusable_is_refused_naming_its_key(key: str, value: Any) -> None:
    """It was replaced by the default without a word: a timeout of "10s" ran with 10 s, one of
    0 with 10 s too."""
    with pytest.raises(WhatsAppSettingsError) as caught:
        register_channels(settings={"whatsapp": {**SETTINGS, key: value}}, env={}, units=UNITS)
    assert caught.value.path == f"channels.whatsapp.{key}"


@pytest.mark.parametrize(("field", "value"), [("unit", "Kunden Service"), ("language", "Deutsch"), ("unit", "nirgendwo")])
def test_a_numbers_unit_or_language_of_the_wrong_shape_is_refused(field: str, value: str) -> None:
    """The number's unit was dropped silently, and its messages routed by the rules alone."""
    numbers = [SETTINGS["numbers"][0], {**SETTINGS["numbers"][1], field: value}]
    with pytest.raises(WhatsAppSettingsError) as caught:
        register_channels(settings={"whatsapp": {**SETTINGS, "numbers": numbers}}, env={}, units=UNITS)
    assert caught.value.path == f"channels.whatsapp.numbers[1].{field}"


def test_download_media_reads_the_words_of_the_environment_and_refuses_others() -> None:
    """Any string but true, 1, yes and on read as false: "ja" or a misspelt "ture" switched the
    download off without a word."""
    for value, download in (("true", True), (" YES ", True), ("on", True), ("1", True), (True, True), ("false", False),
                            ("Off", False), ("0", False), ("no", False), (False, False), ("", False), (None, False)):
        (channel,) = register_channels(settings={"whatsapp": {**SETTINGS, "download_media": value}}, env={}, units=UNITS)
        assert channel.settings.download_media is download, value
    with pytest.raises(WhatsAppSettingsError) as caught:
        register_channels(settings={"whatsapp": {**SETTINGS, "download_media": "ja"}}, env={}, units=UNITS)
    assert (caught.value.path, caught.value.message) == ("channels.whatsapp.download_media", "expected true or false, got 'ja'")
