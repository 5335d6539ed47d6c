"""Load and check the configuration file: schema errors and cross-references, each reported
with the file and the key path that fails (``units.vertrieb.escalate_to``).

Values may be ``{"$env": "NAME", "default": "..."}``: they are resolved from the environment
here, so the same file serves tests, the demo and production.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from .hours import BusinessHours
from .identity import canonical_email
from .text import normalize


def _default_config() -> Path:
    """The example organisation: ``config/`` beside the source tree (a checkout or an editable
    install), else the copy a wheel installs under ``<prefix>/share/contact-router/``."""
    source = Path(__file__).resolve().parent.parent / "config" / "contact-router.toml"
    installed = Path(sys.prefix) / "share" / "contact-router" / "contact-router.toml"
    return source if source.exists() or not installed.exists() else installed


DEFAULT_CONFIG = _default_config()


class ConfigError(Exception):
    """A configuration file failed to load; ``errors`` holds (key path, message) pairs."""

    def __init__(self, file: str, errors: list[tuple[str, str]]) -> None:
        self.file = file
        self.errors = errors
        super().__init__("\n".join(f"{file}: {path or '(top level)'}: {msg}" for path, msg in errors))


@dataclasses.dataclass(frozen=True)
class Unit:
    id: str
    name: str
    kind: str
    languages: tuple[str, ...]
    first_response_hours: float
    hours: BusinessHours
    escalate_to: str | None
    email: str | None
    notify: str | None
    oversees: tuple[str, ...]

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "languages": list(self.languages),
            "first_response_hours": self.first_response_hours,
            "escalate_to": self.escalate_to,
            "email": self.email,
            "oversees": list(self.oversees),
        }


@dataclasses.dataclass(frozen=True)
class Area:
    id: str
    name: str
    unit: str
    postcodes: frozenset[str]
    streets: tuple[str, ...]  # normalised street names ("musterstrasse")
    point: tuple[float, float, float] | None  # lat, lon, radius in metres

    @functools.cached_property
    def postcode_lengths(self) -> frozenset[int]:
        """The lengths of the area's postcodes made of digits: a number of such a length named
        in a text is taken for a postcode."""
        return frozenset(len(code) for code in self.postcodes if code.isdigit())

    def contains_point(self, lat: float, lon: float) -> bool:
        if self.point is None:
            return False
        return haversine_m(lat, lon, self.point[0], self.point[1]) <= self.point[2]


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    description: str
    channels: frozenset[str]
    topics: frozenset[str]
    keywords: tuple[str, ...]  # normalised
    keyword_re: re.Pattern[str] | None  # all keywords, each at the start of a word
    area: str | None
    languages: frozenset[str]
    customer: bool | None
    has_topic: bool | None
    has_location: bool | None
    recipients: frozenset[str]
    unit: str | None


@dataclasses.dataclass(frozen=True)
class StaffMember:
    name: str
    token: str
    units: frozenset[str]  # "*" for all units
    demo: bool


@dataclasses.dataclass(frozen=True)
class Config:
    file: str
    default_language: str
    timezone: str
    fallback_unit: str
    reopen_days: float
    escalation_check_seconds: float
    public_base_url: str
    max_escalation_level: int
    units: Mapping[str, Unit]
    areas: Mapping[str, Area]
    topics: Mapping[str, Mapping[str, str]]
    rules: tuple[Rule, ...]
    templates: Mapping[str, Mapping[str, str]]
    staff: tuple[StaffMember, ...]
    channels: Mapping[str, Any]


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres."""
    r = 6_371_008.8
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(min(1.0, math.sqrt(a)))


@cache
def config_schema() -> dict[str, Any]:
    return json.loads(resources.files("router.schemas").joinpath("config.schema.json").read_text("utf-8"))


def _path(parts: Any) -> str:
    return ".".join(str(p) for p in parts)


def resolve_env(value: Any, env: Mapping[str, str], demo: list[str] | None = None, path: str = "") -> Any:
    """Replace every ``{"$env": NAME, "default": ...}`` by the variable's value (or the default,
    or None). Paths resolved from a default are appended to ``demo``."""
    if isinstance(value, dict):
        if "$env" in value:
            name = value["$env"]
            if not isinstance(name, str):  # where the schema does not reach (a channel's settings)
                raise ConfigError("", [(path, "$env names an environment variable: expected a string")])
            if name in env:
                return env[name]
            if "default" in value:
                if demo is not None:
                    demo.append(path)
                return value["default"]
            return None
        return {k: resolve_env(v, env, demo, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v, env, demo, f"{path}.{i}") for i, v in enumerate(value)]
    return value


def load_config(file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, validate and resolve a TOML (or JSON) configuration file. Raises ``ConfigError``."""
    path = Path(file) if file is not None else DEFAULT_CONFIG
    env = os.environ if env is None else env
    name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(name, [("", f"cannot read file: {exc.strerror or exc}")]) from None
    try:
        if path.suffix == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(name, [("", f"not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}")]) from None
    except RecursionError:
        raise ConfigError(name, [("", "nested too deeply to read")]) from None
    return build_config(data, env, name)


def _not_finite(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every number in ``value`` that is NaN or infinite (TOML spells them ``nan`` and ``inf``):
    JSON Schema's minimum and maximum let them through, and ``nan`` seconds stopped the
    escalation scheduler for good."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, f"{value} is not a number this service can use")]
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _not_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _not_finite(v, f"{path}.{i}")]
    return []


def build_config(data: Any, env: Mapping[str, str], name: str = "<config>") -> Config:
    """Validate an already parsed configuration and turn it into a ``Config``."""
    validator = jsonschema.Draft202012Validator(config_schema())
    try:
        errors = sorted(
            ((_path(e.absolute_path), e.message) for e in validator.iter_errors(data)), key=lambda x: x[0]
        ) or _not_finite(data)
    except RecursionError:
        raise ConfigError(name, [("", "nested too deeply to read")]) from None
    if errors:
        raise ConfigError(name, errors)
    errors = _check_references(data)
    if errors:
        raise ConfigError(name, errors)

    demo: list[str] = []
    try:
        resolved = resolve_env(data, env, demo)
    except ConfigError as exc:
        raise ConfigError(name, exc.errors) from None
    service = resolved["service"]
    timezone = service.get("timezone", "Europe/Berlin")
    try:
        always = BusinessHours.from_config({}, timezone)
    except (ValueError, KeyError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise ConfigError(name, [("service.timezone", f"unknown timezone {timezone!r} ({exc})")]) from None
    calendars: dict[str, BusinessHours] = {}
    calendar_errors = []
    for cal_id, spec in resolved.get("business_hours", {}).items():
        try:
            calendars[cal_id] = BusinessHours.from_config(spec, timezone)
        except (ValueError, KeyError) as exc:
            calendar_errors.append((f"business_hours.{cal_id}", str(exc)))
    if calendar_errors:
        raise ConfigError(name, calendar_errors)

    units = {
        uid: Unit(
            id=uid,
            name=u["name"],
            kind=u.get("kind", "own"),
            languages=tuple(u.get("languages", ["de"])),
            first_response_hours=float(u["first_response_hours"]),
            hours=calendars.get(u.get("business_hours", ""), always),
            escalate_to=u.get("escalate_to"),
            email=u.get("email"),
            notify=u.get("notify"),
            oversees=tuple(u.get("oversees", ())),
        )
        for uid, u in resolved["units"].items()
    }
    # Every deadline must be computable: a response time that a sparse calendar cannot fit
    # into a year would fail each message to the unit, so it fails here, named.
    probe = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    deadline_errors = []
    for uid, unit in units.items():
        why = ""
        if not unit.hours.always_open and unit.first_response_hours > unit.hours.weekly_hours * 53 + 1:
            # More than 366 days can hold (53 of each weekday, an hour more from a change of
            # daylight saving time): no need to count them out, which took seconds for a
            # calendar of a minute a week.
            late = True
        else:
            try:
                late = unit.hours.add(probe, unit.first_response_hours) - probe > timedelta(days=366)
            except (ValueError, OverflowError) as exc:
                late, why = True, f" ({exc})"
        if late:
            deadline_errors.append((f"units.{uid}.first_response_hours", f"no deadline within a year of business hours{why}"))
    if deadline_errors:
        raise ConfigError(name, deadline_errors)
    areas = {
        aid: Area(
            id=aid,
            name=a["name"],
            unit=a["unit"],
            postcodes=frozenset(p.replace(" ", "") for p in a.get("postcodes", ())),
            streets=tuple(normalize_street(s) for s in a.get("streets", ())),
            point=(a["point"]["lat"], a["point"]["lon"], a["point"]["radius_m"]) if "point" in a else None,
        )
        for aid, a in resolved.get("areas", {}).items()
    }
    rules = tuple(
        Rule(
            id=r["id"],
            description=r.get("description", r["id"]),
            channels=frozenset(r.get("channels", ())),
            topics=frozenset(r.get("topics", ())),
            keywords=tuple(normalize(k) for k in r.get("keywords", ())),
            keyword_re=_keyword_pattern(normalize(k) for k in r.get("keywords", ())),
            area=r.get("area"),
            languages=frozenset(r.get("languages", ())),
            customer=r.get("customer"),
            has_topic=r.get("has_topic"),
            has_location=r.get("has_location"),
            recipients=frozenset(canonical_email(x) for x in r.get("recipients", ())),
            unit=r.get("unit"),
        )
        for r in resolved.get("rules", [])
    )
    staff_errors = []
    staff = []
    for i, s in enumerate(resolved["staff"]):
        token = s["token"]
        if not token:
            continue  # an unset token switches that staff member off
        if len(str(token)) < 8 and f"staff.{i}.token" not in demo:
            staff_errors.append((f"staff.{i}.token", "a staff token needs at least 8 characters"))
        staff.append(StaffMember(s["name"], str(token), frozenset(s["units"]), f"staff.{i}.token" in demo))
    if staff_errors:
        raise ConfigError(name, staff_errors)

    return Config(
        file=name,
        default_language=service.get("default_language", "de"),
        timezone=timezone,
        fallback_unit=service["fallback_unit"],
        reopen_days=float(service.get("reopen_days", 14)),
        escalation_check_seconds=float(service.get("escalation_check_seconds", 30)),
        public_base_url=str(service.get("public_base_url") or "http://127.0.0.1:8080").rstrip("/"),
        max_escalation_level=int(service.get("max_escalation_level", 10)),
        units=units,
        areas=areas,
        topics=resolved.get("topics", {}),
        rules=rules,
        templates=resolved.get("templates", {}),
        staff=tuple(staff),
        channels=resolved.get("channels", {}),
    )


def _keyword_pattern(keywords: Any) -> re.Pattern[str] | None:
    """One compiled search for all of a rule's keywords (longest first), each at a word start."""
    words = sorted(set(keywords), key=len, reverse=True)
    if not words:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + ")")


# A house number at the end: "3", "3a", "3 a", "3-5", "3/1", "12a-12c".
_HOUSE_NUMBER = re.compile(r"[\s,]*\d+\s*[a-z]?(?:\s*[-/]\s*\d*\s*[a-z]?)*\s*$")


def normalize_street(street: str) -> str:
    """``Musterstr. 5``, ``Musterstr 5a`` and ``Muster-Straße`` all become ``musterstrasse``.
    (A house number's letter stayed: "Lindenweg 3a" was "lindenwega", in no area.)"""
    text = _HOUSE_NUMBER.sub("", normalize(street).strip())
    text = "".join(ch for ch in text if not ch.isdigit()).strip()
    text = text.replace("-", "").replace(" ", "").rstrip(".")
    if text.endswith("str"):
        text += "asse"
    return text


def _check_references(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Cross-references the schema cannot express: unit ids, calendars, escalation cycles."""
    errors: list[tuple[str, str]] = []
    units = data["units"]
    calendars = data.get("business_hours", {})
    known = set(units)
    if data["service"]["fallback_unit"] not in known:
        errors.append(("service.fallback_unit", f"unknown unit {data['service']['fallback_unit']!r}"))
    for uid, u in units.items():
        if "escalate_to" in u and u["escalate_to"] not in known:
            errors.append((f"units.{uid}.escalate_to", f"unknown unit {u['escalate_to']!r}"))
        if "business_hours" in u and u["business_hours"] not in calendars:
            errors.append((f"units.{uid}.business_hours", f"unknown business_hours {u['business_hours']!r}"))
        for i, other in enumerate(u.get("oversees", ())):
            if other not in known:
                errors.append((f"units.{uid}.oversees.{i}", f"unknown unit {other!r}"))
        seen, cur = {uid}, u.get("escalate_to")
        while cur in units:
            if cur in seen:
                errors.append((f"units.{uid}.escalate_to", "escalation chain runs in a circle"))
                break
            seen.add(cur)
            cur = units[cur].get("escalate_to")
    for aid, a in data.get("areas", {}).items():
        if a["unit"] not in known:
            errors.append((f"areas.{aid}.unit", f"unknown unit {a['unit']!r}"))
    areas = set(data.get("areas", {}))
    topics = set(data.get("topics", {}))
    rule_ids: set[str] = set()
    for i, r in enumerate(data.get("rules", [])):
        if r["id"] in rule_ids:
            errors.append((f"rules.{i}.id", f"duplicate rule id {r['id']!r}"))
        rule_ids.add(r["id"])
        if "unit" in r and r["unit"] not in known:
            errors.append((f"rules.{i}.unit", f"unknown unit {r['unit']!r}"))
        if "area" in r and r["area"] != "*" and r["area"] not in areas:
            errors.append((f"rules.{i}.area", f"unknown area {r['area']!r}"))
        if "unit" not in r and "area" not in r:
            errors.append((f"rules.{i}", "a rule needs a unit, or an area whose unit it takes"))
        for j, t in enumerate(r.get("topics", ())):
            if topics and t not in topics:
                errors.append((f"rules.{i}.topics.{j}", f"unknown topic {t!r}"))
    for i, s in enumerate(data["staff"]):
        for j, uid in enumerate(s["units"]):
            if uid != "*" and uid not in known:
                errors.append((f"staff.{i}.units.{j}", f"unknown unit {uid!r}"))
    ack = data.get("templates", {}).get("ack")
    if not ack:
        errors.append(("templates.ack", "an acknowledgement template is required"))
    for name, variants in data.get("templates", {}).items():
        for language, text in variants.items():
            try:
                text.format_map(_AnyValue())
            except (ValueError, IndexError, KeyError, AttributeError, TypeError) as exc:
                errors.append((f"templates.{name}.{language}", f"not a valid template: {exc}"))
    return errors


class _AnyValue(dict[str, str]):
    """Fills every placeholder while a template is checked at load."""

    def __missing__(self, key: str) -> str:
        return ""
