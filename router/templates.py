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


# The end of a sentence: full stops, question or exclamation marks before a blank and what
# starts a sentence (a capital letter, a placeholder, a quote or bracket), or before the line's
# end. A full stop after a single letter is an abbreviation's ("z. B.", "d. h."), as is one
# before a small letter or a digit ("bzw. heute", "Nr. 5").
_SENTENCE_END = re.compile(r"(?<!\b[^\W\d_])[.!?]+(?=[ \t]+[\"'(\[{„«A-ZÄÖÜ]|[ \t]*$)")
# A clause of a sentence: up to and with its comma or semicolon.
_CLAUSE = re.compile(r"[^,;]*(?:[,;]|$)")
_BRACKETS = re.compile(r"[ \t]*\([^()]*\)")
# A replacement field while a template is cut: a mark of private-use characters around its
# number, so that no cut falls inside one ("{case_reference:,<10}" holds a comma).
_MARK = re.compile("\ue000(\\d+)\ue001")


def _marked(text: str) -> tuple[str, list[tuple[str, str]]]:
    """``text`` with each replacement field as a mark, and the fields' names and texts."""
    out, fields = [], []
    for literal, field, spec, conversion in string.Formatter().parse(text):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            out.append(f"\ue000{len(fields)}\ue001")
            written = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            fields.append((field.split(".")[0].split("[")[0], "{" + written + "}"))
    return "".join(out), fields


def placeholders(text: str) -> set[str]:
    """The names of the ``{placeholders}`` a template fills."""
    return {name for name, _ in _marked(text)[1]}


def _sentences(line: str) -> list[str]:
    """``line`` cut after each sentence's end; the blanks between go with the next one."""
    pieces, start = [], 0
    for end in _SENTENCE_END.finditer(line):
        pieces.append(line[start:end.end()])
        start = end.end()
    if start < len(line):
        pieces.append(line[start:])
    return pieces


@lru_cache(maxsize=256)
def without_sentences(text: str, names: frozenset[str]) -> str:
    """``text`` without the sentences that hold one of the placeholders ``names`` (only their
    brackets or clause, when the sentence holds other placeholders too: "Ihre Fallnummer:
    {case_reference}, Stand unter {status_url}" keeps its case reference), and without a line
    that held nothing else: a status link that no page serves is left out with its words ("You
    can follow your case here:"), not sent as a link that answers 404."""
    marked, fields = _marked(text)

    def named(piece: str) -> set[str]:
        return {fields[int(number)][0] for number in _MARK.findall(piece)}

    def dropped(piece: str) -> bool:
        """Whether ``piece`` holds one of ``names`` and nothing else a reader needs."""
        found = named(piece)
        return bool(found & names) and found <= names

    def without(sentence: str) -> str:
        sentence = _BRACKETS.sub(lambda m: "" if dropped(m.group(0)) else m.group(0), sentence)
        if not named(sentence) & names:  # it was in brackets: "Fall {case_reference} (Stand: {status_url})."
            return sentence
        if dropped(sentence):
            return ""
        body = sentence.rstrip(".!? \t")
        clauses = [clause for clause in _CLAUSE.findall(body) if clause]
        kept = "".join("" if dropped(clause) else _MARK.sub(
            lambda m: "" if fields[int(m.group(1))][0] in names else m.group(0), clause) for clause in clauses)
        return kept.rstrip(",; \t") + sentence[len(body):]

    lines = []
    for line in marked.split("\n"):
        if named(line) & names:
            kept = "".join(without(piece) if named(piece) & names else piece for piece in _sentences(line)).strip()
            kept = re.sub(r"[ \t]{2,}", " ", kept) if kept != line.strip() else kept
        else:
            kept = line
        if kept or not line.strip():
            lines.append(kept)
    return _MARK.sub(lambda m: fields[int(m.group(1))][1], "\n".join(lines))


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
