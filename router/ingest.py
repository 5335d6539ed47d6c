"""One inbound message in: validate, deduplicate, resolve the sender, thread, route, set the
deadline and queue the acknowledgement, all committed in one transaction before the caller
(and so the provider) gets an answer.

The transaction body (``ingest_tx``) is a synchronous unit of work for the store's group
commit; everything that may wait (customer lookups by plugins, routing plugins) happens before
it, and only when a message or a plugin needs it.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from .channel import InvalidMessage
from .config import Config
from .context import IngestResult
from .identity import InvalidAddress, identities_of, resolve_contact, survivor
from .models import Customer, RoutingDecision
from .routing import find_area, message_text, route, written_text
from .search import folded_search_text
from .store.sqlite import iso, parse_iso
from .templates import Templates, format_deadline
from .text import find_case_reference, guess_folded_language
from .tracking import (
    ANNOTATIONS,
    AUTOMATED,
    FROM_A_PERSON,
    FROM_A_PERSON_PARAMS,
    add_flags,
    open_conversation,
    provider_time,
    queue_outbound,
    record_event,
    renew_deadline,
    reopen_earliest,
    reopen_passed,
    to_json,
    written_since,
)
from .validation import validate_inbound

# Message flags that concern the whole conversation and are copied onto it.
CONVERSATION_FLAGS = frozenset({"callback_required", "no_number", "unsupported", "provider_error", "transcription_failed"})
ACK_KINDS = frozenset({"message", "call", "missed_call", "voicemail"})
UNREACHABLE_KINDS = frozenset({"anonymous"})


@dataclasses.dataclass(frozen=True, slots=True)
class Prepared:
    """A validated message and what was worked out before the transaction."""

    message: dict[str, Any]
    identities: list[tuple[str, str]]
    language: str
    customer: Customer | None
    override: RoutingDecision | None
    threads_by_sender: bool
    now: datetime
    folded: str  # subject and text as ``routing.message_text`` folds them, worked out once
    sender_verified: bool  # False for a channel that does not vouch for its sender (the web form)
    other_chats: tuple[str, ...] = ()  # the other channels that thread by sender (SMS beside WhatsApp)


def prepare(
    message: Any, *, config: Config, now: datetime
) -> tuple[dict[str, Any], list[tuple[str, str]], str, str]:
    """Validate and normalise; raises ``InvalidMessage`` naming the field. Returns the message,
    the sender's identities, the language and the folded subject and text."""
    msg = validate_inbound(message)
    name = msg["sender"].get("display_name")
    if isinstance(name, str) and name != " ".join(name.split()):
        # A WhatsApp profile name comes as its owner typed it: "  " or " Erika " gave
        # "Guten Tag   , vielen Dank" in the acknowledgement, and the contact that name.
        msg["sender"] = {**msg["sender"], "display_name": " ".join(name.split()) or None}
    try:
        identities = identities_of(msg)
    except InvalidAddress as exc:
        raise InvalidMessage(str(exc), "sender.address") from None
    folded = message_text(msg)
    language = msg.get("language") or guess_folded_language(folded, msg.get("default_language") or config.default_language)
    return msg, identities, language, folded


def _result_for_existing(conn: sqlite3.Connection, config: Config, row: sqlite3.Row, status_url: Callable[[str], str | None]) -> IngestResult:
    conv = None
    if row["conversation_id"] is not None:
        conv = conn.execute("SELECT * FROM conversations WHERE id = ?", (row["conversation_id"],)).fetchone()
    return _result(config, row["id"], conv, row["language"] or config.default_language, False, status_url, duplicate=True)


def _result(
    config: Config,
    message_id: int,
    conv: sqlite3.Row | None,
    language: str,
    acknowledged: bool,
    status_url: Callable[[str], str | None],
    *,
    duplicate: bool = False,
    ack_text: str | None = None,
    opened: bool = False,
) -> IngestResult:
    if conv is None:
        return IngestResult(message_id, None, None, None, None, None, None, None, language, acknowledged, duplicate)
    unit = config.units.get(conv["unit"])
    return IngestResult(
        message_id=message_id,
        conversation_id=conv["id"],
        case_reference=conv["case_reference"],
        status_token=conv["status_token"],
        status_url=status_url(conv["status_token"]),
        unit=conv["unit"],
        unit_name=unit.name if unit else conv["unit"],
        deadline=parse_iso(conv["deadline"]),
        language=conv["language"] or language,
        acknowledged=acknowledged,
        duplicate=duplicate,
        ack_text=ack_text,
        opened=opened,
        rule=conv["routing_rule"],
        reason=conv["routing_reason"],
    )


class Thread(NamedTuple):
    """Where a message belongs: ``conv`` to join; else a new conversation, ``referred`` (owned by
    that case's unit: the message names it, or it is the sender's case on another chat) or
    ``follows`` (the sender's own conversation settled longer ago than the reopen window: a new
    matter, routed as any other) to link it to."""

    conv: sqlite3.Row | None
    referred: sqlite3.Row | None
    follows: sqlite3.Row | None = None


def _find_thread(
    conn: sqlite3.Connection,
    msg: Mapping[str, Any],
    contact_id: int,
    threads_by_sender: bool,
    sender_verified: bool,
    *,
    refs_join: str = "own",
    topic_unit: Callable[[Mapping[str, Any]], str] | None = None,
    other_chats: tuple[str, ...] = (),
    stale: Callable[[Mapping[str, Any]], bool] | None = None,
    reopen_since: Callable[[], datetime] | None = None,
) -> Thread:
    """Where the message belongs (``Thread``: a conversation to join, one merely referred to, one it
    follows). A case reference joins only the
    sender's own conversation, and only where the channel vouches for the sender; a thread
    reference (an e-mail's In-Reply-To) joins only the sender's own conversation, likewise
    (``refs_join`` "own"): a third party who answers someone else's thread (a Cc, a forwarded
    mail) gets a case of their own, linked, and never the other's acknowledgement, status link
    or answers.
    "ours": also whoever answers a message we sent (a bounce or an auto-reply to our mail, which
    changes nothing there); not one the resident sent, which a neighbour in Cc could name to put
    words on the resident's status page. "any": whoever names it (a voicemail's transcript,
    whose caller may be unknown). ``topic_unit``: the unit a message's topic routes it to, for
    whether an open conversation without a topic is the same matter. ``other_chats``: channels
    whose conversation of the sender, when this channel has none open, is referred to (an SMS
    from the number of a WhatsApp case); ``stale``: whether a conversation settled longer ago
    than the reopen window, which neither that link nor an answer to a copy reaches;
    ``reopen_since``: gives the moment before which a closed conversation is out of that window
    (worked out only when needed: it takes longer than the rest of a message's time arithmetic)."""
    thread = msg.get("thread") or {}
    if thread.get("status_token"):
        row = conn.execute("SELECT * FROM conversations WHERE status_token = ?", (thread["status_token"],)).fetchone()
        if row is not None:
            return Thread(row, None)
    referred = None
    for ref in thread.get("refs") or ():
        # An earlier inbound message's own id, else a key our outbound messages or extra
        # thread_keys left (an e-mail Message-ID we generated, a WhatsApp id we sent).
        ours = False
        key = conn.execute(
            "SELECT conversation_id FROM messages WHERE channel = ? AND channel_message_id = ?", (msg["channel"], ref)
        ).fetchone()
        if key is None or key[0] is None:
            key = conn.execute(
                "SELECT conversation_id FROM messages WHERE channel = ? AND provider_id = ?", (msg["channel"], ref)
            ).fetchone()
            if key is None or key[0] is None:  # a copy or an earlier attempt: its own outbox row
                key = conn.execute(
                    "SELECT conversation_id FROM outbox WHERE channel = ? AND provider_id = ?", (msg["channel"], ref)
                ).fetchone()
            ours = key is not None and key[0] is not None
        if key is None or key[0] is None:
            key = conn.execute(
                "SELECT conversation_id FROM thread_keys WHERE channel = ? AND key = ?", (msg["channel"], ref)
            ).fetchone()
        if key is not None and key[0] is not None:
            row = conn.execute("SELECT * FROM conversations WHERE id = ?", (key[0],)).fetchone()
            if row is not None:
                # The sender's own conversation only where the channel vouches for them: a
                # Message-ID is known to everyone the mail went to, and a forged From is easy.
                own = row["contact_id"] == contact_id and sender_verified
                if own or refs_join == "any" or (refs_join == "ours" and ours):
                    return Thread(row, None)
                referred = referred or row
    reference = find_case_reference(msg.get("subject"), msg.get("text"))
    if reference:
        row = conn.execute("SELECT * FROM conversations WHERE case_reference = ?", (reference,)).fetchone()
        if row is not None:
            if row["contact_id"] == contact_id and sender_verified:
                return Thread(row, None)
            referred = referred or row  # a case reference is not proof of identity: link, don't join
    settled = None
    if threads_by_sender:
        # The sender's open conversation for that topic: a caller who chose another topic in
        # the menu has another matter, for the unit of that topic. (It joined the open one,
        # with that one's unit, reference and deadline.) One without a topic (an SMS, a call
        # without a choice) is the same matter when the topic would go to its unit.
        topic = msg.get("topic")

        def same_topic(row: Mapping[str, Any]) -> bool:
            return not topic or row["topic"] == topic or (topic_unit is not None and row["unit"] == topic_unit(msg))

        def fresh(row: Mapping[str, Any]) -> bool:
            return stale is None or not stale(row)

        def same_matter(row: Mapping[str, Any]) -> bool:
            return same_topic(row) and fresh(row)

        # One settled longer ago than the reopen window is never joined: the case a copy of an
        # answer came from, or a case on another chat, comes first; else it is only linked to.
        same_channel = (
            conn.execute(
                "SELECT * FROM conversations INDEXED BY conversations_contact_channel"
                " WHERE contact_id = ? AND channel = ? AND state != 'closed' ORDER BY id DESC LIMIT 3",
                (contact_id, msg["channel"]),
            ) if not topic else conn.execute(
                "SELECT * FROM conversations INDEXED BY conversations_contact_channel"
                " WHERE contact_id = ? AND channel = ? AND state != 'closed' AND (topic = ? OR topic IS NULL)"
                " ORDER BY topic IS NULL, id DESC LIMIT 3",
                (contact_id, msg["channel"], topic),
            )
        )
        for row in same_channel:
            if same_topic(row):
                if fresh(row):
                    return Thread(row, referred)
                settled = settled or row

        if sender_verified and msg["kind"] == "message":
            # A text back to the copy of a staff answer that went to this address (a web-form
            # case's answer by SMS): that case, the one whose copy came last, reopened if it was
            # closed within the reopen window. It opened a case of its own, with a new reference.
            # The contact's conversations (a few, by index), each with its copies (by index).
            # Only cases not closed, or closed within the reopen window: a contact's old history
            # is not read at every message.
            for row in conn.execute(
                "SELECT * FROM (SELECT c.*, (SELECT MAX(o.id) FROM outbox o WHERE o.conversation_id = c.id"
                " AND o.channel = ? AND o.to_address = ? AND o.primary_delivery = 0) AS latest_copy"
                " FROM conversations c WHERE c.contact_id = ? AND c.channel != ?"
                " AND (c.state != 'closed' OR c.closed_at >= ?))"
                " WHERE latest_copy IS NOT NULL ORDER BY latest_copy DESC LIMIT 5",
                (msg["channel"], msg["sender"]["address"], contact_id, msg["channel"], iso(reopen_since()) if reopen_since else ""),
            ):
                if same_matter(row):
                    return Thread(row, referred)
        if referred is None and sender_verified and other_chats:
            # Nothing open here, but the same number has a case on another chat (an SMS an hour
            # after a WhatsApp message): most likely the same matter. It opened a second case,
            # routed afresh to another unit and linked to nothing. The new case is linked to it
            # and owned by its unit; it stays on this channel, where the person wrote. Not a case
            # settled longer ago than the reopen window: a message months later is a new matter.
            for row in conn.execute(
                f"SELECT * FROM conversations WHERE contact_id = ? AND channel IN ({', '.join('?' * len(other_chats))})"
                " AND state != 'closed' ORDER BY id DESC LIMIT 5",
                (contact_id, *other_chats),
            ):
                if same_matter(row):
                    return Thread(None, row)
    # The sender's conversation settled too long ago: a new matter, routed as any, linked to it.
    return Thread(None, referred, settled)


def _referred_decision(
    config: Config, referred: Mapping[str, Any], msg: Mapping[str, Any], contact_id: int, *, settled: bool = False
) -> RoutingDecision:
    """The unit of the case a new conversation is linked to, and why: the message names it, or
    the sender has it open on another chat (not ``settled`` longer than the reopen window: a
    reference to such a case names it)."""
    owner = config.units[referred["unit"]].name
    if (referred["contact_id"] == contact_id and referred["channel"] != msg["channel"] and referred["state"] != "closed"
            and not settled):
        return RoutingDecision(
            unit=referred["unit"], rule="open-case",
            reason=f"The sender's case {referred['case_reference']} ({referred['channel']}) is open; {owner} owns it.",
        )
    return RoutingDecision(
        unit=referred["unit"], rule="case-reference",
        reason=f"The message refers to case {referred['case_reference']}, which {owner} owns.",
    )


def _later_annotation_stored(
    conn: sqlite3.Connection, kind: str, target_id: int, contact_id: int, sent_at: str | None
) -> bool:
    """Whether this contact's reactions (or edits) of the target include one the provider sent
    after ``sent_at``. Without a send time, arrival order decides, as before."""
    sent = provider_time(sent_at)
    if sent is None:
        return False
    # An edit without text (a failed transcription) changed nothing, so it replaces nothing.
    rows = conn.execute(
        "SELECT json_extract(payload, '$.sent_at') FROM messages"
        " WHERE kind = ? AND target_message_id = ? AND contact_id = ? AND payload IS NOT NULL"
        " AND (kind != 'edit' OR text IS NOT NULL)",
        (kind, target_id, contact_id),
    )
    return any((other := provider_time(value)) is not None and other > sent for (value,) in rows)


def _may_annotate(kind: str, target: Mapping[str, Any], contact_id: int, thread_conv: Mapping[str, Any] | None) -> bool:
    """Whether a reaction, edit or deletion may change its target: one of the sender's own
    conversation (a reaction to our answer too), or of the conversation its thread names (a
    transcript, whose caller may be unknown); an edit or deletion only of an inbound message.
    A channel that does not sign its requests must not let one sender rewrite another's words."""
    if kind != "reaction" and target["direction"] != "in":
        return False
    return target["contact_id"] == contact_id or (
        thread_conv is not None and target["conversation_id"] == thread_conv["id"]
    )


def _annotate(
    conn: sqlite3.Connection, config: Config, prep: Prepared, contact_id: int, status_url: Callable[[str], str | None]
) -> IngestResult:
    """Reactions, edits and deletions: kept against the message they refer to; never a new
    conversation, never an acknowledgement."""
    msg, stamp = prep.message, iso(prep.now)
    target = None
    if msg.get("target_message_id"):
        target = conn.execute(
            "SELECT * FROM messages WHERE channel = ? AND (channel_message_id = ? OR provider_id = ?) LIMIT 1",
            (msg["channel"], msg["target_message_id"], msg["target_message_id"]),
        ).fetchone()
    thread_conv = None
    if (msg.get("thread") or {}).get("refs"):
        thread_conv = _find_thread(conn, msg, contact_id, False, prep.sender_verified, refs_join="any").conv
    if target is not None and not _may_annotate(msg["kind"], target, contact_id, thread_conv):
        target = None  # kept, as an annotation of nothing: it changes nobody else's message
    conversation_id = target["conversation_id"] if target is not None else None
    if target is None and thread_conv is not None:
        # Not here yet (a voicemail's transcript can come before the voicemail): it belongs with
        # the conversation its thread names (the call), where staff see it, not nowhere.
        conversation_id = thread_conv["id"]
    meta = msg.get("meta") or {}
    payload: dict[str, Any] = {k: msg[k] for k in ("meta", "raw", "flags", "attachments", "sent_at") if msg.get(k)}
    # A reaction or edit the provider sent before one already stored (a retry of a replaced
    # reaction, or two arriving out of order) is kept, but as superseded: it must not undo
    # the later one.
    superseded = (
        target is not None
        and msg["kind"] in ("reaction", "edit")
        and _later_annotation_stored(conn, msg["kind"], target["id"], contact_id, msg.get("sent_at"))
    )
    if target is not None and msg["kind"] == "edit" and msg.get("text") is not None and not superseded:
        # An edit without text (a failed transcription) keeps what the target says.
        payload["previous_text"] = target["text"]
        conn.execute("UPDATE messages SET text = ?, edited_at = ? WHERE id = ?", (msg.get("text"), stamp, target["id"]))
    if msg.get("flags") and conversation_id is not None:
        add_flags(conn, conversation_id, [f for f in msg["flags"] if f in CONVERSATION_FLAGS], stamp)
    if target is not None and msg["kind"] == "deletion":
        conn.execute("UPDATE messages SET deleted_at = ? WHERE id = ?", (stamp, target["id"]))
    if target is not None and msg["kind"] == "reaction" and not superseded:
        # One reaction per sender and message: a new one replaces, a removed one removes. The
        # replaced one stays (its id keeps a provider's retry of it a duplicate), marked with
        # deleted_at and left out of the conversation view.
        conn.execute(
            "UPDATE messages SET deleted_at = ? WHERE kind = 'reaction' AND target_message_id = ? AND contact_id = ?"
            " AND deleted_at IS NULL",
            (stamp, target["id"], contact_id),
        )
    message_id = conn.execute(
        "INSERT INTO messages (conversation_id, contact_id, direction, kind, channel, channel_message_id,"
        " target_message_id, text, language, payload, created_at, deleted_at) VALUES (?, ?, 'in', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            conversation_id,
            contact_id,
            msg["kind"],
            msg["channel"],
            msg["channel_message_id"],
            target["id"] if target is not None else None,
            msg.get("text") if msg["kind"] != "reaction" else meta.get("emoji"),
            prep.language,
            to_json(payload) if payload else None,
            stamp,
            stamp if superseded else None,
        ),
    ).lastrowid
    if msg["kind"] == "edit" and msg.get("text") and conversation_id is not None and not superseded:
        # The new wording is found by search as well (the old one still is, with the original).
        conn.execute(
            "INSERT INTO message_search (rowid, body) VALUES (?, ?)",
            (message_id, folded_search_text(prep.folded, msg["sender"].get("display_name"), written_text(msg))),
        )
    if msg["kind"] == "reaction" and meta.get("removed") and target is not None:
        # Keep the removal itself only as the dedupe key, not as a visible reaction.
        conn.execute("UPDATE messages SET text = NULL WHERE id = ?", (message_id,))
    conv = None
    if conversation_id is not None:
        conv = conn.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
    return _result(config, message_id, conv, prep.language, False, status_url)


# The latest word of either side in a conversation: a person's message, or an answer of staff.
_LATEST_WORD = (
    f"SELECT created_at FROM messages WHERE conversation_id = ? AND (kind IN ('reply', 'callback') OR ({FROM_A_PERSON}))"
    " ORDER BY id DESC LIMIT 1"
)


def _settled_too_long(conn: sqlite3.Connection, config: Config, conv: Mapping[str, Any], now: datetime) -> bool:
    """Closed, or answered or waiting with no message either way, for longer than the reopen
    window: a new message opens a new conversation (routed, acknowledged, linked to the old
    one). On a chat, where a sender's messages join their open conversation, a new matter
    months later joined the old answered one, unacknowledged, with its old owner."""
    if conv["state"] == "closed":
        since = parse_iso(conv["closed_at"])
    elif conv["state"] in ("answered", "waiting"):
        # The latest message of either side (a staff reply does not touch the conversation's row);
        # not an internal note or a notification to a unit, which the resident never saw, nor a
        # machine's message (an auto-reply), which is no word of the resident.
        latest = conn.execute(_LATEST_WORD, (conv["id"], *FROM_A_PERSON_PARAMS)).fetchone()
        since = max(filter(None, (parse_iso(conv["updated_at"]), parse_iso(latest[0]) if latest else None)), default=None)
    else:
        return False
    return since is not None and reopen_passed(config, since, now)


def _no_word_from_us(conn: sqlite3.Connection, conversation_id: int, channel: str) -> bool:
    """Whether a person writing in the conversation on ``channel`` has had nothing from us
    there: no person wrote in it before (a machine's message opened it, and was not
    acknowledged), and no acknowledgement, staff answer or call-back SMS, each of which
    carries the case reference, went to them on that channel. Staff may have written into it:
    an answer that bounced, is still queued, or went on another channel told them nothing."""
    if written_since(conn, conversation_id, 0) is not None:
        return False  # a person wrote in it before: this is a follow-up
    # The conversation's messages first, then their rows by outbox_message: joined, SQLite read
    # the outbox by its state (every row ever sent) and looked for the conversation's among them.
    return conn.execute(
        "SELECT 1 FROM messages m WHERE m.conversation_id = ? AND m.direction = 'out' AND m.kind IN ('ack', 'reply', 'callback_sms')"
        " AND EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = m.id AND o.channel = ? AND +o.state = 'sent') LIMIT 1",
        (conversation_id, channel),
    ).fetchone() is None


def _status_page_contact(conn: sqlite3.Connection, msg: Mapping[str, Any]) -> tuple[int, bool, bool] | None:
    """(contact, is customer, new) for a message written on a case's status page: a form session
    (sender kind ``webform``) whose ``thread.status_token`` names a conversation is that
    conversation's contact, whose key the page's link is. None for any other message.

    Resolved by an address instead (the contact's first, as the page sent it), a reply was
    filed under whoever had since taken that address over, and with the contact left without
    one the next reply failed."""
    token = (msg.get("thread") or {}).get("status_token")
    if msg["sender"]["kind"] != "webform" or not token:
        return None
    row = conn.execute("SELECT contact_id FROM conversations WHERE status_token = ?", (token,)).fetchone()
    if row is None:
        return None
    contact_id = survivor(conn, row[0])
    customer = conn.execute("SELECT is_customer FROM contacts WHERE id = ?", (contact_id,)).fetchone()
    return contact_id, bool(customer and customer[0]), False


def ingest_tx(
    conn: sqlite3.Connection,
    *,
    config: Config,
    templates: Templates,
    prep: Prepared,
    status_url: Callable[[str], str | None],
) -> IngestResult:
    """The whole inbound path as one unit of work in the group transaction."""
    msg = prep.message
    now = prep.now
    stamp = iso(now)

    existing = conn.execute(
        "SELECT id, conversation_id, language FROM messages WHERE channel = ? AND channel_message_id = ?",
        (msg["channel"], msg["channel_message_id"]),
    ).fetchone()
    if existing is not None:
        return _result_for_existing(conn, config, existing, status_url)

    sender = msg["sender"]
    on_page = _status_page_contact(conn, msg)
    if on_page is not None:
        contact_id, is_customer, new_contact = on_page
    else:
        contact_id, is_customer, new_contact = resolve_contact(
            conn,
            prep.identities,
            display_name=sender.get("display_name"),
            language=msg.get("language"),
            customer=prep.customer,
            claim=(msg.get("customer_number") or "").strip() or None,
            channel=msg["channel"],
            now=stamp,
            sender_verified=prep.sender_verified,
        )

    if msg["kind"] in ANNOTATIONS:
        return _annotate(conn, config, prep, contact_id, status_url)

    # A contact created just now has no conversation to continue.
    automated = msg.get("ack_suppressed") in AUTOMATED
    settled_by_id: dict[int, bool] = {}

    def settled(row: Mapping[str, Any]) -> bool:
        """``_settled_too_long``, asked once per conversation of this message (it may read its
        latest message): the thread lookup asks it, then the decisions below."""
        if row["id"] not in settled_by_id:
            settled_by_id[row["id"]] = _settled_too_long(conn, config, row, now)
        return settled_by_id[row["id"]]

    conv, referred, follows = _find_thread(
        conn, msg, contact_id, prep.threads_by_sender and not new_contact, prep.sender_verified,
        refs_join="ours" if automated else "own",
        topic_unit=lambda m: prep.override.unit if prep.override is not None else route(
            config, m, is_customer=is_customer, language=prep.language, normalized_text=prep.folded)[0].unit,
        other_chats=prep.other_chats,
        stale=settled,
        reopen_since=lambda: reopen_earliest(config, now),
    )
    needs_ack = False
    if conv is None and follows is not None and automated:
        conv = follows  # a machine's message is kept where it belongs, however old
    if conv is not None and automated:
        pass  # a machine's message (out of office, a list, a bounce) is kept where it belongs and changes nothing
    elif conv is not None and settled(conv):
        referred, conv = conv, None  # too old: a new conversation, linked to the old one
    elif conv is not None and conv["state"] == "closed":
        conv = {**conv, **renew_deadline(conn, config, conv, now, state="open", inbound=True)}
        record_event(conn, conv["id"], "reopened", stamp, reason="new message from the contact")
        needs_ack = True
    elif conv is not None and conv["state"] in ("waiting", "answered", "acknowledged") and _no_word_from_us(
        conn, conv["id"], msg["channel"]
    ):
        # Opened by a machine's message (no deadline, no acknowledgement), and nothing with its
        # case reference reached the person on this channel since: their first message is its
        # real beginning, with an acknowledgement and a deadline. One that waits for an answer
        # already (a staff answer that bounced, staff reopened it) keeps a deadline still ahead.
        due = parse_iso(conv["deadline"])
        if conv["state"] == "acknowledged" and due is not None and due > now:
            conn.execute("UPDATE conversations SET state = 'open', updated_at = ? WHERE id = ?", (stamp, conv["id"]))
            conv = {**conv, "state": "open", "updated_at": stamp}
        else:
            conv = {**conv, **renew_deadline(conn, config, conv, now, state="open", inbound=True)}
            record_event(conn, conv["id"], "awaiting_answer", stamp, reason="first message from a person")
        needs_ack = True
    elif conv is not None and conv["state"] in ("answered", "waiting"):
        conv = {**conv, **renew_deadline(conn, config, conv, now, inbound=True)}
        record_event(conn, conv["id"], "awaiting_answer", stamp, reason="new message from the contact")

    opened = conv is None  # also when the old one was closed too long ago to reopen
    if opened:
        if prep.override is not None or referred is not None:
            if prep.override is not None:
                decision = prep.override
            else:
                decision = _referred_decision(config, referred, msg, contact_id, settled=settled(referred))
            area_hit = find_area(config, msg, prep.folded)
            area = area_hit[0] if area_hit else None
        else:
            decision, area = route(config, msg, is_customer=is_customer, language=prep.language, normalized_text=prep.folded)
        conv = open_conversation(
            conn,
            config,
            contact_id=contact_id,
            channel=msg["channel"],
            recipient=msg.get("recipient"),
            unit=decision.unit,
            rule=decision.rule,
            reason=decision.reason,
            topic=msg.get("topic"),
            language=prep.language,
            subject=msg.get("subject"),
            area=area.id if area else None,
            linked_to=link["id"] if (link := referred or follows) is not None else None,
            now=now,
            automated=automated,
        )
        needs_ack = True
    elif not automated and conv["last_inbound_at"] != stamp:  # else written already, with the renewed deadline
        # (A machine's message leaves the row alone: its updated_at would start the reopen window over.)
        conn.execute(
            "UPDATE conversations SET last_inbound_at = ?, updated_at = ? WHERE id = ?", (stamp, stamp, conv["id"])
        )
        conv = {**conv, "last_inbound_at": stamp, "updated_at": stamp}

    # ``ack_suppressed`` is kept so that a machine's message can be told from a person's later
    # (``tracking.written_since``).
    payload = {
        k: msg[k]
        for k in ("attachments", "location", "address", "meta", "raw", "flags", "recipient", "topic", "customer_number", "sent_at",
                  "ack_suppressed")
        if msg.get(k)
    }
    message_id = conn.execute(
        "INSERT INTO messages (conversation_id, contact_id, direction, kind, channel, channel_message_id, subject, text,"
        " language, payload, created_at) VALUES (?, ?, 'in', ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            conv["id"],
            contact_id,
            msg["kind"],
            msg["channel"],
            msg["channel_message_id"],
            msg.get("subject"),
            msg.get("text"),
            prep.language,
            to_json(payload) if payload else None,
            stamp,
        ),
    ).lastrowid
    conn.execute(
        "INSERT INTO message_search (rowid, body) VALUES (?, ?)",
        (message_id, folded_search_text(prep.folded, sender.get("display_name"), written_text(msg))),
    )
    # The message's own id is found through the messages table; only extra keys need a row.
    keys = set(msg.get("thread_keys") or ()) - {msg["channel_message_id"]}
    if keys:
        conn.executemany(
            "INSERT OR IGNORE INTO thread_keys (channel, key, conversation_id) VALUES (?, ?, ?)",
            [(msg["channel"], k, conv["id"]) for k in keys],
        )
    flags = [f for f in msg.get("flags") or () if f in CONVERSATION_FLAGS]
    if msg["kind"] in ("missed_call", "voicemail") and "callback_required" not in flags:
        flags.append("callback_required")
    if sender["kind"] in UNREACHABLE_KINDS and "no_number" not in flags:
        flags.append("no_number")
    if flags:
        add_flags(conn, conv["id"], flags, stamp)

    acknowledged = False
    ack_text = None
    if needs_ack and msg["kind"] in ACK_KINDS and not msg.get("ack_suppressed") and sender["kind"] not in UNREACHABLE_KINDS:
        language = templates.language_for("ack", prep.language)
        unit = config.units[conv["unit"]]
        name = sender.get("display_name")
        ack_text = templates.render(
            "ack",
            language,
            case_reference=conv["case_reference"],
            unit_name=unit.name,
            deadline=format_deadline(parse_iso(conv["deadline"]), language, config.timezone),
            status_url=status_url(conv["status_token"]),
            name=name or "",
            name_suffix=f" {name}" if name else "",
        )
        kind, address = prep.identities[0]
        queue_outbound(
            conn,
            conversation_id=conv["id"],
            contact_id=contact_id,
            kind="ack",
            channel=msg["channel"],
            to_kind=kind,
            to=address,
            text=ack_text,
            language=language,
            subject=f"[#{conv['case_reference']}] {msg.get('subject') or unit.name}",
            now=stamp,
        )
        acknowledged = True
    elif needs_ack and msg.get("ack_suppressed"):
        record_event(conn, conv["id"], "ack_suppressed", stamp, reason=msg["ack_suppressed"])
    return _result(config, message_id, conv, prep.language, acknowledged, status_url, ack_text=ack_text, opened=opened)
