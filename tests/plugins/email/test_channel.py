from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from email.message import EmailMessage

import aiosmtplib
import pytest
from aiohttp import web
from aiosmtpd.smtp import SMTP

from plugins.email import EmailChannel, EmailSettings
from router.clock import FrozenClock
from router.hookspecs import (
    ChannelContext,
    IngestResult,
    InvalidMessage,
    OutboundMessage,
    PermanentDeliveryError,
    RetryableDeliveryError,
)

from .test_bounces import POSTFIX_DSN
from .test_parse import LATIN1

NOW = datetime(2024, 5, 3, 8, 15, tzinfo=UTC)


class FakeCore:
    """Stands in for the core: records what the channel hands over."""

    def __init__(self) -> None:
        self.ingested: list[dict] = []
        self.deliveries: list = []
        self.fail_with: Exception | None = None
        self.acknowledge = True

    async def ingest(self, message: dict) -> IngestResult:
        if self.fail_with is not None:
            raise self.fail_with
        self.ingested.append(message)
        return IngestResult(
            message_id=len(self.ingested), conversation_id=1, case_reference="K-7F3QX2", status_token=None,
            status_url=None, unit=message.get("unit_hint"), unit_name=None, deadline=None, language="de",
            acknowledged=self.acknowledge and not message.get("ack_suppressed"),
        )

    async def record_delivery(self, channel: str, update) -> bool:
        self.deliveries.append((channel, update))
        return True


def make_channel(tmp_path, core: FakeCore, **settings) -> EmailChannel:
    section = {
        "addresses": {"bau@example.org": {"unit": "bauhotline", "language": "de"}, "service@example.org": {"unit": "kundenservice"}},
        "listen_port": 0,
        "inbound_secret": "s3cret",
        "max_message_bytes": 20_000,
        **settings,
    }
    channel = EmailChannel(EmailSettings.from_mapping(section))

    async def no_view(**kwargs):
        return None

    channel.setup(
        ChannelContext(
            name="email", settings=section, data_dir=tmp_path, public_base_url="http://127.0.0.1:8080",
            clock=FrozenClock(NOW), ingest=core.ingest, record_delivery=core.record_delivery,
            conversation_view=no_view, http=lambda: None, render=lambda *a, **k: "", units={},
        )
    )
    return channel


@contextlib.asynccontextmanager
async def running(channel: EmailChannel):
    async with contextlib.AsyncExitStack() as stack:
        for service in channel.services():
            await stack.enter_async_context(contextlib.asynccontextmanager(service)())
        yield channel


async def smtp_send(channel: EmailChannel, raw: bytes, *, sender="juergen.mueller@example.com", recipients=("bau@example.org",)):
    """Send with a real SMTP client; returns the refused recipients (empty when all went in)."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=channel.smtp_port, start_tls=False, timeout=5) as client:
        refused, _ = await client.sendmail(sender, list(recipients), raw)
    return refused


async def test_smtp_mail_is_ingested_before_250(tmp_path):
    core = FakeCore()
    async with running(make_channel(tmp_path, core)) as channel:
        refused = await smtp_send(channel, LATIN1)
    assert refused == {}
    [message] = core.ingested
    assert message["subject"] == "Baustelle vor meinem Haus in der Musterstraße"
    assert message["unit_hint"] == "bauhotline"
    assert (tmp_path / message["raw"]["path"]).read_bytes().replace(b"\r\n", b"\n") == LATIN1.replace(b"\r\n", b"\n")


async def test_smtp_unknown_recipient_refused_at_rcpt(tmp_path):
    core = FakeCore()
    async with running(make_channel(tmp_path, core)) as channel:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await smtp_send(channel, LATIN1, recipients=["nobody@example.org"])
    assert refused.value.recipients[0].code == 550
    assert "5.1.1" in refused.value.recipients[0].message
    assert core.ingested == []


async def test_smtp_oversized_mail_refused_with_552(tmp_path):
    core = FakeCore()
    big = LATIN1 + b"x" * 30_000 + b"\r\n"
    async with running(make_channel(tmp_path, core)) as channel:
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await smtp_send(channel, big)
    assert refused.value.code == 552
    assert core.ingested == []


async def test_smtp_store_failure_answers_451(tmp_path):
    core = FakeCore()
    core.fail_with = RuntimeError("database locked")
    async with running(make_channel(tmp_path, core)) as channel:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await smtp_send(channel, LATIN1)
    assert refused.value.code == 451


async def test_smtp_invalid_message_answers_554(tmp_path):
    core = FakeCore()
    core.fail_with = InvalidMessage("too long", path="subject")
    async with running(make_channel(tmp_path, core)) as channel:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await smtp_send(channel, LATIN1)
    assert refused.value.code == 554


async def test_smtp_bounce_marks_outbound_failed_and_is_stored(tmp_path):
    core = FakeCore()
    async with running(make_channel(tmp_path, core)) as channel:
        await smtp_send(channel, POSTFIX_DSN, sender="")
    [message] = core.ingested
    assert message["ack_suppressed"] == "bounce"
    [(channel_name, update)] = core.deliveries
    assert channel_name == "email"
    assert update.provider_id == "<9f2c41d7a0b3e5c8.cr@example.org>"
    assert update.status == "failed"
    assert update.permanent is True
    assert "User unknown" in update.error_detail


async def test_acknowledgements_are_capped_per_address(tmp_path):
    core = FakeCore()
    channel = make_channel(tmp_path, core, ack_per_hour=2)
    for n in range(4):
        raw = LATIN1.replace(b"<20240503101200.1234@", f"<{n}.cap@".encode())
        await channel.receive(raw, envelope_from="juergen.mueller@example.com", envelope_to=["bau@example.org"])
    assert [m["ack_suppressed"] for m in core.ingested] == [None, None, "rate-limit", "rate-limit"]


async def test_an_automatic_mail_keeps_its_reason_over_the_limit(tmp_path):
    """An auto-reply from an address past its acknowledgements is still an auto-reply: the core
    treats the automatic reasons (``auto-reply``, ``bounce``, ...) as a machine's mail that
    opens no deadline, and "rate-limit" is none of them."""
    core = FakeCore()
    channel = make_channel(tmp_path, core, ack_per_hour=1)
    auto = LATIN1.replace(b"<20240503101200.1234@", b"<auto.1@").replace(
        b"MIME-Version: 1.0", b"Auto-Submitted: auto-replied\r\nMIME-Version: 1.0")
    for raw in (LATIN1, auto):
        await channel.receive(raw, envelope_from="juergen.mueller@example.com", envelope_to=["bau@example.org"])
    assert [m["ack_suppressed"] for m in core.ingested] == [None, "auto-reply"]


async def test_a_temporary_bounce_marks_the_outbound_failed_but_not_for_good(tmp_path):
    """A 4.x.x failure (mailbox full, the mail expired in a queue) says nothing final about the
    address: the outbox tries again instead of giving the address up."""
    core = FakeCore()
    channel = make_channel(tmp_path, core)
    await channel.receive(POSTFIX_DSN.replace(b"Status: 5.1.1", b"Status: 4.2.2"), envelope_from="",
                          envelope_to=["bau@example.org"])
    [(_, update)] = core.deliveries
    assert (update.status, update.error_code, update.permanent) == ("failed", "4.2.2", False)


async def test_attachments_saved_by_hash(tmp_path):
    core = FakeCore()
    channel = make_channel(tmp_path, core)
    mail = EmailMessage()
    mail["From"] = "a@example.com"
    mail["To"] = "bau@example.org"
    mail["Message-ID"] = "<att@example.com>"
    mail.set_content("Foto anbei")
    mail.add_attachment(b"\x89PNG fake", maintype="image", subtype="png", filename="../../etc/passwd")
    await channel.receive(mail.as_bytes(), envelope_from=None, envelope_to=None)
    [described] = core.ingested[0]["attachments"]
    assert described["name"] == "../../etc/passwd"
    assert described["path"] == f"email/attachments/{described['sha256']}"
    assert (tmp_path / described["path"]).read_bytes() == b"\x89PNG fake"


# -- HTTP route ----------------------------------------------------------------------------


@pytest.fixture
async def http(aiohttp_client, tmp_path):
    core = FakeCore()
    channel = make_channel(tmp_path, core)
    sub = web.Application()
    sub.add_routes(channel.routes())
    app = web.Application()
    app.add_subapp("/channels/email", sub)
    client = await aiohttp_client(app)
    return client, core


async def test_http_inbound_accepts_raw_mail(http):
    client, core = http
    response = await client.post("/channels/email/inbound", data=LATIN1,
                                 headers={"Authorization": "Bearer s3cret", "X-Envelope-To": "bau@example.org"})
    assert response.status == 202
    assert (await response.json())["case_reference"] == "K-7F3QX2"
    assert core.ingested[0]["recipient"] == "bau@example.org"


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Bearer s3cret2", "s3cret", "Bearer s3crét"])
async def test_http_inbound_needs_the_secret(http, auth):
    client, core = http
    headers = {"Authorization": auth} if auth is not None else {}
    response = await client.post("/channels/email/inbound", data=LATIN1, headers=headers)
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "unauthorized"
    assert core.ingested == []


async def test_http_inbound_size_limit(http):
    client, core = http
    response = await client.post("/channels/email/inbound", data=LATIN1 + b"x" * 30_000,
                                 headers={"Authorization": "Bearer s3cret"})
    assert response.status == 413
    assert core.ingested == []


async def test_http_inbound_size_limit_holds_for_a_chunked_body(http):
    """Without a Content-Length the limit is counted while reading."""
    client, core = http

    async def chunks():
        yield LATIN1
        for _ in range(10):
            yield b"x" * 4096

    response = await client.post("/channels/email/inbound", data=chunks(), headers={"Authorization": "Bearer s3cret"})
    assert response.status == 413
    error = (await response.json())["error"]
    assert error["code"] == "too_large" and "20000 bytes" in error["message"]
    assert core.ingested == []


# -- sending -------------------------------------------------------------------------------


class Sink:
    """A relay on loopback that accepts, or answers with a fixed code."""

    def __init__(self, answer: str = "250 OK") -> None:
        self.answer = answer
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        if not self.answer.startswith("250"):
            return self.answer
        self.received.append((envelope.mail_from, envelope.rcpt_tos, envelope.original_content or envelope.content))
        return "250 OK"


@contextlib.asynccontextmanager
async def sink_server(sink: Sink):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(sink, loop=loop), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def reply(**overrides) -> OutboundMessage:
    values = dict(outbox_id=1, channel="email", kind="reply", to_kind="email", to="max@example.com",
                  text="Die Grube wird morgen geschlossen.", language="de", idempotency_key="out-1",
                  case_reference="K-7F3QX2", subject="Grube", unit_email="bau@example.org", unit_name="Bauhotline",
                  thread_refs=("<in-1@example.com>",))
    values.update(overrides)
    return OutboundMessage(**values)


async def test_send_through_relay(tmp_path):
    sink = Sink()
    async with sink_server(sink) as port:
        channel = make_channel(tmp_path, FakeCore(), relay_host="127.0.0.1", relay_port=port, relay_tls="none")
        result = await channel.send(reply())
    [(mail_from, rcpt, data)] = sink.received
    assert rcpt == ["max@example.com"] and mail_from == "bau@example.org"
    assert result.provider_id == result.thread_key
    assert f"Message-ID: {result.provider_id}".encode() in data
    assert b"In-Reply-To: <in-1@example.com>" in data


@pytest.mark.parametrize(("answer", "error"), [("451 4.3.0 try later", RetryableDeliveryError),
                                              ("554 5.7.1 rejected", PermanentDeliveryError),
                                              ("500 5.5.2 syntax error", PermanentDeliveryError)])
async def test_send_maps_relay_answers(tmp_path, answer, error):
    async with sink_server(Sink(answer)) as port:
        channel = make_channel(tmp_path, FakeCore(), relay_host="127.0.0.1", relay_port=port, relay_tls="none")
        with pytest.raises(error):
            await channel.send(reply())


async def test_send_without_relay_stays_queued(tmp_path):
    with pytest.raises(RetryableDeliveryError, match="no relay configured"):
        await make_channel(tmp_path, FakeCore()).send(reply())


async def test_send_relay_down_is_retryable(tmp_path):
    async with sink_server(Sink()) as port:
        pass  # the port is free again
    channel = make_channel(tmp_path, FakeCore(), relay_host="127.0.0.1", relay_port=port, relay_tls="none", relay_timeout=2)
    with pytest.raises(RetryableDeliveryError):
        await channel.send(reply())


async def test_store_files_false_from_the_environment_stores_no_file(tmp_path):
    """The string "false" (``{ "$env" = ... }``) kept every mail and its attachments on disk."""
    core = FakeCore()
    channel = make_channel(tmp_path, core, store_files="false")
    await channel.receive(LATIN1, envelope_from="juergen.mueller@example.com", envelope_to=["bau@example.org"])
    [message] = core.ingested
    assert message["raw"].get("path") is None
    assert not (tmp_path / "email").exists()
