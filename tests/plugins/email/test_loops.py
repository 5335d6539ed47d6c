from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from plugins.email.compose import message_id_for
from plugins.email.loops import AckRateLimiter, auto_reply_reason, classify
from plugins.email.parse import read_message


def mail(extra: str = "", sender: str = "Max Muster <max@example.com>", message_id: str = "<1@mail.example.com>"):
    head = f"From: {sender}\r\nTo: bau@example.org\r\nMessage-ID: {message_id}\r\nSubject: Hallo\r\n"
    return read_message((head + extra + "\r\nText\r\n").encode())


def reason(msg, envelope_from="max@example.com"):
    return auto_reply_reason(msg, envelope_from=envelope_from, own_domain="example.org")


def test_ordinary_mail_is_acknowledged():
    assert reason(mail()) is None
    assert reason(mail("Auto-Submitted: no\r\n")) is None
    assert reason(mail("Precedence: first-class\r\n")) is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Auto-Submitted: auto-replied\r\n", "auto-reply"),
        ("Auto-Submitted: auto-generated\r\n", "auto-reply"),
        ("Auto-Submitted: auto-notified; owner-email=x@example.com\r\n", "auto-reply"),
        ("Precedence: bulk\r\n", "bulk"),
        ("Precedence: junk\r\n", "bulk"),
        ("Precedence: list\r\n", "list"),
        ("List-Id: Anwohner <anwohner.lists.example.com>\r\n", "list"),
        ("List-Unsubscribe: <mailto:leave@lists.example.com>\r\n", "list"),
        ("X-Auto-Response-Suppress: All\r\n", "auto-reply"),
        ("X-Auto-Response-Suppress: DR, OOF, AutoReply\r\n", "auto-reply"),
        ("X-Auto-Response-Suppress: OOF\r\n", "auto-reply"),
        ("List-Post: <mailto:anwohner@lists.example.com>\r\n", "list"),
        ("X-Autoreply: yes\r\n", "auto-reply"),
        ("X-Autorespond: Abwesend\r\n", "auto-reply"),
    ],
)
def test_header_rules(header, expected):
    assert reason(mail(header)) == expected


def test_receipt_only_suppression_still_acknowledged():
    # Outlook asks only not to get delivery/read receipts: our acknowledgement is fine.
    assert reason(mail("X-Auto-Response-Suppress: DR, RN, NRN\r\n")) is None


@pytest.mark.parametrize("envelope_from", ["", "<>"])
def test_empty_return_path(envelope_from):
    assert reason(mail(), envelope_from=envelope_from) == "bounce"


def test_empty_return_path_header_when_envelope_unknown():
    assert reason(mail("Return-Path: <>\r\n"), envelope_from=None) == "bounce"
    assert reason(mail("Return-Path: <max@example.com>\r\n"), envelope_from=None) is None


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("MAILER-DAEMON@mx.example.net", "bounce"),
        ("Mail Delivery Subsystem <mailer-daemon@googlemail.com>", "bounce"),
        ("postmaster@example.net", "bounce"),
        ("no-reply@shop.example.com", "auto-reply"),
        ("noreply@example.com", "auto-reply"),
        ("Do Not Reply <do-not-reply@example.com>", "auto-reply"),
        ("donotreply@example.com", "auto-reply"),
        ("no_reply-notifications@example.com", "auto-reply"),
    ],
)
def test_machine_senders(sender, expected):
    assert reason(mail(sender=sender), envelope_from=None) == expected


def test_machine_envelope_sender_with_human_from():
    assert reason(mail(), envelope_from="bounce-handler@example.com") is None
    assert reason(mail(), envelope_from="MAILER-DAEMON@example.com") == "bounce"


def test_our_own_message_id_is_a_loop():
    ours = message_id_for("outbox-1", "example.org")
    assert reason(mail(message_id=ours)) == "loop"
    assert reason(mail(message_id=message_id_for("outbox-1", "other.example"))) is None
    # A colleague's mail server in our domain is not us.
    assert reason(mail(message_id="<abc@mx1.example.org>")) is None


def test_references_to_our_mail_alone_are_a_normal_reply():
    assert reason(mail("In-Reply-To: <abc.cr@example.org>\r\nReferences: <abc.cr@example.org>\r\n")) is None


def test_classify_names_the_deciding_header():
    assert classify(mail("Precedence: bulk\r\n"), envelope_from=None, own_domain="example.org") == ("bulk", "Precedence: bulk")


NOW = datetime(2024, 5, 3, 10, 0, tzinfo=UTC)


def test_rate_limiter_allows_n_per_hour():
    limiter = AckRateLimiter(3)
    for minute in range(3):
        assert limiter.allowed("Max@Example.com", NOW + timedelta(minutes=minute))
        limiter.record("max@example.com", NOW + timedelta(minutes=minute))
    assert not limiter.allowed("max@example.com", NOW + timedelta(minutes=10))
    assert limiter.allowed("other@example.com", NOW + timedelta(minutes=10))


def test_rate_limiter_window_slides():
    limiter = AckRateLimiter(2)
    limiter.record("a@example.com", NOW)
    limiter.record("a@example.com", NOW + timedelta(minutes=30))
    assert not limiter.allowed("a@example.com", NOW + timedelta(minutes=59))
    assert limiter.allowed("a@example.com", NOW + timedelta(minutes=60))
    limiter.record("a@example.com", NOW + timedelta(minutes=60))
    assert not limiter.allowed("a@example.com", NOW + timedelta(minutes=89))


def test_rate_limiter_forgets_old_addresses():
    limiter = AckRateLimiter(1, max_addresses=2)
    limiter.record("a@example.com", NOW)
    limiter.record("b@example.com", NOW)
    limiter.record("c@example.com", NOW + timedelta(hours=2))
    assert dict(limiter.counts()) == {"c@example.com": 1}


def test_a_portal_relaying_a_persons_message_from_noreply_is_a_persons_mail():
    """A contact form elsewhere sends from noreply@ with the person in Reply-To: the mail was
    taken for an auto-reply, opened without deadline or acknowledgement, and answers would
    have gone to noreply."""
    from plugins.email.parse import parse_mail

    relayed = mail("Reply-To: Erika Muster <Erika@example.net>\r\n", sender="Stadtportal <noreply@portal.example>")
    assert reason(relayed, envelope_from="bounces@portal.example") is None
    parsed = parse_mail(relayed, b"", envelope_from="bounces@portal.example", envelope_to=None, addresses={},
                        own_domain="example.org").inbound
    assert parsed["sender"]["address"] == "erika@example.net" and parsed["sender"]["display_name"] == "Erika Muster"
    assert parsed["meta"]["relayed_by"] == "noreply@portal.example" and not parsed.get("ack_suppressed")
    # the address was typed into the portal's form by whoever filled it in: no proof of who they are
    assert "unverified_sender" in parsed["flags"]


def test_a_reply_to_at_the_senders_own_internationalised_domain_is_no_person_relayed():
    """noreply@ and support@ at one domain, one written in Punycode and one in Unicode, are a
    ticket system's receipt, not a person at another domain."""
    msg = mail("Reply-To: support@Müller-Bau.de\r\n", sender="noreply@xn--mller-bau-q9a.de")
    assert reason(msg, envelope_from="noreply@xn--mller-bau-q9a.de") == "auto-reply"


@pytest.mark.parametrize("extra", ["", "Reply-To: noreply@portal.example\r\n",
                                   "Reply-To: support@portal.example\r\n",  # a ticket system's receipt
                                   "Reply-To: erika@example.net\r\nAuto-Submitted: auto-generated\r\n"])
def test_a_noreply_sender_without_a_person_to_answer_stays_automatic(extra):
    assert reason(mail(extra, sender="noreply@portal.example"), envelope_from="noreply@portal.example") == "auto-reply"


def test_auto_submitted_no_with_a_parameter_is_a_persons_mail():
    """RFC 3834 allows parameters after the keyword: "no" with one is still a person's mail."""
    assert reason(mail("Auto-Submitted: no; comment=manual\r\n")) is None


def test_a_daemon_in_the_sender_header_is_a_bounce():
    """A mail system that puts a person's address in From but names itself in Sender still bounces."""
    assert reason(mail("Sender: MAILER-DAEMON@mx.example.net\r\n"), envelope_from=None) == "bounce"
