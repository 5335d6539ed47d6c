"""Phone numbers as the core wants them: E.164, one identity shared by calls, SMS and WhatsApp.

Withheld numbers arrive in many spellings (Twilio's ``+266696687`` spells ANONYMOUS on a keypad,
PBXs send ``anonymous`` or nothing); they all become "no number" instead of a bogus identity.
"""

from __future__ import annotations

import re

import phonenumbers

WITHHELD = frozenset(
    {
        "",
        "anonymous",
        "restricted",
        "unknown",
        "private",
        "unavailable",
        "withheld",
        "blocked",
        "+266696687",  # ANONYMOUS
        "266696687",
        "+7378742833",  # RESTRICTED
        "7378742833",
        "+2562533",  # BLOCKED
        "+8656696",  # UNKNOWN
        "+86282452253",  # UNAVAILABLE
    }
)

_BARE_INTERNATIONAL = re.compile(r"^[1-9][0-9]{7,14}$")
"""Digits only, no leading 0, 8 to 15 digits (E.164's longest): how sipgate.io and other PBXs
write an international number without its "+" (``4915791234567``)."""

MOBILE_TYPES = frozenset(
    {phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE}
)


def is_withheld(raw: str | None) -> bool:
    """True for a caller id that says the number was withheld."""
    return (raw or "").strip().lower() in WITHHELD


def to_e164(raw: str | None, region: str = "DE") -> str | None:
    """``raw`` (national like ``030 12345678`` or international) as E.164, or None.

    None for withheld numbers and for anything that is no phone number (an alphanumeric SMS
    sender, a short code, a Twilio Client identity such as ``client:015112345678``, which
    phonenumbers read as that mobile number, so the acknowledgement went to a stranger). A
    ``sip:`` or ``tel:`` URI counts by its user part when that is a number.
    """
    if raw is None or is_withheld(raw):
        return None
    text = raw.strip()
    scheme, colon, rest = text.partition(":")
    if colon:
        if scheme.lower() not in ("sip", "sips", "tel"):
            return None
        text = rest.split("@", 1)[0].split(";", 1)[0].strip()
        if is_withheld(text):
            return None
    if any(char.isalpha() for char in text):  # a name, a vanity spelling: no caller's number
        return None
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        # Metadata lags behind new number ranges: an international number of plausible
        # length is kept; a short national string ("12") is no identity.
        digits = sum(char.isdigit() for char in text)
        if not (text.startswith("+") and digits >= 8 and phonenumbers.is_possible_number(number)):
            return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


PBX_NUMBER_FORMATS = ("auto", "international", "national")


def pbx_to_e164(raw: str | None, region: str = "DE", number_format: str = "auto") -> str | None:
    """A number as a PBX reports it (CTI events), as E.164, or None.

    sipgate.io writes international numbers as digits without "+" (``4915791234567``);
    ``to_e164`` read those as national numbers of ``region``, numbers that exist nowhere, so
    the call-back SMS went nowhere and the contact was a stranger. Other PBXs write national
    numbers, some without their trunk 0 (``15223456789``). A run of digits alone cannot tell
    the two apart: in the US, Italy or Denmark a tenth of the national numbers also read as
    another country's, and German numbering takes almost anything as a valid national number.
    So ``number_format`` (the channel's ``cti_number_format``) says how the PBX writes them:
    "international" (sipgate.io: digits without a leading 0 are country code and number),
    "national" (read as ``to_e164`` reads it), or "auto": international only when the digits
    begin with ``region``'s own country code (``49...`` in Germany), national otherwise.
    A number with "+", "00" or a leading 0, or a withheld one, is read as ``to_e164`` reads it.
    """
    text = (raw or "").strip()
    if number_format != "national" and not is_withheld(text) and _BARE_INTERNATIONAL.match(text) and (
        number_format == "international" or text.startswith(str(phonenumbers.country_code_for_region(region)))
    ):
        try:
            number = phonenumbers.parse("+" + text, None)
        except phonenumbers.NumberParseException:
            number = None
        if number is not None and phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return to_e164(raw, region)


def is_mobile(e164: str | None) -> bool:
    """True when the number can take an SMS: phonenumbers says MOBILE or FIXED_LINE_OR_MOBILE.

    Landlines, service numbers and anything unreadable are False.
    """
    if not e164:
        return False
    try:
        number = phonenumbers.parse(e164, None)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.number_type(number) in MOBILE_TYPES
