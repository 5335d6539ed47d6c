"""Routing: ordered rules over channel, topic, keywords, area, language and customer status
choose exactly one responsible unit, and say why in words staff can read.

Pure functions over the configuration; no I/O, so the ingest transaction can call them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .config import Area, Config, Rule, normalize_street
from .identity import canonical_email
from .models import RoutingDecision
from .text import normalize


def find_area(config: Config, message: Mapping[str, Any], normalized_text: str) -> tuple[Area, str] | None:
    """The first configured area the message places itself in, with how we know."""
    if not config.areas:
        return None
    location = message.get("location")
    address = message.get("address") or {}
    postcode = (address.get("postcode") or "").replace(" ", "")
    street = normalize_street(address.get("street") or "") if address.get("street") else ""
    for area in config.areas.values():
        if location and area.contains_point(location["lat"], location["lon"]):
            return area, f"location within {area.point[2]:.0f} m of the area's centre" if area.point else "location"
        if postcode and postcode in area.postcodes:
            return area, f"postcode {postcode}"
        if street and street in area.streets and not _elsewhere(area, postcode):
            return area, f"street {address.get('street')}"
    if normalized_text:
        named = () if postcode else _numbers_before_words(normalized_text)
        for number in named:
            for area in config.areas.values():
                if number in area.postcodes:
                    return area, f"postcode {number} named in the text"
        squashed = _squashed_streets(normalized_text)
        for area in config.areas.values():
            if _elsewhere(area, postcode):
                continue
            others = [number for number in named if len(number) in area.postcode_lengths]  # none of the area's
            for s in area.streets:
                if _named_here(squashed, s, others):
                    return area, f"street {s} named in the text"
    return None


# What stands between a street and the postcode of its address in the squashed text: a house
# number ("3", "3a", "12-14"), a comma, "in", "D-" ("Lindenweg 12-14, D-80331", "Lindenweg 3 in 80331").
_BEFORE_POSTCODE = re.compile(r"[0-9]{0,4}[a-z]?(?:[0-9]{1,4}[a-z]?)?[,;.]?(?:in)?d?")


def _named_here(squashed: str, street: str, others: list[str]) -> bool:
    """Whether ``street`` is named in ``squashed`` without a postcode of another town (``others``)
    right after it, as an address gives one ("Lindenweg 3, 80331 München"). A number elsewhere in
    the text (an amount, a meter reading, a customer number) does not say where the street is."""
    if not others:
        return street in squashed
    at = squashed.find(street)
    while at >= 0:
        end = at + len(street)
        if not any(0 <= (found := squashed.find(number, end)) and _BEFORE_POSTCODE.fullmatch(squashed, end, found)
                   for number in others):
            return True
        at = squashed.find(street, at + 1)
    return False


# A number standing alone before a word, as a postcode stands before its town ("80331 München",
# "D-12345 Musterstadt"). It counts as a postcode where an area's postcodes are as long: a
# year or a house number before a word is shorter than a German postcode. Found from its
# digits on (a pattern that opens with a look behind is tried at every character).
_DIGIT = re.compile(r"[0-9]")  # most texts have none: this look is the cheapest
_DIGITS = re.compile(r"[0-9]{3,}")
_LETTER_AFTER = re.compile(r"[ \t]*[^\W\d_]")


def _numbers_before_words(text: str) -> list[str]:
    """The numbers of 3 to 10 digits in ``text`` that stand alone (not within a word, an amount
    or a time) before a word."""
    found: list[str] = []
    if not _DIGIT.search(text):
        return found
    for match in _DIGITS.finditer(text):
        start, end = match.span()
        before = text[start - 1] if start else " "
        if end - start <= 10 and not (before.isalnum() or before in "_.,:/") and _LETTER_AFTER.match(text, end):
            found.append(match.group())
    return found


# "Str." (or "Str") closing a word or standing after one: the street abbreviated, as residents
# write it in a chat ("Musterstr. 12", "Muster-Str.4", "Muster Str 7"). Found from its letters
# on, as above; whether a word stands before it is looked at for each one found.
_STREET_ABBREVIATION = re.compile(r"str(?![^\W\d_])\.?")


def _squashed_streets(normalized_text: str) -> str:
    """The folded text without spaces and hyphens, "str." written out as "strasse": the form
    of the areas' streets (``normalize_street``), so that a street named in it is found."""
    text = normalized_text
    if "str" not in text:
        return text.replace("-", "").replace(" ", "")
    pieces, done = [], 0
    for match in _STREET_ABBREVIATION.finditer(text):
        before = match.start() - 1
        while before >= 0 and text[before] in " -":
            before -= 1
        if before >= 0 and text[before].isalpha():
            pieces += (text[done:match.start()], "strasse")
            done = match.end()
    if pieces:
        text = "".join(pieces) + text[done:]
    return text.replace("-", "").replace(" ", "")


def _elsewhere(area: Area, postcode: str) -> bool:
    """Whether the message's postcode puts it outside ``area``: a street of the same name in
    another town ("Lindenweg 3, 80331 München") is not the area's street."""
    return bool(postcode and area.postcodes and postcode not in area.postcodes)


def _about(rule: Rule, topic: str | None, normalized_text: str) -> str | None:
    """Whether the message is about the rule's topics/keywords; returns the reason part.

    A topic the sender chose (other than "other") decides: keywords in the text do not
    override it, so a fault report that mentions an excavator stays a fault report."""
    if not rule.topics and not rule.keywords:
        return ""
    if topic and topic in rule.topics:
        return f"topic {topic}"
    if topic and topic != "other" and rule.topics:
        return None
    if rule.keyword_re is not None:
        match = rule.keyword_re.search(normalized_text)
        if match:
            return f"keyword {match.group(0)!r}"
    return None


def decide(
    config: Config,
    message: Mapping[str, Any],
    *,
    is_customer: bool,
    language: str,
) -> RoutingDecision:
    """Apply the rules in order; the first match decides, else the entry point's unit, else the
    fallback unit. Never fails: every message gets an owner."""
    return route(config, message, is_customer=is_customer, language=language)[0]


def written_text(message: Mapping[str, Any]) -> str:
    """Subject and text as written, joined by a space."""
    return " ".join(filter(None, (message.get("subject"), message.get("text"))))


def message_text(message: Mapping[str, Any]) -> str:
    """Subject and text, folded for matching."""
    return normalize(written_text(message))


def route(
    config: Config,
    message: Mapping[str, Any],
    *,
    is_customer: bool,
    language: str,
    normalized_text: str | None = None,
) -> tuple[RoutingDecision, Area | None]:
    """``decide``, plus the area the message places itself in (stored on the conversation),
    worked out once for both. ``normalized_text`` is ``message_text(message)`` when the caller
    has it already."""
    if normalized_text is None:
        normalized_text = message_text(message)
    topic = message.get("topic")
    has_topic = bool(topic) and topic != "other"
    channel = message["channel"]
    recipient = canonical_email(message.get("recipient") or "")
    area_hit = find_area(config, message, normalized_text)
    area = area_hit[0] if area_hit else None

    for rule in config.rules:
        if rule.channels and channel not in rule.channels:
            continue
        if rule.languages and language not in rule.languages:
            continue
        if rule.customer is not None and rule.customer != is_customer:
            continue
        if rule.has_topic is not None and rule.has_topic != has_topic:
            continue
        if rule.has_location is not None and rule.has_location != (message.get("location") is not None):
            continue
        if rule.recipients and recipient not in rule.recipients:
            continue
        about = _about(rule, topic, normalized_text)
        if about is None:
            continue
        parts = [about] if about else []
        unit = rule.unit
        if rule.area is not None:
            if area_hit is None or (rule.area != "*" and area_hit[0].id != rule.area):
                continue
            parts.append(f"in area {area_hit[0].name} ({area_hit[1]})")
            unit = unit or area_hit[0].unit
        if unit not in config.units:
            continue
        reason = f"{rule.description} Matched: {', '.join(parts) or 'all messages'}."
        return RoutingDecision(unit=unit, rule=rule.id, reason=reason), area

    hint = message.get("unit_hint")
    if hint and hint in config.units:
        via = f" ({message.get('recipient')})" if message.get("recipient") else ""
        return RoutingDecision(
            unit=hint, rule="entry-point", reason=f"No rule matched; the message came in through {channel}{via}, which belongs to {config.units[hint].name}."
        ), area
    return RoutingDecision(
        unit=config.fallback_unit,
        rule="fallback",
        reason=f"No rule matched; {config.units[config.fallback_unit].name} is the fallback unit.",
    ), area
