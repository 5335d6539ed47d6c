from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

from aiosmtplib.email import flatten_message

from plugins.email.addresses import ascii_address
from plugins.email.compose import build_mail, message_id_for
from plugins.email.loops import auto_reply_reason
from plugins.email.parse import parse_message, read_message
from router.hookspecs import OutboundMessage

NOW = datetime(2024, 5, 3, 8, 15, tzinfo=UTC)


def render(mail, utf8: bool = False) -> bytes:
    """The bytes the relay client sends (aiosmtplib writes the mail out itself)."""
    return flatten_message(mail, utf8=utf8)


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


# Exchange Online's Message-IDs are about 90 characters: longer than a folded header line.
OUTLOOK_ID = "<AM0PR07MB6213D1B0C6F1A2B3C4D5E6F7A8B9C0D1E2F3A@AM0PR07MB6213.eurprd07.prod.outlook.com>"


def header_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_long_message_ids_are_written_as_msg_ids():
    """The standard library folded In-Reply-To and References as text at 78 characters and
    wrote an id longer than that as an RFC 2047 encoded word: Outlook did not thread our mail."""
    ours = message_id_for("outbox-1", "example.org")
    raw = render(build(outbound(thread_refs=(ours, OUTLOOK_ID))))
    lines = header_lines(raw)
    assert f"In-Reply-To: {OUTLOOK_ID}".encode() in lines
    assert f"References: {ours}".encode() in lines and f" {OUTLOOK_ID}".encode() in lines
    assert not [line for line in lines if line.startswith((b"In-Reply-To", b"References")) and b"=?" in line]
    mail = read_message(raw)
    assert mail["In-Reply-To"] == OUTLOOK_ID and mail["References"] == f"{ours} {OUTLOOK_ID}"
    # other headers are still folded and encoded as usual
    assert any(line.startswith(b"Subject: ") and b"=?utf-8?" in line for line in lines)
    assert max(len(line) for line in lines if not line.startswith((b" <", b"In-Reply-To:"))) <= 78


def test_references_are_folded_between_ids_only():
    ids = tuple(f"<{n:02d}.{'x' * n}@example.net>" for n in range(25))
    raw = render(build(outbound(thread_refs=ids)))
    lines = header_lines(raw)
    start = next(i for i, line in enumerate(lines) if line.startswith(b"References:"))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(b" "):
            break
        block.append(line)
    assert b" ".join(line.strip() for line in block) == b"References: " + " ".join(ids[-20:]).encode()
    assert all(len(line) <= 78 for line in block)
    assert all(line.strip().startswith(b"<") and line.endswith(b">") for line in block[1:])


def test_references_name_the_message_ids_of_stored_mails():
    """An inbound mail's channel_message_id is its Message-ID and a digest of its sender
    (``parse.dedupe_key``); mail stored before that is its bare Message-ID. Either way the
    References name the Message-ID, and ids that cannot be a msg-id are left out."""
    refs = ("<old@example.net>", "<1@localhost> 0123456789abcdef", "sha256:" + "0" * 64, "<äöü@example.com>",
            message_id_for("outbox-1", "example.org"))
    mail = read_message(render(build(outbound(thread_refs=refs))))
    assert mail["References"] == f"<old@example.net> <1@localhost> {message_id_for('outbox-1', 'example.org')}"


def test_an_internationalised_domain_is_written_in_ascii():
    """A relay without SMTPUTF8 refused max@müller-bau.de; its domain has an ASCII form."""
    mail = build(outbound(to="max@müller-bau.de"))
    assert mail["To"] == "max@xn--mller-bau-q9a.de"
    assert str(mail["To"]).isascii()
    assert render(mail).isascii()
    # a local part beyond ASCII has no ASCII form: the mail needs SMTPUTF8, headers in UTF-8
    mail = build(outbound(to="jürgen@exämple.de"))
    assert mail["To"] == "jürgen@exämple.de" and not str(mail["To"]).isascii()
    assert "To: jürgen@exämple.de".encode() in header_lines(render(mail, utf8=True))


def test_ascii_domains_are_idna_2008():
    assert ascii_address("max@müller-bau.de") == "max@xn--mller-bau-q9a.de" == ascii_address("max@Müller-Bau.DE")
    assert ascii_address("anna@example.net") == "anna@example.net"
    assert ascii_address("jürgen@exämple.de") == "jürgen@exämple.de"
    too_long = "x@" + "ü" * 70 + ".de"
    assert ascii_address(too_long) == too_long


def test_a_senders_name_with_parentheses_and_commas_comes_through_whole():
    """formataddr() and the header's folding made "(Strom)" a comment mail programs hide, and a
    comma in the name a second address, whose name then stood in for the address."""
    for name in ("Störungsannahme (Strom)", "Störungsannahme (Tiefbau Müller, Nord)", 'Bau "Nord" GmbH'):
        mail = build_mail(outbound(), from_addr="stoerung@example.org", from_name=name, domain="example.org", now=NOW)
        for raw in (render(mail), render(mail, utf8=True)):
            (address,) = email.message_from_string(raw.decode(), policy=email.policy.default)["From"].addresses
            assert (address.display_name, address.addr_spec) == (name, "stoerung@example.org")


def test_a_subject_of_the_case_reference_alone_gets_words():
    """A web-form case's answer by mail had the subject "[#K-7F3QX2]" and nothing else."""
    mail = roundtrip(build(outbound(kind="reply", subject="[#K-7F3QX2]", thread_refs=())))
    assert mail["Subject"] == "Ihre Anfrage [#K-7F3QX2]"
    mail = roundtrip(build(outbound(kind="reply", subject="[#K-7F3QX2] Grube", thread_refs=())))
    assert mail["Subject"] == "[#K-7F3QX2] Grube"
