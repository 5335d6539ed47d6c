"""The outbox: delivers queued acknowledgements, replies and notifications through their
channel's plugin, with retries and backoff, delivery statuses, and fallbacks.

A row is claimed (state ``sending`` with a lease) in one commit before the provider is called,
and its outcome recorded in another. A worker that dies mid-send leaves the lease to expire,
and the row is sent again: at least once, with the same idempotency key, so a provider that
deduplicates on it sends it once (and a status kept for that key meanwhile records the earlier
send instead). A row whose earlier send is known to be over gets a new key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from .channel import (
    ENDINGS,
    NOT_CONFIGURED,
    Channel,
    DeliveryUpdate,
    OutboundMessage,
    PermanentDeliveryError,
    ResendAsDeliveryError,
    RetryableDeliveryError,
    SendResult,
    StorageUnavailable,
)
from .clock import Clock
from .config import Config
from .identity import claims_usable
from .store.sqlite import SQLiteStore, is_outage, iso, parse_iso, run_units
from .text import sortable_token
from .tracking import (
    add_flags,
    add_outbox_row,
    answer_standing,
    answered_by,
    mark_answered,
    provider_time,
    record_event,
    remove_flags,
    written_since,
)

log = logging.getLogger("contact_router.outbox")
T = TypeVar("T")


STATUS_RANK = {"queued": 0, "sent": 1, "delivered": 2, "read": 3}
# The least wait before sending again after a provider reported a send failed but not for
# good (a rate limit, a temporary bounce): backoff alone would try again within seconds.
STATUS_RETRY_SECONDS = 30.0
# Marks a row whose attempts are used up, kept for a last look for a status of its last send
# (``Capabilities.status_wait``): on its next claim it is given up, not sent.
LAST_LOOK = "; no more attempts, waiting for a status of the last one"
# Statuses kept, not matched to a send yet, under one row's idempotency key (partial index
# delivery_events_unmatched_key).
_KEPT_UNDER_KEY = "FROM delivery_events WHERE channel = ? AND idempotency_key = ? AND outbox_id IS NULL"


@dataclasses.dataclass
class OutboxPolicy:
    """Retry behaviour: exponential backoff with jitter, capped, then give up as permanent."""

    max_attempts: int = 8
    retry_seconds: float = 86400.0
    """A row that keeps failing for reasons that may pass (a provider's outage, a timeout, a
    plugin's error) is given up only when it has had ``max_attempts`` and was queued this long
    ago: eight attempts took about three minutes, and an outage longer than that lost every
    acknowledgement queued meanwhile for good."""
    base_delay: float = 2.0
    max_delay: float = 900.0
    lease_seconds: float = 120.0
    send_timeout: float = 30.0
    batch_size: int = 50
    concurrency: int = 16
    poll_seconds: float = 1.0
    gather_seconds: float = 0.05
    """How long the first outcome of a batch waits for the outcomes of the batch's other sends,
    so that they are committed together; a slow send holds the others back no longer."""
    outcome_retry_seconds: float = 1.0
    """How often outcomes are tried again while the database refuses writes."""
    answer_deadline: Callable[[str, datetime], datetime] | None = None
    """The new deadline of a unit's conversation whose answer could not be delivered (the
    service sets the unit's response time in its hours); without it the answer is due at once."""

    def delay(self, attempts: int) -> float:
        # The exponent is capped, so that a row retried for weeks cannot overflow the float.
        raw = min(self.max_delay, self.base_delay * (2 ** min(max(0, attempts - 1), 30)))
        return raw * random.uniform(0.5, 1.0)

    def exhausted(self, attempts: int, queued_at: str | None, now: datetime, *, outage: bool = True) -> bool:
        """Whether a row with ``attempts`` so far, queued at ``queued_at``, is given up. Only a
        failure that may pass with time (``outage``: no answer, a provider's error, a plugin's)
        waits out ``retry_seconds``; a refusal (every form refused, a failed status reported
        again and again) is given up after ``max_attempts``, so that the fallback comes soon
        and a provider is not paid for a day of refused sends."""
        if attempts < self.max_attempts:
            return False
        if not outage:
            return True
        queued = parse_iso(queued_at)
        return queued is None or (now - queued).total_seconds() >= self.retry_seconds

    @staticmethod
    def floor(seconds: float) -> float:
        """A least wait of ``seconds`` with jitter (up to a quarter more): rows that failed
        together must not all come due at the same instant again."""
        return seconds * random.uniform(1.0, 1.25)


def claim_due(conn: sqlite3.Connection, now: datetime, policy: OutboxPolicy) -> list[dict[str, Any]]:
    """Claim due rows (and rows whose lease expired) for sending; returns what to send."""
    stamp = iso(now)
    # Two statements, each reading outbox_due in its order and stopping at the batch size. As
    # one (pending due OR lease expired, ORDER BY next_attempt_at) SQLite collected every due
    # row and sorted them: with a backlog of 10,000 acknowledgements under load, each claim
    # read and sorted all of them. Expired leases (rows a dead worker held) go first.
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM outbox WHERE state = 'sending' AND claimed_until <= ? ORDER BY id LIMIT ?",
            (stamp, policy.batch_size),
        )
    ]
    if len(ids) < policy.batch_size:
        ids += [
            r[0]
            for r in conn.execute(
                "SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
                (stamp, policy.batch_size - len(ids)),
            )
        ]
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    conn.execute(
        f"UPDATE outbox SET state = 'sending', attempts = attempts + 1, claimed_until = ?, updated_at = ?"
        f" WHERE id IN ({marks})",
        (iso(now + timedelta(seconds=policy.lease_seconds)), stamp, *ids),
    )
    claimed = conn.execute(
        f"SELECT o.*, m.text, m.subject, m.language, m.kind AS message_kind, c.case_reference, c.status_token,"
        f" c.unit, c.recipient, c.contact_id FROM outbox o JOIN messages m ON m.id = o.message_id"
        f" LEFT JOIN conversations c ON c.id = o.conversation_id WHERE o.id IN ({marks})",
        ids,
    ).fetchall()
    # Thread references and the last inbound message are looked up once per distinct
    # (conversation, channel) and (contact, channel), not once per row: a batch of
    # acknowledgements is mostly one row per conversation, but it saves the statement overhead
    # of two lookups per row all the same.
    refs: dict[tuple[int, str], list[str]] = {}
    last_inbound: dict[tuple[int, str], tuple[str | None, str | None]] = {}
    result = []
    for row in claimed:
        item = dict(row)
        item["thread_refs"] = []
        item["last_inbound_at"] = item["last_inbound_sent_at"] = None
        # A unit's notification is not part of the resident's thread: its references would let
        # the unit write into it (a forged auto-reply the status page shows as the resident's).
        if row["conversation_id"] is not None and row["kind"] != "notification":
            key = (row["conversation_id"], row["channel"])
            if key not in refs:
                refs[key] = _thread_refs(conn, *key)
            item["thread_refs"] = list(refs[key])
            if row["contact_id"] is not None:
                # Reply windows (WhatsApp's 24 hours) count inbound messages on this channel only.
                who = (row["contact_id"], row["channel"])
                if who not in last_inbound:
                    last_inbound[who] = _last_inbound(conn, *who)
                item["last_inbound_at"], item["last_inbound_sent_at"] = last_inbound[who]
        result.append(item)
    return result


def _last_inbound(conn: sqlite3.Connection, contact_id: int, channel: str) -> tuple[str | None, str | None]:
    """When the contact's latest message on the channel arrived, and when they sent the latest
    one by the provider's clock (its ``sent_at``, never later than its arrival): a message the
    provider delivered late (Meta retries webhooks for days) arrives last but was sent before.
    Read newest first, and only as far as a message that arrived before that send time (at
    most 50: more messages delivered late after the latest sent leave the window counted early,
    which sends a template where free text would have gone, never the other way)."""
    arrived = latest = None
    for created_at, sent_at in conn.execute(
        "SELECT created_at, json_extract(payload, '$.sent_at') FROM messages WHERE contact_id = ? AND channel = ?"
        " AND direction = 'in' ORDER BY id DESC LIMIT 50",
        (contact_id, channel),
    ):
        came = parse_iso(created_at)
        if latest is not None and came <= latest:
            break
        arrived = arrived or created_at
        sent = min(came, provider_time(sent_at) or came)
        latest = sent if latest is None else max(latest, sent)
    return arrived, iso(latest)


def _thread_refs(conn: sqlite3.Connection, conversation_id: int, channel: str) -> list[str]:
    """Ids of the conversation's earlier messages on this channel, oldest first (for e-mail
    In-Reply-To and References)."""
    rows = conn.execute(
        "SELECT COALESCE(channel_message_id, provider_id), direction FROM messages WHERE conversation_id = ?"
        " AND channel = ? AND COALESCE(channel_message_id, provider_id) IS NOT NULL ORDER BY id",
        (conversation_id, channel),
    ).fetchall()
    refs = [r[0] for r in rows][-20:]
    # The last reference becomes In-Reply-To: the person's latest message, not our own.
    inbound = [r[0] for r in rows if r[1] == "in"]
    if inbound and inbound[-1] in refs:
        refs.remove(inbound[-1])
        refs.append(inbound[-1])
    return refs


def record_sent(
    conn: sqlite3.Connection, row: Mapping[str, Any], provider_id: str | None, status: str, thread_key: str | None,
    answered_on: bool, now: datetime, policy: OutboxPolicy | None = None,
    channels: Mapping[str, Channel] | None = None,
) -> dict[str, Any] | None:
    """The provider accepted a message. Returns the answered conversation when this delivery
    made it answered (``policy``: the deadline of a message written meanwhile; ``channels``:
    which of them have delivery receipts, see ``_answer_lost``). ``provider_id`` is None when
    the provider took it without naming an id (kept NULL, not an empty id).

    ``row`` is the outbox row as claimed: the columns read here (its message, conversation,
    channel, kind and whether it is the primary delivery) never change after it is queued,
    so it is not read again."""
    stamp = iso(now)
    outbox_id = row["id"]
    provider_id = provider_id or None
    conn.execute(
        "UPDATE outbox SET state = 'sent', provider_id = ?, delivery_status = ?, claimed_until = NULL,"
        " last_error = NULL, updated_at = ? WHERE id = ?",
        (provider_id, status, stamp, outbox_id),
    )
    # delivery_events holds what providers report later; "accepted" is the outbox row itself.
    if row["primary_delivery"]:
        conn.execute(
            "UPDATE messages SET provider_id = ?, delivery_status = ? WHERE id = ?", (provider_id, status, row["message_id"])
        )
    if row["conversation_id"] is not None:
        # A primary message is found again by its provider id through the messages table;
        # copies and extra ids (an e-mail Message-ID) need a thread key.
        keys = {provider_id, thread_key} - {None}
        if row["primary_delivery"]:
            keys.discard(provider_id)
        for key in keys:
            conn.execute(
                "INSERT OR IGNORE INTO thread_keys (channel, key, conversation_id) VALUES (?, ?, ?)",
                (row["channel"], key, row["conversation_id"]),
            )
    return _after_status(conn, row, status, answered_on, now, policy, channels)


def _after_status(
    conn: sqlite3.Connection, row: Mapping[str, Any], status: str, answered_on: bool, now: datetime,
    policy: OutboxPolicy | None, channels: Mapping[str, Channel] | None = None,
) -> dict[str, Any] | None:
    """State changes that follow a delivery status: acknowledged, answered (and waiting for an
    answer again when the resident wrote while the answer was on its way)."""
    stamp = iso(now)
    if row["conversation_id"] is None:
        return None
    if row["kind"] == "ack" and status in STATUS_RANK:
        conn.execute(
            "UPDATE conversations SET state = 'acknowledged', updated_at = ? WHERE id = ? AND state = 'open'",
            (stamp, row["conversation_id"]),
        )
    # A copy of an answer delivered after the answer itself (or the other way round) answers
    # nothing more: the resident may have written since, and that question still waits.
    if row["kind"] == "reply" and answered_on and not answered_by(conn, row["conversation_id"], row["message_id"]):
        # Statuses reported together come in any order: a later answer whose loss was reported
        # first is applied as if it came after this delivery, so that both orders end alike.
        lost = _later_answer_lost(conn, row)
        if lost is not None and answer_standing(conn, row["conversation_id"], lost["message_id"]) == "answer_lost":
            # That loss was applied already (the conversation was answered, waited or closed):
            # this answer reached the person before it, and answers nothing that loss reopened.
            conn.execute(
                "UPDATE conversations SET answered_at = ?, first_answered_at = COALESCE(first_answered_at, ?) WHERE id = ?",
                (stamp, stamp, row["conversation_id"]),
            )
            return None
        if mark_answered(conn, row["conversation_id"], stamp, row["message_id"]):
            _written_meanwhile(conn, row, now, policy)
            if lost is not None:
                _answer_lost(conn, lost, now, policy, channels)
            conv = conn.execute("SELECT * FROM conversations WHERE id = ?", (row["conversation_id"],)).fetchone()
            msg = conn.execute("SELECT id, text, channel, kind FROM messages WHERE id = ?", (row["message_id"],)).fetchone()
            return {"conversation": dict(conv), "message": dict(msg)}
    return None


def _later_answer_lost(conn: sqlite3.Connection, row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The conversation's latest staff answer, when it is ``row``'s message or one written after
    it and every delivery of it failed, else ``row``'s message when every delivery of it failed
    (its delivery, reported with a failure of the same send, came before it), as ``_answer_lost``
    takes it: its message and one of its outbox rows; None when neither is lost. ``row``'s own
    loss counts while a newer answer is only on its way: it reopens the case (``_answer_lost``)."""
    latest = conn.execute(
        "SELECT id FROM messages WHERE conversation_id = ? AND id >= ? AND direction = 'out' AND kind = 'reply'"
        " ORDER BY id DESC LIMIT 1",
        (row["conversation_id"], row["message_id"]),
    ).fetchone()
    for message_id in dict.fromkeys((latest["id"] if latest is not None else row["message_id"], row["message_id"])):
        states = conn.execute("SELECT id, state FROM outbox WHERE message_id = ? ORDER BY id", (message_id,)).fetchall()
        if states and all(r["state"] == "failed" for r in states):
            return {"id": states[-1]["id"], "message_id": message_id, "conversation_id": row["conversation_id"]}
    return None


def _written_meanwhile(conn: sqlite3.Connection, row: Mapping[str, Any], now: datetime, policy: OutboxPolicy | None) -> None:
    """The answer ``row`` carried was written before the resident's latest message: that message
    (the first a person wrote after it) waits for an answer, with the deadline it would have had
    had it come after the answer. Only answered, the conversation kept no deadline, and a
    question asked while the answer was queued or on its way was never answered nor escalated."""
    later = written_since(conn, row["conversation_id"], row["message_id"])
    if later is None:
        return
    conv = conn.execute("SELECT id, unit FROM conversations WHERE id = ?", (row["conversation_id"],)).fetchone()
    _wait_again(conn, conv, parse_iso(later["created_at"]) or now, now, policy, "awaiting_answer",
                reason="new message from the contact while the answer was on its way", message_id=later["id"])


def _wait_again(
    conn: sqlite3.Connection, conv: Mapping[str, Any], since: datetime, now: datetime, policy: OutboxPolicy | None,
    event: str, **data: Any,
) -> None:
    """The conversation waits for an answer again, with the deadline its unit gives from
    ``since`` (``policy.answer_deadline``) and its escalations counted afresh; ``event`` says why."""
    due = policy.answer_deadline(conv["unit"], since) if policy and policy.answer_deadline else since
    stamp, deadline = iso(now), iso(due)
    conn.execute(
        "UPDATE conversations SET state = 'acknowledged', deadline = ?, escalate_at = ?, escalation_level = 0,"
        " closed_at = NULL, updated_at = ? WHERE id = ?",
        (deadline, deadline, stamp, conv["id"]),
    )
    record_event(conn, conv["id"], event, stamp, **data, deadline=deadline)


def record_retry(
    conn: sqlite3.Connection, outbox_id: int, error: str, delay: float, hint: str | None, now: datetime, *,
    new_request: bool = False,
) -> None:
    """Send the row again after ``delay`` seconds (in the form ``hint`` names, if given).

    The idempotency key stays while it is unknown whether the provider took the earlier send
    (a timeout, an error, a worker that died). ``new_request`` when that send is known to be
    over, refused or reported failed: the next one gets a key of its own, since a provider that
    deduplicates by key would answer it with the earlier send's result and send nothing."""
    conn.execute(
        "UPDATE outbox SET state = 'pending', next_attempt_at = ?, last_error = ?, hint = COALESCE(?, hint),"
        " idempotency_key = COALESCE(?, idempotency_key), claimed_until = NULL, updated_at = ? WHERE id = ?",
        (iso(now + timedelta(seconds=delay)), error[:1000], hint, sortable_token(16, hex=True) if new_request else None,
         iso(now), outbox_id),
    )


def record_failure(
    conn: sqlite3.Connection,
    outbox_id: int,
    error: str,
    code: str | None,
    channels: Mapping[str, Channel],
    now: datetime,
    *,
    log_event: bool = True,
    address_failed: bool = True,
    policy: OutboxPolicy | None = None,
) -> None:
    """A permanent failure: mark it, then try the contact's other identities on channels that
    can reach them; if none is left, flag the conversation for a call-back, and when it was the
    answer that made the conversation answered (or let staff wait), it waits for an answer
    again, with a deadline from ``policy.answer_deadline``. ``address_failed``
    when the address is what failed (the provider refused the recipient or reported the
    message failed); not when the attempts ran out on errors of the provider or the plugin,
    which marked a number that was fine as failed, everywhere, for later replies."""
    stamp = iso(now)
    row = conn.execute("SELECT * FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
    if row is None:
        return
    conn.execute(
        "UPDATE outbox SET state = 'failed', last_error = ?, delivery_status = 'failed', claimed_until = NULL,"
        " updated_at = ? WHERE id = ?",
        (error[:1000], stamp, outbox_id),
    )
    if log_event:  # a provider's failed status was logged by apply_delivery_update already
        conn.execute(
            "INSERT INTO delivery_events (channel, provider_id, outbox_id, status, error_code, error_detail, at)"
            " VALUES (?, ?, ?, 'failed', ?, ?, ?)",
            (row["channel"], row["provider_id"] or "", outbox_id, code, error[:1000], stamp),
        )
    if row["primary_delivery"]:
        conn.execute("UPDATE messages SET delivery_status = 'failed' WHERE id = ?", (row["message_id"],))
    if address_failed:
        conn.execute(
            "UPDATE identities SET failed_at = ? WHERE kind = ? AND address = ?", (stamp, row["to_kind"], row["to_address"])
        )
    if row["conversation_id"] is None:
        return
    if row["kind"] == "notification":
        # The unit that owns the case now was never told: shown on the conversation, so that
        # an escalation that reached nobody does not pass for one that did. Only the latest
        # notification speaks for the current owner (a late bounce of an earlier owner's does not).
        record_event(conn, row["conversation_id"], "owner_not_notified", stamp, to=row["to_address"], reason=error[:300])
        if _latest_notification(conn, row):
            add_flags(conn, row["conversation_id"], ["owner_not_notified"], stamp)
        return
    tried = {
        (r["channel"], r["to_kind"], r["to_address"])
        for r in conn.execute("SELECT channel, to_kind, to_address FROM outbox WHERE message_id = ?", (row["message_id"],))
    }
    conv = conn.execute("SELECT contact_id, channel, state FROM conversations WHERE id = ?", (row["conversation_id"],)).fetchone()
    if row["kind"] == "ack" and conv["state"] == "closed":
        # Staff closed the case before its acknowledgement went (a duplicate, spam): nobody is
        # to be told any more, nor called back. It landed on the call-back list, closed.
        record_event(conn, row["conversation_id"], "undeliverable", stamp, reason=error[:500])
        return
    # An address the contact merely named (``claimed``, typed into a form): see ``claims_usable``.
    identities = conn.execute(
        "SELECT kind, address FROM identities WHERE contact_id = ? AND claimed <= ? ORDER BY last_inbound_at DESC",
        (conv["contact_id"], claims_usable(channels.get(conv["channel"]))),
    ).fetchall()
    # Same address on another channel (a number not on WhatsApp still takes SMS), or another
    # address; each (channel, address) is tried once per message.
    for ident in identities:
        for channel in channels.values():
            caps = channel.capabilities
            if not (caps.can_reply and caps.push and ident["kind"] in caps.identity_kinds):
                continue
            if (channel.name, ident["kind"], ident["address"]) in tried:
                continue
            add_outbox_row(
                conn,
                message_id=row["message_id"],
                conversation_id=row["conversation_id"],
                kind=row["kind"],
                channel=channel.name,
                to_kind=ident["kind"],
                to=ident["address"],
                now=stamp,
                primary=bool(row["primary_delivery"]),
            )
            record_event(
                conn, row["conversation_id"], "delivery_fallback", stamp,
                failed=f"{row['channel']}:{row['to_address']}", next=f"{channel.name}:{ident['address']}",
            )
            return
    if row["primary_delivery"] or row["kind"] == "ack":
        add_flags(conn, row["conversation_id"], ["undeliverable", "callback_required"], stamp)
        record_event(conn, row["conversation_id"], "undeliverable", stamp, reason=error[:500])
    if row["primary_delivery"] and row["kind"] == "reply":
        _answer_lost(conn, row, now, policy, channels)


def _latest_notification(conn: sqlite3.Connection, row: Mapping[str, Any]) -> bool:
    """Whether ``row`` is the conversation's latest notification (to its current owner)."""
    latest = conn.execute(
        "SELECT MAX(id) FROM outbox WHERE conversation_id = ? AND kind = 'notification'", (row["conversation_id"],)
    ).fetchone()[0]
    return latest == row["id"]


def _answer_lost(
    conn: sqlite3.Connection, row: Mapping[str, Any], now: datetime, policy: OutboxPolicy | None,
    channels: Mapping[str, Channel] | None = None,
) -> None:
    """A staff reply that reached nobody (nor did a copy of it): unless something after it
    stands, and if the conversation counts as answered, waiting for the resident, or closed
    (answered and closed at once), it waits for an answer again. Before, a bounced answer left
    the case answered or closed, with no deadline, never escalated and never overdue, while the
    resident had heard nothing.

    On an answered case a later answer stands only once it reached the person (delivered, or
    sent where ``channels`` says its channel has no delivery receipts): ``answered`` says one
    did, and one only queued or on its way may fail or never arrive. The case waits, its
    escalation held while that answer is queued, and that answer answers it once delivered. A
    waiting or closed case claims no answer arrived: staff left it so, and a later answer not
    failed stands until its own outcome (its loss reopens the case).

    Where the case does not wait again, an answer that stood as the one that answered it
    (``answered_by``) stands no more: an ``answer_lost`` event (``reopened`` false) says so, and
    on an answered case the first later answer that reached the person answers it now. That is
    where the other order of the same reports ends: this loss first, then that delivery."""
    conv = conn.execute(
        "SELECT id, unit, state FROM conversations WHERE id = ?", (row["conversation_id"],)
    ).fetchone()
    if conv is None:
        return
    copy = conn.execute(
        "SELECT 1 FROM outbox WHERE message_id = ? AND id != ? AND state = 'sent' LIMIT 1", (row["message_id"], row["id"])
    ).fetchone()
    if copy is not None:
        return  # a copy of it (the mail of a web-form answer) went out: the answer arrived
    answered = conv["state"] == "answered"
    reached = _later_answer_reached(conn, conv["id"], row["message_id"], channels) if answered else None
    if conv["state"] in ("answered", "waiting", "closed") and reached is None:
        answers = "'callback'" if answered else "'reply', 'callback'"
        later = conn.execute(
            "SELECT 1 FROM messages WHERE conversation_id = ? AND id > ? AND (direction = 'in'"
            f" OR (direction = 'out' AND kind IN ({answers}) AND delivery_status IS NOT 'failed')) LIMIT 1",
            (conv["id"], row["message_id"]),
        ).fetchone()
        # A later answer (or a call-back that reached the person) stands; a message from the
        # resident after it ("Danke, alles klar") shows the case went on, and staff decided since.
        if later is None:
            _wait_again(conn, conv, now, now, policy, "answer_lost", message_id=row["message_id"])
            return
    if not answered_by(conn, conv["id"], row["message_id"]):
        return
    stamp = iso(now)
    record_event(conn, conv["id"], "answer_lost", stamp, message_id=row["message_id"], reopened=False)
    if reached is not None and _answer_of_record(conn, conv["id"]) == row["message_id"]:
        conn.execute("UPDATE conversations SET answered_at = ?, updated_at = ? WHERE id = ?", (stamp, stamp, conv["id"]))
        record_event(conn, conv["id"], "answered", stamp, message_id=reached)


def _answer_of_record(conn: sqlite3.Connection, conversation_id: int) -> int | None:
    """The message the conversation's latest ``answered`` event names (None: a call-back, or none)."""
    last = conn.execute(
        "SELECT json_extract(data, '$.message_id') FROM events WHERE conversation_id = ? AND kind = 'answered'"
        " ORDER BY id DESC LIMIT 1",
        (conversation_id,),
    ).fetchone()
    return last[0] if last is not None else None


def _later_answer_reached(
    conn: sqlite3.Connection, conversation_id: int, message_id: int, channels: Mapping[str, Channel] | None,
) -> int | None:
    """The first staff answer written after ``message_id`` that reached the person: a delivery
    of it (or of a copy) reported ``delivered`` or ``read``, or ``sent`` on a channel that
    ``channels`` says has no delivery receipts. None when none did (yet)."""
    for answer, channel, status in conn.execute(
        "SELECT m.id, o.channel, o.delivery_status FROM messages m JOIN outbox o ON o.message_id = m.id"
        " WHERE m.conversation_id = ? AND m.id > ? AND m.direction = 'out' AND m.kind = 'reply' AND o.state = 'sent'"
        " ORDER BY m.id, o.id",
        (conversation_id, message_id),
    ):
        if status in ("delivered", "read"):
            return answer
        known = channels.get(channel) if channels is not None else None
        if status == "sent" and known is not None and not known.capabilities.delivery_receipts:
            return answer
    return None


def apply_delivery_update(
    conn: sqlite3.Connection, channel: str, update: DeliveryUpdate, answered_on: frozenset[str], channels: Mapping[str, Channel], now: datetime,
    policy: OutboxPolicy | None = None,
) -> tuple[bool, dict[str, Any] | None]:
    """A provider status callback: record it, advance the message's status (never backwards),
    and act on failures. Returns (known, answered conversation if this made it answered).

    A status for a provider id we do not know yet is kept: the provider may report before the
    send's own outcome is recorded, and ``record_sent`` applies it then. So is a status for a
    row that is being sent again: it names the earlier attempt. A status that names the
    idempotency key of a row waiting to be sent again (its send timed out, or its worker died)
    says that send went through: the row is recorded as sent instead. One that names the key of
    a row the outbox gave up on, or of one sent without an id, applies to that row (the first
    gives the row its id); ``_apply_status`` says what a delivery after a failure does."""
    policy = policy or OutboxPolicy()
    at = iso(update.at) if update.at else iso(now)
    row = conn.execute(
        "SELECT * FROM outbox WHERE channel = ? AND provider_id = ? ORDER BY id DESC LIMIT 1", (channel, update.provider_id)
    ).fetchone()
    known = row is not None
    if row is not None and row["state"] == "sending":
        # The row is being sent again (a retry after a failure that was not permanent), and its
        # provider id is still the earlier attempt's: the send under way decides. Kept like a
        # status for a send not recorded yet, it applies only if that send gets the same id.
        row = None
    detail = " ".join(filter(None, (update.error_title, update.error_detail))) or None
    # A callback without a time of its own (Twilio's) is stamped on arrival: its repetition is
    # known by what it says, since a message takes each status once.
    repeated = conn.execute(
        "SELECT 1 FROM delivery_events WHERE channel = ? AND provider_id = ? AND status = ?"
        " AND error_code IS ? AND (at = ? OR ?) LIMIT 1",
        (channel, update.provider_id, update.status, update.error_code, at, update.at is None),
    ).fetchone()
    if repeated is not None:  # the provider delivered the same callback again
        return known, None
    answered = None
    if not known and update.idempotency_key:
        keyed = conn.execute(
            "SELECT * FROM outbox WHERE idempotency_key = ? AND channel = ?", (update.idempotency_key, channel)
        ).fetchone()
        if keyed is not None and keyed["state"] == "pending":
            answered, _ = record_send(conn, keyed, update.provider_id, "sent", None, answered_on, channels, now, policy)
            row = conn.execute("SELECT * FROM outbox WHERE id = ?", (keyed["id"],)).fetchone()
        elif keyed is not None and (keyed["state"] == "failed" or (keyed["state"] == "sent" and keyed["provider_id"] is None)):
            # Given up on while the provider had it (its answer never came, or a failure it
            # contradicts now), or taken without an id (a 2xx that named none): the status
            # names a send of it. One without an id gets this one, so that later statuses find it.
            if keyed["provider_id"] is None:
                conn.execute("UPDATE outbox SET provider_id = ? WHERE id = ?", (update.provider_id, keyed["id"]))
                if keyed["state"] == "sent" and keyed["primary_delivery"]:
                    conn.execute("UPDATE messages SET provider_id = COALESCE(provider_id, ?) WHERE id = ?",
                                 (update.provider_id, keyed["message_id"]))
            row = conn.execute("SELECT * FROM outbox WHERE id = ?", (keyed["id"],)).fetchone()
    # A failure for a send not recorded yet keeps what it asks for (resend in another form, or
    # try the other identities): ``apply_early_statuses`` acts on it once the send is recorded.
    failed = update.status == "failed"
    conn.execute(
        "INSERT INTO delivery_events (channel, provider_id, outbox_id, status, error_code, error_detail, at,"
        " resend_hint, permanent, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (channel, update.provider_id, row["id"] if row else None, update.status, update.error_code, detail, at,
         update.resend_hint if failed else None, int(update.permanent) if failed else None, update.idempotency_key),
    )
    if row is None:
        return known, None
    return True, _apply_status(conn, row, update, answered_on, channels, now, policy) or answered


def record_send(
    conn: sqlite3.Connection, row: Mapping[str, Any], provider_id: str | None, status: str, thread_key: str | None,
    answered_on: frozenset[str], channels: Mapping[str, Channel], now: datetime, policy: OutboxPolicy,
) -> tuple[dict[str, Any] | None, bool]:
    """A send of ``row`` the provider took (its answer, or a status naming the row's key): record
    it and apply the statuses kept for its provider id. Returns the answered conversation, and
    whether a failure was among those statuses (a resend or fallback may be due at once).

    Taken without an id (``provider_id`` empty: a 2xx that named none), the send gets the id of
    a status kept under the row's key, if its provider echoes the key and one came first; else
    none, until a status naming the key gives it one (``apply_delivery_update``)."""
    provider_id = provider_id or _kept_provider_id(conn, row)
    answered_now = status in ("delivered", "read") or row["channel"] in answered_on
    answered = record_sent(conn, row, provider_id, status, thread_key, answered_now, now, policy, channels)
    if row["kind"] == "notification" and row["conversation_id"] is not None and _latest_notification(conn, row):
        remove_flags(conn, row["conversation_id"], ["owner_not_notified"], iso(now))  # the current owner was told
    if provider_id is None:
        return answered, False
    early, failed = apply_early_statuses(conn, row["id"], row["channel"], provider_id, answered_on, channels, now, policy)
    return early or answered, failed


def adopt_earlier_send(
    conn: sqlite3.Connection, row: Mapping[str, Any], answered_on: frozenset[str], channels: Mapping[str, Channel],
    now: datetime, policy: OutboxPolicy,
) -> tuple[dict[str, Any] | None, bool] | None:
    """Before a row is sent again: whether the provider reported on an earlier send under the
    same idempotency key (a send that timed out but went through; statuses that arrived while a
    dead worker held the row). If it did, that send is recorded as the row's and the result is
    what recording a send returns; if not, None, and the row is sent. Only providers that echo
    the key in their statuses (WhatsApp's ``biz_opaque_callback_data``, Twilio's callback URL) are spared a
    duplicate."""
    provider_id = _kept_provider_id(conn, row)
    if provider_id is None:
        return None
    return record_send(conn, row, provider_id, "sent", None, answered_on, channels, now, policy)


def _kept_provider_id(conn: sqlite3.Connection, row: Mapping[str, Any]) -> str | None:
    """The provider id of the first status kept under ``row``'s idempotency key (a send of it
    the provider reported before its outcome was recorded), or None when none came."""
    kept = conn.execute(
        f"SELECT provider_id {_KEPT_UNDER_KEY} ORDER BY id LIMIT 1", (row["channel"], row["idempotency_key"])
    ).fetchone()
    return kept["provider_id"] if kept is not None else None


def _apply_status(
    conn: sqlite3.Connection, row: sqlite3.Row, update: DeliveryUpdate, answered_on: frozenset[str],
    channels: Mapping[str, Channel], now: datetime, policy: OutboxPolicy,
) -> dict[str, Any] | None:
    """What a provider status does to an outbox row, its message and its conversation."""
    stamp = iso(now)
    reached = update.status in ("delivered", "read") or (update.status == "sent" and row["channel"] in answered_on)
    if update.status == "failed":
        if row["state"] == "failed":
            return None
        detail = " ".join(filter(None, (update.error_code, update.error_title, update.error_detail))) or "failed"
        if (update.resend_hint or not update.permanent) and policy.exhausted(row["attempts"], row["created_at"], now,
                                                                             outage=False):
            # A provider that takes every send and then reports it failed (a rate limit that
            # does not lift) would otherwise be sent to for ever, with nobody told.
            error = f"gave up after {row['attempts']} attempts: {detail}"
            record_failure(conn, row["id"], error, update.error_code, channels, now, log_event=False, address_failed=False,
                           policy=policy)
            return None
        if update.resend_hint:
            record_retry(conn, row["id"], detail, 0, update.resend_hint, now, new_request=True)
            conn.execute("UPDATE outbox SET provider_id = NULL WHERE id = ?", (row["id"],))
            if row["primary_delivery"]:
                conn.execute("UPDATE messages SET delivery_status = 'queued' WHERE id = ?", (row["message_id"],))
            return None
        if not update.permanent:
            delay = max(policy.floor(STATUS_RETRY_SECONDS), policy.delay(row["attempts"]))
            record_retry(conn, row["id"], detail, delay, None, now, new_request=True)
            return None
        record_failure(conn, row["id"], detail, update.error_code, channels, now, log_event=False,
                       address_failed=update.address_failed, policy=policy)
        return None
    if row["state"] == "failed":
        if not reached:
            return None  # a late "sent" proves nothing where it is no delivery
        if _reported_failed(conn, row, update.provider_id):
            # The provider reported this very send failed: a failure is final, and its
            # "delivered", reported with it or late, came before it (statuses come in any
            # order). It counted as it would have then; the failure that followed stands.
            return _after_status(conn, row, update.status, True, now, policy, channels)
        # Given up on (its answer never came, its attempts ran out) or failed on another send of
        # it, while the provider had taken it: the message reached the person after all.
        return _delivered_after_all(conn, row, update, now, policy, channels)
    current = row["delivery_status"] or "queued"
    if STATUS_RANK.get(update.status, 0) <= STATUS_RANK.get(current, 0):
        return None
    conn.execute("UPDATE outbox SET delivery_status = ?, updated_at = ? WHERE id = ?", (update.status, stamp, row["id"]))
    if row["primary_delivery"]:
        conn.execute("UPDATE messages SET delivery_status = ? WHERE id = ?", (update.status, row["message_id"]))
    return _after_status(conn, row, update.status, reached, now, policy, channels)


def _reported_failed(conn: sqlite3.Connection, row: Mapping[str, Any], provider_id: str) -> bool:
    """Whether the provider reported the send ``provider_id`` of ``row`` failed."""
    return conn.execute(
        "SELECT 1 FROM delivery_events WHERE outbox_id = ? AND channel = ? AND provider_id = ? AND status = 'failed' LIMIT 1",
        (row["id"], row["channel"], provider_id),
    ).fetchone() is not None


def _delivered_after_all(
    conn: sqlite3.Connection, row: sqlite3.Row, update: DeliveryUpdate, now: datetime, policy: OutboxPolicy,
    channels: Mapping[str, Channel] | None = None,
) -> dict[str, Any] | None:
    """The provider reports that a message reached the person (``delivered``, ``read``; ``sent``
    where that counts) after its row had failed without the provider saying that send failed:
    given up after its attempts (its sends timed out, yet the provider had taken one), refused
    on a later send, or failed on another send of it.

    The row is recorded as sent with the status, the message moves forward, a fallback still
    queued for it is not sent, the address is good again if this row's failure marked it, the
    flags that failure set go where nothing else holds them, and the message counts as a
    delivered one would: an acknowledgement acknowledges, a staff answer answers (``_after_status``,
    once: an answer that answered already, by a copy or a fallback, answers nothing more).
    An event ``delivered_after_all`` says so in the conversation's history."""
    stamp = iso(now)
    failed_at = row["updated_at"]  # a failed row is not changed after its failure but here
    conn.execute(
        "UPDATE outbox SET state = 'sent', provider_id = ?, delivery_status = ?, claimed_until = NULL, last_error = NULL,"
        " updated_at = ? WHERE id = ?",
        (update.provider_id, update.status, stamp, row["id"]),
    )
    # Found again by its provider id (a reply quoting it) through the messages table while it is
    # the message's; else (a copy's, or the message has a fallback's id) through a thread key.
    keyed_by_message = False
    if row["primary_delivery"]:
        message = conn.execute("SELECT provider_id, delivery_status FROM messages WHERE id = ?", (row["message_id"],)).fetchone()
        # Forward only: a fallback of the message may have been read meanwhile.
        if STATUS_RANK.get(update.status, 0) > STATUS_RANK.get(message["delivery_status"] or "queued", 0):
            conn.execute("UPDATE messages SET delivery_status = ? WHERE id = ?", (update.status, row["message_id"]))
        if message["provider_id"] is None:
            conn.execute("UPDATE messages SET provider_id = ? WHERE id = ?", (update.provider_id, row["message_id"]))
        keyed_by_message = message["provider_id"] in (None, update.provider_id)
    if row["conversation_id"] is not None and not keyed_by_message:
        conn.execute("INSERT OR IGNORE INTO thread_keys (channel, key, conversation_id) VALUES (?, ?, ?)",
                     (row["channel"], update.provider_id, row["conversation_id"]))
    # Its fallbacks (rows of the same message after it, primary like it) not sent yet are not
    # sent: the person has the message. One under way goes; nothing can stop it.
    cancelled = conn.execute(
        "UPDATE outbox SET state = 'failed', last_error = ?, claimed_until = NULL, updated_at = ?"
        " WHERE message_id = ? AND id > ? AND primary_delivery = ? AND state = 'pending'",
        (f"not sent: {row['channel']} reported the message {update.status} after all", stamp, row["message_id"],
         row["id"], row["primary_delivery"]),
    ).rowcount
    # The address works: good again, unless a failure since this one marked it.
    conn.execute(
        "UPDATE identities SET failed_at = NULL WHERE kind = ? AND address = ? AND failed_at <= ?",
        (row["to_kind"], row["to_address"], failed_at),
    )
    if row["conversation_id"] is None:
        return None
    record_event(conn, row["conversation_id"], "delivered_after_all", stamp, message_id=row["message_id"],
                 channel=row["channel"], to=row["to_address"], status=update.status, fallbacks_not_sent=cancelled)
    _clear_unreached_flags(conn, row, stamp)
    sent = conn.execute("SELECT * FROM outbox WHERE id = ?", (row["id"],)).fetchone()
    return _after_status(conn, sent, update.status, True, now, policy, channels)


def _clear_unreached_flags(conn: sqlite3.Connection, row: Mapping[str, Any], stamp: str) -> None:
    """``row``'s message reached the person after all: the flags its failure set go, where
    nothing else holds them. ``owner_not_notified`` when it is the latest notification;
    ``undeliverable`` when no other acknowledgement, answer or call-back SMS of the
    conversation reached nobody (every delivery of it failed, or it had no address) since a
    call-back last reached the person; ``callback_required`` when, besides, no missed call,
    voicemail or other message asking for a call-back waits for one that reached them."""
    conversation_id = row["conversation_id"]
    if row["kind"] == "notification":
        if _latest_notification(conn, row):
            remove_flags(conn, conversation_id, ["owner_not_notified"], stamp)
        return
    reached_since = (
        "NOT EXISTS (SELECT 1 FROM messages c WHERE c.conversation_id = m.conversation_id AND c.kind = 'callback'"
        " AND c.direction = 'out' AND c.id > m.id)"
    )
    unreached = conn.execute(
        "SELECT 1 FROM messages m WHERE m.conversation_id = ? AND m.id != ? AND m.direction = 'out'"
        " AND m.kind IN ('ack', 'reply', 'callback_sms') AND m.delivery_status = 'failed'"
        " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = m.id AND o.state != 'failed')"
        f" AND {reached_since} LIMIT 1",
        (conversation_id, row["message_id"]),
    ).fetchone()
    if unreached is not None:
        return
    calls = conn.execute(
        "SELECT 1 FROM messages m WHERE m.conversation_id = ? AND m.direction = 'in' AND (m.kind IN ('missed_call', 'voicemail')"
        " OR EXISTS (SELECT 1 FROM json_each(m.payload, '$.flags') WHERE value = 'callback_required'))"
        f" AND {reached_since} LIMIT 1",
        (conversation_id,),
    ).fetchone()
    remove_flags(conn, conversation_id, ["undeliverable"] if calls is not None else ["undeliverable", "callback_required"],
                 stamp)


def apply_early_statuses(
    conn: sqlite3.Connection, outbox_id: int, channel: str, provider_id: str, answered_on: frozenset[str],
    channels: Mapping[str, Channel], now: datetime, policy: OutboxPolicy,
) -> tuple[dict[str, Any] | None, bool]:
    """Statuses the provider sent for ``provider_id`` before this row's send was recorded.

    Returns the answered conversation, if one of them answered it, and whether one of them
    was a failure (which may have made the row or a fallback due again at once)."""
    early = conn.execute(
        "SELECT id, status, error_code, error_detail, resend_hint, permanent FROM delivery_events"
        " WHERE channel = ? AND provider_id = ? AND outbox_id IS NULL ORDER BY id",
        (channel, provider_id),
    ).fetchall()
    answered = None
    for event in early:
        conn.execute("UPDATE delivery_events SET outbox_id = ? WHERE id = ?", (outbox_id, event["id"]))
        row = conn.execute("SELECT * FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
        update = DeliveryUpdate(provider_id=row["provider_id"] or "", status=event["status"],
                                error_code=event["error_code"], error_detail=event["error_detail"],
                                # NULL, kept before migration 7: permanent, as it was read then
                                resend_hint=event["resend_hint"], permanent=event["permanent"] != 0)
        answered = _apply_status(conn, row, update, answered_on, channels, now, policy) or answered
    return answered, any(event["status"] == "failed" for event in early)


class OutboxWorker:
    """Claims due rows, sends them concurrently through their channels, records outcomes."""

    def __init__(
        self,
        *,
        store: SQLiteStore,
        config: Config,
        channels: Mapping[str, Channel],
        clock: Clock,
        policy: OutboxPolicy | None = None,
        status_url: Callable[[str], str | None],
        on_answered: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.channels = channels
        self.clock = clock
        self.policy = policy or OutboxPolicy()
        self.status_url = status_url
        self.on_answered = on_answered
        self.wake = asyncio.Event()
        self._outcomes: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # Rows of the batch under way whose outcome is not queued yet, and a signal for each
        # outcome queued: the flusher waits for the rest of the batch (``gather_seconds``).
        self._unrecorded = 0
        self._queued = asyncio.Event()
        # Rows of the batch under way still waiting for a slot among the provider calls.
        self._waiting: set[int] = set()
        self.sent = 0
        self.failed = 0
        self.retried = 0

    @functools.cached_property
    def answered_on_sent(self) -> frozenset[str]:
        """Channels without delivery receipts: accepted by the provider counts as delivered.
        (The channels are registered before the worker starts, and do not change.)"""
        return frozenset(n for n, c in self.channels.items() if not c.capabilities.delivery_receipts)

    async def run(self) -> None:
        """Run until cancelled."""
        while True:
            try:
                count = await self.run_once()
            except asyncio.CancelledError:
                raise
            except StorageUnavailable as exc:  # the store logged the cause; tried again at the poll
                log.warning("outbox batch skipped: %s", exc)
                count = 0
            except ENDINGS:
                raise
            except BaseException:  # keep delivering: one bad batch must not stop the outbox (nor
                log.exception("outbox batch failed")  # another framework's exception, no Exception)
                count = 0
            # A batch that was not full took everything due: claiming again at once would
            # only cost a transaction (one in four per message at a low rate). New rows set
            # ``wake``, also while the batch was being sent; retries fall due by the clock.
            if count < self.policy.batch_size:
                try:
                    async with asyncio.timeout(self.policy.poll_seconds):
                        await self.wake.wait()
                except TimeoutError:
                    pass
                self.wake.clear()

    async def _record(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Record one send's outcome; outcomes that arrive while an earlier set is being committed
        go together into the next unit of work.

        Every acknowledgement ends in an outcome, so under load they were as many units as
        inbound messages, each with its own savepoint, queue entry and future in the group
        commit. One unit per set keeps each outcome in its own savepoint (one that fails rolls
        back only itself) and answers each caller after the commit, as before."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._outcomes.append((work, future))
        self._unrecorded = max(0, self._unrecorded - 1)
        self._queued.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_outcomes(), name="outbox-outcomes")
        return await future

    async def _gather_outcomes(self) -> None:
        """Wait until every send of the batch under way has queued its outcome, or
        ``gather_seconds`` have passed.

        Sends finish one after another; committed as they came, the outcomes of a batch of
        fifty acknowledgements took about ten transactions, each with its fsync, and the outbox
        spent more on them than on the sends (measured: 1,240 commits for 6,000 acknowledgements).
        Waiting for the batch costs nothing in throughput, since the next claim waits for the
        whole batch anyway; the acknowledgements themselves are already on their way."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.gather_seconds
        while self._unrecorded > 0 and loop.time() < deadline:
            self._queued.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._queued.wait()
            except TimeoutError:
                return

    async def _flush_outcomes(self) -> None:
        while self._outcomes:
            await self._gather_outcomes()
            batch, self._outcomes = self._outcomes, []
            try:
                results = await self.store.write(partial(run_units, works=[work for work, _ in batch], savepoint="outcome"))
            except StorageUnavailable as exc:
                results = [(False, exc)] * len(batch)
            except BaseException as exc:  # the commit failed: no outcome of this set is recorded
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("commit failed"))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            refused = []
            for (work, future), (ok, value) in zip(batch, results, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                elif isinstance(value, StorageUnavailable) or is_outage(value):
                    refused.append((work, future))
                else:
                    future.set_exception(value)
            if refused:
                # The database refuses writes. These sends went out: an outcome dropped now would
                # send its row a second time once the lease runs out. They wait and go again,
                # ahead of what came meanwhile (nothing else of the outbox can be written either).
                log.warning("%d outbox outcomes not recorded yet (the database refuses writes); trying again in %.0f s",
                            len(refused), self.policy.outcome_retry_seconds)
                await asyncio.sleep(self.policy.outcome_retry_seconds)
                self._outcomes = refused + self._outcomes

    async def run_once(self) -> int:
        """Send everything due now; returns how many rows were attempted."""
        now = self.clock.now()
        items = await self.store.write(lambda conn: claim_due(conn, now, self.policy))
        if not items:
            return 0
        # The limit holds for the provider calls only: a send that is done makes room for the
        # next while its outcome waits for the rest of the batch and the commit.
        limit = asyncio.Semaphore(self.policy.concurrency)
        self._unrecorded = len(items)
        try:
            # Every delivery of the batch ends before the next batch begins, also when one
            # raises: a straggler would count its outcome against the next batch.
            results = await asyncio.gather(*(self._deliver(item, limit) for item in items), return_exceptions=True)
        except asyncio.CancelledError:  # the service stops
            await self._hand_back(items)
            raise
        finally:
            self._unrecorded = 0  # every row of the batch has its outcome, or never will
            self._queued.set()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return len(items)

    async def _hand_back(self, items: list[dict[str, Any]]) -> None:
        """The service stops in the middle of a batch: record the outcomes that came in, and
        hand back what is left, so that a restart sends it without waiting out the lease
        (``lease_seconds``, two minutes, for every row of the batch at each deploy).

        A row that never reached its channel (it waited for a slot) is due again at once, its
        attempt not counted. A row whose send was cut short may have gone through: it is due
        after its channel's ``status_wait``, when a status could prove that, as after a send
        that timed out. Best effort: when the database refuses, the leases run out as before."""
        self._unrecorded = 0
        self._queued.set()
        if self._flusher is not None and not self._flusher.done():
            await asyncio.wait((self._flusher,), timeout=self.policy.gather_seconds + 5)
        now = self.clock.now()
        stamp = iso(now)
        waiting = [item["id"] for item in items if item["id"] in self._waiting]
        cut_short = []
        for item in items:
            if item["id"] not in self._waiting:
                channel = self.channels.get(item["channel"])
                wait = channel.capabilities.status_wait if channel is not None else None
                cut_short.append((iso(now + (wait or timedelta(0))), item["id"]))
        self._waiting.clear()

        def hand_back(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE outbox SET state = 'pending', attempts = attempts - 1, claimed_until = NULL, next_attempt_at = ?,"
                " updated_at = ? WHERE id = ? AND state = 'sending'",
                [(stamp, stamp, row_id) for row_id in waiting],
            )
            conn.executemany(
                "UPDATE outbox SET claimed_until = ?1 WHERE id = ?2 AND state = 'sending' AND claimed_until > ?1", cut_short
            )

        try:
            await self.store.write(hand_back)
        except Exception as exc:  # noqa: BLE001 - stopping: the leases run out as before
            log.warning("outbox: the rows of the batch under way could not be handed back (%s); they wait out their lease", exc)

    def _outbound(self, item: Mapping[str, Any]) -> OutboundMessage:
        unit = self.config.units.get(item.get("unit") or "")
        # The status link is the resident's key to the conversation: never in what a unit is
        # sent (a contractor kept it after the case moved on).
        token = item.get("status_token") if item["kind"] != "notification" else None
        return OutboundMessage(
            outbox_id=item["id"],
            channel=item["channel"],
            kind=item["kind"],
            to_kind=item["to_kind"],
            to=item["to_address"],
            text=item["text"] or "",
            language=item["language"] or self.config.default_language,
            idempotency_key=item["idempotency_key"],
            conversation_id=item["conversation_id"],
            case_reference=item.get("case_reference"),
            subject=item.get("subject"),
            status_url=self.status_url(token) if token else None,
            unit_id=unit.id if unit else None,
            unit_name=unit.name if unit else None,
            unit_email=unit.email if unit else None,
            recipient=item.get("recipient"),
            thread_refs=tuple(item.get("thread_refs") or ()),
            last_inbound_at=parse_iso(item.get("last_inbound_at")),
            last_inbound_sent_at=parse_iso(item.get("last_inbound_sent_at")),
            hint=item.get("hint"),
            attempt=item["attempts"],
        )

    async def _retry(
        self, item: dict[str, Any], message: str, retry_after: float | None, *, give_up: bool = True,
        status_wait: timedelta | None = None, outage: bool = True,
    ) -> None:
        """Send again later (after the provider's ``retry_after``, else with backoff, and no
        sooner than ``status_wait``); once the policy says the row is exhausted (``max_attempts``
        and, for an ``outage``, ``retry_seconds``) give up, which falls back to the contact's
        other identities or flags the conversation for a call-back. A channel that is not
        configured yet never gives up."""
        wait = self.policy.floor(status_wait.total_seconds()) if status_wait is not None else 0.0
        if give_up and self.policy.exhausted(item["attempts"], item["created_at"], self.clock.now(), outage=outage):
            if status_wait is not None:
                # The last send may have gone through: a fallback now would reach the person
                # twice. One more look for its status after the wait; then ``_send`` gives up.
                note = message[:900] + LAST_LOOK  # kept whole: last_error holds 1,000 characters
                await self._record(lambda conn: record_retry(conn, item["id"], note, wait, None, self.clock.now()))
                return
            await self._give_up(item, item["attempts"], message)
            return
        self.retried += 1
        delay = max(retry_after or self.policy.delay(item["attempts"]), wait)
        await self._record(lambda conn: record_retry(conn, item["id"], message, delay, None, self.clock.now()))

    async def _give_up(self, item: Mapping[str, Any], attempts: int, message: str) -> None:
        """No more attempts: the row fails, which falls back to the contact's other identities
        or flags the conversation for a call-back."""
        self.failed += 1
        error = f"gave up after {attempts} attempts: {message}"
        await self._record(lambda conn: record_failure(
            conn, item["id"], error, None, self.channels, self.clock.now(), address_failed=False, policy=self.policy))

    async def _deliver(self, item: dict[str, Any], limit: asyncio.Semaphore) -> None:
        """Send one row and record its outcome. Any outcome but a clean send wakes the worker
        for another claim: it can have made a row due at once (the same message again in
        another form, a fallback to another identity, also through a failure the provider
        reported before the send was recorded), which would otherwise wait for the poll."""
        if not await self._send(item, limit):
            self.wake.set()

    async def _send(self, item: dict[str, Any], limit: asyncio.Semaphore) -> bool:
        """True when the provider took the row and nothing else became due."""
        channel = self.channels.get(item["channel"])
        if channel is None:
            # Its plugin was removed (or not loaded) since the row was queued: retried in case
            # it comes back, then given up like any failure, which falls back to the contact's
            # other identities or flags the conversation for a call-back. Before, it was retried
            # for ever, and nothing told staff the person had not been answered.
            await self._retry(item, f"channel {item['channel']!r} is not configured", None)
            return False
        if item["attempts"] > 1 and (not self.store.settled or await self._earlier_send_reported(item)):
            # It may have gone through after all: look in a write unit, behind any status still
            # being committed (the read sees only what is), and record that send if one names it.
            adopted = await self._record(lambda conn: adopt_earlier_send(
                conn, item, self.answered_on_sent, self.channels, self.clock.now(), self.policy))
            if adopted is not None:
                return await self._after_sent(*adopted)
            self._unrecorded += 1  # that was no outcome: the row's is still to come
        if (item["last_error"] or "").endswith(LAST_LOOK):
            # Its attempts are used up, and no status showed the last one went through: give up
            # now, without a send more.
            await self._give_up(item, item["attempts"] - 1, item["last_error"].removesuffix(LAST_LOOK))
            return False
        self._waiting.add(item["id"])
        try:
            async with limit, asyncio.timeout(self.policy.send_timeout):
                self._waiting.discard(item["id"])
                result = await channel.send(self._outbound(item))
        except ResendAsDeliveryError as exc:
            if exc.hint == item.get("hint") or item["attempts"] > self.policy.max_attempts:
                # The form it asks for was tried already (or the forms go round): a refusal like
                # any other, with backoff and a last attempt. Resent at once every time, a channel
                # that refused every form was asked again for ever, a thousand times a second.
                await self._retry(item, exc.message, None, outage=False)
                return False
            self.retried += 1
            # Values, not the exception, go into the unit: it runs after this block.
            error, hint = exc.message, exc.hint
            await self._record(lambda conn: record_retry(conn, item["id"], error, 0, hint, self.clock.now(), new_request=True))
            return False
        except (RetryableDeliveryError, TimeoutError) as exc:
            # No answer came: the send may have gone through, and its status may yet prove it.
            unknown = not isinstance(exc, RetryableDeliveryError) or exc.outcome_unknown
            wait = channel.capabilities.status_wait if unknown else None
            if isinstance(exc, RetryableDeliveryError):
                if exc.code == NOT_CONFIGURED:  # every message of the channel waits for an operator
                    log.error("channel %s cannot send until its settings are fixed (outbox row %s stays queued): %s",
                              item["channel"], item["id"], exc.message)
                await self._retry(item, exc.message, exc.retry_after, give_up=exc.code != NOT_CONFIGURED, status_wait=wait)
            else:
                await self._retry(item, "timed out", None, status_wait=wait)
            return False
        except PermanentDeliveryError as exc:
            self.failed += 1
            error, code, address_failed = exc.message, exc.code, exc.address_failed
            await self._record(lambda conn: record_failure(
                conn, item["id"], error, code, self.channels, self.clock.now(), address_failed=address_failed,
                policy=self.policy))
            return False
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the worker itself is stopping
            # Raised inside the plugin (a shared task of its own that a timed-out send cancelled):
            # a plugin bug like any other. Let through, it ended the worker: no send after it.
            log.error("channel %s: its send of outbox row %s was cancelled inside the plugin", item["channel"], item["id"])
            await self._retry(item, "the channel's send was cancelled inside the plugin", None)
            return False
        except ENDINGS:
            raise
        except BaseException as exc:  # a plugin bug: logged, then retried like any failure, and given up
            # Also one that is no Exception (another framework's cancellation or timeout): let
            # through, it ended the worker, and nothing was sent until a restart.
            log.exception("channel %s raised while sending outbox row %s", item["channel"], item["id"])
            await self._retry(item, f"{type(exc).__name__}: {exc}", None)
            return False
        if not isinstance(result, SendResult):  # a plugin bug, like an exception: retried, then given up
            log.error("channel %s returned %r instead of a SendResult for outbox row %s", item["channel"], result, item["id"])
            await self._retry(item, f"the channel returned {type(result).__name__}, not a SendResult", None)
            return False
        self.sent += 1
        return await self._after_sent(*await self._record(lambda conn: record_send(
            conn, item, result.provider_id, result.status, result.thread_key, self.answered_on_sent, self.channels,
            self.clock.now(), self.policy)))

    async def _earlier_send_reported(self, item: Mapping[str, Any]) -> bool:
        """Whether a status kept under the row's idempotency key says an earlier send of it went
        through. A read, for when no write is queued or under way (``store.settled``): for nearly
        every retried row there is none, and the look then costs no commit."""
        return await self.store.fetchone(
            f"SELECT 1 {_KEPT_UNDER_KEY} LIMIT 1",
            (item["channel"], item["idempotency_key"]),
        ) is not None

    async def _after_sent(self, answered: dict[str, Any] | None, failed_early: bool) -> bool:
        if answered and self.on_answered is not None:
            await self.on_answered(answered)
        return not failed_early
