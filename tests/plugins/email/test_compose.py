from __future__ import annotations

from datetime import UTC, datetime

from plugins.email.compose import build_mail, message_id_for
from plugins.email.loops import auto_reply_reason
from plugins.email.parse import parse_message, read_message
from router.hookspecs import OutboundMessage

NOW = datetime(2024, 5, 3, 8, 15, tzinfo=UTC)


def outbound(**overrides) -> OutboundMessage:
    values = dict(
        outbox_id=7,
        channel="email",
        kind="ack",
        to_kind="email",
        to="juergen.mueller@example.com",
        text="Guten Tag Herr Müller,\n\nwir haben Ihre Anfrage erhalten. Die Bauhotline antwortet bis Montag.",
        language="de",
        idempotency_key="outbox-7",
        case_reference="K-7F3QX2",
        subject="Baustelle vor meinem Haus in der Musterstraße",
        unit_name="Bauhotline",
        unit_email="bau@example.org",
        thread_refs=("<first@mail.example.com>", "<20240503101200.1234@mail.example.com>"),
    )
    values.update(overrides)
    return OutboundMessage(**values)


def build(message: OutboundMessage):
    return build_mail(message, from_addr="bau@example.org", from_name="Bauhotline Müllerstadt", domain="example.org", now=NOW)


def roundtrip(mail):
    return read_message(mail.as_bytes())


def test_acknowledgement_headers():
    mail = roundtrip(build(outbound()))
    assert mail["Message-ID"] == message_id_for("outbox-7", "example.org")
    assert mail["Message-ID"].endswith("@example.org>")
    assert mail["Subject"] == "Re: Baustelle vor meinem Haus in der Musterstraße [#K-7F3QX2]"
    assert mail["In-Reply-To"] == "<20240503101200.1234@mail.example.com>"
    assert mail["References"] == "<first@mail.example.com> <20240503101200.1234@mail.example.com>"
    assert mail["Auto-Submitted"] == "auto-replied"
    assert mail["X-Auto-Response-Suppress"] == "All"
    assert mail["From"].addresses[0].display_name == "Bauhotline Müllerstadt"
    assert mail["From"].addresses[0].addr_spec == "bau@example.org"
    assert mail["To"] == "juergen.mueller@example.com"
    assert mail["Date"].datetime == NOW
    assert mail["Content-Language"] == "de"
    assert mail.get_content_type() == "text/plain"
    assert mail.get_content_charset() == "utf-8"
    assert "Herr Müller" in mail.get_content()


def test_retry_keeps_the_message_id():
    first = build(outbound(attempt=1))
    second = build(outbound(attempt=3))
    assert first["Message-ID"] == second["Message-ID"]
    assert build(outbound(idempotency_key="outbox-8"))["Message-ID"] != first["Message-ID"]


def test_staff_reply_has_html_alternative_and_no_auto_headers():
    mail = roundtrip(build(outbound(kind="reply", text="Die Grube wird am <Dienstag> geschlossen & gesichert.\nGruß")))
    assert mail.get_content_type() == "multipart/alternative"
    assert mail["Auto-Submitted"] is None
    assert mail["X-Auto-Response-Suppress"] is None
    plain = mail.get_body(("plain",)).get_content()
    html = mail.get_body(("html",)).get_content()
    assert "am <Dienstag> geschlossen & gesichert." in plain
    assert "am &lt;Dienstag&gt; geschlossen &amp; gesichert.<br>\nGruß" in html


def test_notification_is_auto_generated():
    mail = build(outbound(kind="notification", thread_refs=()))
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["X-Auto-Response-Suppress"] == "All"
    assert mail["In-Reply-To"] is None
    assert mail["Subject"] == "Baustelle vor meinem Haus in der Musterstraße [#K-7F3QX2]"


def test_subject_defaults_and_existing_reference():
    assert build(outbound(subject=None, thread_refs=()))["Subject"] == "Ihre Anfrage [#K-7F3QX2]"
    assert build(outbound(subject=None, language="en", thread_refs=()))["Subject"] == "Your request [#K-7F3QX2]"
    assert build(outbound(subject="AW: Frage [#K-7F3QX2]"))["Subject"] == "AW: Frage [#K-7F3QX2]"
    assert build(outbound(subject="Zeile\r\nBcc: evil@example.com"))["Subject"].startswith("Re: Zeile Bcc:")


def test_status_link_appended_once():
    url = "https://router.example.org/channels/webform/status/abc"
    mail = build(outbound(kind="reply", status_url=url, thread_refs=()))
    assert mail.get_body(("plain",)).get_content().count(url) == 1
    mail = build(outbound(kind="reply", status_url=url, text=f"Siehe {url}"))
    assert mail.get_body(("plain",)).get_content().count(url) == 1


def test_our_acknowledgement_is_recognised_as_automatic():
    """Two auto-responders facing each other: ours comes back and is never answered."""
    raw = build(outbound()).as_bytes()
    assert auto_reply_reason(read_message(raw), envelope_from="bau@example.org", own_domain="example.org") == "loop"


def test_resident_reply_to_our_mail_threads_back():
    ours = build(outbound())
    reply = (
        "From: juergen.mueller@example.com\r\nTo: bau@example.org\r\nMessage-ID: <r1@mail.example.com>\r\n"
        f"In-Reply-To: {ours['Message-ID']}\r\nReferences: {ours['References']} {ours['Message-ID']}\r\n"
        f"Subject: Re: {ours['Subject']}\r\n\r\nDanke!\r\n"
    ).encode()
    msg = parse_message(reply, envelope_from="juergen.mueller@example.com", envelope_to=["bau@example.org"],
                        addresses={"bau@example.org": {"unit": "bauhotline", "language": "de"}}, own_domain="example.org")
    assert msg["thread"]["refs"][0] == ours["Message-ID"]
    assert msg["ack_suppressed"] is None
