"""The WhatsApp channel's configuration: the ``channels.whatsapp`` table, read once at start.

The channel is off (``from_mapping`` returns None) while a credential or a business number's
``phone_number_id`` is missing, so an installation without WhatsApp simply has no such channel.
A value that is given but unusable (a timeout of "soon", a unit id with spaces) is refused with
``WhatsAppSettingsError`` naming its key, rather than replaced by a default.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from typing import Any

from router.hookspecs import SettingsError
from router.settings import flag, non_negative_float, positive_float, positive_int

DEFAULT_GRAPH_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v21.0"
DEFAULT_MAX_BODY_BYTES = 3 * 1024 * 1024
"""Meta's webhook bodies stay below 3 MB."""
DEFAULT_TIMEOUT = 10.0
DEFAULT_STATUS_WAIT = 30.0
"""After a send that got no answer, how long to wait for its status (Meta echoes the
idempotency key in it) before sending again: a status usually comes within seconds. 0 turns
the wait off (backoff alone)."""
DEFAULT_MAX_MEDIA_BYTES = 25 * 1024 * 1024
"""Largest media item ``download_media`` fetches; larger ones keep only their media id."""

DEFAULT_PROMPTS = {
    "de": "Antworten Sie auf diese Nachricht, um die vollständige Antwort zu lesen.",
    "en": "Reply to this message to read the full answer.",
}
"""The template's second parameter when an answer is too long for it."""

class WhatsAppSettingsError(SettingsError):
    """A value in ``channels.whatsapp`` is unusable; ``path`` names the key."""


_WHERE = "channels.whatsapp"
_LANGUAGE = re.compile(r"^[a-z]{2}$")
_UNIT = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


@dataclasses.dataclass(frozen=True, slots=True)
class BusinessNumber:
    """One WhatsApp business number: where messages to it go when no rule decides, and the
    language its senders are assumed to write."""

    phone_number_id: str
    unit: str | None = None
    language: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TemplateSettings:
    """The approved template sent outside the 24-hour window, by language.

    ``languages`` maps our language codes to the template's (``{"en": "en_US"}``).
    """

    name: str
    languages: Mapping[str, str]
    prompts: Mapping[str, str]
    max_parameter_chars: int

    def choose(self, *preferred: str | None) -> tuple[str | None, str]:
        """The language the template goes out in: ``(our language, the template's code)`` for
        the first of ``preferred`` that has one, else the first configured, else ``(None,
        "en_US")``. Anything written into the template (the prompt) follows our language of
        the pair, not the conversation's: a German template with an English prompt would read
        as a mistake."""
        for language in preferred:
            if language and language in self.languages:
                return language, self.languages[language]
        return next(iter(self.languages.items()), (None, "en_US"))

    def prompt(self, language: str | None) -> str:
        return self.prompts.get(language or "") or self.prompts.get("en") or DEFAULT_PROMPTS["en"]


@dataclasses.dataclass(frozen=True, slots=True)
class WhatsAppSettings:
    """Credentials, endpoints and numbers. Secrets stay out of ``repr``."""

    app_secret: str = dataclasses.field(repr=False)
    verify_token: str = dataclasses.field(repr=False)
    access_token: str = dataclasses.field(repr=False)
    numbers: tuple[BusinessNumber, ...]
    graph_url: str = DEFAULT_GRAPH_URL
    api_version: str = DEFAULT_API_VERSION
    template: TemplateSettings | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout: float = DEFAULT_TIMEOUT
    status_wait: float = DEFAULT_STATUS_WAIT
    download_media: bool = False
    max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None, units: Collection[str] | None = None) -> WhatsAppSettings | None:
        """Read the resolved ``channels.whatsapp`` table; None when the channel is off."""
        if not isinstance(section, Mapping):
            return None
        secrets = [_text(section.get(key)) for key in ("app_secret", "verify_token", "access_token")]
        raw_numbers = section.get("numbers")
        if not all(secrets) or not isinstance(raw_numbers, list) or not raw_numbers:
            return None
        numbers = []
        for index, raw in enumerate(raw_numbers):
            phone_number_id = _text(raw.get("phone_number_id")) if isinstance(raw, Mapping) else None
            if not phone_number_id:
                return None
            unit, language = _text(raw.get("unit")), _text(raw.get("language"))
            where = f"channels.whatsapp.numbers[{index}]"
            if unit and not _UNIT.match(unit):
                raise WhatsAppSettingsError(f"{where}.unit", f"not a unit id: {unit!r}")
            if unit and units is not None and unit not in units:
                raise WhatsAppSettingsError(f"{where}.unit", f"unknown unit {unit!r}")
            if language and not _LANGUAGE.match(language):
                raise WhatsAppSettingsError(f"{where}.language", f"expected a two-letter language code, got {language!r}")
            numbers.append(BusinessNumber(phone_number_id=phone_number_id, unit=unit, language=language))
        app_secret, verify_token, access_token = secrets
        assert app_secret and verify_token and access_token
        return cls(
            app_secret=app_secret,
            verify_token=verify_token,
            access_token=access_token,
            numbers=tuple(numbers),
            graph_url=(_text(section.get("graph_url")) or DEFAULT_GRAPH_URL).rstrip("/"),
            api_version=(_text(section.get("api_version")) or DEFAULT_API_VERSION).strip("/"),
            template=_template(section.get("template")),
            max_body_bytes=positive_int(section, "max_body_bytes", DEFAULT_MAX_BODY_BYTES, _WHERE, error=WhatsAppSettingsError),
            timeout=positive_float(section, "timeout", DEFAULT_TIMEOUT, _WHERE, error=WhatsAppSettingsError),
            status_wait=non_negative_float(section, "status_wait", DEFAULT_STATUS_WAIT, _WHERE, error=WhatsAppSettingsError),
            download_media=flag(section, "download_media", False, _WHERE, error=WhatsAppSettingsError),
            max_media_bytes=positive_int(section, "max_media_bytes", DEFAULT_MAX_MEDIA_BYTES, _WHERE,
                                         error=WhatsAppSettingsError),
        )

    def number(self, phone_number_id: str | None) -> BusinessNumber | None:
        """The configured number with this id, or None."""
        for number in self.numbers:
            if number.phone_number_id == phone_number_id:
                return number
        return None


def _template(raw: Any) -> TemplateSettings | None:
    if not isinstance(raw, Mapping) or not _text(raw.get("name")):
        return None
    languages = raw.get("languages") if isinstance(raw.get("languages"), Mapping) else {}
    prompts = raw.get("prompts") if isinstance(raw.get("prompts"), Mapping) else {}
    return TemplateSettings(
        name=str(raw["name"]).strip(),
        languages={str(k): str(v) for k, v in languages.items() if _text(v)},
        prompts={**DEFAULT_PROMPTS, **{str(k): str(v) for k, v in prompts.items() if _text(v)}},
        max_parameter_chars=positive_int(raw, "max_parameter_chars", 700, f"{_WHERE}.template", error=WhatsAppSettingsError),
    )


def _text(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None
