"""The phone channel's configuration: the ``channels.phone`` section, with Twilio's credentials
falling back to the environment variables the example configuration names.

Twilio (voice and SMS) needs ``account_sid``, ``auth_token`` and ``phone_number``; CTI events need
only ``cti_secret``. With neither, the channel is off.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

from router.hookspecs import SettingsError
from router.settings import flag, given, non_negative_float, positive_float, positive_int

from .numbers import PBX_NUMBER_FORMATS

DEFAULT_MENU = {"1": "construction", "2": "contract", "3": "fault", "0": "other"}

ENV_FALLBACKS = {
    "account_sid": "TWILIO_ACCOUNT_SID",
    "auth_token": "TWILIO_AUTH_TOKEN",
    "phone_number": "TWILIO_PHONE_NUMBER",
    "api_url": "TWILIO_API_URL",
    "public_base_url": "PUBLIC_BASE_URL",
}

_WHERE = "channels.phone"
_DIGIT = re.compile(r"^[0-9*#]$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_TOPIC = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class PhoneSettingsError(SettingsError):
    """A value in ``channels.phone`` is unusable; ``path`` names the key."""


@dataclasses.dataclass(frozen=True, slots=True)
class PhoneSettings:
    """Everything the phone channel reads from its configuration, checked once at start."""

    account_sid: str | None = None
    auth_token: str | None = dataclasses.field(default=None, repr=False)
    phone_number: str | None = None
    api_url: str = "https://api.twilio.com"
    public_base_url: str | None = None
    cti_secret: str | None = dataclasses.field(default=None, repr=False)
    cti_number_format: str = "auto"  # how the PBX writes numbers: see ``numbers.pbx_to_e164``
    menu: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MENU))
    menu_labels: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    english_digit: str | None = "9"
    forward_numbers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    forward_timeout: int = 20
    screen_forwards: bool = True  # whoever picks up a forward takes it with 1 (``twiml.screen``)
    voicemail_max_length: int = 120
    callback_attempts: int = 3  # read by the core's call-back log; checked here so a bad value stops the start
    region: str = "DE"
    timezone: str | None = None  # None: the service's timezone (``ChannelContext.timezone``)
    company_name: str | None = None
    voice: str | Mapping[str, str] | None = None
    """Twilio's ``<Say>`` voice: one name for the German texts, or a table by language
    (``{de = "Polly.Vicki", en = "Polly.Amy"}``); a language without one gets Twilio's default."""
    other_channels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    sms_max_length: int = 1600
    send_timeout: float = 15.0
    status_wait: float = 30.0
    """After an SMS whose POST got no answer (Twilio may have taken it), how long to wait for
    its status callback, which names our key, before sending it again: Twilio calls back
    ``sent`` within seconds of taking an SMS. 0 turns the wait off (backoff alone)."""

    @property
    def twilio_enabled(self) -> bool:
        """True when voice webhooks and SMS can work: all three Twilio credentials are set."""
        return bool(self.account_sid and self.auth_token and self.phone_number)

    @property
    def cti_enabled(self) -> bool:
        return bool(self.cti_secret)

    @classmethod
    def from_config(
        cls, section: Mapping[str, Any] | None, env: Mapping[str, str] | None = None, units: Collection[str] | None = None,
    ) -> PhoneSettings:
        """Read and check ``section``; Twilio values missing there come from ``env``.

        Raises ``PhoneSettingsError`` naming the key for a value of the wrong shape.
        """
        section = dict(section or {})
        env = env or {}
        for key, variable in ENV_FALLBACKS.items():
            if not section.get(key) and env.get(variable):
                section[key] = env[variable]
        values: dict[str, Any] = {}
        for key in ("account_sid", "auth_token", "phone_number", "api_url", "public_base_url", "cti_secret",
                    "cti_number_format", "region", "timezone", "company_name"):
            value = given(section, key)  # a blank one from the environment is not given
            if value is None:
                continue
            if not isinstance(value, str):
                raise PhoneSettingsError(f"channels.phone.{key}", "expected a string")
            values[key] = value.strip()
        # Checked here, not when the first call comes: an unknown timezone made the channel tell
        # callers deadlines in UTC (an hour early in winter), an unknown region read every
        # national number as no number at all.
        if "timezone" in values:
            try:
                ZoneInfo(values["timezone"])
            except (ZoneInfoNotFoundError, ValueError):
                raise PhoneSettingsError("channels.phone.timezone", f"unknown timezone {values['timezone']!r}") from None
        if values.get("cti_number_format", "auto") not in PBX_NUMBER_FORMATS:
            raise PhoneSettingsError("channels.phone.cti_number_format", f"one of {', '.join(PBX_NUMBER_FORMATS)}")
        if "region" in values:
            if values["region"].upper() not in phonenumbers.SUPPORTED_REGIONS:
                raise PhoneSettingsError("channels.phone.region", f"not a region phone numbers are known for: {values['region']!r}")
            values["region"] = values["region"].upper()
        if "phone_number" in values:
            _check_e164(values["phone_number"], values.get("region", "DE"))
        if (voice := given(section, "voice")) is not None:  # blank from the environment: not given, as above
            values["voice"] = _voice(voice)
        defaults = {field.name: field.default for field in dataclasses.fields(cls)}
        for key in ("forward_timeout", "voicemail_max_length", "sms_max_length", "callback_attempts"):
            values[key] = positive_int(section, key, defaults[key], _WHERE, error=PhoneSettingsError)
        values["send_timeout"] = positive_float(section, "send_timeout", defaults["send_timeout"], _WHERE, error=PhoneSettingsError)
        values["status_wait"] = non_negative_float(section, "status_wait", defaults["status_wait"], _WHERE,
                                                   error=PhoneSettingsError)
        if "menu" in section:
            menu = section["menu"]
            if not isinstance(menu, Mapping) or not menu:
                raise PhoneSettingsError("channels.phone.menu", "expected a table of digit = topic")
            for digit, topic in menu.items():
                if not (isinstance(digit, str) and _DIGIT.match(digit)):
                    raise PhoneSettingsError(f"channels.phone.menu.{digit}", "a menu key is one digit")
                if not (isinstance(topic, str) and _TOPIC.match(topic)):
                    raise PhoneSettingsError(f"channels.phone.menu.{digit}", f"not a topic id: {topic!r}")
            values["menu"] = dict(menu)
        values["screen_forwards"] = flag(section, "screen_forwards", defaults["screen_forwards"], _WHERE, error=PhoneSettingsError)
        if "english_digit" in section:
            digit = section["english_digit"]
            if digit is not None and not (isinstance(digit, str) and _DIGIT.match(digit)):
                raise PhoneSettingsError("channels.phone.english_digit", "expected one digit or null")
            values["english_digit"] = digit
        if values.get("english_digit", "9") in values.get("menu", DEFAULT_MENU):
            raise PhoneSettingsError("channels.phone.english_digit", "the digit is already a menu choice")
        for key in ("forward_numbers", "other_channels"):
            if key in section:
                table = section[key]
                if not isinstance(table, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in table.items()
                ):
                    raise PhoneSettingsError(f"channels.phone.{key}", "expected a table of strings")
                values[key] = dict(table)
        unknown = sorted(set(values.get("forward_numbers", {})) - set(units)) if units is not None else []
        if unknown:  # its calls were never put through, without a word
            raise PhoneSettingsError(f"channels.phone.forward_numbers.{unknown[0]}", f"unknown unit {unknown[0]!r}")
        if "menu_labels" in section:
            labels = section["menu_labels"]
            if not isinstance(labels, Mapping) or not all(isinstance(v, Mapping) for v in labels.values()):
                raise PhoneSettingsError("channels.phone.menu_labels", "expected topic = {language = label}")
            values["menu_labels"] = {k: dict(v) for k, v in labels.items()}
        return cls(**values)


def _check_e164(number: str, region: str) -> None:
    """Refuse a ``phone_number`` that is not E.164 (``+493099999999``).

    Twilio answers every SMS from a number in another form with 21212 (invalid 'From'); the
    channel would start, take calls, and keep every acknowledgement queued. The error names
    the E.164 form where the number reads as one in ``region``.
    """
    try:
        possible = bool(_E164.match(number)) and phonenumbers.is_possible_number(phonenumbers.parse(number, None))
    except phonenumbers.NumberParseException:
        possible = False
    if possible:
        return
    hint = ""
    try:
        parsed = phonenumbers.parse(number, region)
        if phonenumbers.is_valid_number(parsed):
            hint = f" (write it as {phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)})"
    except phonenumbers.NumberParseException:
        pass
    raise PhoneSettingsError("channels.phone.phone_number", f"not an E.164 number: {number!r}{hint}")


def _voice(value: Any) -> str | dict[str, str]:
    """``voice``: a name (for the German texts: voices speak one language, and the German
    ``Polly.Vicki`` read the English menu too), or a table of names by language."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, Mapping) and value:
        voices = {}
        for language, name in value.items():
            if not (isinstance(language, str) and re.fullmatch(r"[a-z]{2}", language)):
                raise PhoneSettingsError(f"channels.phone.voice.{language}", "expected a two-letter language code")
            if not (isinstance(name, str) and name.strip()):
                raise PhoneSettingsError(f"channels.phone.voice.{language}", "expected a voice's name")
            voices[language] = name.strip()
        return voices
    raise PhoneSettingsError("channels.phone.voice", "expected a voice's name or a table of them by language")
