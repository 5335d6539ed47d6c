"""Texts sent to people: templates from the configuration in their language, and dates
written the way a German or English reader expects, in the organisation's timezone."""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

_DE_DAYS = ("Mo.", "Di.", "Mi.", "Do.", "Fr.", "Sa.", "So.")
_EN_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_EN_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_deadline(when: datetime | None, language: str, timezone: str) -> str:
    """``Mo., 30.11.2026, 11:00 Uhr`` or ``Mon 30 Nov 2026, 11:00`` in local time; in the hour
    the clocks repeat, with its offset (``So., 25.10.2026, 02:30 Uhr (UTC+1)``), since the same
    wall-clock time stands for two moments an hour apart."""
    if when is None:
        return "-"
    # Only the minute is shown, and the deadlines of a busy minute share it: worked out once.
    return _format_minute(when.replace(second=0, microsecond=0), language, timezone)


@lru_cache(maxsize=1024)
def _format_minute(when: datetime, language: str, timezone: str) -> str:
    local = when.astimezone(ZoneInfo(timezone))
    suffix = f" ({utc_offset(local)})" if repeated(local) else ""
    if language == "de":
        return f"{_DE_DAYS[local.weekday()]}, {local:%d.%m.%Y}, {local:%H:%M} Uhr{suffix}"
    return f"{_EN_DAYS[local.weekday()]} {local.day} {_EN_MONTHS[local.month - 1]} {local.year}, {local:%H:%M}{suffix}"


def repeated(local: datetime) -> bool:
    """Whether the wall-clock time of ``local`` (aware, in its zone) comes twice that night: the
    hour the clocks go back. "02:30" then names two moments an hour apart."""
    return local.replace(fold=1 - local.fold).utcoffset() != local.utcoffset()


def utc_offset(local: datetime) -> str:
    """The offset of ``local`` as people read it: ``UTC+2``, ``UTC-3:30``."""
    offset = local.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign, minutes = ("-", -minutes) if minutes < 0 else ("+", minutes)
    hours, rest = divmod(minutes, 60)
    return f"UTC{sign}{hours}" + (f":{rest:02d}" if rest else "")


NOTICES: dict[str, dict[str, str]] = {
    "escalation": {
        "de": "Fall {case_reference} wurde nicht bis {old_deadline} beantwortet und liegt jetzt bei {unit_name}"
              " (Eskalationsstufe {level}). Bitte antworten Sie bis {deadline}.",
        "en": "Case {case_reference} was not answered by {old_deadline} and is now with {unit_name}"
              " (escalation level {level}). Please answer by {deadline}.",
    },
    "callback_escalation": {
        "de": "Fall {case_reference}: Wir haben die Person telefonisch nicht erreicht. Der Fall liegt jetzt bei"
              " {unit_name} (Eskalationsstufe {level}). Bitte antworten Sie bis {deadline}.",
        "en": "Case {case_reference}: we could not reach the person by phone. The case is now with {unit_name}"
              " (escalation level {level}). Please answer by {deadline}.",
    },
    "reminder": {
        "de": "Erinnerung: Fall {case_reference} liegt bei {unit_name} und wartet auf eine Antwort (Frist {deadline},"
              " Stufe {level}). Bitte antworten Sie jetzt.",
        "en": "Reminder: case {case_reference} is with {unit_name} and waits for an answer (deadline {deadline},"
              " level {level}). Please answer now.",
    },
    "new_owner": {
        "de": "Fall {case_reference} wurde {unit_name} übertragen. Bitte antworten Sie bis {deadline}.",
        "en": "Case {case_reference} was transferred to {unit_name}. Please answer by {deadline}.",
    },
    "new_owner_nothing_due": {
        "de": "Fall {case_reference} wurde {unit_name} übertragen. Eine Antwort ist derzeit nicht fällig.",
        "en": "Case {case_reference} was transferred to {unit_name}. No answer is due at the moment.",
    },
}
"""What a unit is told when the configuration has no text for it (only ``ack`` is required):
it was told the resident's acknowledgement, its placeholders (``{name_suffix}``,
``{status_url}``) left as written. A configured ``escalation`` still stands in for a
``reminder`` or ``callback_escalation`` that is not configured, and a configured ``new_owner``
for ``new_owner_nothing_due``, as docs/configuration.md says; these come last."""


class _Values(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def placeholders(text: str) -> set[str]:
    """The names of the ``{placeholders}`` a template fills."""
    return {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(text) if field}


# The end of a sentence: full stops, question or exclamation marks before a blank and what
# starts a sentence (a capital letter, a placeholder, a quote or bracket), or before the line's
# end. A full stop after a single letter is an abbreviation's ("z. B.", "d. h."), as is one
# before a small letter or a digit ("bzw. heute", "Nr. 5").
_SENTENCE_END = re.compile(r"(?<!\b[^\W\d_])[.!?]+(?=[ \t]+[\"'(\[{„«A-ZÄÖÜ]|[ \t]*$)")
# A clause of a sentence: up to and with its comma or semicolon.
_CLAUSE = re.compile(r"[^,;]*(?:[,;]|$)")
_FIELD = re.compile(r"\{(\w+)[^{}]*\}")
_BRACKETS = re.compile(r"[ \t]*\([^()]*\)")


def _sentences(line: str) -> list[str]:
    """``line`` cut after each sentence's end; the blanks between go with the next one."""
    pieces, start = [], 0
    for end in _SENTENCE_END.finditer(line):
        pieces.append(line[start:end.end()])
        start = end.end()
    if start < len(line):
        pieces.append(line[start:])
    return pieces


def _without(sentence: str, names: frozenset[str]) -> str:
    """``sentence`` without ``names``: all of it when it holds nothing else a reader needs, else
    the clauses that hold them ("Ihre Fallnummer: {case_reference}, Stand unter {status_url}"
    keeps its case reference), else the placeholders alone."""
    sentence = _BRACKETS.sub(lambda m: "" if placeholders(m.group(0)) <= names and placeholders(m.group(0)) else
                             m.group(0), sentence)
    if not placeholders(sentence) & names:  # it was in brackets: "Fall {case_reference} (Stand: {status_url})."
        return sentence
    others = placeholders(sentence) - names
    if not others:
        return ""
    body = sentence.rstrip(".!? \t")
    ending = sentence[len(body):]
    clauses = [c for c in _CLAUSE.findall(body) if c]
    kept = [c if not placeholders(c) & names
            else "" if not placeholders(c) - names
            else _FIELD.sub(lambda m: "" if m.group(1) in names else m.group(0), c) for c in clauses]
    return "".join(kept).rstrip(",; \t") + ending


@lru_cache(maxsize=256)
def without_sentences(text: str, names: frozenset[str]) -> str:
    """``text`` without the sentences that hold one of the placeholders ``names`` (only their
    clause, when the sentence holds other placeholders too), and without a line that held
    nothing else: a status link that no page serves is left out with its words ("You can follow
    your case here:"), not sent as a link that answers 404."""
    lines = []
    for line in text.split("\n"):
        if placeholders(line) & names:
            kept = "".join(_without(piece, names) if placeholders(piece) & names else piece
                           for piece in _sentences(line)).strip()
            kept = re.sub(r"[ \t]{2,}", " ", kept) if kept != line.strip() else kept
        else:
            kept = line
        if kept or not line.strip():
            lines.append(kept)
    return "\n".join(lines)


class Templates:
    """The configured templates; ``render`` picks the language, then the default language."""

    def __init__(self, templates: Mapping[str, Mapping[str, str]], default_language: str) -> None:
        self._templates = templates
        self.default_language = default_language

    def has(self, name: str) -> bool:
        return bool(self._templates.get(name))

    def first_configured(self, *names: str) -> str:
        """The first of ``names`` the configuration has, else the first (its ``NOTICES`` text):
        ``reminder`` falls back to a configured ``escalation`` before the built-in words."""
        return next((name for name in names if self.has(name)), names[0])

    def language_for(self, name: str, language: str | None) -> str:
        variants = self._templates.get(name) or NOTICES.get(name, {})
        if language and language in variants:
            return language
        if self.default_language in variants:
            return self.default_language
        return next(iter(variants), self.default_language)

    def render(self, name: str, language: str | None, /, **values: Any) -> str:
        """Fill ``templates.<name>.<language>`` (for a unit's notice without one, ``NOTICES``);
        unknown placeholders stay as written, and a sentence whose placeholder's value is None
        is left out (a ``status_url`` while no status page is served)."""
        variants = self._templates.get(name) or NOTICES.get(name)
        if not variants:
            raise KeyError(f"no template {name!r}")
        text = variants[self.language_for(name, language)]
        missing = frozenset(key for key, value in values.items() if value is None)
        if missing:
            text = without_sentences(text, missing)
        return text.format_map(_Values(values))

    def using(self, placeholder: str) -> Iterator[str]:
        """The configured templates that fill ``placeholder``, as ``<name>.<language>``."""
        for name, variants in self._templates.items():
            for language, text in variants.items():
                if placeholder in placeholders(text):
                    yield f"{name}.{language}"
