"""Read queries for the shared inbox and the resident's status page, on the reader connection.

Every list query filters on indexed columns and pages by id (a keyset cursor), so it costs the
same on the millionth conversation as on the first."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..search import match_query
from ..store.sqlite import iso, parse_iso

if TYPE_CHECKING:
    from ..core import Core

WAITING_STATES = ("open", "acknowledged")


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"c:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Raises ValueError for a cursor we did not make."""
    padded = cursor + "=" * (-len(cursor) % 4)
    text = base64.urlsafe_b64decode(padded.encode()).decode()
    if not text.startswith("c:"):
        raise ValueError("bad cursor")
    value = int(text[2:])
    if not 0 < value <= 2**62:
        raise ValueError("bad cursor")
    return value


def _conversation_item(row: Any, now: datetime) -> dict[str, Any]:
    deadline = row["deadline"]
    return {
        "id": row["id"],
        "case_reference": row["case_reference"],
        "channel": row["channel"],
        "unit": row["unit"],
        "state": row["state"],
        "topic": row["topic"],
        "language": row["language"],
        "subject": row["subject"],
        "area": row["area"],
        "assignee": row["assignee"],
        "flags": json.loads(row["flags"] or "[]"),
        "contact": {
            "id": row["contact_id"],
            "display_name": row["display_name"],
            "is_customer": bool(row["is_customer"]),
            "customer_number": row["customer_number"],
            "customer_claim": row["customer_claim"],
        },
        "deadline": _rfc3339(deadline),
        "overdue": bool(deadline and row["state"] in WAITING_STATES and deadline < iso(now)),
        "escalation_level": row["escalation_level"],
        "linked_to": row["linked_to"],
        "created_at": _rfc3339(row["created_at"]),
        "updated_at": _rfc3339(row["updated_at"]),
        "last_inbound_at": _rfc3339(row["last_inbound_at"]),
        "first_answered_at": _rfc3339(row["first_answered_at"]),
    }


def _rfc3339(value: str | None) -> str | None:
    dt = parse_iso(value)
    return dt.isoformat().replace("+00:00", "Z") if dt else None


CONVERSATION_SELECT = (
    "SELECT c.*, k.display_name, k.is_customer, k.customer_number, k.customer_claim"
    " FROM conversations c JOIN contacts k ON k.id = c.contact_id"
)


async def list_conversations(
    core: Core,
    *,
    units: Iterable[str],
    state: str | None = None,
    channel: str | None = None,
    overdue: bool | None = None,
    q: str | None = None,
    contact_id: int | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> tuple[list[dict[str, Any]], str | None]:
    """Conversations of the given units, newest first, filtered; returns (items, next cursor)."""
    now = core.clock.now()
    where = []
    params: list[Any] = []
    unit_list = sorted(set(units))
    # One unit: walk its (unit, id) index. Several: walk the primary key newest first and
    # filter; "+" keeps SQLite from choosing the unit index and sorting everything (2 s at 1M).
    column = "c.unit" if len(unit_list) == 1 else "+c.unit"
    where.append(f"{column} IN ({','.join('?' * len(unit_list))})")
    params.extend(unit_list)
    if state:
        where.append("c.state = ?")
        params.append(state)
    if channel:
        where.append("c.channel = ?")
        params.append(channel)
    if overdue is True:
        where.append("+c.deadline IS NOT NULL AND +c.deadline < ? AND +c.state IN ('open', 'acknowledged')")
        params.append(iso(now))
    elif overdue is False:
        where.append("NOT (c.deadline IS NOT NULL AND c.deadline < ? AND c.state IN ('open', 'acknowledged'))")
        params.append(iso(now))
    if contact_id is not None:
        where.append("c.contact_id = ?")
        params.append(contact_id)
    if q:
        from ..text import find_case_reference

        reference = find_case_reference(q)
        if reference:
            where.append("c.case_reference = ?")
            params.append(reference)
        else:
            match = match_query(q)
            if match is None:
                return [], None
            where.append(
                "c.id IN (SELECT m.conversation_id FROM message_search s JOIN messages m ON m.id = s.rowid"
                " WHERE message_search MATCH ?)"
            )
            params.append(match)
    if before_id is not None:
        where.append("c.id < ?")
        params.append(before_id)
    sql = f"{CONVERSATION_SELECT} WHERE {' AND '.join(where)} ORDER BY c.id DESC LIMIT ?"
    params.append(limit + 1)
    rows = await core.store.fetchall(sql, tuple(params))
    items = [_conversation_item(r, now) for r in rows[:limit]]
    next_cursor = encode_cursor(rows[limit - 1]["id"]) if len(rows) > limit else None
    return items, next_cursor


async def conversation_unit(core: Core, conversation_id: int) -> str | None:
    row = await core.store.fetchone("SELECT unit FROM conversations WHERE id = ?", (conversation_id,))
    return row["unit"] if row else None


def _message_item(row: Any, deliveries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    payload = json.loads(row["payload"]) if row["payload"] else {}
    item = {
        "id": row["id"],
        "direction": row["direction"],
        "kind": row["kind"],
        "channel": row["channel"],
        "author": row["author"],
        "subject": row["subject"],
        "text": row["text"],
        "language": row["language"],
        "created_at": _rfc3339(row["created_at"]),
        "delivery_status": row["delivery_status"],
        "edited_at": _rfc3339(row["edited_at"]),
        "deleted_at": _rfc3339(row["deleted_at"]),
        "target_message_id": row["target_message_id"],
    }
    for key in ("attachments", "location", "address", "meta", "flags", "previous_text"):
        if key in payload:
            item[key] = payload[key]
    if deliveries is not None:
        item["deliveries"] = deliveries
    return item


async def conversation_detail(core: Core, conversation_id: int) -> dict[str, Any] | None:
    """One conversation with messages across channels, routing reason, escalations, events,
    call-back attempts and the delivery state of every outbound message."""
    now = core.clock.now()
    row = await core.store.fetchone(f"{CONVERSATION_SELECT} WHERE c.id = ?", (conversation_id,))
    if row is None:
        return None
    item = _conversation_item(row, now)
    item["routing"] = {"rule": row["routing_rule"], "reason": row["routing_reason"]}
    item["status_url"] = core.status_url(row["status_token"])
    outbox = await core.store.fetchall(
        "SELECT id, message_id, channel, to_kind, to_address, state, attempts, last_error, delivery_status,"
        " next_attempt_at FROM outbox WHERE conversation_id = ? ORDER BY id",
        (conversation_id,),
    )
    by_message: dict[int, list[dict[str, Any]]] = {}
    for o in outbox:
        by_message.setdefault(o["message_id"], []).append({
            "channel": o["channel"], "to": o["to_address"], "state": o["state"], "attempts": o["attempts"],
            "delivery_status": o["delivery_status"], "last_error": o["last_error"],
            "next_attempt_at": _rfc3339(o["next_attempt_at"]) if o["state"] == "pending" else None,
        })
    messages = await core.store.fetchall(
        "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
    )
    item["messages"] = [_message_item(m, by_message.get(m["id"], [])) for m in messages]
    item["pending_deliveries"] = sum(1 for o in outbox if o["state"] in ("pending", "sending"))
    escalations = await core.store.fetchall(
        "SELECT level, from_unit, to_unit, reason, at FROM escalations WHERE conversation_id = ? ORDER BY id",
        (conversation_id,),
    )
    item["escalations"] = [{**dict(e), "at": _rfc3339(e["at"])} for e in escalations]
    events = await core.store.fetchall(
        "SELECT kind, actor, data, at FROM events WHERE conversation_id = ? ORDER BY id", (conversation_id,)
    )
    item["events"] = [
        {"kind": e["kind"], "actor": e["actor"], "data": json.loads(e["data"]) if e["data"] else {}, "at": _rfc3339(e["at"])}
        for e in events
    ]
    callbacks = await core.store.fetchall(
        "SELECT outcome, note, staff, at FROM callback_attempts WHERE conversation_id = ? ORDER BY id", (conversation_id,)
    )
    item["callbacks"] = [{**dict(c), "at": _rfc3339(c["at"])} for c in callbacks]
    identities = await core.store.fetchall(
        "SELECT kind, address, last_inbound_at, failed_at FROM identities WHERE contact_id = ? ORDER BY id",
        (row["contact_id"],),
    )
    item["contact"]["identities"] = [
        {"kind": i["kind"], "address": i["address"], "last_inbound_at": _rfc3339(i["last_inbound_at"]),
         "failed": i["failed_at"] is not None}
        for i in identities
    ]
    return item


async def resident_view(core: Core, status_token: str) -> dict[str, Any] | None:
    """What the resident sees on the status page: no notes, no internal notifications, no
    staff names beyond the unit."""
    row = await core.store.fetchone("SELECT * FROM conversations WHERE status_token = ?", (status_token,))
    if row is None:
        return None
    messages = await core.store.fetchall(
        "SELECT id, direction, kind, channel, text, created_at, delivery_status FROM messages"
        " WHERE conversation_id = ? AND direction IN ('in', 'out') AND kind NOT IN ('reaction', 'edit', 'deletion', 'callback')"
        " ORDER BY id",
        (row["id"],),
    )
    unit = core.config.units.get(row["unit"])
    sender = await core.store.fetchone(
        "SELECT kind, address FROM identities WHERE contact_id = ? ORDER BY id LIMIT 1", (row["contact_id"],)
    )
    return {
        "id": row["id"],
        "sender": {"kind": sender["kind"], "address": sender["address"]} if sender else None,
        "case_reference": row["case_reference"],
        "state": row["state"],
        "unit": row["unit"],
        "unit_name": unit.name if unit else row["unit"],
        "deadline": parse_iso(row["deadline"]),
        "language": row["language"],
        "topic": row["topic"],
        "created_at": parse_iso(row["created_at"]),
        "messages": [
            {"direction": m["direction"], "kind": m["kind"], "channel": m["channel"], "text": m["text"],
             "created_at": parse_iso(m["created_at"]), "delivery_status": m["delivery_status"]}
            for m in messages
        ],
    }


async def contact_detail(core: Core, contact_id: int) -> dict[str, Any] | None:
    row = await core.store.fetchone("SELECT * FROM contacts WHERE id = ?", (contact_id,))
    if row is None:
        return None
    identities = await core.store.fetchall(
        "SELECT kind, address, last_inbound_at, failed_at FROM identities WHERE contact_id = ? ORDER BY id", (contact_id,)
    )
    return {
        "id": row["id"],
        "display_name": row["display_name"],
        "language": row["language"],
        "is_customer": bool(row["is_customer"]),
        "customer_number": row["customer_number"],
        "customer_claim": row["customer_claim"],
        "merged_into": row["merged_into"],
        "created_at": _rfc3339(row["created_at"]),
        "identities": [
            {"kind": i["kind"], "address": i["address"], "last_inbound_at": _rfc3339(i["last_inbound_at"]),
             "failed": i["failed_at"] is not None}
            for i in identities
        ],
    }


async def contact_units(core: Core, contact_id: int) -> set[str]:
    rows = await core.store.fetchall("SELECT DISTINCT unit FROM conversations WHERE contact_id = ?", (contact_id,))
    return {r["unit"] for r in rows}


async def stats(core: Core, units: Iterable[str]) -> list[dict[str, Any]]:
    """Per channel and unit: received, acknowledged, answered, overdue, median time to first
    human answer (seconds)."""
    now = iso(core.clock.now())
    unit_list = sorted(set(units))
    marks = ",".join("?" * len(unit_list))
    rows = await core.store.fetchall(
        f"SELECT channel, unit, COUNT(*) AS received,"
        f" SUM(state != 'open' OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND m.kind = 'ack'"
        f"   AND m.delivery_status IN ('sent', 'delivered', 'read'))) AS acknowledged,"
        f" SUM(first_answered_at IS NOT NULL) AS answered,"
        f" SUM(deadline IS NOT NULL AND deadline < ? AND state IN ('open', 'acknowledged')) AS overdue"
        f" FROM conversations c WHERE unit IN ({marks}) GROUP BY channel, unit ORDER BY channel, unit",
        (now, *unit_list),
    )
    durations = await core.store.fetchall(
        f"SELECT channel, unit, created_at, first_answered_at FROM conversations"
        f" WHERE unit IN ({marks}) AND first_answered_at IS NOT NULL",
        tuple(unit_list),
    )
    per: dict[tuple[str, str], list[float]] = {}
    for d in durations:
        start, end = parse_iso(d["created_at"]), parse_iso(d["first_answered_at"])
        if start and end:
            per.setdefault((d["channel"], d["unit"]), []).append((end - start).total_seconds())
    result = []
    for r in rows:
        values = sorted(per.get((r["channel"], r["unit"]), []))
        median = None
        if values:
            mid = len(values) // 2
            median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
        result.append({
            "channel": r["channel"], "unit": r["unit"], "received": r["received"],
            "acknowledged": r["acknowledged"] or 0, "answered": r["answered"] or 0, "overdue": r["overdue"] or 0,
            "median_first_answer_seconds": median,
        })
    return result
