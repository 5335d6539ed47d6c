from __future__ import annotations

from plugins.email.bounces import Bounce, parse_bounce
from plugins.email.parse import read_message


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


POSTFIX_DSN = crlf(
    """Return-Path: <>
From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
To: bau@example.org
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
Message-ID: <20240503101530.AB12C3D4E5@mx.example.org>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="AB12C3D4E5.1714731330/mx.example.org"

--AB12C3D4E5.1714731330/mx.example.org
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.org.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<tippfehler@example.net>: host mx.example.net[192.0.2.7] said: 550 5.1.1
    <tippfehler@example.net>: Recipient address rejected: User unknown

--AB12C3D4E5.1714731330/mx.example.org
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
X-Postfix-Queue-ID: AB12C3D4E5
Arrival-Date: Fri,  3 May 2024 10:15:29 +0200 (CEST)

Final-Recipient: rfc822; tippfehler@example.net
Original-Recipient: rfc822;tippfehler@example.net
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.net
Diagnostic-Code: smtp; 550 5.1.1 <tippfehler@example.net>: Recipient address
    rejected: User unknown

--AB12C3D4E5.1714731330/mx.example.org
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

From: Bauhotline <bau@example.org>
To: tippfehler@example.net
Subject: Ihre Anfrage [#K-7F3QX2]
Message-ID: <9f2c41d7a0b3e5c8.cr@example.org>
Auto-Submitted: auto-replied

--AB12C3D4E5.1714731330/mx.example.org--
"""
)


def test_standard_dsn():
    bounce = parse_bounce(read_message(POSTFIX_DSN))
    assert bounce == Bounce(
        original_message_id="<9f2c41d7a0b3e5c8.cr@example.org>",
        recipient="tippfehler@example.net",
        status="5.1.1",
        reason="550 5.1.1 <tippfehler@example.net>: Recipient address rejected: User unknown",
        permanent=True,
    )


def test_dsn_with_full_original_message():
    raw = crlf(
        """From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: service@example.org
Subject: Delivery Status Notification (Failure)
Content-Type: multipart/report; report-type="delivery-status"; boundary="xyz"

--xyz
Content-Type: text/plain; charset=utf-8

Address not found.

--xyz
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.com

Final-Recipient: rfc822; voll@example.com
Action: failed
Status: 5.2.2
Diagnostic-Code: smtp; 552 5.2.2 mailbox full

--xyz
Content-Type: message/rfc822

From: service@example.org
To: voll@example.com
Message-ID: <full.cr@example.org>
Subject: Antwort

Text
--xyz--
"""
    )
    bounce = parse_bounce(read_message(raw))
    assert bounce.original_message_id == "<full.cr@example.org>"
    assert bounce.recipient == "voll@example.com"
    assert bounce.status == "5.2.2"
    assert bounce.reason == "552 5.2.2 mailbox full"


def test_delayed_dsn_is_not_a_failure():
    raw = POSTFIX_DSN.replace(b"Action: failed", b"Action: delayed").replace(b"Status: 5.1.1", b"Status: 4.4.1")
    assert parse_bounce(read_message(raw)) is None


def test_temporary_failure_is_not_permanent():
    raw = POSTFIX_DSN.replace(b"Status: 5.1.1", b"Status: 4.2.2")
    assert parse_bounce(read_message(raw)).permanent is False


QMAIL_FAILURE = crlf(
    """Return-Path: <>
From: MAILER-DAEMON@mail.example.net
To: bau@example.org
Subject: failure notice
Message-ID: <q1@mail.example.net>

Hi. This is the qmail-send program at mail.example.net.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<alt@example.net>:
192.0.2.9 does not like recipient.
Remote host said: 550 5.1.1 mailbox unavailable
Giving up on 192.0.2.9.

--- Below this line is a copy of the message.

Return-Path: <bau@example.org>
From: Bauhotline <bau@example.org>
To: alt@example.net
Subject: Ihre Anfrage [#K-ABCDEF]
Message-ID: <qmail-original.cr@example.org>

Guten Tag,
"""
)


def test_nonstandard_qmail_failure_notice():
    bounce = parse_bounce(read_message(QMAIL_FAILURE))
    assert bounce.original_message_id == "<qmail-original.cr@example.org>"
    assert bounce.recipient == "alt@example.net"
    assert bounce.status == "5.1.1"
    assert bounce.reason == "Remote host said: 550 5.1.1 mailbox unavailable"
    assert bounce.permanent is True


EXCHANGE_UNZUSTELLBAR = crlf(
    """From: Microsoft Outlook <postmaster@firma.example>
To: service@example.org
Subject: =?utf-8?Q?Unzustellbar:_Ihre_Anfrage_[#K-7F3QX2]?=
Message-ID: <ex1@firma.example>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="ex"

--ex
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<html><body><p>Ihre Nachricht konnte nicht an <b>m.meier@firma.example</b> zugestellt werden.</p>
<p>Diagnoseinformationen: Remote Server returned '550 5.4.1 Recipient address rejected: Access denied'</p>
<hr><p>Urspr=C3=BCngliche Nachrichtenkopfzeilen:</p>
<pre>From: Kundenservice &lt;service@example.org&gt;
To: m.meier@firma.example
Message-ID: &lt;exchange-original.cr@example.org&gt;
Subject: Ihre Anfrage [#K-7F3QX2]
</pre></body></html>
--ex--
"""
)


def test_nonstandard_exchange_unzustellbar():
    bounce = parse_bounce(read_message(EXCHANGE_UNZUSTELLBAR))
    assert bounce.original_message_id == "<exchange-original.cr@example.org>"
    assert bounce.recipient == "m.meier@firma.example"
    assert bounce.status == "5.4.1"
    assert "Access denied" in bounce.reason


def test_ordinary_mails_are_not_bounces():
    human = crlf("From: max@example.com\nTo: bau@example.org\nSubject: Undeliverable parcel?\n\nMein Paket kam nie an.\n")
    assert parse_bounce(read_message(human)) is None
    daemon_other = crlf("From: postmaster@example.net\nTo: bau@example.org\nSubject: Wartungsarbeiten\n\nHeute Nacht.\n")
    assert parse_bounce(read_message(daemon_other)) is None


def test_broken_report_does_not_raise():
    raw = crlf(
        "From: MAILER-DAEMON@x.example\nSubject: Undelivered Mail Returned to Sender\n"
        "Content-Type: multipart/report; report-type=delivery-status; boundary=zz\n\n--zz\nContent-Type: message/delivery-status\n\n\x00garbage"
    )
    # A report without a failed recipient is not a failure bounce; it is stored like any mail.
    assert parse_bounce(read_message(raw)) is None


def test_dsn_recipient_is_the_final_recipient_where_it_failed():
    """Original-Recipient is the address before forwarding; the failure happened at Final-Recipient."""
    raw = POSTFIX_DSN.replace(b"Original-Recipient: rfc822;tippfehler@example.net",
                              b"Original-Recipient: rfc822;alias@example.com")
    assert parse_bounce(read_message(raw)).recipient == "tippfehler@example.net"


def test_dsn_status_with_a_comment_keeps_only_the_code():
    raw = POSTFIX_DSN.replace(b"Status: 5.1.1\r\n", b"Status: 5.1.1 (Mailbox unknown)\r\n")
    assert parse_bounce(read_message(raw)).status == "5.1.1"


def test_dsn_original_headers_as_message_rfc822_headers():
    raw = POSTFIX_DSN.replace(b"Content-Type: text/rfc822-headers", b"Content-Type: message/rfc822-headers")
    assert parse_bounce(read_message(raw)).original_message_id == "<9f2c41d7a0b3e5c8.cr@example.org>"


def test_nonstandard_status_is_not_taken_from_the_quoted_original():
    """A number in our own quoted mail ("450 Euro") is no SMTP code: it made a failure temporary."""
    raw = QMAIL_FAILURE.replace(b"Remote host said: 550 5.1.1 mailbox unavailable\r\n", b"") + crlf(
        "die Gebuehr betraegt 450 Euro.\n")
    bounce = parse_bounce(read_message(raw))
    assert bounce.recipient == "alt@example.net"
    assert bounce.status is None and bounce.permanent is True


def test_nonstandard_bounce_recognised_by_its_empty_return_path():
    raw = QMAIL_FAILURE.replace(b"From: MAILER-DAEMON@mail.example.net", b"From: Mail System <mail@mail.example.net>")
    bounce = parse_bounce(read_message(raw))
    assert bounce is not None and bounce.original_message_id == "<qmail-original.cr@example.org>"


def test_nonstandard_recipient_is_not_the_daemon_named_in_the_text():
    raw = crlf(
        """From: postmaster@firma.example
To: service@example.org
Subject: Unzustellbar: Ihre Anfrage
Message-ID: <ex2@firma.example>

Diese Nachricht wurde von postmaster@firma.example erzeugt.
Ihre Nachricht an m.meier@firma.example konnte nicht zugestellt werden.

Message-ID: <exchange-two.cr@example.org>
"""
    )
    bounce = parse_bounce(read_message(raw))
    assert bounce.recipient == "m.meier@firma.example"
    assert bounce.original_message_id == "<exchange-two.cr@example.org>"


def test_nonstandard_bounce_quoting_message_rfc822_headers():
    raw = crlf(
        """From: MAILER-DAEMON@mx.example.net
To: service@example.org
Subject: Undeliverable: Antwort
Content-Type: multipart/mixed; boundary="nb"

--nb
Content-Type: text/plain

Delivery to weg@example.net failed: 550 5.1.1 user unknown

--nb
Content-Type: message/rfc822-headers

From: service@example.org
To: weg@example.net
Message-ID: <headers-only.cr@example.org>

--nb--
"""
    )
    bounce = parse_bounce(read_message(raw))
    assert bounce.original_message_id == "<headers-only.cr@example.org>"
    assert bounce.recipient == "weg@example.net" and bounce.status == "5.1.1"
