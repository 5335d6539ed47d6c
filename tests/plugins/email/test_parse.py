from __future__ import annotations

import base64
import hashlib
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.email.parse import (
    MAX_ATTACHMENTS,
    attachments,
    message_ids,
    parse_mail,
    parse_message,
    read_message,
)
from plugins.email.text import split_reply, utf8_encoded_words

from .conftest import ADDRESSES
from .test_bounces import POSTFIX_DSN


def parse(raw: bytes, *, envelope_from: str | None = "max@example.com", envelope_to=("bau@example.org",)):
    return parse_message(
        raw,
        envelope_from=envelope_from,
        envelope_to=list(envelope_to) if envelope_to is not None else None,
        addresses=ADDRESSES,
        own_domain="example.org",
    )


def crlf(text: str, encoding: str = "ascii") -> bytes:
    return text.replace("\n", "\r\n").encode(encoding)


LATIN1 = crlf(
    """Return-Path: <max@example.com>
From: =?ISO-8859-1?Q?J=FCrgen_M=FCller?= <Juergen.Mueller@Example.COM>
To: Bauhotline <bau@example.org>
Subject: =?ISO-8859-1?Q?Baustelle_vor_meinem_Haus_in_der_Musterstra=DFe?=
Date: Fri, 03 May 2024 10:12:00 +0200
Message-ID: <20240503101200.1234@mail.example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=ISO-8859-1
Content-Transfer-Encoding: 8bit

Guten Tag,

seit Montag ist die Einfahrt gesperrt. Wann wird die Grube geschlossen?
Gr\xfc\xdfe aus der M\xfchlenstra\xdfe

-- 
J\xfcrgen M\xfcller
Tel. 0123 456789
""",
    "latin-1",
)


def test_latin1_mail_with_umlauts(valid):
    msg = valid(parse(LATIN1))
    assert msg["channel"] == "email"
    digest = hashlib.sha256(b"juergen.mueller@example.com\n2024-05-03T08:12:00+00:00").hexdigest()[:16]
    assert msg["channel_message_id"] == f"<20240503101200.1234@mail.example.com> {digest}"
    assert msg["thread_keys"] == ["<20240503101200.1234@mail.example.com>"]
    assert msg["sender"] == {"kind": "email", "address": "juergen.mueller@example.com", "display_name": "Jürgen Müller"}
    assert msg["recipient"] == "bau@example.org"
    assert msg["unit_hint"] == "bauhotline"
    assert (msg["language"], msg["default_language"]) == (None, "de")  # the text tells; the address's is the default
    assert msg["subject"] == "Baustelle vor meinem Haus in der Musterstraße"
    assert "Grüße aus der Mühlenstraße" in msg["text"]
    assert "Jürgen" not in msg["text"]
    assert msg["meta"]["signature"] == "Jürgen Müller\nTel. 0123 456789"
    assert msg["sent_at"] == "2024-05-03T08:12:00+00:00"
    assert msg["ack_suppressed"] is None
    assert msg["raw"]["message_id"] == "<20240503101200.1234@mail.example.com>"
    assert msg["raw"]["headers"]["Subject"] == msg["subject"]


def test_windows_1252_labelled_as_latin1():
    raw = crlf(
        """From: anna@example.com
To: service@example.org
Subject: Rechnung
Message-ID: <a1@example.com>
Content-Type: text/plain; charset=iso-8859-1

Die Rechnung \x96 \x84viel zu hoch\x93 \x80 120
""",
        "latin-1",
    )
    msg = parse(raw, envelope_to=["service@example.org"])
    assert msg["text"] == "Die Rechnung – „viel zu hoch“ € 120"
    assert msg["unit_hint"] == "kundenservice"
    assert msg["language"] is None


_OUTLOOK_QUOTES = b"\x84M\xfcller\x93 \x96 der Bagger \x85"  # Windows-1252: „Müller“ – der Bagger …


@pytest.mark.parametrize("label", ["iso-8859-15", "ISO_8859-1", "iso88591", "cp819", "iso-8859-9", "latin9"])
def test_windows_1252_quotes_in_a_body_labelled_iso_8859_are_not_control_characters(label):
    """Outlook's „ “ – … are bytes 0x80-0x9F of Windows-1252; ISO-8859-x decodes them as C1
    controls (invisible). Browsers, Thunderbird and webmail follow the WHATWG Encoding Standard
    and read iso-8859-1 (in all its spellings) and iso-8859-9 as the Windows code page; no mail
    is text with C1 controls (RFC 5198), so under ISO-8859-15 they are the Windows ones too."""
    raw = crlf(f"From: a@example.com\nTo: bau@example.org\nMessage-ID: <q@example.com>\nSubject: x\n"
               f"Content-Type: text/plain; charset={label}\nContent-Transfer-Encoding: 8bit\n\n") + _OUTLOOK_QUOTES + b"\r\n"
    assert parse(raw)["text"] == "„Müller“ – der Bagger …"


def test_a_latin_9_body_keeps_its_own_letters_beside_the_windows_quotes():
    raw = crlf("From: a@example.com\nTo: bau@example.org\nMessage-ID: <q@example.com>\nSubject: x\n"
               "Content-Type: text/plain; charset=iso-8859-15\nContent-Transfer-Encoding: quoted-printable\n\n"
               "=84Preis=93: 20 =A4 f=FCr =BCuvre\n")
    assert parse(raw)["text"] == "„Preis“: 20 € für Œuvre"


def test_windows_quotes_in_central_european_and_undefined_bytes():
    """ISO-8859-2 is Windows-1250's sibling; a byte Windows-1252 leaves undefined (0x81) costs
    the rest of the text nothing (it made the whole body Latin-1, every quote a control)."""
    head = "From: a@example.com\nTo: bau@example.org\nMessage-ID: <q@example.com>\nSubject: x\n"
    raw = crlf(head + "Content-Type: text/plain; charset=iso-8859-2\nContent-Transfer-Encoding: 8bit\n\n") + \
        b"\x84Kone\xe8n\xe1\x93 \x9club\r\n"
    assert parse(raw)["text"] == "„Konečná“ ślub"
    raw = crlf(head + "Content-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: 8bit\n\n") + \
        b"\x84M\xfcller\x93 \x81\r\n"
    assert parse(raw)["text"].startswith("„Müller“ ")


@pytest.mark.parametrize(("label", "body", "text"), [
    # Windows-1250: „Łódź“ – ślub, with 0x81 (undefined) between
    ("windows-1250", b"\x84\xa3\xf3d\x9f\x93 \x96 \x9club \x81 \xbf\xf3\xb3w", "„Łódź“ – ślub \x81 żółw"),
    ("cp1250", b"\x84Kone\xe8n\xe1\x93 \x98", "„Konečná“ \x98"),
    # Windows-1251: «Привет» with 0x98 (its one undefined byte)
    ("windows-1251", b"\xab\xcf\xf0\xe8\xe2\xe5\xf2\xbb \x98", "«Привет» \x98"),
    # Windows-1253: Γειά with 0xaa (undefined)
    ("windows-1253", b"\xc3\xe5\xe9\xdc \xaa", "Γειά \xaa"),
])
def test_an_undefined_byte_under_a_windows_label_costs_only_itself(label, body, text):
    """One byte the labelled Windows code page leaves undefined made the whole text Windows-1252:
    a Polish, Czech, Russian or Greek mail came out as wrong letters throughout. The labelled
    code page decodes every byte it defines, the undefined one is its code point (WHATWG)."""
    raw = crlf("From: a@example.com\nTo: bau@example.org\nMessage-ID: <q@example.com>\nSubject: x\n"
               f"Content-Type: text/plain; charset={label}\nContent-Transfer-Encoding: 8bit\n\n") + body + b"\r\n"
    assert parse(raw)["text"] == text


def test_utf8_labelled_windows_1250_is_still_read_as_utf8():
    """UTF-8 under a Windows label (a client's bug) that the code page cannot read is UTF-8."""
    raw = crlf("From: a@example.com\nTo: bau@example.org\nMessage-ID: <q@example.com>\nSubject: x\n"
               "Content-Type: text/plain; charset=windows-1250\nContent-Transfer-Encoding: 8bit\n\n") + \
        "Łódź".encode() + b"\r\n"
    assert parse(raw)["text"] == "Łódź"


def test_windows_quotes_converted_to_utf8_as_latin_1_are_read_as_meant():
    """A gateway that read Windows-1252 as ISO-8859-1 and wrote UTF-8 sends U+0084 and U+0093."""
    raw = crlf("From: a@example.com\nTo: bau@example.org\nMessage-ID: <q@example.com>\nSubject: x\n"
               "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n") + \
        "\x84Müller\x93 \x96 ok".encode() + b"\r\n"
    assert parse(raw)["text"] == "„Müller“ – ok"


def test_windows_quotes_in_an_iso_8859_15_header_are_not_control_characters():
    raw = crlf("From: =?iso-8859-15?Q?=84Bau=93_M=FCller?= <a@example.com>\nTo: bau@example.org\n"
               "Message-ID: <q@example.com>\nSubject: =?ISO-8859-15?Q?Grube_=96_offen_=A4?=\n\nHallo\n")
    msg = parse(raw)
    assert msg["subject"] == "Grube – offen €"
    assert msg["sender"]["display_name"] == "„Bau“ Müller"


@pytest.mark.parametrize(("headers", "body"), [
    ("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit", b"\xef\xbb\xbfGr\xc3\xbc\xc3\x9fe"),
    ("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64", b"77u/R3LDvMOfZQ=="),
    ("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable", b"=EF=BB=BFGr=C3=BC=C3=9Fe"),
    # a BOM decides the encoding, whatever the label says (WHATWG: "BOM sniffing")
    ("Content-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: 8bit", b"\xef\xbb\xbfGr\xc3\xbc\xc3\x9fe"),
    ("Content-Type: text/plain\nContent-Transfer-Encoding: 8bit", b"\xef\xbb\xbfGr\xc3\xbc\xc3\x9fe"),
    ("Content-Type: text/plain; charset=windows-1252\nContent-Transfer-Encoding: base64", b"//5HAHIA/ADfAGUA"),  # UTF-16LE
], ids=["8bit", "base64", "quoted-printable", "latin-1 label", "no label", "utf-16"])
def test_a_byte_order_mark_at_the_start_of_a_text_part_is_not_text(headers, body):
    """Notepad and some form mailers start UTF-8 text with a BOM: it was kept as U+FEFF (or,
    under a Latin-1 label, as "ï»¿"), the first character of the stored text."""
    raw = crlf(f"From: a@example.com\nTo: bau@example.org\nMessage-ID: <b@example.com>\nSubject: x\n{headers}\n\n") + body + b"\r\n"
    assert parse(raw)["text"] == "Grüße"


def test_a_byte_order_mark_in_a_header_is_not_text():
    raw = crlf("From: =?utf-8?B?77u/SsO8cmdlbg==?= <j@example.com>\nTo: bau@example.org\nMessage-ID: <b@example.com>\n"
               "Subject: AW: =?UTF-8?B?77u/QmF1c3RlbGxl?=\n\nHallo\n")
    msg = parse(raw)
    assert (msg["subject"], msg["sender"]["display_name"]) == ("AW: Baustelle", "Jürgen")
    # raw UTF-8 (SMTPUTF8 mail)
    raw = b"From: \xef\xbb\xbfJ\xc3\xbcrgen <j@example.com>\r\nTo: bau@example.org\r\nMessage-ID: <c@example.com>\r\n" \
          b"Subject: \xef\xbb\xbfBaustelle \xc3\xbc\r\n\r\nHallo\r\n"
    msg = parse(raw)
    assert (msg["subject"], msg["sender"]["display_name"]) == ("Baustelle ü", "Jürgen")


def test_utf8_labelled_as_latin1_is_recognised():
    body = "Schöne Grüße".encode()
    raw = crlf("From: a@example.com\nTo: bau@example.org\nMessage-ID: <x@example.com>\n"
               "Content-Type: text/plain; charset=iso-8859-1\n\n") + body
    assert parse(raw)["text"] == "Schöne Grüße"


def test_utf8_quoted_printable(valid):
    raw = crlf(
        """From: =?UTF-8?Q?=C3=96mer_Y=C4=B1lmaz?= <oemer@example.com>
To: bau@example.org
Subject: =?UTF-8?B?U3TDtnJ1bmcgaW0gR2Vsw6RuZGU=?=
Message-ID: <qp@example.com>
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Die Stra=C3=9Fe ist seit heute gesperrt, kein Zugang zur Gr=C3=BCnfl=C3=A4=
che.
"""
    )
    msg = valid(parse(raw))
    assert msg["subject"] == "Störung im Gelände"
    assert msg["sender"]["display_name"] == "Ömer Yılmaz"
    assert msg["text"] == "Die Straße ist seit heute gesperrt, kein Zugang zur Grünfläche."


def test_format_flowed_joined():
    raw = crlf(
        """From: a@example.com
To: bau@example.org
Message-ID: <ff@example.com>
Content-Type: text/plain; charset=utf-8; format=flowed; delsp=no

Das ist ein langer Satz, der vom Programm umbrochen 
wurde und wieder zusammengehört.
 From here on it is stuffed.
Neue Zeile.
""",
        "utf-8",
    )
    assert parse(raw)["text"] == (
        "Das ist ein langer Satz, der vom Programm umbrochen wurde und wieder zusammengehört.\n"
        "From here on it is stuffed.\nNeue Zeile."
    )


def test_format_flowed_delsp():
    raw = crlf(
        "From: a@example.com\nTo: bau@example.org\nMessage-ID: <ds@example.com>\n"
        "Content-Type: text/plain; charset=utf-8; format=flowed; delsp=yes\n\nzusammen \ngeschrieben\n"
    )
    assert parse(raw)["text"] == "zusammengeschrieben"


def test_format_flowed_never_flows_the_signature_separator():
    """RFC 3676 4.3: "-- " ends in a space but is no soft break; flowed, it joined the name
    below it into the text ("-- Max Muster"), and the signature was lost."""
    raw = crlf(
        "From: a@example.com\nTo: bau@example.org\nMessage-ID: <sig@example.com>\n"
        "Content-Type: text/plain; charset=utf-8; format=flowed\n\n"
        "Die Grube ist wieder offen. \nBitte kommen Sie.\n-- \nMax Muster\n"
    )
    msg = parse(raw)
    assert msg["text"] == "Die Grube ist wieder offen. Bitte kommen Sie."
    assert msg["meta"]["signature"] == "Max Muster"


def test_html_only_with_script_and_style(valid):
    raw = crlf(
        """From: web@example.com
To: bau@example.org
Message-ID: <html@example.com>
Content-Type: text/html; charset=utf-8

<html><head><title>Titel</title><style>p { color: red }</style></head>
<body><script>alert("x")</script><p>Hallo&nbsp;Team,</p><p>der Bagger steht <b>vor</b> Haus&nbsp;5 &amp; 7.</p>
<ul><li>Einfahrt</li><li>Gehweg</li></ul>
<div class="gmail_quote">Am 02.05.2024 um 09:00 schrieb Bauhotline &lt;bau@example.org&gt;:
<blockquote>Ihre Anfrage ist eingegangen.</blockquote></div></body></html>
"""
    )
    msg = valid(parse(raw))
    assert msg["text"] == "Hallo\xa0Team,\n\nder Bagger steht vor Haus\xa05 & 7.\n\n- Einfahrt\n- Gehweg"
    assert "alert" not in msg["text"] and "color" not in msg["text"] and "Titel" not in msg["text"]
    assert msg["meta"]["html"] is True
    assert "> Ihre Anfrage ist eingegangen." in msg["meta"]["quoted"]


def test_plain_preferred_over_html():
    raw = crlf(
        """From: a@example.com
To: bau@example.org
Message-ID: <alt@example.com>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="b1"

--b1
Content-Type: text/plain; charset=utf-8

Nur Text.
--b1
Content-Type: text/html; charset=utf-8

<p>Nur <i>HTML</i>.</p>
--b1--
"""
    )
    msg = parse(raw)
    assert msg["text"] == "Nur Text."
    assert "html" not in msg["meta"]
    assert msg["attachments"] == []


def test_multipart_with_attachment(valid):
    pdf = b"%PDF-1.4 fake plan of the site\n" * 20
    raw = crlf(
        f"""From: a@example.com
To: bau@example.org
Message-ID: <att@example.com>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: text/plain; charset=utf-8

Anbei der Plan.
--outer
Content-Type: application/pdf; name="Lageplan.pdf"
Content-Disposition: attachment; filename*=UTF-8''Lagepl%C3%A4n%20Nord.pdf
Content-Transfer-Encoding: base64

{base64.encodebytes(pdf).decode()}
--outer--
"""
    )
    msg = valid(parse(raw))
    assert msg["text"] == "Anbei der Plan."
    assert msg["attachments"] == [
        {"name": "Lageplän Nord.pdf", "content_type": "application/pdf",
         "size": len(pdf), "sha256": hashlib.sha256(pdf).hexdigest()}
    ]
    payloads = attachments(raw)
    assert [(a.name, a.data) for a in payloads] == [("Lageplän Nord.pdf", pdf)]


def test_quoted_history_german_outlook():
    raw = crlf(
        """From: a@example.com
To: bau@example.org
Message-ID: <ol@example.com>
In-Reply-To: <ack-2@example.org>
References: <first@example.com> <ack-1@example.org> <ack-2@example.org>
Subject: AW: Ihre Anfrage [#K-7F3QX2]
Content-Type: text/plain; charset=utf-8

Danke, aber die Grube ist immer noch offen.

-----Ursprüngliche Nachricht-----
Von: Bauhotline <bau@example.org>
Gesendet: Freitag, 3. Mai 2024 10:15
Betreff: Ihre Anfrage [#K-7F3QX2]

Wir haben Ihre Anfrage erhalten.
""",
        "utf-8",
    )
    msg = parse(raw)
    assert msg["text"] == "Danke, aber die Grube ist immer noch offen."
    assert msg["meta"]["quoted"].startswith("-----Ursprüngliche Nachricht-----")
    assert "Wir haben Ihre Anfrage erhalten." in msg["meta"]["quoted"]
    assert msg["subject"] == "AW: Ihre Anfrage [#K-7F3QX2]"
    assert msg["thread"]["refs"] == ["<ack-2@example.org>", "<first@example.com>", "<ack-1@example.org>"]


def test_quoted_history_german_attribution_wrapped():
    raw = crlf(
        """From: a@example.com
To: bau@example.org
Message-ID: <de@example.com>
Content-Type: text/plain; charset=utf-8

Das Loch ist wieder da.

Am 03.05.2024 um 10:15 schrieb Bauhotline
<bau@example.org>:
> Ihre Anfrage ist eingegangen.
""",
        "utf-8",
    )
    msg = parse(raw)
    assert msg["text"] == "Das Loch ist wieder da."
    assert msg["meta"]["quoted"].startswith("Am 03.05.2024 um 10:15 schrieb Bauhotline")


def test_quoted_history_english_and_mobile_signature():
    raw = crlf(
        """From: a@example.com
To: service@example.org
Message-ID: <en@example.com>
Content-Type: text/plain; charset=utf-8

The crew left the road open overnight.

Sent from my iPhone

On Fri, May 3, 2024 at 10:15 AM Customer Care <service@example.org> wrote:
> We received your request.
"""
    )
    msg = parse(raw, envelope_to=["service@example.org"])
    assert msg["text"] == "The crew left the road open overnight."
    assert msg["meta"]["signature"] == "Sent from my iPhone"
    assert msg["meta"]["quoted"].endswith("> We received your request.")


def test_bottom_posted_reply_keeps_own_text():
    raw = crlf(
        "From: a@example.com\nTo: bau@example.org\nMessage-ID: <bp@example.com>\n\n"
        "> Wann ist die Baustelle fertig?\n> Gruss\n\nIn zwei Wochen, sagt der Polier.\n"
    )
    msg = parse(raw)
    assert msg["text"] == "In zwei Wochen, sagt der Polier."
    assert msg["meta"]["quoted"] == "> Wann ist die Baustelle fertig?\n> Gruss"


def test_interleaved_reply_is_kept_whole():
    body = "> Frage eins?\nAntwort eins.\n> Frage zwei?\nAntwort zwei."
    raw = crlf(f"From: a@example.com\nTo: bau@example.org\nMessage-ID: <il@example.com>\n\n{body}\n")
    msg = parse(raw)
    assert msg["text"] == body
    assert "quoted" not in msg["meta"]


def test_forward_without_own_text_keeps_everything():
    body = "-----Original Message-----\nFrom: neighbour@example.com\nSent: Monday\n\nThe road is flooded."
    raw = crlf(f"From: a@example.com\nTo: bau@example.org\nMessage-ID: <fw@example.com>\n\n{body}\n")
    assert parse(raw)["text"] == body


def test_case_reference_stays_in_subject_and_text():
    raw = crlf("From: a@example.com\nTo: bau@example.org\nMessage-ID: <cr@example.com>\n"
               "Subject: Re: [#K-7F3QX2] Baustelle\n\nZu K-7F3QX2: noch offen.\n")
    msg = parse(raw)
    assert "[#K-7F3QX2]" in msg["subject"]
    assert "K-7F3QX2" in msg["text"]


def test_recipient_from_cc_when_envelope_unknown():
    raw = crlf("From: a@example.com\nTo: someone@example.net\nCc: Service <Service@Example.org>, bau@example.org\n"
               "Message-ID: <cc@example.com>\n\nHallo\n")
    msg = parse(raw, envelope_to=None, envelope_from=None)
    assert msg["recipient"] == "service@example.org"
    assert msg["unit_hint"] == "kundenservice"


def test_the_mails_content_language_comes_before_the_addresss_as_the_default(valid):
    """Both are only the default for a text that does not tell its language; of the two, the
    mail's own ``Content-Language`` is the sender's, the address's a guess for everyone."""
    def mail(language: str | None, to: str) -> bytes:
        head = f"From: a@example.com\nTo: {to}\nMessage-ID: <lang-{language}@example.com>\n"
        return crlf(head + (f"Content-Language: {language}\n" if language else "") + "\n1234\n")

    assert valid(parse(mail("en-GB", "bau@example.org")))["default_language"] == "en"
    assert parse(mail(None, "bau@example.org"))["default_language"] == "de"
    assert parse(mail("de-DE", "service@example.org"), envelope_to=("service@example.org",))["default_language"] == "de"


def test_missing_message_id_gets_stable_hash_id(valid):
    raw = crlf("From: a@example.com\nTo: bau@example.org\nSubject: ohne ID\n\nText\n")
    msg = valid(parse(raw))
    assert msg["channel_message_id"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert parse(raw)["channel_message_id"] == msg["channel_message_id"]
    assert msg["thread_keys"] == []


def test_auto_reply_is_marked_not_acknowledged(valid):
    raw = crlf("From: a@example.com\nTo: bau@example.org\nMessage-ID: <oof@example.com>\n"
               "Auto-Submitted: auto-replied\nSubject: Abwesenheitsnotiz\n\nIch bin bis Montag nicht im Haus.\n")
    msg = valid(parse(raw))
    assert msg["ack_suppressed"] == "auto-reply"
    assert msg["text"] == "Ich bin bis Montag nicht im Haus."


def test_bounce_is_marked(valid):
    raw = crlf(
        """From: Mail Delivery System <MAILER-DAEMON@mx.example.net>
To: bau@example.org
Subject: Undelivered Mail Returned to Sender
Message-ID: <b@mx.example.net>

<nobody@example.net>: host mx.example.net said: 550 5.1.1 User unknown

Message-ID: <abc.cr@example.org>
"""
    )
    msg = valid(parse(raw, envelope_from=""))
    assert msg["ack_suppressed"] == "bounce"
    assert msg["meta"]["bounce"]["original_message_id"] == "<abc.cr@example.org>"


MALFORMED = [
    # multipart without its boundary
    b"From: a@example.com\r\nTo: bau@example.org\r\nMessage-ID: <m1@example.com>\r\n"
    b"Content-Type: multipart/mixed; boundary=\"nowhere\"\r\n\r\nHallo, die Grube ist offen.\r\n",
    # broken base64 and an unknown charset
    b"From: a@example.com\r\nTo: bau@example.org\r\nMessage-ID: <m2@example.com>\r\n"
    b"Content-Type: text/plain; charset=x-unknown-42\r\nContent-Transfer-Encoding: base64\r\n\r\nSGFsbG8gV2VsdA=!!\r\n",
    # 8-bit garbage in headers, no From, no header/body separator
    b"Subject: Gr\xfc\xdfe \xff\r\nTo: <<<bau@example.org\r\nContent-Type: text/plain; charset=\"\r\nText ohne Trenner\r\n",
    # nonsense
    b"\x00\x01\x02 not a mail at all",
    b"",
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_mail_never_raises(raw, valid):
    valid(parse(raw, envelope_from=None, envelope_to=None))


def test_malformed_multipart_keeps_text():
    msg = parse(MALFORMED[0])
    assert "die Grube ist offen" in msg["text"]


def test_8bit_header_is_repaired():
    assert parse(MALFORMED[2], envelope_from=None)["subject"].startswith("Grüße")


def test_text_is_limited():
    raw = crlf("From: a@example.com\nTo: bau@example.org\nMessage-ID: <big@example.com>\n\n") + b"x" * 250_000
    assert len(parse(raw)["text"]) == 200_000


def test_message_ids_accept_bare_ids():
    assert message_ids("<a@b> <c@d>") == ["<a@b>", "<c@d>"]
    assert message_ids("a@b") == ["<a@b>"]
    assert message_ids(None) == []


def test_read_message_does_not_raise_on_nonsense():
    assert read_message(b"\xff\xfe") is not None


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_give_a_valid_message(raw):
    from .conftest import VALIDATOR

    msg = parse(b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n" + raw,
                envelope_from=None, envelope_to=None)
    assert not list(VALIDATOR.iter_errors(msg))


def test_text_declared_base64_but_plain_is_kept_readable(valid):
    raw = crlf(
        """From: max@example.com
To: bau@example.org
Subject: Kaputt
Message-ID: <b64-plain@example.com>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="never-used"
Content-Transfer-Encoding: base64

Baustelle am Lindenweg, bitte melden!
"""
    )
    msg = valid(parse(raw))
    assert msg["text"] == "Baustelle am Lindenweg, bitte melden!"


def test_real_base64_body_is_still_decoded(valid):
    body = base64.encodebytes("Grüße aus der Mühlenstraße\n".encode()).decode()
    raw = crlf(
        "From: max@example.com\nTo: bau@example.org\nSubject: B64\nMessage-ID: <b64@example.com>\nMIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n" + body
    )
    assert valid(parse(raw))["text"] == "Grüße aus der Mühlenstraße"


def test_bounce_refers_to_the_message_it_reports(valid):
    from .test_bounces import POSTFIX_DSN

    msg = valid(parse(POSTFIX_DSN, envelope_from=""))
    assert msg["thread"]["refs"][0] == "<9f2c41d7a0b3e5c8.cr@example.org>"
    assert msg["ack_suppressed"] == "bounce"


def test_an_internationalised_sender_address_is_the_sender():
    """SMTPUTF8 mail (RFC 6531): the address is the person, not ``unknown@invalid``."""
    raw = crlf("""From: Jürgen <jürgen@exämple.de>
To: bau@example.org
Subject: Baustelle
Message-ID: <utf8-1@exämple.de>
Content-Type: text/plain; charset=utf-8

Hallo
""", "utf-8")
    for envelope_from in ("jürgen@exämple.de", None):  # None: over IMAP, or HTTP without X-Envelope-From
        message = parse(raw, envelope_from=envelope_from)
        assert message["sender"]["address"] == "jürgen@exämple.de"
        assert "no_sender" not in message.get("flags", [])
    for broken in ("a b@example.com", "a@b@example.com", "@example.com", "x@"):
        sender = parse(crlf(f"From: {broken}\nTo: bau@example.org\n\nHallo\n"), envelope_from=None)["sender"]
        assert sender["kind"] == "anonymous" and sender["address"].startswith("anonymous:")


def _many_attachments() -> bytes:
    mail = EmailMessage()
    mail["From"] = "Anna <anna@example.net>"
    mail["To"] = "bau@example.org"
    mail["Message-ID"] = "<viele@example.net>"
    mail.set_content("Fotos anbei.")
    mail.add_alternative("<p>Fotos anbei.</p>", subtype="html")
    for n in range(MAX_ATTACHMENTS + 5):
        mail.add_attachment(f"Foto {n % 3}".encode(), maintype="image", subtype="jpeg", filename=f"foto-{n}.jpg")
    return bytes(mail)


def test_parse_mail_returns_the_attachments_it_describes_from_one_walk(valid):
    raw = _many_attachments()
    parsed = parse_mail(read_message(raw), raw, envelope_from=None, envelope_to=None, addresses=ADDRESSES,
                        own_domain="example.org")
    inbound = valid(parsed.inbound)
    assert inbound == parse(raw, envelope_from=None, envelope_to=None)
    assert len(parsed.attachments) == MAX_ATTACHMENTS and inbound["meta"]["attachments_omitted"] == 5
    # one list, in the order of the descriptions: same names, sizes and hashes, duplicates included
    assert [a.describe() for a in parsed.attachments] == inbound["attachments"]
    assert [(a.name, a.data) for a in parsed.attachments] == [(a.name, a.data) for a in attachments(raw)[:MAX_ATTACHMENTS]]
    assert parsed.attachments[0].sha256 == hashlib.sha256(b"Foto 0").hexdigest()


def test_each_header_of_a_mail_is_parsed_once():
    """The stdlib parses a header again on every access; ``read_message`` keeps the parsed one
    (Content-Type alone was parsed some twenty times per mail)."""
    msg = read_message(LATIN1)
    assert msg.get("Content-Type") is msg.get("Content-Type")
    assert msg["From"] is msg["from"]
    assert msg["From"].addresses[0].addr_spec == "Juergen.Mueller@Example.COM"
    part = read_message(_many_attachments()).get_payload()[1]
    assert part.get("Content-Disposition") is part.get("Content-Disposition")
    # one cache per mail: another mail with the same header gets a header of its own
    assert read_message(LATIN1)["From"] is not msg["From"]


@pytest.mark.parametrize("raw", [LATIN1, _many_attachments(), POSTFIX_DSN, *MALFORMED])
def test_the_header_cache_changes_nothing(raw):
    """What the stdlib's own parse gives, exactly (for encoded words labelled with their real
    charset; mislabelled ones read better, see test_encoded_words_get_the_charset_fallback_bodies_get)."""
    options = {"envelope_from": None, "envelope_to": None, "addresses": ADDRESSES, "own_domain": "example.org"}
    plain = BytesParser(policy=policy.default).parsebytes(raw)
    assert parse_mail(read_message(raw), raw, **options).inbound == parse_mail(plain, raw, **options).inbound


# -------------------------------------------------------------------------- the dedupe key

FORM_MAIL = """From: {sender}
To: bau@example.org
Subject: Kontaktformular
Date: {date}
Message-ID: <1@localhost>
Content-Type: text/plain; charset=utf-8

{text}
"""


def form_mail(sender: str, text: str, date: str = "Mon, 30 Nov 2026 09:00:00 +0100") -> bytes:
    return crlf(FORM_MAIL.format(sender=sender, text=text, date=date), "utf-8")


def test_a_message_id_reused_by_another_sender_is_another_mail(valid):
    """Scanners and PHP forms send every mail as <1@localhost>: the core de-duplicates on the
    channel_message_id, and a second resident's mail was answered 250 and dropped."""
    anna = valid(parse(form_mail("Anna <anna@example.net>", "Die Grube ist offen."), envelope_from="anna@example.net"))
    bernd = valid(parse(form_mail("bernd@example.com", "Wasser im Keller!"), envelope_from="bernd@example.com"))
    assert anna["channel_message_id"] != bernd["channel_message_id"]
    assert anna["channel_message_id"].startswith("<1@localhost> ")
    # the bare Message-ID stays the thread key: replies naming it still find the mail
    assert anna["thread_keys"] == bernd["thread_keys"] == ["<1@localhost>"]
    assert anna["raw"]["message_id"] == "<1@localhost>"


def test_the_same_mail_gets_the_same_key_whichever_way_it_comes():
    """Over SMTP (with an envelope), over IMAP (without) or retried: the key is made of the
    mail's own headers only. The same form sending another mail a second later is another mail."""
    raw = form_mail("Anna <Anna@Example.NET>", "Die Grube ist offen.")
    smtp = parse(raw, envelope_from="bounce+123@relay.example.net")
    imap = parse(raw, envelope_from=None, envelope_to=None)
    assert smtp["channel_message_id"] == imap["channel_message_id"] == parse(raw)["channel_message_id"]
    later = parse(form_mail("Anna <anna@example.net>", "Noch etwas.", date="Mon, 30 Nov 2026 09:00:01 +0100"))
    assert later["channel_message_id"] != smtp["channel_message_id"]
    # the same moment written in another zone is the same Date
    same = parse(form_mail("anna@example.net", "Die Grube ist offen.", date="Mon, 30 Nov 2026 08:00:00 +0000"))
    assert same["channel_message_id"] == smtp["channel_message_id"]


def test_a_message_id_too_long_for_the_key_falls_back_to_the_content_hash(valid):
    long_id = "<" + "a" * 500 + "@example.net>"
    raw = crlf(f"From: a@example.com\nTo: bau@example.org\nMessage-ID: {long_id}\n\nText\n")
    msg = valid(parse(raw))
    assert msg["channel_message_id"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert msg["thread_keys"] == [long_id]


# -------------------------------------------------------------------------- mail without a sender


def test_mails_without_a_sender_are_each_someone_unreachable(valid):
    """Filed under one contact ``unknown@invalid`` they were threaded together and acknowledged
    to that address through the relay. ``anonymous`` is the kind the core never acknowledges."""
    first = valid(parse(crlf("To: bau@example.org\nMessage-ID: <nofrom-1@example.com>\n\nErste Person.\n"),
                        envelope_from=None))
    second = valid(parse(crlf("To: bau@example.org\nMessage-ID: <nofrom-2@example.com>\n\nZweite Person.\n"),
                         envelope_from=None))
    for msg in (first, second):
        assert msg["sender"]["kind"] == "anonymous"
        assert msg["sender"]["address"].startswith("anonymous:email-")
        assert "no_sender" in msg["flags"]
    assert first["sender"]["address"] != second["sender"]["address"]
    # an envelope sender is somebody
    enveloped = parse(crlf("To: bau@example.org\nMessage-ID: <nofrom-3@example.com>\n\nHallo\n"), envelope_from="x@example.net")
    assert enveloped["sender"] == {"kind": "email", "address": "x@example.net", "display_name": None}


# -------------------------------------------------------------------------- text around inline images

APPLE_MAIL = crlf(
    """From: Jürgen Müller <juergen@example.com>
To: bau@example.org
Subject: Foto vom Loch
Message-ID: <apple-1@example.com>
Mime-Version: 1.0 (Mac OS X Mail 16.0)
Content-Type: multipart/mixed; boundary="Apple-Mail=_1"

--Apple-Mail=_1
Content-Transfer-Encoding: 7bit
Content-Type: text/plain; charset=us-ascii

Guten Tag, hier das Foto:

--Apple-Mail=_1
Content-Disposition: inline; filename=IMG_0001.jpg
Content-Type: image/jpeg; name="IMG_0001.jpg"
Content-Transfer-Encoding: base64

/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAP//////////////////////////////////////////////////////////////////////////////////////wgALCAABAAEBAREA/8QAFBABAAAAAAAAAAAAAAAAAAAAAP/aAAgBAQABPxA=

--Apple-Mail=_1
Content-Transfer-Encoding: quoted-printable
Content-Type: text/plain; charset=utf-8

Das Loch ist seit drei Wochen offen, mein Kind ist gestern hineingefallen.=20
Bitte sofort absichern! Tel. 0123 456789

--Apple-Mail=_1--
""",
    "utf-8",
)


def test_text_after_an_inline_image_is_kept(valid):
    """Apple Mail: text, an inline image and more text as parts of a multipart/mixed. Only the
    first text was read, and what the resident wrote below the photo was lost."""
    msg = valid(parse(APPLE_MAIL))
    assert msg["text"] == ("Guten Tag, hier das Foto:\n\nDas Loch ist seit drei Wochen offen, mein Kind ist gestern "
                           "hineingefallen. \nBitte sofort absichern! Tel. 0123 456789")
    assert [a["name"] for a in msg["attachments"]] == ["IMG_0001.jpg"]
    assert "html" not in msg["meta"]


def mime(structure: str) -> bytes:
    return crlf("From: a@example.com\nTo: bau@example.org\nMessage-ID: <mime@example.com>\nMIME-Version: 1.0\n" + structure,
                "utf-8")


def test_alternatives_give_one_text_and_mixed_parts_all(valid):
    raw = mime("""Content-Type: multipart/mixed; boundary="m"

--m
Content-Type: multipart/alternative; boundary="a"

--a
Content-Type: text/plain; charset=utf-8

Erster Teil.
--a
Content-Type: text/html; charset=utf-8

<p>Erster Teil.</p>
--a--
--m
Content-Type: image/png
Content-Disposition: inline

PNG
--m
Content-Type: multipart/alternative; boundary="b"

--b
Content-Type: text/plain; charset=utf-8


--b
Content-Type: text/html; charset=utf-8

<p>Zweiter Teil, <b>nur</b> als HTML.</p>
--b--
--m
Content-Type: text/plain; charset=utf-8; name="notiz.txt"
Content-Disposition: attachment; filename="notiz.txt"

Eine angehängte Datei ist kein Text der Mail.
--m--
""")
    msg = valid(parse(raw))
    assert msg["text"] == "Erster Teil.\n\nZweiter Teil, nur als HTML."
    assert msg["meta"]["html"] is True
    assert [a["name"] for a in msg["attachments"]] == [None, "notiz.txt"]


def test_plain_and_html_side_by_side_in_a_mixed_are_read_once():
    """Some mailers put both forms in a multipart/mixed instead of a multipart/alternative."""
    raw = mime("""Content-Type: multipart/mixed; boundary="m"

--m
Content-Type: text/plain; charset=utf-8

Die Grube ist offen.
--m
Content-Type: text/html; charset=utf-8

<p>Die Grube ist offen.</p>
--m--
""")
    assert parse(raw)["text"] == "Die Grube ist offen."


# -------------------------------------------------------------------------- encoded words


def test_encoded_words_get_the_charset_fallback_bodies_get(valid):
    """UTF-8 under an iso-8859-1 label gave mojibake, Latin-1 under utf-8 U+FFFD."""
    raw = crlf(
        """From: =?iso-8859-1?Q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.com>
To: bau@example.org
Subject: =?utf-8?Q?Stra=DFensperrung_M=FChlenweg?=
Message-ID: <ew-1@example.com>
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: 8bit

Gr\xc3\xbc\xc3\x9fe
""",
        "latin-1",
    )
    msg = valid(parse(raw))
    assert msg["text"] == "Grüße"
    assert msg["sender"] == {"kind": "email", "address": "juergen@example.com", "display_name": "Jürgen Müller"}
    assert msg["subject"] == "Straßensperrung Mühlenweg"
    assert msg["raw"]["headers"]["Subject"] == "Straßensperrung Mühlenweg"


def test_encoded_words_beside_unencoded_8bit_text_are_decoded(valid):
    """A header with raw UTF-8 or Latin-1 and encoded words at once (a mailer that writes its own
    "AW:" or a list's tag unencoded before the encoded subject it answers): the raw bytes were
    repaired, and the encoded words left as they were, "=?utf-8?q?...?=" for staff to read."""
    for charset in ("utf-8", "latin-1"):
        raw = crlf(
            """From: J\xfcrgen =?utf-8?q?Wei=C3=9F-=C3=96zt=C3=BCrk?= <juergen@example.com>
To: bau@example.org
Subject: AW: [B\xfcrgerverein] =?utf-8?q?Stra=C3=9Fe_gesperrt_=E2=80=93?=
 =?utf-8?q?_Zufahrt_f=C3=BCr_M=C3=BCllabfuhr=3F_=F0=9F=9A=A7?= (Baustelle)
Message-ID: <ew-8bit@example.com>
Content-Type: text/plain; charset=utf-8

Hallo
""",
            charset,
        )
        msg = valid(parse(raw))
        subject = "AW: [Bürgerverein] Straße gesperrt – Zufahrt für Müllabfuhr? 🚧 (Baustelle)"
        assert msg["subject"] == subject, charset
        assert msg["raw"]["headers"]["Subject"] == subject
        assert msg["sender"]["display_name"] == "Jürgen Weiß-Öztürk"
    # an unreadable word stays as written; text that only looks like a word is not one
    raw = crlf("From: a@example.com\nSubject: Gr\xfc\xdfe =?utf-8?b?@@@?= a=?b\n\nx", "latin-1")
    assert parse(raw)["subject"] == "Grüße =?utf-8?b?@@@?= a=?b"


def test_encoded_words_split_inside_a_character_and_unreadable_ones():
    # one UTF-8 character split between two words, as some clients do
    assert str(read_message(crlf("Subject: =?utf-8?q?Gr=C3?= =?utf-8?q?=BC=C3=9Fe?=\n\nx"))["Subject"]) == "Grüße"
    assert utf8_encoded_words("=?utf-8?b?@@@?= Rest") == "=?utf-8?b?@@@?= Rest"  # left to the standard library
    assert utf8_encoded_words("kein Wort") == "kein Wort"
    # correctly labelled words read as before
    assert str(read_message(LATIN1)["Subject"]) == "Baustelle vor meinem Haus in der Musterstraße"


# -------------------------------------------------------------------------- attribution lines


def test_the_residents_own_sentence_with_a_date_is_not_an_attribution():
    """ "am 12.05. schrieb ich Ihnen bereits wegen folgender Punkte:" hid the points (and the
    rest of the mail) as quoted history."""
    body = ("Sehr geehrte Damen und Herren,\n\nam 12.05. schrieb ich Ihnen bereits wegen folgender Punkte:\n"
            "- Die Grube ist offen\n- Das Wasser läuft in den Keller\n\nBitte melden Sie sich.\nMax")
    assert split_reply(body) == (body, None, None)
    english = "Hello,\n\nOn 3 May at 9 I wrote:\nThe pit is open.\n\nBob"
    assert split_reply(english) == (english, None, None)


@pytest.mark.parametrize("follows", [
    "> Ihre Anfrage ist eingegangen.",
    "\n\n> Ihre Anfrage ist eingegangen.",
    "-----Ursprüngliche Nachricht-----\nVon: Bauhotline",
    "Von: Bauhotline <bau@example.org>\nGesendet: Freitag, 3. Mai 2024 10:15\nBetreff: Ihre Anfrage",
])
def test_an_attribution_counts_when_quoted_history_follows(follows):
    text, quoted, _ = split_reply(f"Danke!\n\nAm 03.05.2024 um 10:15 schrieb Bauhotline <bau@example.org>:\n{follows}")
    assert text == "Danke!"
    assert quoted.startswith("Am 03.05.2024 um 10:15 schrieb Bauhotline")


def test_an_attribution_without_quoted_history_after_it_is_text():
    """A third person's words, even: only quoted history makes it an attribution."""
    body = "Guten Tag,\n\nAm 12.05. schrieb Herr Maier vom Bauamt:\nDie Grube wird bis Freitag geschlossen.\n\nStimmt das?"
    assert split_reply(body) == (body, None, None)


@pytest.mark.parametrize("sender", ["Info@XN--MLLER-BAU-Q9A.de", "info@Müller-Bau.de"])
def test_the_senders_internationalised_domain_is_given_in_one_form(sender, valid):
    """The core keeps one form of an address; the channel's own count of acknowledgements per
    address (``ack_per_hour``) must count the one mailbox once, whichever form it wrote."""
    raw = f"From: Bau GmbH <{sender}>\r\nTo: bau@example.org\r\nSubject: Test\r\nMessage-ID: <i@x.de>\r\n\r\nHallo\r\n"
    msg = valid(parse(raw.encode()))
    assert msg["sender"]["address"] == "info@müller-bau.de"


def test_reply_to_does_not_replace_the_sender():
    """The sender is who the From names; a Reply-To elsewhere is kept for staff beside it."""
    raw = crlf("From: Max Muster <max@example.com>\nReply-To: sekretariat@example.net\nTo: bau@example.org\n"
               "Message-ID: <rt@example.com>\nSubject: Frage\n\nHallo\n")
    msg = parse(raw)
    assert msg["sender"]["address"] == "max@example.com"
    assert msg["sender"]["display_name"] == "Max Muster"
    assert msg["meta"]["reply_to"] == "sekretariat@example.net"


def test_a_mail_referencing_its_own_message_id_does_not_thread_to_itself():
    raw = crlf("From: max@example.com\nTo: bau@example.org\nMessage-ID: <self@example.com>\n"
               "References: <self@example.com> <ack-1@example.org>\nSubject: Frage\n\nHallo\n")
    assert parse(raw)["thread"]["refs"] == ["<ack-1@example.org>"]


def test_reply_to_equal_to_the_sender_is_not_noted():
    raw = crlf("From: max@example.com\nReply-To: Max@Example.com\nTo: bau@example.org\n"
               "Message-ID: <rt2@example.com>\nSubject: Frage\n\nHallo\n")
    assert "reply_to" not in parse(raw)["meta"]


def test_a_bounce_threads_first_to_the_message_it_reports():
    """The reported message decides the conversation, before any other reference the bounce carries."""
    raw = POSTFIX_DSN.replace(b"Message-ID: <20240503101530.AB12C3D4E5@mx.example.org>\r\n",
                              b"Message-ID: <20240503101530.AB12C3D4E5@mx.example.org>\r\n"
                              b"In-Reply-To: <elsewhere@example.com>\r\n")
    msg = parse(raw, envelope_from="")
    assert msg["thread"]["refs"] == ["<9f2c41d7a0b3e5c8.cr@example.org>", "<elsewhere@example.com>"]


def test_recipient_from_delivered_to_before_to_and_cc_when_envelope_unknown():
    """A mail to one of our addresses forwarded into another's mailbox belongs where it was delivered."""
    raw = crlf("Delivered-To: bau@example.org\nFrom: a@example.com\nTo: service@example.org\n"
               "Message-ID: <dt@example.com>\n\nHallo\n")
    msg = parse(raw, envelope_to=None, envelope_from=None)
    assert msg["recipient"] == "bau@example.org" and msg["unit_hint"] == "bauhotline"
