from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from plugins.phone import twiml

MENU = [("1", "construction"), ("2", "contract"), ("3", "fault"), ("0", "other")]
ACTION = "https://example.org/channels/phone/twilio/menu?lang=de&topic=a&b"


def parsed(document: str) -> ET.Element:
    assert document.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(document)
    assert root.tag == "Response"
    return root


SPOKEN = {
    "greeting_menu": lambda **kw: twiml.greeting_menu(action_url=ACTION, menu=MENU, **kw),
    "forward": lambda **kw: twiml.forward("+4930111111", action_url=ACTION, **kw),
    "voicemail": lambda **kw: twiml.voicemail(action_url=ACTION, transcribe_callback_url=ACTION, **kw),
    "goodbye": lambda **kw: twiml.goodbye(**kw),
    "hangup": lambda **kw: twiml.hangup(**kw),
}


@pytest.mark.parametrize("name", SPOKEN)
def test_every_spoken_answer_parses_and_speaks_german_by_default(name):
    root = parsed(SPOKEN[name]())
    says = root.iter("Say")
    first = next(says)
    assert first.get("language") == "de-DE"
    assert first.text


@pytest.mark.parametrize("name", SPOKEN)
def test_every_spoken_answer_speaks_english_when_asked(name):
    root = parsed(SPOKEN[name](language="en"))
    assert {say.get("language") for say in root.iter("Say")} == {"en-GB"}


def test_menu_gathers_one_digit_names_each_topic_and_offers_english_in_english():
    root = parsed(twiml.greeting_menu(action_url=ACTION, menu=MENU, company="Stadtwerke Muster"))
    gather = root.find("Gather")
    assert gather.get("numDigits") == "1"
    assert gather.get("action") == ACTION  # the ampersands were escaped and survive
    german, english = gather.findall("Say")
    assert "Stadtwerke Muster" in german.text
    for digit in ("1", "2", "3", "0"):
        assert f"die {digit}." in german.text
    assert "Bauarbeiten" in german.text and "Störung" in german.text
    assert english.get("language") == "en-GB" and "9" in english.text
    assert root.find("Redirect").text == ACTION


def test_english_menu_has_no_english_hint_and_configured_labels_win():
    labels = {"construction": {"en": "digging in your street"}}
    root = parsed(twiml.greeting_menu(action_url=ACTION, menu=MENU, language="en", labels=labels))
    says = root.find("Gather").findall("Say")
    assert len(says) == 1
    assert "For digging in your street, press 1." in says[0].text


def test_withheld_greeting_asks_for_a_number():
    text = parsed(twiml.greeting_menu(action_url=ACTION, menu=MENU, withheld=True)).find("Gather/Say").text
    assert "Rufnummer wird nicht übertragen" in text


def test_forward_dials_the_number_with_timeout_and_action():
    root = parsed(twiml.forward("+4930111111", action_url=ACTION, timeout=25))
    dial = root.find("Dial")
    assert dial.get("timeout") == "25"
    assert dial.get("action") == ACTION
    assert dial.find("Number").text == "+4930111111"


def test_voicemail_tells_reference_and_time_then_records_with_transcription():
    root = parsed(
        twiml.voicemail(
            action_url=ACTION, transcribe_callback_url="https://example.org/t", case_reference="K-7F3QX2",
            callback_by="heute um 16:30 Uhr", max_length=90,
        )
    )
    text = root.find("Say").text
    assert "K, 7, F, 3, Q, X, 2" in text
    assert "bis heute um 16:30 Uhr zurück" in text
    record = root.find("Record")
    assert record.get("maxLength") == "90"
    assert record.get("transcribe") == "true"
    assert record.get("transcribeCallback") == "https://example.org/t"
    assert record.get("action") == ACTION
    assert "WhatsApp" not in text


def test_voicemail_without_reference_or_deadline_still_promises_a_call_back():
    text = parsed(twiml.voicemail(action_url=ACTION, transcribe_callback_url=ACTION)).find("Say").text
    assert "so bald wie möglich" in text
    assert "Vorgangsnummer" not in text


def test_withheld_voicemail_asks_for_a_number_and_names_other_channels():
    text = parsed(
        twiml.voicemail(action_url=ACTION, transcribe_callback_url=ACTION, withheld=True)
    ).find("Say").text
    assert "Nummer, unter der wir Sie zurückrufen können" in text
    assert "WhatsApp" in text and "E-Mail" in text and "Kontaktformular" in text


def test_hangup_ends_the_call():
    assert parsed(twiml.hangup()).find("Hangup") is not None


def test_empty_answer_does_nothing():
    assert len(parsed(twiml.empty())) == 0


def test_spell_reference():
    assert twiml.spell_reference("K-7F3QX2") == "K, 7, F, 3, Q, X, 2"


BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2025, 5, 13, 8, 0, tzinfo=UTC)  # a Tuesday, 10:00 in Berlin


@pytest.mark.parametrize(
    ("deadline", "language", "spoken"),
    [
        (datetime(2025, 5, 13, 14, 30, tzinfo=UTC), "de", "heute um 16:30 Uhr"),
        (datetime(2025, 5, 14, 7, 0, tzinfo=UTC), "de", "morgen um 09:00 Uhr"),
        (datetime(2025, 5, 16, 7, 0, tzinfo=UTC), "de", "Freitag, den 16. Mai, um 09:00 Uhr"),
        (datetime(2025, 5, 16, 7, 0, tzinfo=UTC), "en", "Friday 16 May at 09:00"),
        (datetime(2025, 5, 13, 22, 30, tzinfo=UTC), "de", "morgen um 00:30 Uhr"),  # local date counts
    ],
)
def test_callback_time_in_local_words(deadline, language, spoken):
    assert twiml.format_callback_time(deadline, language, BERLIN, NOW) == spoken


NIGHT = datetime(2026, 10, 24, 22, 0, tzinfo=UTC)  # Sunday 00:00 in Berlin, the night the clocks go back


@pytest.mark.parametrize(
    ("deadline", "language", "spoken"),
    [
        # 02:00-03:00 comes twice: first in summer time (UTC+2), then in standard time (UTC+1).
        (datetime(2026, 10, 25, 0, 30, tzinfo=UTC), "de", "heute um 02:30 Uhr Sommerzeit"),
        (datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "de", "heute um 02:30 Uhr Winterzeit"),
        (datetime(2026, 10, 25, 0, 0, tzinfo=UTC), "de", "heute um 02:00 Uhr Sommerzeit"),
        (datetime(2026, 10, 25, 1, 59, tzinfo=UTC), "de", "heute um 02:59 Uhr Winterzeit"),
        (datetime(2026, 10, 25, 0, 30, tzinfo=UTC), "en", "today at 02:30 summer time"),
        (datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "en", "today at 02:30 standard time"),
        # Before and after that hour, and on the night the clocks go forward: one time, no words.
        (datetime(2026, 10, 24, 23, 59, tzinfo=UTC), "de", "heute um 01:59 Uhr"),
        (datetime(2026, 10, 25, 2, 0, tzinfo=UTC), "de", "heute um 03:00 Uhr"),
        (datetime(2026, 3, 29, 1, 30, tzinfo=UTC), "de", "Sonntag, den 29. März, um 03:30 Uhr"),
    ],
)
def test_a_call_back_time_in_the_hour_the_clocks_repeat_says_which_of_the_two_it_is(deadline, language, spoken):
    """"heute um 02:30 Uhr" on the night the clocks go back named two moments an hour apart,
    and the caller could not tell which: the acknowledgement's text writes the offset, a voice
    says summer or standard time."""
    assert twiml.format_callback_time(deadline, language, BERLIN, NIGHT) == spoken


def test_the_repeated_hour_is_told_in_every_wording_of_a_call_back_time():
    """Today, tomorrow and a date alike, in German and English."""
    second = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)
    assert twiml.format_callback_time(second, "de", BERLIN, NIGHT - timedelta(days=1)) == "morgen um 02:30 Uhr Winterzeit"
    assert twiml.format_callback_time(second, "en", BERLIN, NIGHT - timedelta(days=1)) == "tomorrow at 02:30 standard time"
    assert twiml.format_callback_time(second, "de", BERLIN, NIGHT - timedelta(days=3)) == (
        "Sonntag, den 25. Oktober, um 02:30 Uhr Winterzeit")
    assert twiml.format_callback_time(second, "en", BERLIN) == "Sunday 25 October at 02:30 standard time"
    # Clocks that go back without leaving summer time (Moscow's, for good, in October 2014):
    # the offset, in words a voice reads.
    moscow, evening = ZoneInfo("Europe/Moscow"), datetime(2014, 10, 25, 20, 0, tzinfo=UTC)
    assert twiml.format_callback_time(datetime(2014, 10, 25, 21, 30, tzinfo=UTC), "en", moscow, evening) == (
        "today at 01:30 UTC plus 4")
    assert twiml.format_callback_time(datetime(2014, 10, 25, 22, 30, tzinfo=UTC), "de", moscow, evening) == (
        "heute um 01:30 Uhr UTC plus 3")


def test_a_deadline_in_the_future_is_promised():
    assert twiml.callback_promise(datetime(2025, 5, 13, 14, 30, tzinfo=UTC), "de", BERLIN, NOW) == "heute um 16:30 Uhr"


@pytest.mark.parametrize(
    "deadline",
    [None, NOW, datetime(2025, 5, 13, 7, 0, tzinfo=UTC), datetime(2025, 5, 10, 15, 0, tzinfo=UTC)],
    ids=["none", "now", "an-hour-ago", "days-ago"],
)
def test_a_passed_deadline_is_not_promised_and_the_voicemail_says_as_soon_as_possible(deadline):
    assert twiml.callback_promise(deadline, "de", BERLIN, NOW) is None
    text = parsed(twiml.voicemail(action_url=ACTION, transcribe_callback_url=ACTION, callback_by=None)).find("Say").text
    assert "so bald wie möglich" in text and " um " not in text


def test_a_voice_speaks_only_its_own_language():
    """The one voice (the docs' German Polly.Vicki) read the English menu, voicemail prompt and
    goodbye too: German-accented English, or a <Say> Twilio refuses."""
    def voices(document: str) -> list[tuple[str, str | None]]:
        return [(say.get("language"), say.get("voice")) for say in parsed(document).iter("Say")]

    menu = dict(action_url=ACTION, menu=[("1", "construction")], english_digit="9")
    assert voices(twiml.greeting_menu(language="de", voice="Polly.Vicki", **menu)) == [("de-DE", "Polly.Vicki"), ("en-GB", None)]
    assert voices(twiml.greeting_menu(language="en", voice="Polly.Vicki", **menu)) == [("en-GB", None)]
    assert voices(twiml.goodbye("en", voice="Polly.Vicki")) == [("en-GB", None)]
    both = {"de": "Polly.Vicki", "en": "Polly.Amy"}
    assert voices(twiml.greeting_menu(language="de", voice=both, **menu)) == [("de-DE", "Polly.Vicki"), ("en-GB", "Polly.Amy")]
    assert voices(twiml.goodbye("en", voice=both)) == [("en-GB", "Polly.Amy")]
    assert voices(twiml.goodbye("de", voice={"en": "Polly.Amy"})) == [("de-DE", None)]
