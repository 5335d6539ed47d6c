"""TLS on both sides of the e-mail channel, with a certificate for 127.0.0.1 made at test time.

In: the listener offers STARTTLS only when ``tls_cert``/``tls_key`` are set, and a client that
trusts the CA upgrades and delivers. Out: ``relay_tls = "starttls"`` and ``"tls"`` reach an
aiosmtpd relay on loopback, check its certificate against the trusted CAs, and never fall back to
plain text.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from aiosmtpd.smtp import SMTP

from plugins.email import EmailChannel
from router.hookspecs import RetryableDeliveryError
from router.testing import CoreHarness

from .test_channel import FakeCore, make_channel, reply, running
from .test_integration import LATIN1_MAIL


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path) -> dict[str, str]:
    """``tls_cert``/``tls_key`` settings for a certificate for 127.0.0.1 signed by ``ca``."""
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "smtp-cert.pem", tmp_path / "smtp-key.pem"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return {"tls_cert": str(cert), "tls_key": str(key)}


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that checks certificates and host names and trusts only ``ca``."""
    return ssl.create_default_context(cadata=ca.cert_pem.bytes().decode("ascii"))


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def smtp_client(port: int, tls: ssl.SSLContext) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, tls_context=tls, timeout=5)


# ------------------------------------------------------------------------------- listener


async def test_listener_offers_starttls_and_takes_mail_over_it(tmp_path, cert_files, client_tls):
    core = FakeCore()
    async with running(make_channel(tmp_path, core, **cert_files)) as channel:
        assert channel.smtp_port
        async with smtp_client(channel.smtp_port, client_tls) as client:
            await client.ehlo()
            assert client.supports_extension("starttls")
            await client.starttls()
            assert client.is_ehlo_or_helo_needed  # RFC 3207: the session starts over
            await client.ehlo()
            assert not client.supports_extension("starttls")  # not offered twice
            ssl_object = client.get_transport_info("ssl_object")
            assert ssl_object is not None and ssl_object.version() in ("TLSv1.2", "TLSv1.3")
            assert ("IP Address", "127.0.0.1") in client.get_transport_info("peercert")["subjectAltName"]
            refused, _ = await client.sendmail("juergen.mueller@example.com", ["bau@example.org"], LATIN1_MAIL)
    assert refused == {}
    [message] = core.ingested
    assert message["subject"] == "Baustelle vor meinem Haus in der Musterstraße"
    assert message["unit_hint"] == "bauhotline"


async def test_listener_still_takes_plain_mail_when_tls_is_offered(tmp_path, cert_files, client_tls):
    """STARTTLS is offered, not required: a forwarding server on loopback may skip it."""
    core = FakeCore()
    async with running(make_channel(tmp_path, core, **cert_files)) as channel:
        async with smtp_client(channel.smtp_port, client_tls) as client:
            refused, _ = await client.sendmail("juergen.mueller@example.com", ["bau@example.org"], LATIN1_MAIL)
            assert client.get_transport_info("ssl_object") is None
    assert refused == {}
    assert len(core.ingested) == 1


async def test_listener_without_certificate_offers_no_starttls(tmp_path, client_tls):
    core = FakeCore()
    async with running(make_channel(tmp_path, core)) as channel:
        async with smtp_client(channel.smtp_port, client_tls) as client:
            await client.ehlo()
            assert not client.supports_extension("starttls")
            assert "8bitmime" in client.esmtp_extensions  # a real EHLO answer, just without TLS
            with pytest.raises(aiosmtplib.SMTPException):
                await client.starttls()
    assert core.ingested == []


@pytest.mark.parametrize("broken", ["missing", "wrong key"])
async def test_unusable_certificate_stops_the_start(tmp_path, ca, cert_files, broken):
    """A wrong path or a key that does not fit fails when the listener starts, not on every
    connection later."""
    if broken == "missing":
        cert_files["tls_cert"] = str(tmp_path / "missing.pem")
    else:
        other_key = tmp_path / "other-key.pem"
        ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
        cert_files["tls_key"] = str(other_key)
    channel = make_channel(tmp_path, FakeCore(), **cert_files)
    with pytest.raises((OSError, ssl.SSLError)):
        async with running(channel):
            pass
    assert channel.smtp_port is None


def _replace_certificate(cert_files: dict[str, str], issued: trustme.LeafCert | None) -> None:
    cert, key = Path(cert_files["tls_cert"]), Path(cert_files["tls_key"])
    if issued is None:
        cert.write_bytes(b"not a certificate")
    else:
        issued.private_key_pem.write_to_path(str(key))
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    later = cert.stat().st_mtime_ns + 5_000_000_000  # a clear change even on coarse file clocks
    for path in (cert, key):
        os.utime(path, ns=(later, later))


async def test_renewed_certificate_is_used_without_restart(tmp_path, cert_files, caplog):
    new_ca = trustme.CA()
    trusts_new = ssl.create_default_context(cadata=new_ca.cert_pem.bytes().decode("ascii"))
    async with running(make_channel(tmp_path, FakeCore(), **cert_files)) as channel:
        _replace_certificate(cert_files, new_ca.issue_cert("127.0.0.1"))
        async with smtp_client(channel.smtp_port, trusts_new) as client:
            await client.starttls()
            await client.noop()
        # A broken file written later does not take TLS down: the last good certificate stays.
        _replace_certificate(cert_files, None)
        for _ in range(2):
            async with smtp_client(channel.smtp_port, trusts_new) as client:
                await client.starttls()
                await client.noop()
    warnings = [r for r in caplog.records if "cannot load the changed certificate" in r.getMessage()]
    assert len(warnings) == 1


async def test_whole_service_stores_mail_received_over_starttls(tmp_path, cert_files, client_tls):
    settings = {"listen_host": "127.0.0.1", "listen_port": 0, "relay_tls": "none", **cert_files}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "email"), settings={"email": settings}) as harness:
        channel: EmailChannel = harness.core.channels["email"]  # type: ignore[assignment]
        assert channel.smtp_port
        async with smtp_client(channel.smtp_port, client_tls) as client:
            await client.ehlo()
            assert client.supports_extension("starttls")
            await client.starttls()
            refused, _ = await client.sendmail("juergen.mueller@example.com", ["bau@example.org"], LATIN1_MAIL)
        assert refused == {}
        [row] = await harness.rows(
            "SELECT conversation_id FROM messages WHERE json_extract(payload, '$.raw.message_id') = ?", ("<20261130085500.4711@mail.example.com>",)
        )
        status, detail = await harness.api("GET", f"/api/v1/conversations/{row['conversation_id']}")
    assert status == 200, detail
    [inbound] = [m for m in detail["messages"] if m["direction"] == "in"]
    assert "Bagger steht vor der Tür" in inbound["text"]


# ---------------------------------------------------------------------------------- relay


class TlsSink:
    """A relay on loopback that records whether each mail came over TLS."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes, dict[str, Any] | None]] = []

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, envelope.rcpt_tos, envelope.original_content, session.ssl))
        return "250 OK"


@contextlib.asynccontextmanager
async def relay(sink: TlsSink, *, starttls: ssl.SSLContext | None = None, implicit: ssl.SSLContext | None = None
                ) -> AsyncIterator[int]:
    """``starttls``: STARTTLS offered and required before MAIL; ``implicit``: TLS from the first byte."""
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(sink, decode_data=False, tls_context=starttls, require_starttls=starttls is not None, loop=loop)

    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=implicit)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def trust(ca: trustme.CA, tmp_path, monkeypatch) -> None:
    """Make ``ca`` the trusted CA of the default SSL context, as the system store would be."""
    bundle = tmp_path / "trusted-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_send_through_tls_relay(tmp_path, ca, trust, mode):
    sink = TlsSink()
    context = server_tls(ca)
    async with relay(sink, **({"starttls": context} if mode == "starttls" else {"implicit": context})) as port:
        channel = make_channel(tmp_path, FakeCore(), relay_host="127.0.0.1", relay_port=port, relay_tls=mode, relay_timeout=5)
        result = await channel.send(reply())
    [(mail_from, rcpt, data, tls)] = sink.received
    assert mail_from == "bau@example.org" and rcpt == ["max@example.com"]
    assert f"Message-ID: {result.provider_id}".encode() in data
    if mode == "starttls":
        assert tls is not None  # the mail itself went over the upgraded connection
    # (with implicit TLS the sink's socket speaks nothing but TLS, so arriving is the proof)


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_relay_certificate_from_an_unknown_ca_is_refused(tmp_path, trust, mode):
    """The relay's certificate is checked: one from another CA fails, retryably, and no mail goes out."""
    sink = TlsSink()
    context = server_tls(trustme.CA())
    async with relay(sink, **({"starttls": context} if mode == "starttls" else {"implicit": context})) as port:
        channel = make_channel(tmp_path, FakeCore(), relay_host="127.0.0.1", relay_port=port, relay_tls=mode, relay_timeout=5)
        with pytest.raises(RetryableDeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
            await channel.send(reply())
    assert sink.received == []


async def test_starttls_relay_without_starttls_is_not_used_in_plain_text(tmp_path, trust):
    sink = TlsSink()
    async with relay(sink) as port:
        channel = make_channel(tmp_path, FakeCore(), relay_host="127.0.0.1", relay_port=port, relay_tls="starttls", relay_timeout=5)
        with pytest.raises(RetryableDeliveryError, match="(?i)starttls"):
            await channel.send(reply())
    assert sink.received == []


async def test_relay_tls_none_does_not_upgrade_even_when_offered(tmp_path, ca):
    sink = TlsSink()
    loop = asyncio.get_running_loop()
    context = server_tls(ca)
    server = await loop.create_server(lambda: SMTP(sink, decode_data=False, tls_context=context, loop=loop), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        channel = make_channel(tmp_path, FakeCore(), relay_host="127.0.0.1", relay_port=port, relay_tls="none", relay_timeout=5)
        await channel.send(reply())
    finally:
        server.close()
        await server.wait_closed()
    [(_, _, _, tls)] = sink.received
    assert tls is None
