"""TwiML answers for the call flow, built as XML (never by string pasting) in German by default.

greeting and menu -> forward to the unit, or voicemail (case reference, call-back time, record)
-> thanks and goodbye. Every spoken answer carries its ``language`` (``de-DE``; ``en-GB`` once the
caller pressed the English key), so Twilio's speech engine reads it right.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, tzinfo

VOICE_LANGUAGES = {"de": "de-DE", "en": "en-GB"}

TOPIC_LABELS: dict[str, dict[str, str]] = {
    "construction": {"de": "Fragen zu Bauarbeiten", "en": "construction works"},
    "contract": {"de": "Ihren Anschluss oder Vertrag", "en": "your connection or contract"},
    "fault": {"de": "eine Störung", "en": "a fault"},
    "other": {"de": "alle anderen Anliegen", "en": "anything else"},
}

TEXTS: dict[str, dict[str, str]] = {
    "de": {
        "welcome": "Guten Tag, Sie sind verbunden mit {company}.",
        "welcome_plain": "Guten Tag und herzlich willkommen.",
        "menu_item": "Für {label} drücken Sie die {digit}.",
        "english": "For English, please press {digit}.",
        "withheld_hint": "Ihre Rufnummer wird nicht übertragen. Wenn Sie uns eine Nachricht hinterlassen, "
        "nennen Sie darin bitte eine Nummer für unseren Rückruf.",
        "connecting": "Einen Moment bitte, wir verbinden Sie.",
        "screen": "Anruf über die Hotline{about}. Drücken Sie die 1, um ihn anzunehmen.",
        "screen_about": " zu Vorgang {reference}",
        "reference": "Ihre Vorgangsnummer lautet: {reference}. Ich wiederhole: {reference}.",
        "callback_by": "Wir rufen Sie bis {when} zurück.",
        "callback_soon": "Wir rufen Sie so bald wie möglich zurück.",
        "withheld_record": "Ihre Rufnummer wird nicht übertragen. Bitte nennen Sie in Ihrer Nachricht eine "
        "Nummer, unter der wir Sie zurückrufen können.",
        "other_channels": "Sie erreichen uns auch per WhatsApp, per E-Mail oder über das Kontaktformular "
        "auf unserer Internetseite.",
        "record": "Bitte sprechen Sie nach dem Signalton Ihren Namen, Ihre Adresse und Ihr Anliegen. "
        "Zum Beenden drücken Sie die Rautetaste oder legen einfach auf.",
        "thanks": "Vielen Dank für Ihre Nachricht.",
        "goodbye": "Auf Wiederhören.",
        "today": "heute um {time} Uhr{clock}",
        "tomorrow": "morgen um {time} Uhr{clock}",
        "date": "{weekday}, den {day}. {month}, um {time} Uhr{clock}",
        "summer_time": "Sommerzeit",
        "standard_time": "Winterzeit",
        "utc_offset": "UTC {sign} {offset}",
        "plus": "plus",
        "minus": "minus",
    },
    "en": {
        "welcome": "Hello, you are through to {company}.",
        "welcome_plain": "Hello and welcome.",
        "menu_item": "For {label}, press {digit}.",
        "english": "For English, please press {digit}.",
        "withheld_hint": "Your number is withheld. If you leave us a message, please tell us a number "
        "we can call you back on.",
        "connecting": "One moment please, we are putting you through.",
        "screen": "A call through the hotline{about}. Press 1 to take it.",
        "screen_about": " about case {reference}",
        "reference": "Your case reference is: {reference}. Once again: {reference}.",
        "callback_by": "We will call you back by {when}.",
        "callback_soon": "We will call you back as soon as we can.",
        "withheld_record": "Your number is withheld. Please tell us in your message a number we can "
        "call you back on.",
        "other_channels": "You can also reach us on WhatsApp, by e-mail or through the contact form "
        "on our website.",
        "record": "Please tell us your name, your address and your request after the tone. "
        "Press the hash key or simply hang up when you are done.",
        "thanks": "Thank you for your message.",
        "goodbye": "Goodbye.",
        "today": "today at {time}{clock}",
        "tomorrow": "tomorrow at {time}{clock}",
        "date": "{weekday} {day} {month} at {time}{clock}",
        "summer_time": "summer time",
        "standard_time": "standard time",
        "utc_offset": "UTC {sign} {offset}",
        "plus": "plus",
        "minus": "minus",
    },
}

WEEKDAYS = {
    "de": ["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"],
    "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
}
MONTHS = {
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September",
           "Oktober", "November", "Dezember"],
    "en": ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"],
}


Voice = str | Mapping[str, str] | None
"""A ``<Say>`` voice: a name for the German texts, or names by language."""


def _lang(language: str) -> str:
    return language if language in TEXTS else "de"


def _text(language: str, key: str, **values: object) -> str:
    return TEXTS[_lang(language)][key].format(**values)


def _document(root: ET.Element) -> str:
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="unicode")


def _say(parent: ET.Element, text: str, language: str, voice: Voice) -> ET.Element:
    """``voice``: a name for the German texts, or names by language (``PhoneSettings.voice``).
    A voice speaks one language: the German one read the English menu with a German accent, and
    Twilio may refuse a voice with another language."""
    lang = _lang(language)
    say = ET.SubElement(parent, "Say", language=VOICE_LANGUAGES[lang])
    chosen = voice.get(lang) if isinstance(voice, Mapping) else (voice if lang == "de" else None)
    if chosen:
        say.set("voice", chosen)
    say.text = text
    return say


def spell_reference(reference: str) -> str:
    """A case reference as single characters for speech: ``K-7F3QX2`` -> ``K, 7, F, 3, Q, X, 2``."""
    return ", ".join(char for char in reference if char.isalnum())


def format_callback_time(deadline: datetime, language: str, zone: tzinfo, now: datetime | None = None) -> str:
    """The call-back deadline as people say it, in local time: ``heute um 16:30 Uhr``; in the
    hour the clocks go back, which comes twice, with which of the two it is (``clock_name``)."""
    lang = _lang(language)
    local = deadline.astimezone(zone)
    time = local.strftime("%H:%M")
    name = clock_name(local, lang)
    clock = f" {name}" if name else ""
    if now is not None:
        days = (local.date() - now.astimezone(zone).date()).days
        if days == 0:
            return _text(lang, "today", time=time, clock=clock)
        if days == 1:
            return _text(lang, "tomorrow", time=time, clock=clock)
    return _text(
        lang, "date", weekday=WEEKDAYS[lang][local.weekday()], day=local.day,
        month=MONTHS[lang][local.month - 1], time=time, clock=clock,
    )


def clock_name(local: datetime, language: str) -> str | None:
    """For a time in the hour the clocks go back (``local``: aware, in its zone), which of the
    two moments that show it is meant, in words a voice reads well: ``Sommerzeit`` or
    ``Winterzeit`` (``summer time``, ``standard time``); where the clocks went back without
    leaving summer time, the offset (``UTC plus 3``). None at any other time, which the clocks
    show once. A text writes the offset instead (``(UTC+1)``, ``router.templates``)."""
    other = local.replace(fold=1 - local.fold)
    if other.utcoffset() == local.utcoffset():
        return None
    summer, other_summer = local.dst(), other.dst()
    if summer is not None and other_summer is not None and summer != other_summer:
        # The larger of the two is summer time (Ireland's winter time is a negative one).
        return _text(language, "summer_time" if summer > other_summer else "standard_time")
    minutes = int((local.utcoffset() or timedelta(0)).total_seconds() // 60)
    hours, rest = divmod(abs(minutes), 60)
    return _text(language, "utc_offset", sign=_text(language, "minus" if minutes < 0 else "plus"),
                 offset=f"{hours}:{rest:02d}" if rest else str(hours))


def callback_promise(deadline: datetime | None, language: str, zone: tzinfo, now: datetime) -> str | None:
    """The call-back time to speak (``format_callback_time``), or None when there is none to
    promise: no deadline, or one that has passed. A resident who calls again about an overdue
    case heard "we will call you back by today at 17:00" at 20:00; with None the voicemail says
    "as soon as possible" (``callback_soon``) instead."""
    if deadline is None or deadline <= now:
        return None
    return format_callback_time(deadline, language, zone, now)


def topic_label(topic: str, language: str, labels: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """What the menu calls a topic: configured labels first, then the built-in ones, else its id."""
    for table in (labels or {}, TOPIC_LABELS):
        entry = table.get(topic)
        if entry and (entry.get(_lang(language)) or entry.get("de")):
            return entry.get(_lang(language)) or entry["de"]
    return topic


def greeting_menu(
    *,
    action_url: str,
    menu: Sequence[tuple[str, str]],
    language: str = "de",
    english_digit: str | None = "9",
    company: str | None = None,
    withheld: bool = False,
    labels: Mapping[str, Mapping[str, str]] | None = None,
    voice: Voice = None,
    timeout: int = 6,
) -> str:
    """The greeting and a one-digit menu; no key at all continues to ``action_url`` without one.

    ``menu`` lists ``(digit, topic)`` pairs in the order spoken. The English hint is spoken in
    English, and only in the German menu.
    """
    root = ET.Element("Response")
    gather = ET.SubElement(
        root, "Gather", numDigits="1", action=action_url, method="POST", timeout=str(timeout)
    )
    parts = [_text(language, "welcome", company=company) if company else _text(language, "welcome_plain")]
    if withheld:
        parts.append(_text(language, "withheld_hint"))
    for digit, topic in menu:
        parts.append(_text(language, "menu_item", label=topic_label(topic, language, labels), digit=digit))
    _say(gather, " ".join(parts), language, voice)
    if english_digit and _lang(language) == "de":
        _say(gather, _text("en", "english", digit=english_digit), "en", voice)  # the English voice, if one is set
    redirect = ET.SubElement(root, "Redirect", method="POST")
    redirect.text = action_url
    return _document(root)


def forward(
    number: str,
    *,
    action_url: str,
    screen_url: str | None = None,
    timeout: int = 20,
    language: str = "de",
    caller_id: str | None = None,
    voice: Voice = None,
) -> str:
    """Put the caller through to ``number``; ``action_url`` learns whether anyone answered.
    With ``screen_url``, whoever picks up there hears ``screen`` first and takes the call by
    pressing 1: a mailbox or an announcement that picks up takes nothing."""
    root = ET.Element("Response")
    _say(root, _text(language, "connecting"), language, voice)
    dial = ET.SubElement(root, "Dial", timeout=str(timeout), action=action_url, method="POST")
    if caller_id:
        dial.set("callerId", caller_id)
    target = ET.SubElement(dial, "Number")
    if screen_url:
        target.set("url", screen_url)
        target.set("method", "POST")
    target.text = number
    return _document(root)


def screen(*, action_url: str, case_reference: str | None = None, language: str = "de", voice: Voice = None,
           timeout: int = 8) -> str:
    """What the person a call is put through to hears when they pick up: the call, its case,
    and 1 to take it. Nothing pressed (a mailbox, an announcement): this leg hangs up, and the
    caller is not connected to it."""
    root = ET.Element("Response")
    gather = ET.SubElement(root, "Gather", numDigits="1", action=action_url, method="POST", timeout=str(timeout))
    about = _text(language, "screen_about", reference=spell_reference(case_reference)) if case_reference else ""
    _say(gather, _text(language, "screen", about=about), language, voice)
    ET.SubElement(root, "Hangup")
    return _document(root)


def screened(accepted: bool) -> str:
    """The answer to the screen's key: nothing more (Twilio then connects the two), or hang up."""
    root = ET.Element("Response")
    if not accepted:
        ET.SubElement(root, "Hangup")
    return _document(root)


def voicemail(
    *,
    action_url: str,
    transcribe_callback_url: str,
    case_reference: str | None = None,
    callback_by: str | None = None,
    max_length: int = 120,
    language: str = "de",
    withheld: bool = False,
    other_channels: str | None = None,
    voice: Voice = None,
) -> str:
    """Tell the case reference and the call-back time, then record a message with transcription.

    ``callback_by`` is already worded (``format_callback_time``). For a withheld number the
    caller is asked to say a number and told the other ways to reach us.
    """
    root = ET.Element("Response")
    parts = []
    if case_reference:
        parts.append(_text(language, "reference", reference=spell_reference(case_reference)))
    parts.append(_text(language, "callback_by", when=callback_by) if callback_by else _text(language, "callback_soon"))
    if withheld:
        parts.append(_text(language, "withheld_record"))
        parts.append(other_channels or _text(language, "other_channels"))
    parts.append(_text(language, "record"))
    _say(root, " ".join(parts), language, voice)
    ET.SubElement(
        root,
        "Record",
        action=action_url,
        method="POST",
        maxLength=str(max_length),
        finishOnKey="#",
        playBeep="true",
        transcribe="true",
        transcribeCallback=transcribe_callback_url,
    )
    # Reached only when Record ends without calling its action (nothing recorded).
    _say(root, _text(language, "goodbye"), language, voice)
    ET.SubElement(root, "Hangup")
    return _document(root)


def goodbye(language: str = "de", *, thanks: bool = True, voice: Voice = None) -> str:
    """Thank the caller (after a voicemail) and hang up."""
    root = ET.Element("Response")
    text = _text(language, "goodbye")
    if thanks:
        text = _text(language, "thanks") + " " + text
    _say(root, text, language, voice)
    ET.SubElement(root, "Hangup")
    return _document(root)


def hangup(language: str = "de", voice: Voice = None) -> str:
    """Say goodbye and end the call."""
    return goodbye(language, thanks=False, voice=voice)


def empty() -> str:
    """An answer that does nothing: for callbacks (SMS in, statuses, transcripts) that need a 200."""
    return _document(ET.Element("Response"))
