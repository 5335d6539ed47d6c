"""The e-mail channel end to end: a real SMTP client talks to the channel's listener inside the
whole service (``CoreHarness``), and outbound mail is caught by an aiosmtpd sink on loopback."""

from __future__ import annotations

import asyncio
import smtplib
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import make_msgid
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from router.hookspecs import hookimpl
from router.testing import CoreHarness, check_channel_contract

from ...reliability.helpers import wait_until

MAX_BYTES = 100_000


def crlf(text: str, charset: str = "utf-8") -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode(charset)


# A German resident's mail, written by an old client: ISO-8859-1 8-bit body, RFC 2047 subject.
LATIN1_MAIL = crlf(
    """From: =?ISO-8859-1?Q?J=FCrgen_M=FCller?= <Juergen.Mueller@Example.COM>
To: Bau-Hotline <bau@example.org>
Subject: =?ISO-8859-1?Q?Baustelle_vor_meinem_Haus_in_der_Musterstra=DFe?=
Date: Mon, 30 Nov 2026 08:55:00 +0100
Message-ID: <20261130085500.4711@mail.example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=ISO-8859-1
Content-Transfer-Encoding: 8bit

Guten Tag,

seit Montag ist unsere Einfahrt gesperrt und der Bagger steht vor der T\xfcr.
Wann wird die Grube geschlossen? Gr\xfc\xdfe, auch an die Stra\xdfenbauer.

-- 
J\xfcrgen M\xfcller
Tel. 0123 456789
""",
    "latin-1",
)


class Sink:
    """An aiosmtpd relay stand-in on 127.0.0.1 that keeps every mail it accepts."""

    def __init__(self) -> None:
        self.mails: list[tuple[Envelope, EmailMessage]] = []
        self.refuse: dict[str, str] = {}
        self.port = 0
        self.arrived = asyncio.Event()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        if address.lower() in self.refuse:
            return self.refuse[address.lower()]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        self.mails.append((envelope, BytesParser(policy=policy.default).parsebytes(raw)))
        self.arrived.set()
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        """The mails whose envelope went to ``address``."""
        return [m for env, m in self.mails if address in [r.lower() for r in env.rcpt_tos]]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    catcher = Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(catcher, decode_data=False, loop=loop), "127.0.0.1", 0)
    catcher.port = server.sockets[0].getsockname()[1]
    try:
        yield catcher
    finally:
        server.close()
        await server.wait_closed()


def email_settings(sink: Sink, **changes: Any) -> dict[str, Any]:
    return {
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "relay_host": "127.0.0.1",
        "relay_port": sink.port,
        "relay_tls": "none",
        "relay_timeout": 5,
        "max_message_bytes": MAX_BYTES,
        **changes,
    }


@pytest.fixture
async def harness(tmp_path, sink: Sink) -> AsyncIterator[CoreHarness]:
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "email"), settings={"email": email_settings(sink)}) as h:
        yield h


def smtp_port(harness: CoreHarness) -> int:
    port = harness.core.channels["email"].smtp_port  # type: ignore[attr-defined]
    assert port
    return port


async def send(harness: CoreHarness, raw: bytes, *, sender: str = "juergen.mueller@example.com",
               to: tuple[str, ...] = ("bau@example.org",)) -> None:
    """Deliver one mail to the listener with a real SMTP client; raises on any refusal."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(harness), start_tls=False, timeout=5) as client:
        refused, _ = await client.sendmail(sender, list(to), raw)
    assert refused == {}


def compose(*, sender: str, to: str = "bau@example.org", subject: str, text: str, headers: dict[str, str] | None = None,
            message_id: str | None = None) -> bytes:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = to
    mail["Subject"] = subject
    mail["Date"] = "Mon, 30 Nov 2026 09:30:00 +0100"
    mail["Message-ID"] = message_id or make_msgid(domain="client.example.net")
    mail.set_content(text)  # after it: set_content() drops the Content-* headers set before
    for name, value in (headers or {}).items():
        mail[name] = value
    return bytes(mail)


async def conversation_of(harness: CoreHarness, message_id: str) -> dict[str, Any]:
    [row] = await harness.rows("SELECT conversation_id FROM messages WHERE json_extract(payload, '$.raw.message_id') = ?", (message_id,))
    status, detail = await harness.api("GET", f"/api/v1/conversations/{row['conversation_id']}")
    assert status == 200, detail
    return detail


async def ack_of(harness: CoreHarness, sink: Sink, resident: str) -> EmailMessage:
    """Deliver what is queued and return the one acknowledgement the resident got."""
    await harness.run_outbox()
    [ack] = sink.to(resident)
    return ack


# -------------------------------------------------------------------------- inbound and ack


async def test_latin1_mail_is_stored_routed_and_acknowledged_once(harness, sink):
    await send(harness, LATIN1_MAIL)
    detail = await conversation_of(harness, "<20261130085500.4711@mail.example.com>")
    [inbound] = [m for m in detail["messages"] if m["direction"] == "in"]
    assert inbound["subject"] == "Baustelle vor meinem Haus in der Musterstraße"
    assert "Bagger steht vor der Tür." in inbound["text"]
    assert "Grüße, auch an die Straßenbauer." in inbound["text"]
    assert "Jürgen Müller" in inbound["meta"]["signature"] and "Jürgen Müller" not in inbound["text"]
    assert detail["contact"]["display_name"] == "Jürgen Müller"
    assert detail["contact"]["identities"][0]["address"] == "juergen.mueller@example.com"
    # "Baustelle" + "Musterstraße": the contractor's area, whatever address it was sent to
    assert detail["unit"] == "tiefbau-muster"
    assert detail["routing"]["rule"] == "construction-in-area"

    ack = await ack_of(harness, sink, "juergen.mueller@example.com")
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["X-Auto-Response-Suppress"] == "All"
    assert ack["Message-ID"].endswith(".cr@example.org>")
    assert ack["In-Reply-To"] == "<20261130085500.4711@mail.example.com>"
    assert f"[#{detail['case_reference']}]" in ack["Subject"]
    assert "Musterstraße" in ack["Subject"]
    body = ack.get_body(("plain",)).get_content()
    assert detail["case_reference"] in body and "Tiefbau Muster GmbH" in body
    assert ack.get_content_type() == "text/plain"  # no HTML alternative for automatic mail

    # the sink's copy is what the outbox recorded as sent; a second outbox pass sends nothing
    status, detail = await harness.api("GET", f"/api/v1/conversations/{detail['id']}")
    [ack_row] = [m for m in detail["messages"] if m["kind"] == "ack"]
    assert ack_row["delivery_status"] == "sent" and detail["state"] == "acknowledged"
    assert await harness.run_outbox() == 0
    assert len(sink.mails) == 1


async def test_unencoded_8bit_beside_encoded_words_reaches_staff_and_the_ack_readable(harness, sink):
    """An old client writes the name it knows unencoded (Latin-1) and the rest as it got it, in
    encoded words: staff saw "=?utf-8?q?Stra=C3=9Fe...?=" as the subject and "WeiÃŸ-Ã–ztÃ¼rk"
    as the name, and the acknowledgement repeated both to the resident."""
    raw = crlf(
        """From: J\xfcrgen =?utf-8?q?Wei=C3=9F-=C3=96zt=C3=BCrk?= <juergen@example.net>
To: bau@example.org
Subject: AW: [B\xfcrgerverein] =?utf-8?q?Stra=C3=9Fe_gesperrt_=E2=80=93?=
 =?utf-8?q?_Zufahrt_f=C3=BCr_M=C3=BCllabfuhr=3F_=F0=9F=9A=A7?=
Date: Mon, 30 Nov 2026 09:10:00 +0100
Message-ID: <mixed-8bit@mail.example.net>
MIME-Version: 1.0
Content-Type: text/plain; charset=ISO-8859-1
Content-Transfer-Encoding: 8bit

Seit heute fr\xfch kommt die M\xfcllabfuhr nicht mehr durch.
""",
        "latin-1",
    )
    await send(harness, raw, sender="juergen@example.net")
    detail = await conversation_of(harness, "<mixed-8bit@mail.example.net>")
    subject = "AW: [Bürgerverein] Straße gesperrt – Zufahrt für Müllabfuhr? 🚧"
    [inbound] = [m for m in detail["messages"] if m["direction"] == "in"]
    assert inbound["subject"] == subject
    assert detail["contact"]["display_name"] == "Jürgen Weiß-Öztürk"
    status, found = await harness.api("GET", "/api/v1/conversations", params={"q": "Straße Weiß"})
    assert status == 200 and [i["id"] for i in found["items"]] == [detail["id"]]

    ack = await ack_of(harness, sink, "juergen@example.net")
    assert ack["Subject"] == f"Re: [#{detail['case_reference']}] {subject}"
    assert ack.get_body(("plain",)).get_content().startswith("Guten Tag Jürgen Weiß-Öztürk,")


async def test_mail_without_keywords_is_routed_by_the_address_it_was_sent_to(harness, sink):
    for to, unit in (("bau@example.org", "bauhotline"), ("service@example.org", "kundenservice")):
        raw = compose(sender="anna@example.net", to=to, subject="Eine Frage", text="Wer ist hier zuständig?",
                      message_id=f"<frage-{unit}@example.net>")
        await send(harness, raw, sender="anna@example.net", to=(to,))
        detail = await conversation_of(harness, f"<frage-{unit}@example.net>")
        assert (detail["unit"], detail["routing"]["rule"]) == (unit, "entry-point")
        assert to in detail["routing"]["reason"]
    # a keyword beats the address: a fault sent to the construction hotline goes to the fault desk
    raw = compose(sender="anna@example.net", subject="Störung", text="Seit heute kein Internet.", message_id="<stoerung@example.net>")
    await send(harness, raw, sender="anna@example.net")
    assert (await conversation_of(harness, "<stoerung@example.net>"))["unit"] == "stoerung"


async def test_the_acknowledgement_comes_from_the_address_written_to(harness, sink):
    """It came from the owning unit's own address: a resident's answer to a contractor's
    acknowledgement went to the contractor's mailbox and never joined the case."""
    for to in ("bau@example.org", "service@example.org"):
        sender = f"anwohner-{to.split('@')[0]}@example.net"
        raw = compose(sender=sender, to=to, subject="Baustelle", text="Vor meinem Haus in der Musterstraße 5 ist der Gehweg gesperrt.")
        await send(harness, raw, sender=sender, to=(to,))
        await harness.run_outbox()
        [ack] = sink.to(sender)
        (address,) = ack["From"].addresses
        assert (address.addr_spec, address.display_name) == (to, "Tiefbau Muster GmbH")
        assert ack["Reply-To"] is None


async def test_the_mail_not_the_address_tells_the_language(harness, sink):
    """The address's language decided: an English mail to a German address was acknowledged,
    and answered, in German, with or without ``Content-Language: en``."""
    for number, headers in enumerate(({}, {"Content-Language": "en"})):
        sender = f"john{number}@example.net"
        raw = compose(sender=f"John Smith <{sender}>", to="service@example.org", subject="Question about my connection",
                      text="Hello, we moved into the house last week. When will the fibre connection be ready? Thank you",
                      headers=headers)
        await send(harness, raw, sender=sender, to=("service@example.org",))
        await harness.run_outbox()
        [ack] = sink.to(sender)
        assert "Your case reference is" in ack.get_body(("plain",)).get_content()
    # A German mail to it (also from a mail program set up in English), and one with no text to
    # tell, in the address's language
    for sender, text, headers in (
        ("anna@example.net", "Guten Tag, wann kommt mein Glasfaseranschluss? Vielen Dank", {}),
        ("carl@example.net", "Sehr geehrte Damen und Herren, vor unserem Haus ist die Straße aufgegraben. Wann ist die"
                             " Baustelle fertig? Mit freundlichen Grüßen", {"Content-Language": "en-US"}),
        ("ben@example.net", "", {}),
    ):
        await send(harness, compose(sender=sender, to="service@example.org", subject="", text=text, headers=headers),
                   sender=sender, to=("service@example.org",))
        await harness.run_outbox()
        [ack] = sink.to(sender)
        assert "Ihre Fallnummer ist" in ack.get_body(("plain",)).get_content()


async def test_250_after_data_comes_only_after_the_commit(harness):
    """The client's sendmail returns only when the mail is in the database (a slow commit
    delays the 250), and a failed commit answers 451 so the sending server retries."""
    store = harness.core.store

    def blocking_send(raw: bytes) -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", smtp_port(harness), timeout=5) as client:
            return client.sendmail("juergen.mueller@example.com", ["bau@example.org"], raw)

    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the commit waits
    try:
        sending = asyncio.ensure_future(asyncio.to_thread(blocking_send, LATIN1_MAIL))
        await asyncio.sleep(0.3)
        assert not sending.done()  # no 250 while the commit waits
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert await sending == {}
    assert await harness.count("messages", "json_extract(payload, '$.raw.message_id') = ?", ("<20261130085500.4711@mail.example.com>",)) == 1

    def failing_submit(work: Callable[..., Any]) -> Any:
        raise OSError("disk full")

    store.submit = failing_submit  # type: ignore[method-assign]
    try:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            await asyncio.to_thread(blocking_send, compose(sender="juergen.mueller@example.com", subject="Noch was",
                                                           text="Zweite Mail", message_id="<zwei@example.com>"))
        assert refused.value.smtp_code == 451
    finally:
        del store.submit
    assert await harness.count("messages", "json_extract(payload, '$.raw.message_id') = ?", ("<zwei@example.com>",)) == 0


async def test_a_database_that_refuses_writes_answers_451_and_the_retry_is_stored(harness, caplog):
    def blocking_send(raw: bytes) -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", smtp_port(harness), timeout=5) as client:
            return client.sendmail("juergen.mueller@example.com", ["bau@example.org"], raw)

    with harness.refusing_writes():
        with pytest.raises(smtplib.SMTPDataError) as refused:
            await asyncio.to_thread(blocking_send, LATIN1_MAIL)
        assert refused.value.smtp_code == 451
    assert not [r for r in caplog.records if r.exc_info and "451" in r.getMessage()]  # one line, no traceback
    assert await asyncio.to_thread(blocking_send, LATIN1_MAIL) == {}  # the sending server's retry
    assert await harness.count("messages", "direction = 'in'") == 1


async def test_outlook_quotes_under_a_latin_9_label_and_a_byte_order_mark_reach_staff_as_text(harness, sink):
    """What staff read of such a mail had invisible controls where „ “ – stood, and a U+FEFF
    before the subject and the text."""
    raw = (b"From: =?iso-8859-15?Q?J=FCrgen_M=FCller?= <juergen@example.com>\r\nTo: bau@example.org\r\n"
           b"Subject: =?utf-8?B?77u/QmF1c3RlbGxl?=\r\nMessage-ID: <outlook-1@example.com>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain; charset=iso-8859-15\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           b"Die \x84Grube\x93 \x96 seit Montag offen.\r\n--b\r\n"
           b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           b"\xef\xbb\xbf<p>Die \xe2\x80\x9eGrube\xe2\x80\x9c</p>\r\n--b--\r\n")
    await send(harness, raw, sender="juergen@example.com")
    detail = await conversation_of(harness, "<outlook-1@example.com>")
    [inbound] = [m for m in detail["messages"] if m["direction"] == "in"]
    assert inbound["text"] == "Die „Grube“ – seit Montag offen."
    assert detail["subject"] == "Baustelle" and detail["contact"]["display_name"] == "Jürgen Müller"


async def test_redelivered_mail_is_stored_and_acknowledged_once(harness, sink):
    await send(harness, LATIN1_MAIL)
    await send(harness, LATIN1_MAIL)
    assert await harness.count("messages", "direction = 'in'") == 1
    await harness.run_outbox()
    assert len(sink.to("juergen.mueller@example.com")) == 1


# -------------------------------------------------------------------------- threading


async def test_reply_to_the_acknowledgement_joins_the_conversation(harness, sink):
    await send(harness, LATIN1_MAIL)
    first = await conversation_of(harness, "<20261130085500.4711@mail.example.com>")
    ack = await ack_of(harness, sink, "juergen.mueller@example.com")

    # a client that keeps the headers: In-Reply-To our acknowledgement
    answer = compose(sender="Jürgen Müller <juergen.mueller@example.com>", subject="Re: " + ack["Subject"],
                     text="Danke! Die Grube ist übrigens 2 m tief.", message_id="<antwort-1@mail.example.com>",
                     headers={"In-Reply-To": ack["Message-ID"], "References": f"{ack['References']} {ack['Message-ID']}"})
    await send(harness, answer)
    # a client that drops the headers but keeps the reference in the subject
    bare = compose(sender="juergen.mueller@example.com", subject=f"AW: Baustelle [#{first['case_reference']}]",
                   text="Und wann kommt jemand?", message_id="<antwort-2@mail.example.com>")
    await send(harness, bare)

    assert (await conversation_of(harness, "<antwort-1@mail.example.com>"))["id"] == first["id"]
    detail = await conversation_of(harness, "<antwort-2@mail.example.com>")
    assert detail["id"] == first["id"]
    assert [m["text"] for m in detail["messages"] if m["direction"] == "in"][1:] == [
        "Danke! Die Grube ist übrigens 2 m tief.", "Und wann kommt jemand?"]
    assert await harness.count("conversations") == 1
    # follow-ups in an open conversation are not acknowledged again
    await harness.run_outbox()
    assert len(sink.to("juergen.mueller@example.com")) == 1


async def test_case_reference_from_another_sender_links_but_does_not_join(harness, sink):
    await send(harness, LATIN1_MAIL)
    first = await conversation_of(harness, "<20261130085500.4711@mail.example.com>")
    raw = compose(sender="fremd@example.net", subject=f"Re: [#{first['case_reference']}]", text="Ich bin der Nachbar.",
                  message_id="<nachbar@example.net>")
    await send(harness, raw, sender="fremd@example.net")
    other = await conversation_of(harness, "<nachbar@example.net>")
    assert other["id"] != first["id"]
    assert other["unit"] == first["unit"] and other["routing"]["rule"] == "case-reference"


async def test_a_forged_sender_naming_a_residents_case_links_but_does_not_join(tmp_path, sink):
    """A mail in the resident's name whose domain failed DMARC at our mail server (trusted):
    its case reference opens a case of its own, linked, so that its words never stand in the
    resident's conversation. The same mail that passed joins."""
    settings = {"email": email_settings(sink, trusted_authserv_ids=["mx.example.org"])}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "email"), settings=settings) as harness:
        await send(harness, LATIN1_MAIL)
        first = await conversation_of(harness, "<20261130085500.4711@mail.example.com>")
        cases = (("fail", "<forged@attacker.example>", {}),
                 ("fail", "<forged-reply@attacker.example>", {"In-Reply-To": "<20261130085500.4711@mail.example.com>"}),
                 ("pass", "<genuine@mail.example.com>", {}))
        for verdict, message_id, thread in cases:
            raw = compose(sender="juergen.mueller@example.com", subject=f"AW: [#{first['case_reference']}]",
                          text="Bitte rufen Sie mich unter 0151 99999999 an.", message_id=message_id,
                          headers={"Authentication-Results": f"mx.example.org; spf=fail; dmarc={verdict}", **thread})
            await send(harness, raw)
        for forged_id in ("<forged@attacker.example>", "<forged-reply@attacker.example>"):
            forged = await conversation_of(harness, forged_id)
            assert forged["id"] != first["id"] and forged["routing"]["rule"] == "case-reference", forged_id
            (message,) = [m for m in forged["messages"] if m["direction"] == "in"]
            assert "unverified_sender" in message["flags"]
        assert (await conversation_of(harness, "<genuine@mail.example.com>"))["id"] == first["id"]


# -------------------------------------------------------------------------- never answer a machine


OUT_OF_OFFICE = crlf(
    """From: Petra Abwesend <petra@example.net>
To: bau@example.org
Subject: Abwesenheitsnotiz: Ihre Baustelle
Auto-Submitted: auto-replied
X-Autoreply: yes
Message-ID: <ooo-1@example.net>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Ich bin bis 7. Dezember nicht im Büro.
"""
)

LIST_MAIL = crlf(
    """From: Verein Musterstadt <news@verein.example>
To: bau@example.org
Subject: Newsletter Dezember
List-Id: Vereinsnachrichten <news.verein.example>
List-Unsubscribe: <mailto:leave@verein.example>
Precedence: list
Message-ID: <newsletter-12@verein.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Die Baustelle am Marktplatz ist fertig.
"""
)


async def test_out_of_office_and_list_mail_are_stored_but_not_acknowledged(harness, sink):
    await send(harness, OUT_OF_OFFICE, sender="petra@example.net")
    await send(harness, LIST_MAIL, sender="bounces@verein.example")
    for message_id, reason in (("<ooo-1@example.net>", "auto-reply"), ("<newsletter-12@verein.example>", "list")):
        detail = await conversation_of(harness, message_id)
        [inbound] = [m for m in detail["messages"] if m["direction"] == "in"]
        assert inbound["text"]
        assert detail["unit"]  # still owned: a person reads it
        assert [e["data"]["reason"] for e in detail["events"] if e["kind"] == "ack_suppressed"] == [reason]
        # kept and owned, but a machine's mail starts no deadline and escalates nobody
        assert detail["state"] == "waiting" and detail["deadline"] is None
    assert await harness.count("outbox", "kind = 'ack'") == 0
    assert await harness.run_outbox() == 0
    assert sink.mails == []


def dsn_for(message_id: str, recipient: str, case_reference: str) -> bytes:
    return crlf(
        f"""Return-Path: <>
From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
To: bau@example.org
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
Message-ID: <dsn-1@mx.example.net>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain; charset=us-ascii

Your message could not be delivered to {recipient}: 550 5.1.1 User unknown

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; {recipient}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown

--B
Content-Type: text/rfc822-headers

From: Bau-Hotline <bau@example.org>
To: {recipient}
Subject: Ihre Anfrage [#{case_reference}]
Message-ID: {message_id}
Auto-Submitted: auto-replied

--B--
"""
    )


async def test_bounce_is_stored_unacknowledged_and_marks_the_outbound_message_failed(harness, sink):
    raw = compose(sender="tippfehler@example.net", subject="Bagger vor der Tür", text="Wann ist die Baustelle fertig?",
                  message_id="<tippfehler-1@example.net>")
    await send(harness, raw, sender="tippfehler@example.net")
    ack = await ack_of(harness, sink, "tippfehler@example.net")
    conversation = await conversation_of(harness, "<tippfehler-1@example.net>")

    await send(harness, dsn_for(ack["Message-ID"], "tippfehler@example.net", conversation["case_reference"]), sender="")
    # stored with the conversation of the mail it reports, not as a case of its own
    assert (await conversation_of(harness, "<dsn-1@mx.example.net>"))["id"] == conversation["id"]
    assert await harness.count("conversations") == 1
    assert await harness.count("outbox", "kind = 'ack'") == 1  # none for the bounce
    await harness.run_outbox()
    assert len(sink.mails) == 1

    status, detail = await harness.api("GET", f"/api/v1/conversations/{conversation['id']}")
    [ack_row] = [m for m in detail["messages"] if m["kind"] == "ack"]
    assert ack_row["delivery_status"] == "failed"
    assert "5.1.1" in (ack_row["deliveries"][0]["last_error"] or "")
    # no other way to reach the resident: the address is marked failed, the case asks for a call-back
    assert {"undeliverable", "callback_required"} <= set(detail["flags"])
    [identity] = await harness.rows("SELECT failed_at FROM identities WHERE address = 'tippfehler@example.net'")
    assert identity["failed_at"] is not None


class AutoResponder:
    """A mailbox that answers every mail it gets, as badly behaved responders do: ``polite``
    ones mark their answer (RFC 3834), rude ones send a plain mail with a fresh subject."""

    def __init__(self, address: str, *, polite: bool, keep_thread: bool) -> None:
        self.address = address
        self.polite = polite
        self.keep_thread = keep_thread
        self.answered = 0

    def answers(self, sink: Sink) -> list[bytes]:
        mails = sink.to(self.address)[self.answered:]
        self.answered += len(mails)
        out = []
        for mail in mails:
            headers = {"Auto-Submitted": "auto-replied", "X-Autoreply": "yes"} if self.polite else {}
            if self.keep_thread:
                headers["In-Reply-To"] = mail["Message-ID"]
            subject = f"Abwesend: {mail['Subject']}" if self.keep_thread else f"Ich bin nicht da ({self.answered})"
            out.append(compose(sender=self.address, subject=subject, text="Ich bin im Urlaub.", headers=headers))
        return out


@pytest.mark.parametrize(
    ("polite", "keep_thread", "acks"),
    [
        (True, True, 1),  # RFC 3834 responder: its answers are never acknowledged
        (False, True, 1),  # unmarked, but In-Reply-To our mail: joins the conversation, no new ack
        (False, False, 3),  # unmarked and unthreaded: a new case each time, until the hourly cap
    ],
)
async def test_two_auto_responders_facing_each_other_do_not_loop(harness, sink, polite, keep_thread, acks):
    responder = AutoResponder("robot@example.net", polite=polite, keep_thread=keep_thread)
    await send(harness, compose(sender=responder.address, subject="Anfrage", text="Hallo?", message_id="<robot-0@example.net>"),
               sender=responder.address)
    for _ in range(10):
        await harness.run_outbox()
        answers = responder.answers(sink)
        for raw in answers:
            await send(harness, raw, sender=responder.address)
        harness.clock.advance(timedelta(minutes=1))
    assert len(sink.to(responder.address)) == acks
    # every answer of the responder was stored; none acknowledged beyond the first ``acks``
    assert await harness.count("messages", "direction = 'in'") == acks + 1
    assert await harness.count("outbox", "kind = 'ack'") == acks


# -------------------------------------------------------------------------- refusals and broken mail


async def test_unknown_recipient_is_refused_at_rcpt_with_550(harness):
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(harness), start_tls=False, timeout=5) as client:
        await client.mail("juergen.mueller@example.com")
        response = await client.rcpt("bau@example.org")
        assert response.code == 250
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("niemand@example.org")
    assert refused.value.code == 550
    assert await harness.count("messages") == 0


async def test_oversized_mail_is_refused_with_552(harness):
    big = LATIN1_MAIL + b"x" * 76 + b"\r\n"
    big += (b"y" * 76 + b"\r\n") * (MAX_BYTES // 78 + 10)
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await send(harness, big)
    assert refused.value.code == 552
    assert await harness.count("messages") == 0


MALFORMED = crlf(
    """From: =?utf-8?B?broken <kaputt@example.net
To: bau@example.org
Subject: =?iso-8859-1?q?Kaputte_Mail_=E4
Message-ID: <kaputt-1@example.net>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="never-used"
Content-Transfer-Encoding: base64

Dies ist keine MIME-Struktur, aber trotzdem eine Nachricht: Baustelle am Lindenweg!
--falsch
Content-Type: text/plain; charset=nonexistent-charset

=?=?= kaputt
""",
)


async def test_malformed_mime_is_stored_as_best_effort_text(harness, sink):
    await send(harness, MALFORMED, sender="kaputt@example.net")
    detail = await conversation_of(harness, "<kaputt-1@example.net>")
    [inbound] = [m for m in detail["messages"] if m["direction"] == "in"]
    assert inbound["text"].startswith("Dies ist keine MIME-Struktur, aber trotzdem eine Nachricht: Baustelle am Lindenweg!\n")
    assert inbound["meta"]["mime_defects"] >= 1
    assert detail["unit"]
    # and the listener keeps working afterwards
    await send(harness, LATIN1_MAIL)
    assert await harness.count("messages", "direction = 'in'") == 2


# -------------------------------------------------------------------------- answers by mail


async def test_staff_reply_through_the_inbox_api_reaches_the_resident_threaded(harness, sink):
    raw = compose(sender="Anna Weg <anna@example.net>", subject="Frage zum Ausbau", text="Wann wird unsere Straße angeschlossen?",
                  message_id="<anna-1@example.net>")
    await send(harness, raw, sender="anna@example.net")
    conv = await conversation_of(harness, "<anna-1@example.net>")
    assert conv["unit"] == "bauhotline"
    ack = await ack_of(harness, sink, "anna@example.net")

    status, reply = await harness.api("POST", f"/api/v1/conversations/{conv['id']}/replies", token="hotline",
                                      json={"text": "Guten Tag Frau Weg,\n\nim März 2027.\n\nIhre Bau-Hotline"})
    assert status == 201, reply
    await harness.run_outbox()
    [_, answer] = sink.to("anna@example.net")

    assert answer["From"].addresses[0].addr_spec == "bau@example.org"
    assert answer["From"].addresses[0].display_name == "Bau-Hotline"
    assert f"[#{conv['case_reference']}]" in answer["Subject"] and answer["Subject"].startswith("Re: ")
    references = answer["References"].split()
    assert set(references) == {"<anna-1@example.net>", ack["Message-ID"]}
    # In-Reply-To names the resident's own mail, the last of the references
    assert answer["In-Reply-To"] == references[-1] == "<anna-1@example.net>"
    assert "Auto-Submitted" not in answer
    assert answer.get_content_type() == "multipart/alternative"
    plain = answer.get_body(("plain",)).get_content()
    html = answer.get_body(("html",)).get_content()
    assert "im März 2027." in plain and "im März 2027." in html and "<p>" in html

    status, detail = await harness.api("GET", f"/api/v1/conversations/{conv['id']}")
    assert detail["state"] == "answered"
    [out] = [m for m in detail["messages"] if m["kind"] == "reply"]
    assert out["delivery_status"] == "sent"

    # the resident answers the staff reply: same conversation, waiting for an answer again
    raw = compose(sender="anna@example.net", subject="Re: " + answer["Subject"], text="Danke!",
                  message_id="<anna-2@example.net>", headers={"In-Reply-To": answer["Message-ID"]})
    await send(harness, raw, sender="anna@example.net")
    assert (await conversation_of(harness, "<anna-2@example.net>"))["id"] == conv["id"]


async def test_relay_refusal_is_permanent_and_visible(harness, sink):
    sink.refuse["gibtsnicht@example.net"] = "550 5.1.1 no such user"
    raw = compose(sender="gibtsnicht@example.net", subject="Baustelle", text="Hallo", message_id="<gibtsnicht@example.net>")
    await send(harness, raw, sender="gibtsnicht@example.net")
    await harness.run_outbox()
    conv = await conversation_of(harness, "<gibtsnicht@example.net>")
    [ack_row] = [m for m in conv["messages"] if m["kind"] == "ack"]
    assert ack_row["delivery_status"] == "failed" and "550" in ack_row["deliveries"][0]["last_error"]
    assert "callback_required" in conv["flags"]


async def test_webform_resident_with_email_gets_the_answer_by_mail_with_status_link(harness, sink):
    token = (await (await harness.client.get("/channels/webform/token")).json())["form_token"]
    harness.clock.advance(timedelta(seconds=5))
    response = await harness.client.post("/channels/webform/", json={
        "name": "Erika Mustermann", "email": "Erika@Example.NET", "phone": "", "street": "Lindenweg 3",
        "postcode": "12345", "city": "Musterstadt", "customer_number": "", "topic": "construction",
        "message": "Gehweg gesperrt, seit Tagen kommt niemand.", "form_token": token, "website": "",
    })
    assert response.status == 201
    form = await response.json()
    await harness.run_outbox()
    assert sink.mails == []  # the acknowledgement is on the status page

    status, _ = await harness.api("POST", f"/api/v1/conversations/{form['conversation_id']}/replies", token="contractor",
                                  json={"text": "Wir räumen den Gehweg bis Freitag frei."})
    assert status == 201
    await harness.run_outbox()
    [mail] = sink.to("erika@example.net")
    # From our address in the unit's name: the contractor's own address took the resident's
    # answer past the service; a subject of the reference alone said nothing
    sender = mail["From"].addresses[0]
    assert (sender.addr_spec, sender.display_name) == ("bau@example.org", "Tiefbau Muster GmbH")
    assert mail["Subject"] == f"Ihre Anfrage [#{form['case_reference']}]"
    plain = mail.get_body(("plain",)).get_content()
    assert "Wir räumen den Gehweg bis Freitag frei." in plain
    assert form["status_url"] in plain
    status, detail = await harness.api("GET", f"/api/v1/conversations/{form['conversation_id']}")
    assert detail["state"] == "answered"

    # The mailed copy bounces: the bounce belongs with the web-form case, not in a stray one
    # (the copy's Message-ID is only on its own outbox row).
    await send(harness, dsn_for(mail["Message-ID"], "erika@example.net", form["case_reference"]), sender="")
    assert (await conversation_of(harness, "<dsn-1@mx.example.net>"))["id"] == form["conversation_id"]
    assert await harness.count("conversations") == 1


# -------------------------------------------------------------------------- contract kit


async def test_contract_kit_passes_over_smtp(harness, sink):
    async def deliver(h: CoreHarness, key: str) -> None:
        raw = compose(sender="Kit Tester <kit@example.net>", subject="Kontrakt", text="Hallo, eine Frage.",
                      message_id=f"<{key}@kit.example.net>")
        await send(h, raw, sender="kit@example.net")

    conv = await check_channel_contract(harness, "email", deliver, sender=("email", "kit@example.net"))
    assert conv["channel"] == "email"
    # the kit's acknowledgement and staff reply really went through the relay
    assert [m["Auto-Submitted"] for m in sink.to("kit@example.net")] == ["auto-replied", None]


async def test_a_units_notification_carries_neither_the_status_link_nor_the_residents_thread(harness, sink):
    """The mail telling a contractor it owns a case appended the resident's status link (their
    key to the conversation, kept after the case moved on) and the thread's Message-IDs (with
    which the contractor could write into the resident's thread)."""
    message_id = "<anwohner-1@client.example.net>"
    await send(harness, compose(sender="anwohner@example.com", subject="Baustelle", text="Baustelle vor dem Haus",
                                message_id=message_id))
    detail = await conversation_of(harness, message_id)
    target = next(u for u in ("tiefbau-muster", "bauhotline", "kundenservice") if u != detail["unit"])
    status, _ = await harness.api("POST", f"/api/v1/conversations/{detail['id']}/transfer", json={"unit": target})
    assert status == 200
    await harness.run_outbox()
    notes = [m for env, m in sink.mails if "anwohner@example.com" not in [r.lower() for r in env.rcpt_tos]]
    assert notes, "no notification was sent"
    token = detail["status_url"].rsplit("/", 1)[-1]
    for note in notes:
        assert token not in note.as_string()
        assert note["In-Reply-To"] is None and message_id not in (note["References"] or "")
        # from our address (not the unit's domain through our relay), an answer going to the
        # unit's own mailbox (not into the service as a new case opened by the unit)
        (sender,) = note["From"].addresses
        assert sender.addr_spec == "bau@example.org" and sender.display_name != harness.config.units[target].name
        assert note["Reply-To"] == harness.config.units[target].email


async def test_a_late_bounce_of_an_earlier_owners_notification_does_not_flag_the_current_owner(harness, sink):
    """The flag said the owner was not told when the mail to a unit that owned the case before
    bounced, while the current owner's notification had gone out."""
    from router.hookspecs import DeliveryUpdate

    message_id = "<anwohner-2@client.example.net>"
    await send(harness, compose(sender="anwohner@example.com", subject="Baustelle", text="Baustelle vor dem Haus",
                                message_id=message_id))
    detail = await conversation_of(harness, message_id)
    for _ in range(2):  # up the chain twice: two owners notified
        harness.clock.set(datetime.fromisoformat((await conversation_of(harness, message_id))["deadline"].replace("Z", "+00:00"))
                          + timedelta(minutes=1))
        assert len(await harness.escalate()) == 1
    await harness.run_outbox()
    notes = await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'notification' AND conversation_id = ? ORDER BY id",
                               (detail["id"],))
    assert len(notes) == 2 and all(n["provider_id"] for n in notes)
    await harness.core.record_delivery("email", DeliveryUpdate(provider_id=notes[0]["provider_id"], status="failed",
                                                               permanent=True, error_detail="550 unknown user"))
    detail = await conversation_of(harness, message_id)
    assert "owner_not_notified" not in detail["flags"]
    assert any(e["kind"] == "owner_not_notified" for e in detail["events"])  # the history says it all the same
    await harness.core.record_delivery("email", DeliveryUpdate(provider_id=notes[1]["provider_id"], status="failed",
                                                               permanent=True, error_detail="550 unknown user"))
    assert "owner_not_notified" in (await conversation_of(harness, message_id))["flags"]


# -------------------------------------------------------------------------- one Message-ID, two senders

FORM_MAIL = """From: {sender}
To: bau@example.org
Subject: {subject}
Date: Mon, 30 Nov 2026 {time} +0100
Message-ID: <1@localhost>
Content-Type: text/plain; charset=utf-8

{text}
"""


async def test_a_message_id_reused_by_another_sender_is_stored_and_acknowledged(harness, sink):
    """A scanner or PHP form sends every mail as <1@localhost>. The second resident's mail was
    answered 250 and dropped as a duplicate of the first."""
    anna = crlf(FORM_MAIL.format(sender="Anna Alt <anna@example.net>", subject="Baugrube Lindenweg 3", time="09:00:00",
                                 text="Die Grube vor Nr. 3 ist nicht gesichert."))
    bernd = crlf(FORM_MAIL.format(sender="Bernd Berg <bernd@example.com>", subject="Wasserrohrbruch", time="10:00:00",
                                  text="Seit heute früh läuft Wasser in unseren Keller!"))
    await send(harness, anna, sender="anna@example.net")
    await send(harness, bernd, sender="bernd@example.com")
    await send(harness, anna, sender="bounce-42@relay.example.net")  # the same mail again, another envelope
    rows = await harness.rows("SELECT conversation_id, text FROM messages WHERE direction = 'in' ORDER BY id")
    assert [r["text"] for r in rows] == ["Die Grube vor Nr. 3 ist nicht gesichert.", "Seit heute früh läuft Wasser in unseren Keller!"]
    assert rows[0]["conversation_id"] != rows[1]["conversation_id"]

    # both acknowledged, each answering the mail by its bare Message-ID
    await harness.run_outbox()
    [ack_anna], [ack_bernd] = sink.to("anna@example.net"), sink.to("bernd@example.com")
    assert ack_anna["In-Reply-To"] == ack_bernd["In-Reply-To"] == "<1@localhost>"

    # Anna's answer naming <1@localhost> joins her conversation (the first mail keeps the thread key)
    answer = compose(sender="anna@example.net", subject="Re: Baugrube", text="Noch immer offen.",
                     message_id="<anna-2@example.net>", headers={"In-Reply-To": "<1@localhost>"})
    await send(harness, answer, sender="anna@example.net")
    assert (await conversation_of(harness, "<anna-2@example.net>"))["id"] == rows[0]["conversation_id"]
    # and a staff answer to Bernd names his mail too
    status, _ = await harness.api("POST", f"/api/v1/conversations/{rows[1]['conversation_id']}/replies",
                                  json={"text": "Wir kommen."})
    assert status == 201
    await harness.run_outbox()
    reply = sink.to("bernd@example.com")[-1]
    assert reply["In-Reply-To"] == "<1@localhost>" and reply["References"].split() == [ack_bernd["Message-ID"], "<1@localhost>"]


# -------------------------------------------------------------------------- long Message-IDs going out

OUTLOOK_ID = "<AM0PR07MB6213D1B0C6F1A2B3C4D5E6F7A8B9C0D1E2F3A@AM0PR07MB6213.eurprd07.prod.outlook.com>"


async def test_the_acknowledgement_names_an_outlook_message_id_as_a_msg_id(harness, sink):
    """Exchange Online's ids are about 90 characters; they went out as RFC 2047 encoded words
    in In-Reply-To and References, and Outlook did not thread the acknowledgement."""
    raw = compose(sender="Jürgen Müller <juergen@example.com>", subject="Baustelle", text="Wann ist die Grube zu?",
                  message_id=OUTLOOK_ID, headers={"Thread-Index": "AdrDs4f3Qw=="})
    await send(harness, raw, sender="juergen@example.com")
    await harness.run_outbox()
    [(envelope, ack)] = sink.mails
    head = envelope.original_content.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert f"In-Reply-To: {OUTLOOK_ID}".encode() in head
    assert f"References: {OUTLOOK_ID}".encode() in head
    assert not [line for line in head if b"=?" in line and (b"<" in line or line.startswith((b"In-Reply-To", b"References")))]
    assert ack["In-Reply-To"] == OUTLOOK_ID


# -------------------------------------------------------------------------- mail that names nobody


@pytest.fixture
async def http_harness(tmp_path, sink: Sink) -> AsyncIterator[CoreHarness]:
    settings = {"email": email_settings(sink, inbound_secret="s3cret")}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "email"), settings=settings) as h:
        yield h


async def post_mail(harness: CoreHarness, raw: bytes) -> dict[str, Any]:
    status, body = await harness.api("POST", "/channels/email/inbound", token=None, data=raw,
                                     headers={"Authorization": "Bearer s3cret", "X-Envelope-To": "bau@example.org"})
    assert status == 202, body
    return body


async def test_mails_without_a_sender_are_not_one_contact_and_not_acknowledged(http_harness, sink):
    """Without From and envelope sender all such mail was the contact unknown@invalid: threaded
    together (the second names the first) and acknowledged to that address through the relay."""
    first = await post_mail(http_harness, crlf("To: bau@example.org\nSubject: Anonym 1\nMessage-ID: <nofrom-1@example.com>\n\n"
                                               "Erste Person ohne Absender.\n"))
    second = await post_mail(http_harness, crlf("To: bau@example.org\nSubject: Anonym 2\nMessage-ID: <nofrom-2@example.com>\n"
                                                "In-Reply-To: <nofrom-1@example.com>\n\nZweite, ganz andere Person.\n"))
    assert first["conversation_id"] != second["conversation_id"]
    rows = await http_harness.rows("SELECT DISTINCT contact_id FROM messages WHERE direction = 'in'")
    assert len(rows) == 2
    assert await http_harness.count("outbox") == 0
    assert await http_harness.count("identities", "kind = 'email'") == 0
    for body in (first, second):
        status, detail = await http_harness.api("GET", f"/api/v1/conversations/{body['conversation_id']}")
        assert detail["unit"] == "bauhotline" and detail["deadline"] and detail["state"] == "open"
        assert "no_number" in detail["flags"]
        [inbound] = [m for m in detail["messages"] if m["direction"] == "in"]
        assert "no_sender" in inbound["flags"]
    # a staff answer has nowhere to go: kept, and the case asks for a call-back
    status, _ = await http_harness.api("POST", f"/api/v1/conversations/{first['conversation_id']}/replies",
                                       json={"text": "Wer sind Sie?"})
    assert status == 201
    await http_harness.run_outbox()
    assert sink.mails == []
    status, detail = await http_harness.api("GET", f"/api/v1/conversations/{first['conversation_id']}")
    assert {"undeliverable", "callback_required"} <= set(detail["flags"])


# -------------------------------------------------------------------------- internationalised addresses


async def test_an_acknowledgement_to_an_internationalised_domain_goes_through_a_relay_without_smtputf8(harness, sink):
    """The sink offers no SMTPUTF8, like many relays: max@müller-bau.de failed as "relay
    unreachable" and was retried for a day. Its domain has an ASCII form."""
    raw = "From: Max <max@müller-bau.de>\r\nTo: bau@example.org\r\nSubject: Test\r\nMessage-ID: <idn-1@x.de>\r\n\r\nHallo\r\n"
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(harness), start_tls=False, timeout=5) as client:
        await client.sendmail("max@müller-bau.de", ["bau@example.org"], raw.encode(), mail_options=["SMTPUTF8"])
    await harness.run_outbox()
    [(envelope, ack)] = sink.mails
    assert envelope.rcpt_tos == ["max@xn--mller-bau-q9a.de"]
    assert ack["To"] == "max@xn--mller-bau-q9a.de"
    [row] = await harness.rows("SELECT state, attempts FROM outbox")
    assert (row["state"], row["attempts"]) == ("sent", 1)


async def test_a_resident_writing_from_both_forms_of_an_internationalised_domain_is_one_contact_and_thread(harness, sink):
    """info@müller-bau.de and info@xn--mller-bau-q9a.de were two contacts: the answer from the
    other form did not join the case its acknowledgement named, but opened a second one. Every
    acknowledgement goes out in the ASCII form, through a relay without SMTPUTF8."""
    first = ("From: Bau GmbH <info@xn--mller-bau-q9a.de>\r\nTo: bau@example.org\r\nSubject: Baustelle\r\n"
             "Message-ID: <idn-a@x.de>\r\n\r\nWann ist die Grube zu?\r\n")
    await send(harness, first.encode(), sender="info@xn--mller-bau-q9a.de")
    await harness.run_outbox()
    [(envelope, ack)] = sink.mails
    assert envelope.rcpt_tos == ["info@xn--mller-bau-q9a.de"] and ack["To"] == "info@xn--mller-bau-q9a.de"
    answer = ("From: Bau GmbH <Info@Müller-Bau.de>\r\nTo: bau@example.org\r\nSubject: Re: Baustelle\r\n"
              f"Message-ID: <idn-b@x.de>\r\nIn-Reply-To: {ack['Message-ID']}\r\n\r\nDanke!\r\n")
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(harness), start_tls=False, timeout=5) as client:
        await client.sendmail("Info@Müller-Bau.de", ["bau@example.org"], answer.encode(), mail_options=["SMTPUTF8"])
    detail = await conversation_of(harness, "<idn-b@x.de>")
    assert detail["id"] == (await conversation_of(harness, "<idn-a@x.de>"))["id"]
    assert [m["text"] for m in detail["messages"] if m["direction"] == "in"] == ["Wann ist die Grube zu?", "Danke!"]
    assert await harness.count("contacts") == 1 and await harness.count("conversations") == 1
    assert [r["address"] for r in await harness.rows("SELECT address FROM identities")] == ["info@müller-bau.de"]
    status, reply = await harness.api("POST", f"/api/v1/conversations/{detail['id']}/replies", json={"text": "Morgen."})
    assert status == 201, reply
    await harness.run_outbox()
    assert [env.rcpt_tos for env, _ in sink.mails] == [["info@xn--mller-bau-q9a.de"]] * 2


async def test_a_mail_domain_that_is_not_valid_idna_is_kept_and_answered_as_written(harness, sink):
    """A From whose domain IDNA 2008 refuses (not Punycode, an emoji) is stored and
    acknowledged: its address is kept as written (lower case), never a 500 or a 451."""
    for number, address in enumerate(("info@XN--ZZ.de", "herz@i\u2764.ws")):
        raw = (f"From: <{address}>\r\nTo: bau@example.org\r\nSubject: Test\r\nMessage-ID: <bad-idn-{number}@x.de>\r\n"
               "\r\nHallo\r\n")
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(harness), start_tls=False, timeout=5) as client:
            refused, _ = await client.sendmail(address, ["bau@example.org"], raw.encode(), mail_options=["SMTPUTF8"])
        assert refused == {}
    assert sorted(r["address"] for r in await harness.rows("SELECT address FROM identities")) == [
        "herz@i\u2764.ws", "info@xn--zz.de"]
    await harness.run_outbox()
    # the IDNA 2003 domain goes out in its Punycode form, which resolves
    assert sorted(env.rcpt_tos[0] for env, _ in sink.mails) == ["herz@xn--i-7iq.ws", "info@xn--zz.de"]


async def test_an_address_that_needs_smtputf8_fails_at_once_without_it(harness, sink):
    """jürgen@… has no ASCII form: through a relay without SMTPUTF8 it is a permanent failure
    of the message (the fallback starts), not of the address, and nothing is retried."""
    raw = "From: Jürgen <jürgen@exämple.de>\r\nTo: bau@example.org\r\nSubject: Test\r\nMessage-ID: <idn-2@x.de>\r\n\r\nHallo\r\n"
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(harness), start_tls=False, timeout=5) as client:
        await client.sendmail("jürgen@exämple.de", ["bau@example.org"], raw.encode(), mail_options=["SMTPUTF8"])
    await harness.run_outbox()
    assert sink.mails == []
    [row] = await harness.rows("SELECT state, attempts, last_error FROM outbox")
    assert (row["state"], row["attempts"]) == ("failed", 1) and "SMTPUTF8" in row["last_error"]
    [identity] = await harness.rows("SELECT failed_at FROM identities WHERE kind = 'email'")
    assert identity["failed_at"] is None  # the address is fine; our relay cannot carry it
    detail = await conversation_of(harness, "<idn-2@x.de>")
    assert {"undeliverable", "callback_required"} <= set(detail["flags"])


async def test_an_address_that_needs_smtputf8_goes_through_a_relay_that_offers_it(tmp_path):
    catcher = Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(catcher, decode_data=False, enable_SMTPUTF8=True, loop=loop), "127.0.0.1", 0)
    catcher.port = server.sockets[0].getsockname()[1]
    try:
        async with CoreHarness(tmp_path / "data", entrypoints=("webform", "email"),
                               settings={"email": email_settings(catcher)}) as harness:
            raw = ("From: Jürgen Müller <jürgen@exämple.de>\r\nTo: bau@example.org\r\nSubject: Grüße\r\n"
                   "Message-ID: <idn-3@x.de>\r\n\r\nHallo\r\n")
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(harness), start_tls=False, timeout=5) as client:
                await client.sendmail("jürgen@exämple.de", ["bau@example.org"], raw.encode(), mail_options=["SMTPUTF8"])
            await harness.run_outbox()
            # the same mailbox with its domain in ASCII: one contact, answered on the open case
            again = ("From: Jürgen Müller <jürgen@xn--exmple-cua.de>\r\nTo: bau@example.org\r\nSubject: Re: Grüße\r\n"
                     "Message-ID: <idn-4@x.de>\r\nIn-Reply-To: <idn-3@x.de>\r\n\r\nNoch da?\r\n")
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(harness), start_tls=False, timeout=5) as client:
                await client.sendmail("jürgen@xn--exmple-cua.de", ["bau@example.org"], again.encode(), mail_options=["SMTPUTF8"])
            assert await harness.count("contacts") == 1 and await harness.count("conversations") == 1
    finally:
        server.close()
        await server.wait_closed()
    [(envelope, ack)] = catcher.mails
    assert envelope.rcpt_tos == ["jürgen@exämple.de"] and "SMTPUTF8" in [o.upper() for o in envelope.mail_options]
    assert "To: jürgen@exämple.de".encode() in envelope.original_content.split(b"\r\n")
    assert ack["In-Reply-To"] == "<idn-3@x.de>"


async def test_a_sender_that_hangs_up_while_its_mail_is_committed_leaves_it_stored_and_reported_once(tmp_path, sink):
    """aiosmtpd cancels the DATA handler when the client goes away. The mail was queued for the
    commit and is stored all the same, and what follows the commit follows it: the plugins
    hear of the message and its new case. They never did, and the sending server's retry is a
    duplicate, which they are not told of."""
    heard: list[tuple[str, Any]] = []

    class Audit:
        @hookimpl
        def message_received(self, message, result):
            heard.append(("message_received", result.message_id))

        @hookimpl
        def conversation_routed(self, conversation, rule, reason):
            heard.append(("conversation_routed", conversation["id"]))

    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "email"), settings={"email": email_settings(sink)},
                           plugins=[Audit()]) as harness:
        store = harness.core.store
        blocker = sqlite3.connect(store.path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the commit waits
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", smtp_port(harness))
            for line in (None, b"EHLO client.example.net", b"MAIL FROM:<juergen.mueller@example.com>",
                         b"RCPT TO:<bau@example.org>", b"DATA"):
                if line is not None:
                    writer.write(line + b"\r\n")
                while (await reader.readline())[3:4] != b" ":  # a reply's last line: "250 OK"
                    pass
            writer.write(LATIN1_MAIL.replace(b"\n.", b"\n..") + b"\r\n.\r\n")
            await writer.drain()
            assert await wait_until(lambda: not store.settled, 5, 0.01)  # queued for the commit
            writer.close()  # the client gives up waiting for its 250
            await asyncio.sleep(0.2)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert await wait_until(lambda: store.settled, 10, 0.01)
        await harness.events_done()
        assert await harness.count("messages", "direction = 'in'") == 1
        [(conversation_id,)] = await harness.core.store.fetchall("SELECT id FROM conversations")
        assert sorted(heard) == [("conversation_routed", conversation_id), ("message_received", 1)]
        await send(harness, LATIN1_MAIL)  # the sending server's retry
        await harness.events_done()
        assert await harness.count("messages", "direction = 'in'") == 1 and len(heard) == 2
        await harness.run_outbox()
        assert len(sink.to("juergen.mueller@example.com")) == 1


async def test_our_own_address_on_an_internationalised_domain_takes_mail_to_either_form(tmp_path, sink):
    """An address of ours on an internationalised domain was compared lower-cased only: mail to
    its Punycode form (what a sending server without SMTPUTF8 writes) was refused at RCPT with
    550, and mail to it in another case or normalisation went to the fallback unit."""
    settings = email_settings(sink, addresses={"bau@müller-bau.example": "bauhotline"})
    async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings={"email": settings}) as harness:
        for number, (to, options) in enumerate((("bau@xn--mller-bau-q9a.example", []), ("Bau@MÜLLER-Bau.example", ["SMTPUTF8"]))):
            sender = f"anwohner{number}@example.net"
            raw = (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: Frage\r\nMessage-ID: <own-idn-{number}@example.net>\r\n"
                   "\r\nWer ist hier zuständig?\r\n")
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(harness), start_tls=False, timeout=5) as client:
                refused, _ = await client.sendmail(sender, [to], raw.encode(), mail_options=options)
            assert refused == {}
            detail = await conversation_of(harness, f"<own-idn-{number}@example.net>")
            assert (detail["unit"], detail["routing"]["rule"]) == ("bauhotline", "entry-point")
            await harness.run_outbox()
            [ack] = sink.to(sender)
            # from the address written to, in the form a relay without SMTPUTF8 takes
            assert ack["From"].addresses[0].addr_spec == "bau@xn--mller-bau-q9a.example"
