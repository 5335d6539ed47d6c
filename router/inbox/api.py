"""The shared inbox HTTP API under ``/api/v1``: bearer tokens per staff member, each scoped to
units (plus the units those oversee); a conversation outside the caller's scope answers 404 as
if it did not exist. Also ``/healthz`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import re
import time
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from .. import idempotency, keys
from ..channel import json_error
from ..config import Config, StaffMember
from ..search import MAX_WORDS, search_words
from ..store.sqlite import iso, parse_iso
from ..tracking import FLAGS
from . import queries
from .openapi import MAX_ID, openapi_document

MAX_TEXT = 20_000
# /healthz waits this long for its write; a database locked by another process answers later.
HEALTH_TIMEOUT_SECONDS = 5
# ... and writes only when no transaction committed in this many seconds (under load, never).
HEALTH_FRESH_SECONDS = 5
# /healthz fails when outbox rows have been due this long and the outbox has recorded no outcome
# (sent, failed, to be tried again) for as long: a worker that is stuck, which a restart mends.
# Not a provider that is down: its failures are outcomes, and a restart would not mend it.
OUTBOX_STALL_SECONDS = 300.0
# /healthz counts the outbox's rows up to this many: a backlog of a million costs it no more
# than one of ten thousand. /metrics counts them all.
HEALTH_COUNT_LIMIT = 10_000
STATES = ("open", "acknowledged", "answered", "waiting", "closed")


def _error(status: int, code: str, message: str, **extra: Any) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden, 404: web.HTTPNotFound, 409: web.HTTPConflict}[status]
    headers = {"WWW-Authenticate": 'Bearer realm="contact-router"'} if status == 401 else None
    return json_error(cls, code, message, extra=extra, headers=headers)


def visible_units(config: Config, member: StaffMember) -> frozenset[str]:
    """The units a staff member may read and act on: their own and those their units oversee."""
    if "*" in member.units:
        return frozenset(config.units)
    units = set(member.units)
    for uid in member.units:
        unit = config.units.get(uid)
        if unit:
            units.update(unit.oversees)
    return frozenset(units)


_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def authenticate(request: web.Request) -> tuple[StaffMember, frozenset[str]]:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _error(401, "unauthorized", "a bearer token is required")
    token = token.strip()
    found = None
    for member in request.app[keys.STAFF]:
        # A header is decoded with surrogate escapes; bytes that are no UTF-8 match no token.
        if hmac.compare_digest(member.token.encode(), token.encode("utf-8", "surrogateescape")):
            found = member
    if found is None:
        raise _error(401, "unauthorized", "unknown token")
    if found.demo and any(name in request.headers for name in _PROXY_HEADERS):
        # A demo token is known to everyone who read the README: it is for this machine only.
        raise _error(401, "unauthorized", "demo tokens are accepted only from this machine, not through a proxy")
    return found, visible_units(request.app[keys.CONFIG], found)


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise _error(400, "invalid_body", "send a JSON object with Content-Type: application/json")
    try:
        # Decoded here as UTF-8 (the only charset JSON has), whatever charset the header names.
        data = json.loads((await request.read()).decode("utf-8"))
    except (ValueError, RecursionError):  # JSON errors, bad UTF-8, nesting too deep
        raise _error(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _error(400, "invalid_body", "the body must be a JSON object")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # "\ud800": half a UTF-16 pair, which no database column holds
        raise _error(400, "invalid_json", "the body holds an unpaired surrogate (\\uD800-\\uDFFF)") from None
    return data


def _text(data: dict[str, Any], field: str, *, required: bool = True, max_len: int = MAX_TEXT) -> str | None:
    value = data.get(field)
    if not required and (value is None or (isinstance(value, str) and not value.strip())):
        return None  # an optional field a web page sends empty is not given
    if not isinstance(value, str) or not value.strip():
        raise _error(400, "invalid_field", f"{field} must be a non-empty string", field=field)
    if len(value) > max_len:
        raise _error(400, "invalid_field", f"{field} is longer than {max_len} characters", field=field)
    return value.strip()


def _int_param(value: str, field: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise _error(400, "invalid_parameter", f"{field} must be an integer", field=field) from None
    if number < 1 or number > MAX_ID:
        raise _error(400, "invalid_parameter", f"{field} is out of range", field=field)
    return number


async def _scoped_conversation(request: web.Request, *, keyed: bool = False) -> tuple[StaffMember, int, frozenset[str]]:
    """The member, the conversation's id and the member's units: a quick 404 for a conversation
    outside them. The actions check the units again inside their write, since a transfer or an
    escalation may move the conversation in between.

    Not for a ``keyed`` action's request with an ``Idempotency-Key``: it answers a replay first, then
    checks the units in its write. A reply whose answer was lost, sent again after the case
    moved to another unit, got a 404, and staff took the sent answer for one never sent."""
    member, units = authenticate(request)
    conversation_id = _int_param(request.match_info["id"], "id")
    if keyed and idempotency.HEADER in request.headers:
        return member, conversation_id, units
    unit = await queries.conversation_unit(request.app[keys.CORE], conversation_id)
    if unit is None or unit not in units:
        raise _error(404, "not_found", "conversation not found")
    return member, conversation_id, units


routes = web.RouteTableDef()


@routes.get("/api/v1/conversations")
async def list_conversations(request: web.Request) -> web.Response:
    member, units = authenticate(request)
    q = request.query
    unit = q.get("unit")
    if unit is not None:
        if unit not in request.app[keys.CONFIG].units:
            raise _error(400, "invalid_parameter", f"unknown unit {unit!r}", field="unit")
        units = units & {unit}
    state = q.get("state")
    if state is not None and state not in STATES:
        raise _error(400, "invalid_parameter", f"state must be one of {', '.join(STATES)}", field="state")
    overdue = None
    if "overdue" in q:
        if q["overdue"] not in ("true", "false"):
            raise _error(400, "invalid_parameter", "overdue must be true or false", field="overdue")
        overdue = q["overdue"] == "true"
    limit = _int_param(q.get("limit", "50"), "limit")
    if limit > 200:
        raise _error(400, "invalid_parameter", "limit is at most 200", field="limit")
    before = None
    if q.get("cursor"):
        try:
            before = queries.decode_cursor(q["cursor"])
        except (ValueError, UnicodeDecodeError):
            raise _error(400, "invalid_parameter", "cursor is not valid", field="cursor") from None
    contact = _int_param(q["contact"], "contact") if "contact" in q else None
    flag = q.get("flag")
    if flag is not None and flag not in FLAGS:
        raise _error(400, "invalid_parameter", f"flag must be one of {', '.join(sorted(FLAGS))}", field="flag")
    search = q.get("q")
    if search is not None and len(search) > 200:
        raise _error(400, "invalid_parameter", "q is longer than 200 characters", field="q")
    if search is not None and len(search_words(search)) > MAX_WORDS:
        # Every word must occur: the words after the tenth were dropped without a word, and a
        # search found what did not have them.
        raise _error(400, "invalid_parameter", f"q has more than {MAX_WORDS} words", field="q")
    if not units:
        return web.json_response({"items": [], "next_cursor": None})
    items, cursor = await queries.list_conversations(
        request.app[keys.CORE], units=units, state=state, channel=q.get("channel"), overdue=overdue,
        q=search, contact_id=contact, flag=flag, before_id=before, limit=limit,
    )
    if not _sees_status_link(request.app[keys.CONFIG], member):
        items = [_hide_status_link(item) for item in items]
    return web.json_response({"items": items, "next_cursor": cursor})


def _sees_status_link(config: Config, member: StaffMember) -> bool:
    """Whether the resident's status link belongs in what this member sees: staff of an own
    unit (the hotline gives it out again on the phone). Staff of external units (contractors)
    do not get it: the link is the resident's key to the whole conversation, and it would
    keep working for them after the conversation moved to another unit."""
    return "*" in member.units or any(
        unit in config.units and config.units[unit].kind != "external" for unit in member.units
    )


HIDDEN_STATUS_LINK = "[status link]"
# A status page's address (its token after /status/), or a status token alone: the time in 13
# hex digits, then 32 characters of URL-safe base64 (``sortable_token(24)``). Alone means after
# a character a token has not, or after a percent-escape: a link written into another one
# (Outlook's Safe Links: ``?url=https%3A%2F%2F…%2Fstatus%2F<token>&data=…``) ends in ``%2F``,
# one written into a link that was itself written into one (a tracking redirect) in ``%252F``.
_STATUS_LINK = re.compile(
    r"(?:https?://[^\s/]{1,253})?/channels/webform/status/[A-Za-z0-9_-]+"
    r"|(?:(?<![A-Za-z0-9_-])|(?<=%[0-9A-Fa-f]{2})|(?<=%25[0-9A-Fa-f]{2}))[0-9a-f]{13}[A-Za-z0-9_-]{32}(?![A-Za-z0-9_-])"
)


def _hide_status_link(item: dict[str, Any]) -> dict[str, Any]:
    """A conversation (its detail or its list entry) without residents' status links: its own
    field gone, and every text that carries one (the acknowledgement, the notice of a new
    answer, the call-back SMS, a reply by mail that quotes one of them, ``meta``, the subject,
    a call-back's note, another conversation's link quoted or pasted). The subject slipped
    through, in the detail and in the list: a resident who pasted an older case's link into
    a new case's subject gave it to the contractor who got the new case."""

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            # Any conversation's link, not only this one's: a neighbour's answer quotes the
            # resident's acknowledgement, and a resident pastes an older case's link.
            return _STATUS_LINK.sub(HIDDEN_STATUS_LINK, value) if "/status/" in value or len(value) >= 45 else value
        if isinstance(value, dict):
            return {key: scrub(inner) for key, inner in value.items()}
        if isinstance(value, list):
            return [scrub(inner) for inner in value]
        return value

    return {key: scrub(value) for key, value in item.items() if key != "status_url"}


def _shown(request: web.Request, member: StaffMember, detail: dict[str, Any]) -> dict[str, Any]:
    """The detail as this member may see it (without status links for staff of external units)."""
    if not _sees_status_link(request.app[keys.CONFIG], member):
        return _hide_status_link(detail)
    return detail


async def _detail(request: web.Request, member: StaffMember, units: frozenset[str], conversation_id: int) -> dict[str, Any]:
    """The conversation as this member may see it: 404 when it is not in their units (also when
    it moved away since the request began)."""
    detail = await queries.conversation_detail(request.app[keys.CORE], conversation_id)
    if detail is None or detail["unit"] not in units:
        raise _error(404, "not_found", "conversation not found")
    return _shown(request, member, detail)


async def _done(request: web.Request, member: StaffMember, units: frozenset[str], conversation_id: int) -> web.Response:
    """The answer to an action that was done (assign, a transfer to one of the caller's units,
    close, reopen, wait): the detail, read after the write. Another request (a transfer, an
    escalation) may have moved the conversation out of the caller's units between the write and
    that read: the action was done all the same, so not a 404 ("changes nothing"), which made
    staff do it again, but ``{id, unit, moved: true}``, as a transfer away answers."""
    detail = await queries.conversation_detail(request.app[keys.CORE], conversation_id)
    if detail is None:  # conversations are never deleted, and the action just found this one
        raise RuntimeError(f"conversation {conversation_id} is gone after an action on it")
    if detail["unit"] not in units:
        return web.json_response({"id": conversation_id, "unit": detail["unit"], "moved": True})
    return web.json_response(_shown(request, member, detail))


@routes.get("/api/v1/conversations/{id}")
async def get_conversation(request: web.Request) -> web.Response:
    member, conversation_id, units = await _scoped_conversation(request)
    return web.json_response(await _detail(request, member, units, conversation_id))


def _idempotency_key(request: web.Request, member: StaffMember) -> str | None:
    """The request's ``Idempotency-Key`` header, checked and scoped to the caller's token; None
    when it has none."""
    key = request.headers.get(idempotency.HEADER)
    if key is None:
        return None
    if not idempotency.valid_key(key):
        raise _error(400, "invalid_header", f"{idempotency.HEADER} must be 1 to 255 printable ASCII characters without"
                     " spaces", field=idempotency.HEADER)
    return idempotency.scoped(member.token, key)


def _created(result: dict[str, Any], body: dict[str, Any]) -> web.Response:
    """201 with ``body`` (without the replay marker); an action sent again with its idempotency
    key, answered as the first time, says so in a header."""
    headers = {"Idempotent-Replayed": "true"} if result.get(idempotency.REPLAYED) else None
    return web.json_response({k: v for k, v in body.items() if k != idempotency.REPLAYED}, status=201, headers=headers)


@routes.post("/api/v1/conversations/{id}/replies")
async def post_reply(request: web.Request) -> web.Response:
    member, conversation_id, units = await _scoped_conversation(request, keyed=True)
    data = await _body(request)
    text = _text(data, "text")
    message = await request.app[keys.CORE].reply(
        conversation_id, text, member.name, units=units, key=_idempotency_key(request, member))
    return _created(message, {**message, "created_at": queries.rfc3339(message["created_at"])})


@routes.post("/api/v1/conversations/{id}/notes")
async def post_note(request: web.Request) -> web.Response:
    member, conversation_id, units = await _scoped_conversation(request, keyed=True)
    data = await _body(request)
    note = await request.app[keys.CORE].note(
        conversation_id, _text(data, "text"), member.name, units=units, key=_idempotency_key(request, member))
    return _created(note, {**note, "created_at": queries.rfc3339(note["created_at"])})


@routes.post("/api/v1/conversations/{id}/assign")
async def post_assign(request: web.Request) -> web.Response:
    member, conversation_id, units = await _scoped_conversation(request)
    data = await _body(request)
    if "assignee" not in data:
        raise _error(400, "invalid_field", "assignee is required: a name, or null to unassign", field="assignee")
    assignee = data["assignee"]
    if assignee is not None and (not isinstance(assignee, str) or not assignee.strip() or len(assignee) > 100):
        raise _error(400, "invalid_field", "assignee must be a name or null", field="assignee")
    await request.app[keys.CORE].assign(conversation_id, assignee, member.name, units=units)
    return await _done(request, member, units, conversation_id)


@routes.post("/api/v1/conversations/{id}/transfer")
async def post_transfer(request: web.Request) -> web.Response:
    member, conversation_id, units = await _scoped_conversation(request)
    data = await _body(request)
    unit = _text(data, "unit", max_len=64)
    if unit not in request.app[keys.CONFIG].units:
        raise _error(400, "invalid_field", f"unknown unit {unit!r}", field="unit")
    reason = _text(data, "reason", required=False, max_len=2000) or ""
    await request.app[keys.CORE].transfer(conversation_id, unit, reason, member.name, units=units)
    if unit not in units:
        return web.json_response({"id": conversation_id, "unit": unit, "transferred": True})
    return await _done(request, member, units, conversation_id)


async def _state_action(request: web.Request, action: str) -> web.Response:
    member, conversation_id, units = await _scoped_conversation(request)
    await request.app[keys.CORE].set_state(conversation_id, action, member.name, units=units)
    return await _done(request, member, units, conversation_id)


@routes.post("/api/v1/conversations/{id}/close")
async def post_close(request: web.Request) -> web.Response:
    return await _state_action(request, "close")


@routes.post("/api/v1/conversations/{id}/reopen")
async def post_reopen(request: web.Request) -> web.Response:
    return await _state_action(request, "reopen")


@routes.post("/api/v1/conversations/{id}/wait")
async def post_wait(request: web.Request) -> web.Response:
    return await _state_action(request, "wait")


@routes.post("/api/v1/conversations/{id}/callbacks")
async def post_callback(request: web.Request) -> web.Response:
    member, conversation_id, units = await _scoped_conversation(request, keyed=True)
    data = await _body(request)
    outcome = data.get("outcome")
    if outcome not in ("reached", "not_reached", "wrong_number"):
        raise _error(400, "invalid_field", "outcome must be reached, not_reached or wrong_number", field="outcome")
    note = _text(data, "note", required=False, max_len=5000)
    result = await request.app[keys.CORE].log_callback(
        conversation_id, outcome, note, member.name, units=units, key=_idempotency_key(request, member))
    # The attempt's time as every other time of the API is written (the detail's callbacks[].at).
    attempt = {**result["attempt"], "at": queries.rfc3339(result["attempt"]["at"])}
    return _created(result, {"attempt": attempt, "answered": bool(result["answered"]), "escalated": bool(result["escalated"])})


async def _scoped_contact(request: web.Request, contact_id: int, units: frozenset[str]) -> dict[str, Any]:
    """The contact, for staff who see one of its conversations; a merged contact (whose
    conversations went to the contact it was merged into) for staff who see the survivor's."""
    core = request.app[keys.CORE]
    contact = await queries.contact_detail(core, contact_id)
    if contact is None or not (await queries.contact_units(core, contact_id)) & units:
        raise _error(404, "not_found", "contact not found")
    return contact


@routes.get("/api/v1/contacts/{id}")
async def get_contact(request: web.Request) -> web.Response:
    _, units = authenticate(request)
    contact = await _scoped_contact(request, _int_param(request.match_info["id"], "id"), units)
    return web.json_response(contact)


@routes.post("/api/v1/contacts/{id}/merge")
async def post_merge(request: web.Request) -> web.Response:
    member, units = authenticate(request)
    survivor = _int_param(request.match_info["id"], "id")
    data = await _body(request)
    other = data.get("other_contact_id")
    if not isinstance(other, int) or isinstance(other, bool) or not 1 <= other <= MAX_ID:
        raise _error(400, "invalid_field", "other_contact_id must be a contact id", field="other_contact_id")
    if not _sees_status_link(request.app[keys.CONFIG], member):
        # A merge makes one person's addresses the other's: the next answer in any of their
        # cases goes to the address used last. A contractor who merged a form it had sent itself
        # into a resident's contact received the resident's answers, and their status link.
        raise _error(403, "forbidden", "merging contacts is for staff of the company's own units")
    core = request.app[keys.CORE]
    # Merging moves every conversation of both contacts: only for staff who see them all, which
    # the merge checks in its write (404 otherwise).
    await core.merge_contacts(survivor, other, member.name, units=units)
    return web.json_response(await queries.contact_detail(core, survivor))


@routes.get("/api/v1/units")
async def get_units(request: web.Request) -> web.Response:
    _, units = authenticate(request)
    config = request.app[keys.CONFIG]
    return web.json_response({"items": [config.units[u].public() for u in config.units if u in units]})


# RFC 3339 and its date alone; a URL's query turns the "+" of an offset into a space, which is
# taken back (``2026-11-01T08:00:00 01:00``).
# RFC 3339 (5.6) lets the "T" and the "Z" be written in lower case.
_MOMENT = re.compile(r"\d{4}-\d{2}-\d{2}(?:[Tt]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:[Zz]|[+ -]\d{2}:\d{2})?)?")


def _time_param(request: web.Request, field: str, timezone: str) -> datetime | None:
    """A point in time from a query parameter, or None when it is not given: a date (its
    midnight in the service's timezone) or a date and time with an offset (without one, in the
    service's timezone; a local time that the clock skips or repeats at a change of daylight
    saving time is read with the offset before the change)."""
    values = request.query.getall(field, [])
    if not values:
        return None
    if len(values) > 1:
        raise _error(400, "invalid_parameter", f"{field} is given more than once", field=field)
    value = values[0]
    if not _MOMENT.fullmatch(value):
        raise _error(400, "invalid_parameter", f"{field} must be a date (2026-11-01) or a date and time"
                     " (2026-11-01T08:00:00Z, or with an offset such as %2B01:00)", field=field)
    try:
        moment = datetime.fromisoformat(value.replace(" ", "+").upper())
    except ValueError:  # a month 13, a 30 February
        raise _error(400, "invalid_parameter", f"{field} is no date: {value}", field=field) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(timezone))
    if not 1970 <= moment.year <= 9998:
        raise _error(400, "invalid_parameter", f"{field} is out of range", field=field)
    return moment.astimezone(UTC)


@routes.get("/api/v1/stats")
async def get_stats(request: web.Request) -> web.Response:
    _, units = authenticate(request)
    timezone = request.app[keys.CONFIG].timezone
    since, until = _time_param(request, "from", timezone), _time_param(request, "to", timezone)
    if since is not None and until is not None and since >= until:
        raise _error(400, "invalid_parameter", "to must be later than from", field="to")
    items = await queries.stats(request.app[keys.CORE], units, since, until)
    # Written as every time of the API is (queries.rfc3339), not as the store keeps them.
    return web.json_response({"items": items, "from": queries.rfc3339(iso(since)), "to": queries.rfc3339(iso(until))})


@routes.get("/api/v1/me")
async def get_me(request: web.Request) -> web.Response:
    member, units = authenticate(request)
    return web.json_response({"name": member.name, "units": sorted(units)})


@routes.get("/api/v1/openapi.json")
async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


# The outbox's rows due now (pending and due, or claimed by a worker whose lease ran out: what
# a worker would claim), since when the oldest of each kind is due, and the rows waiting for a
# later attempt. Each is a range of the index outbox_due (state, next_attempt_at), and each count
# stops at :limit; only the rows in 'sending' (a batch or two) are read from the table.
OUTBOX_HEALTH_SQL = (
    "SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM outbox WHERE state = 'pending' AND next_attempt_at <= :now LIMIT :limit)),"
    " (SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending' AND next_attempt_at <= :now),"
    " (SELECT COUNT(*) FROM (SELECT 1 FROM outbox WHERE state = 'sending' AND claimed_until <= :now LIMIT :limit)),"
    " (SELECT MIN(claimed_until) FROM outbox WHERE state = 'sending' AND claimed_until <= :now),"
    " (SELECT COUNT(*) FROM (SELECT 1 FROM outbox WHERE state = 'pending' AND next_attempt_at > :now LIMIT :limit))"
)


async def _outbox_health(app: web.Application) -> dict[str, Any]:
    """The outbox as /healthz shows it: ``due``, the rows a worker should be sending now (counted
    up to ``HEALTH_COUNT_LIMIT``); ``oldest_due_seconds``, how long the oldest of them has been
    due (null when none is); ``retrying``, the rows waiting for a later attempt after a failure."""
    now = app[keys.CLOCK].now()
    row = await app[keys.STORE].fetchone(OUTBOX_HEALTH_SQL, {"now": iso(now), "limit": HEALTH_COUNT_LIMIT})
    assert row is not None
    pending, pending_since, expired, expired_since, retrying = row
    since = min(filter(None, (parse_iso(pending_since), parse_iso(expired_since))), default=None)
    return {
        "due": min(pending + expired, HEALTH_COUNT_LIMIT),
        "oldest_due_seconds": None if since is None else round(max(0.0, (now - since).total_seconds()), 3),
        "retrying": retrying,
    }


@dataclasses.dataclass
class OutboxWatch:
    """How many outcomes the outbox worker had recorded when /healthz last looked, and since
    when (``time.monotonic``) that count has stood still."""

    outcomes: int = 0
    since: float = dataclasses.field(default_factory=time.monotonic)

    def quiet_for(self, outcomes: int) -> float:
        """Seconds the count of outcomes has not moved, as far as /healthz has seen."""
        now = time.monotonic()
        if outcomes != self.outcomes:
            self.outcomes, self.since = outcomes, now
        return now - self.since


def _outbox_stuck(app: web.Application, outbox: dict[str, Any]) -> str | None:
    """Why the outbox counts as stuck, or None: its task runs, rows have been due for
    ``OUTBOX_STALL_SECONDS``, and it has recorded no outcome at all for as long. A provider that
    is down is not stuck (each failure is an outcome, and the rows wait for their retry), nor a
    long backlog that is being sent."""
    worker = app[keys.CORE].outbox
    running = any(task.get_name() == "outbox" and not task.done() for task in app[keys.WORKERS])
    if worker is None or not running:
        return None
    quiet = app[keys.OUTBOX_WATCH].quiet_for(worker.sent + worker.failed + worker.retried)
    waited = outbox["oldest_due_seconds"]
    if waited is None or waited < OUTBOX_STALL_SECONDS or quiet < OUTBOX_STALL_SECONDS:
        return None
    return (f"outbox stuck: {outbox['due']} deliveries due (the oldest for {waited:.0f} s) and no delivery outcome"
            f" for {quiet:.0f} s; restart the service")


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    store = request.app[keys.STORE]
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS):
            # A write: a database that is read-only or full still answers reads. Unless rows
            # were committed just now, which shows the same without another fsync.
            if store.outage is not None or time.monotonic() - store.committed_at > HEALTH_FRESH_SECONDS:
                await store.probe()
            outbox = await _outbox_health(request.app)
    except TimeoutError:
        return web.json_response({"status": "error", "detail": f"the database did not take a write or answer a read"
                                  f" within {HEALTH_TIMEOUT_SECONDS} s"}, status=503)
    except Exception as exc:  # report, do not crash the probe
        return web.json_response({"status": "error", "detail": str(exc)}, status=503)
    # A worker that ended (it never should: each pass's failure is logged and the next one
    # runs) leaves messages stored and acknowledged to providers but never sent or escalated.
    ended = [task.get_name() for task in request.app[keys.WORKERS] if task.done()]
    if ended:
        return web.json_response({"status": "error", "detail": f"stopped: {', '.join(ended)}; restart the service",
                                  "outbox": outbox}, status=503)
    stuck = _outbox_stuck(request.app, outbox)
    if stuck is not None:
        return web.json_response({"status": "error", "detail": stuck, "outbox": outbox}, status=503)
    return web.json_response({"status": "ok", "channels": sorted(request.app[keys.CORE].channels), "outbox": outbox})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    core = request.app[keys.CORE]
    gauges = {
        "contact_router_outbox_rows": [({"state": state, "channel": channel}, n)
                                       for state, channel, n in await queries.outbox_backlog(core)],
        "contact_router_conversations_overdue": [({"unit": unit}, n) for unit, n in await queries.overdue_by_unit(core)],
    }
    counters = {  # since start, as the counters of the process are
        "contact_router_group_commits": [({}, core.store.commits)],
        "contact_router_group_commit_units": [({}, core.store.units_committed)],
        "contact_router_storage_unavailable": [({}, core.store.outages)],
    }
    return web.Response(text=request.app[keys.METRICS].render(gauges, counters), content_type="text/plain",
                        charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})


def setup_inbox(app: web.Application, *, allow_demo_tokens: bool = True) -> None:
    """Mount the API; demo tokens (from the configuration's defaults) only when allowed."""
    config = app[keys.CONFIG]
    app[keys.STAFF] = tuple(m for m in config.staff if allow_demo_tokens or not m.demo)
    app[keys.OUTBOX_WATCH] = OutboxWatch()
    app.router.add_routes(routes)
