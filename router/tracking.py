"""Conversations and the reply guarantee: states, deadlines in business hours, queued
acknowledgements and notifications, escalation along the unit's chain.

States: ``open`` (waiting for its acknowledgement), ``acknowledged`` (waiting for a human
answer), ``answered`` (a human answer reached the person), ``waiting`` (staff wait for the
resident; no deadline), ``closed``. A new inbound message reopens. Every function here runs
inside the caller's transaction on the writer connection.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from .config import Config
from .hours import days_earlier, days_later
from .store.sqlite import iso, parse_iso
from .templates import Templates, format_deadline
from .text import new_case_reference, sortable_token

# One encoder for every row: json.dumps(..., ensure_ascii=False) builds a new JSONEncoder on
# each call, since only the all-defaults call has a cached one. Same output.
to_json = json.JSONEncoder(ensure_ascii=False).encode

AWAITING_ANSWER = ("open", "acknowledged")

# Inbound kinds that change an earlier message (a reaction, an edit, a deletion) and are no
# message of their own.
ANNOTATIONS = frozenset({"reaction", "edit", "deletion"})
# ack_suppressed reasons that mark a message as sent by a machine: it opens no deadline.
AUTOMATED = frozenset({"auto-reply", "list", "bulk", "bounce", "loop"})
# A message a person sent, as a condition on ``messages`` with its parameters: inbound, and not
# one a machine sent (an auto-reply, a list mail, a bounce), which is nobody's word.
FROM_A_PERSON = (
    "direction = 'in' AND (payload IS NULL OR COALESCE(json_extract(payload, '$.ack_suppressed'), '')"
    f" NOT IN ({', '.join('?' * len(AUTOMATED))}))"
)
FROM_A_PERSON_PARAMS = tuple(sorted(AUTOMATED))
# The first message a person wrote after a given one, not a reaction, an edit or a deletion.
_WRITTEN_SINCE = (
    f"SELECT id, created_at FROM messages WHERE conversation_id = ? AND id > ? AND {FROM_A_PERSON}"
    f" AND kind NOT IN ({', '.join('?' * len(ANNOTATIONS))}) ORDER BY id LIMIT 1"
)

FLAGS = frozenset({
    "callback_required",  # a missed call, a voicemail, or nothing could be delivered: call the person back
    "callback_failed",  # the call-backs failed (too many attempts, a wrong number)
    "undeliverable",  # an acknowledgement or answer reached no address of the contact
    "owner_not_notified",  # the mail telling the owning unit about the case could not be delivered
    "no_number",  # nobody to answer on the channel: a withheld number, a mail without a sender
    "unsupported",  # a message of a kind the channel does not know
    "provider_error",  # the provider reported an error with the message
    "transcription_failed",  # a voicemail without its transcript
})
"""Every flag a conversation can carry; the inbox lists the conversations with one."""

# The scheduler's scan. The hint keeps SQLite on the partial escalate_at index: left alone it
# picks the state index and sorts, 434 ms instead of 1 ms at a million conversations. A
# conversation whose owner's answer is queued or on its way is not overdue for want of an
# answer: escalated, the owner lost the case they had just answered (a 404 for an external
# unit) and the next unit was told they did not answer. It escalates if the answer fails. An
# answer that reached the person already (somewhere: its copy may still be retried) is none
# to what they wrote after it: a copy waiting for a relay that is down held that back.
OVERDUE_SCAN = (
    "SELECT * FROM conversations INDEXED BY conversations_escalate WHERE escalate_at IS NOT NULL AND escalate_at <= ?"
    " AND state IN ('open', 'acknowledged') AND NOT EXISTS (SELECT 1 FROM outbox JOIN messages ON messages.id ="
    " outbox.message_id WHERE outbox.conversation_id = conversations.id AND outbox.kind = 'reply'"
    " AND outbox.state IN ('pending', 'sending')"
    " AND (conversations.answered_at IS NULL OR messages.created_at > conversations.answered_at))"
    " ORDER BY escalate_at LIMIT ?"
)


# A new conversation's columns: those given per conversation, then those every new one starts
# with. The constants are written as SQL literals: each None bound as a parameter costs the
# sqlite3 module a failed adapter lookup (about 0.3 us).
_NEW_CONVERSATION_COLUMNS = (
    "contact_id", "channel", "recipient", "unit", "state", "topic", "language", "subject", "area", "routing_rule",
    "routing_reason", "deadline", "escalate_at", "linked_to", "created_at", "updated_at", "last_inbound_at",
)
_NEW_CONVERSATION_CONSTANTS: dict[str, Any] = {
    "escalation_level": 0, "assignee": None, "flags": "[]", "first_answered_at": None, "answered_at": None,
    "closed_at": None,
}
_INSERT_CONVERSATION = (
    f"INSERT INTO conversations (case_reference, status_token, {', '.join(_NEW_CONVERSATION_COLUMNS)},"
    f" {', '.join(_NEW_CONVERSATION_CONSTANTS)}) VALUES ({', '.join('?' * (len(_NEW_CONVERSATION_COLUMNS) + 2))}, "
    + ", ".join("NULL" if v is None else repr(v) for v in _NEW_CONVERSATION_CONSTANTS.values())  # ints and '[]'
    + ")"
)


def deadline_for(config: Config, unit_id: str, start: datetime) -> datetime:
    """When the unit's first response is due: its response time in its business hours."""
    unit = config.units[unit_id]
    return unit.hours.add(start, unit.first_response_hours)


def record_event(
    conn: sqlite3.Connection, conversation_id: int | None, kind: str, now: str, actor: str | None = None, **data: Any
) -> None:
    conn.execute(
        "INSERT INTO events (conversation_id, kind, actor, data, at) VALUES (?, ?, ?, ?, ?)",
        (conversation_id, kind, actor, to_json(data) if data else None, now),
    )


def add_flags(conn: sqlite3.Connection, conversation_id: int, flags: Iterable[str], now: str) -> None:
    row = conn.execute("SELECT flags FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
    current = json.loads(row[0]) if row else []
    new = [f for f in flags if f not in current]
    if new:
        conn.execute(
            "UPDATE conversations SET flags = ?, updated_at = ? WHERE id = ?",
            (json.dumps(sorted(current + new)), now, conversation_id),
        )


def remove_flags(conn: sqlite3.Connection, conversation_id: int, flags: Iterable[str], now: str) -> None:
    row = conn.execute("SELECT flags FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
    current = json.loads(row[0]) if row else []
    kept = [f for f in current if f not in set(flags)]
    if kept != current:
        conn.execute(
            "UPDATE conversations SET flags = ?, updated_at = ? WHERE id = ?", (json.dumps(kept), now, conversation_id)
        )


def open_conversation(
    conn: sqlite3.Connection,
    config: Config,
    *,
    contact_id: int,
    channel: str,
    recipient: str | None,
    unit: str,
    rule: str,
    reason: str,
    topic: str | None,
    language: str,
    subject: str | None,
    area: str | None,
    linked_to: int | None,
    now: datetime,
    automated: bool = False,
) -> dict[str, Any]:
    """Create a conversation with a fresh case reference, status token and deadline.

    ``automated`` (a newsletter, an out-of-office note): kept and owned, but ``waiting`` without
    a deadline, so nobody is escalated over it."""
    stamp = iso(now)
    deadline = None if automated else iso(deadline_for(config, unit, now))
    values = (
        contact_id, channel, recipient, unit, "waiting" if automated else "open", topic, language, subject, area,
        rule, reason, deadline, deadline, linked_to, stamp, stamp, stamp,
    )
    for _ in range(10):
        reference, token = new_case_reference(), sortable_token(24)
        try:
            conversation_id = conn.execute(_INSERT_CONVERSATION, (reference, token, *values)).lastrowid
            break
        except sqlite3.IntegrityError as exc:
            if "case_reference" not in str(exc) and "status_token" not in str(exc):
                raise
    else:  # pragma: no cover - 32^6 references make this practically impossible
        raise RuntimeError("could not allocate a case reference")
    # The routing decision lives on the conversation row (routing_rule, routing_reason); later
    # changes of owner are events. The row is returned as written, without reading it back.
    return {
        "id": conversation_id, "case_reference": reference, "status_token": token,
        **dict(zip(_NEW_CONVERSATION_COLUMNS, values, strict=True)), **_NEW_CONVERSATION_CONSTANTS,
    }


def renew_deadline(
    conn: sqlite3.Connection,
    config: Config,
    conversation: Mapping[str, Any],
    now: datetime,
    state: str = "acknowledged",
    *,
    inbound: bool = False,
) -> dict[str, Any]:
    """A conversation that no longer waited for an answer waits again, with a new deadline.
    ``state`` is ``open`` when a new acknowledgement is about to be queued for it; ``inbound``
    when a message from the contact is why (it becomes ``last_inbound_at`` in the same UPDATE).
    Returns the columns as written, so the caller need not read the row again."""
    stamp = iso(now)
    deadline = iso(deadline_for(config, conversation["unit"], now))
    # A new deadline begins a new wait: its escalations count from nought (``max_escalation_level``
    # counted over the conversation's whole life, and a long chat stopped escalating for good).
    changed = {"state": state, "deadline": deadline, "escalate_at": deadline, "escalation_level": 0, "closed_at": None,
               "updated_at": stamp}
    if inbound:
        changed["last_inbound_at"] = stamp
    conn.execute(
        f"UPDATE conversations SET {', '.join(f'{column} = ?' for column in changed)} WHERE id = ?",
        (*changed.values(), conversation["id"]),
    )
    return changed


def queue_outbound(
    conn: sqlite3.Connection,
    *,
    conversation_id: int | None,
    contact_id: int | None,
    kind: str,
    channel: str,
    to_kind: str,
    to: str,
    text: str,
    language: str,
    now: str,
    author: str | None = None,
    subject: str | None = None,
    direction: str = "out",
) -> int:
    """Store an outbound message and its outbox row; returns the message id."""
    message_id = conn.execute(
        "INSERT INTO messages (conversation_id, contact_id, direction, kind, channel, author, subject, text, language,"
        " delivery_status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
        (conversation_id, contact_id, direction, kind, channel, author, subject, text, language, now),
    ).lastrowid
    add_outbox_row(conn, message_id=message_id, conversation_id=conversation_id, kind=kind, channel=channel,
                   to_kind=to_kind, to=to, now=now)
    return message_id


def add_outbox_row(
    conn: sqlite3.Connection,
    *,
    message_id: int,
    conversation_id: int | None,
    kind: str,
    channel: str,
    to_kind: str,
    to: str,
    now: str,
    primary: bool = True,
) -> int:
    return conn.execute(
        "INSERT INTO outbox (message_id, conversation_id, channel, kind, to_kind, to_address, primary_delivery, state,"
        " next_attempt_at, idempotency_key, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
        (message_id, conversation_id, channel, kind, to_kind, to, int(primary), now, sortable_token(16, hex=True), now, now),
    ).lastrowid


def queue_unit_notification(
    conn: sqlite3.Connection,
    config: Config,
    templates: Templates,
    *,
    conversation: sqlite3.Row,
    unit_id: str,
    template: str,
    now: datetime,
    old_deadline: datetime | None = None,
    **values: Any,
) -> int | None:
    """Tell a unit it owns a conversation now, by mail to its notification address. A unit
    without one is not told (it watches the inbox): an event says so. Dates are written in the
    notification's language, ``old_deadline`` too."""
    unit = config.units[unit_id]
    if not unit.notify:
        record_event(conn, conversation["id"], "owner_not_notified", iso(now), unit=unit_id,
                     reason="the unit has no notify address")
        return None
    language = templates.language_for(template, unit.languages[0] if unit.languages else None)
    deadline = parse_iso(conversation["deadline"])
    text = templates.render(
        template,
        language,
        case_reference=conversation["case_reference"],
        unit_name=unit.name,
        deadline=format_deadline(deadline, language, config.timezone),
        old_deadline=format_deadline(old_deadline, language, config.timezone),
        **values,
    )
    return queue_outbound(
        conn,
        conversation_id=conversation["id"],
        contact_id=None,
        kind="notification",
        channel="email",
        to_kind="email",
        to=unit.notify,
        text=text,
        language=language,
        subject=f"[#{conversation['case_reference']}] {unit.name}",
        now=iso(now),
        direction="internal",
    )


def escalate(
    conn: sqlite3.Connection, config: Config, templates: Templates, conversation: sqlite3.Row, now: datetime,
    *, cause: str = "overdue",
) -> dict[str, Any]:
    """Move an overdue conversation to the next unit of its chain and notify the new owner.

    At the end of the chain the owner stays, is reminded, and the next reminder is scheduled:
    ownership never lapses and the conversation stays visibly overdue. ``cause`` "callbacks":
    the call-backs failed, before the deadline; the notice says so (``callback_escalation``)
    instead of that the deadline passed.
    """
    from_unit = conversation["unit"]
    level = conversation["escalation_level"] + 1
    to_unit = config.units[from_unit].escalate_to or from_unit
    stamp = iso(now)
    old_deadline = parse_iso(conversation["deadline"])
    new_deadline = deadline_for(config, to_unit, now)
    if to_unit != from_unit:
        why = "could not reach the person by phone" if cause == "callbacks" else "did not answer by the deadline"
        reason = f"{config.units[from_unit].name} {why}; escalated to {config.units[to_unit].name}."
        conn.execute(
            "UPDATE conversations SET unit = ?, escalation_level = ?, deadline = ?, escalate_at = ?, assignee = NULL,"
            " updated_at = ? WHERE id = ?",
            (to_unit, level, iso(new_deadline), iso(new_deadline), stamp, conversation["id"]),
        )
    else:
        reason = f"{config.units[from_unit].name} is the end of the escalation chain and is overdue; reminded."
        # Keep the promised deadline (the conversation stays overdue); remind again later, and
        # at the deadline at the latest when it is still ahead (failed call-backs escalate
        # before it: a response time later, the deadline passed without a reminder).
        remind_at = old_deadline if old_deadline is not None and now < old_deadline < new_deadline else new_deadline
        conn.execute(
            "UPDATE conversations SET escalation_level = ?, escalate_at = ?, updated_at = ? WHERE id = ?",
            (level, iso(remind_at), stamp, conversation["id"]),
        )
    conn.execute(
        "INSERT INTO escalations (conversation_id, level, from_unit, to_unit, reason, at) VALUES (?, ?, ?, ?, ?, ?)",
        (conversation["id"], level, from_unit, to_unit, reason, stamp),
    )
    record_event(conn, conversation["id"], "escalated", stamp, from_unit=from_unit, to_unit=to_unit, level=level)
    updated = conn.execute("SELECT * FROM conversations WHERE id = ?", (conversation["id"],)).fetchone()
    # The end of the chain is reminded of a deadline that stays: "please answer by" a time
    # gone by read oddly, so a ``reminder`` template says it where one is configured.
    first = "reminder" if to_unit == from_unit else "callback_escalation" if cause == "callbacks" else "escalation"
    template = templates.first_configured(first, "escalation")
    queue_unit_notification(
        conn,
        config,
        templates,
        conversation=updated,
        unit_id=to_unit,
        template=template,
        now=now,
        old_deadline=old_deadline,
        level=level,
    )
    return {
        "conversation": dict(updated),
        "from_unit": from_unit,
        "to_unit": to_unit,
        "level": level,
    }


def escalate_due(
    conn: sqlite3.Connection, config: Config, templates: Templates, now: datetime, limit: int = 200
) -> list[dict[str, Any]]:
    """Escalate every conversation whose escalation time has passed and that still waits."""
    rows = conn.execute(OVERDUE_SCAN, (iso(now), limit)).fetchall()
    results = []
    for row in rows:
        if row["escalation_level"] >= config.max_escalation_level:
            # No more reminders for this deadline: said so in its history, so that the silence
            # after the last reminder is not taken for an answer. It stays in the overdue list.
            conn.execute("UPDATE conversations SET escalate_at = NULL WHERE id = ?", (row["id"],))
            record_event(conn, row["id"], "escalations_exhausted", iso(now), level=row["escalation_level"],
                         unit=row["unit"])
            continue
        results.append(escalate(conn, config, templates, row, now))
    return results


def mark_answered(conn: sqlite3.Connection, conversation_id: int, now: str, message_id: int | None = None) -> bool:
    """A human answer reached the person. Returns True when this changed the state; the
    ``answered`` event names the answer's message (``answered_by``)."""
    row = conn.execute("SELECT state FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
    if row is None or row["state"] in ("answered", "closed", "waiting"):
        if row is not None and row["state"] != "answered":
            conn.execute(
                "UPDATE conversations SET answered_at = ?, first_answered_at = COALESCE(first_answered_at, ?)"
                " WHERE id = ?",
                (now, now, conversation_id),
            )
        return False
    conn.execute(
        "UPDATE conversations SET state = 'answered', deadline = NULL, escalate_at = NULL, answered_at = ?,"
        " first_answered_at = COALESCE(first_answered_at, ?), updated_at = ? WHERE id = ?",
        (now, now, now, conversation_id),
    )
    if message_id is None:
        record_event(conn, conversation_id, "answered", now)
    else:
        record_event(conn, conversation_id, "answered", now, message_id=message_id)
    return True


def answer_standing(conn: sqlite3.Connection, conversation_id: int, message_id: int) -> str | None:
    """What the answer ``message_id`` last did to the conversation: ``answered`` (it was
    delivered and answered it), ``answer_lost`` (it reached nobody, and the conversation waited
    for an answer again, or it had answered it and no longer stands), or None (neither yet)."""
    last = conn.execute(
        "SELECT kind FROM events WHERE conversation_id = ? AND kind IN ('answered', 'answer_lost')"
        " AND json_extract(data, '$.message_id') = ? ORDER BY id DESC LIMIT 1",
        (conversation_id, message_id),
    ).fetchone()
    return last["kind"] if last is not None else None


def answered_by(conn: sqlite3.Connection, conversation_id: int, message_id: int) -> bool:
    """Whether the answer ``message_id`` answered the conversation and was not lost since:
    delivered once (its copy on another channel, or the primary row), it answers nothing
    written after; lost (``answer_lost``: its mail bounced), a copy of it that arrives answers."""
    return answer_standing(conn, conversation_id, message_id) == "answered"


def provider_time(value: Any) -> datetime | None:
    """A provider's RFC 3339 send time (a message's ``sent_at``) in UTC, comparable across
    offsets; None when it is not a time with an offset, or one UTC cannot write: any offset is
    valid, and 0001-01-01T00:30:00+01:00 falls before year 1 in UTC (writing it raised)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
        return parsed.astimezone(UTC) if parsed.tzinfo is not None else None
    except (ValueError, OverflowError):
        return None


def written_since(conn: sqlite3.Connection, conversation_id: int, message_id: int) -> sqlite3.Row | None:
    """The first message (``id``, ``created_at``) a person wrote in the conversation after the
    message ``message_id`` was stored: not a reaction, an edit or a deletion, nor one a machine
    sent (an auto-reply), none of which waits for an answer. None when there is none."""
    return conn.execute(
        _WRITTEN_SINCE, (conversation_id, message_id, *FROM_A_PERSON_PARAMS, *sorted(ANNOTATIONS))
    ).fetchone()


def reopen_until(config: Config, since: datetime) -> datetime:
    """When a conversation settled at ``since`` (closed, or answered or waiting with nothing
    since) leaves the reopen window: ``reopen_days`` calendar days later in the service's
    timezone, at the same wall-clock time (``hours.days_later``). As 24-hour days, the window
    ended an hour before or after that time of day across a change of the clocks."""
    return days_later(since, config.reopen_days, ZoneInfo(config.timezone))


def reopen_passed(config: Config, since: datetime, now: datetime) -> bool:
    """Whether ``now`` is past the reopen window of a conversation settled at ``since``
    (``reopen_until``). Asked for each conversation a message may join: away from the window's
    end, elapsed time answers at once (a change of the clocks moves the end by hours, never by
    ``_CLOCK_SLACK``); near it, the wall clock does."""
    elapsed, window = now - since, timedelta(days=config.reopen_days)
    if abs(elapsed - window) > _CLOCK_SLACK:
        return elapsed > window
    return now > reopen_until(config, since)


# More than the clocks of any timezone have ever been moved by (Samoa skipped a day in 2011).
_CLOCK_SLACK = timedelta(days=2)


def reopen_earliest(config: Config, now: datetime) -> datetime:
    """The earliest moment whose reopen window (``reopen_until``) still holds ``now``: for SQL
    over stored UTC stamps, a conversation settled before it is out of the window. One settled
    after it may be out as well (in the hour the clocks go back): ``reopen_until`` decides."""
    return days_earlier(now, config.reopen_days, ZoneInfo(config.timezone))


# The distinct units of all conversations, one seek in ``conversations_unit`` per unit (a plain
# DISTINCT reads the whole index: 610 ms at a million conversations, at every start).
_UNITS_IN_USE = """
WITH RECURSIVE used(unit) AS (
    SELECT MIN(unit) FROM conversations
    UNION ALL
    SELECT (SELECT MIN(unit) FROM conversations WHERE unit > used.unit) FROM used WHERE used.unit IS NOT NULL
)
SELECT unit FROM used WHERE unit IS NOT NULL"""


def adopt_orphans(conn: sqlite3.Connection, config: Config, now: datetime) -> int:
    """Give the fallback unit every conversation whose unit the configuration no longer has
    (a unit renamed or removed): otherwise its next message, deadline or escalation would look
    up a unit that is not there. Returns how many conversations moved; each gets an event."""
    gone = [row[0] for row in conn.execute(_UNITS_IN_USE) if row[0] not in config.units]
    if not gone:
        return 0
    stamp = iso(now)
    fallback = config.fallback_unit
    reason = f"Its unit is no longer in the configuration; {config.units[fallback].name} is the fallback unit."
    moved = conn.execute(
        f"SELECT id, unit FROM conversations WHERE unit IN ({','.join('?' * len(gone))})", gone
    ).fetchall()
    for conversation_id, unit in moved:
        conn.execute(
            "UPDATE conversations SET unit = ?, routing_rule = 'fallback', routing_reason = ?, assignee = NULL,"
            " updated_at = ? WHERE id = ?",
            (fallback, reason, stamp, conversation_id),
        )
        record_event(conn, conversation_id, "transferred", stamp, from_unit=unit, to_unit=fallback, reason=reason)
    return len(moved)
