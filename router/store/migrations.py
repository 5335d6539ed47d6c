"""Versioned schema migrations, applied in order at start; each runs once, in its own
transaction, and is recorded in ``schema_migrations``. A migration is SQL, or a function of the
connection where SQL alone cannot say it."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime

from ..identity import canonical_email, survivor

log = logging.getLogger("contact_router.store")

# Every inbound message into the search index, as the ingest path indexes one
# (``search.search_text``): when the index is made, and when what it holds changes.
_INDEX_INBOUND_MESSAGES = """
INSERT INTO message_search (rowid, body)
    SELECT m.id, cr_search_text(m.subject, m.text, k.display_name)
    FROM messages m LEFT JOIN contacts k ON k.id = m.contact_id
    WHERE m.direction = 'in';
"""
# The search index emptied and built again: when the way a message is indexed changes.
_REINDEX_INBOUND_MESSAGES = "INSERT INTO message_search (message_search) VALUES ('delete-all');\n" + _INDEX_INBOUND_MESSAGES

# The CHECK constraints of the first schema that test a column against a list of constants.
_IN_CHECKS = {
    "conversations": ("state", ("open", "acknowledged", "answered", "waiting", "closed")),
    "messages": ("direction", ("in", "out", "internal")),
    "outbox": ("state", ("pending", "sending", "sent", "failed")),
    "callback_attempts": ("outcome", ("reached", "not_reached", "wrong_number")),
}


def _in_check(column: str, values: tuple[str, ...]) -> str:
    return f"CHECK ({column} IN ({', '.join(repr(v) for v in values)}))"


def _comparison_check(column: str, values: tuple[str, ...]) -> str:
    return f"CHECK ({' OR '.join(f'{column} = {v!r}' for v in values)})"


def checks_as_comparisons(conn: sqlite3.Connection) -> None:
    """Rewrite ``CHECK (x IN ('a', 'b', 'c'))`` as ``CHECK (x = 'a' OR x = 'b' OR x = 'c')``.

    SQLite evaluates an IN list of more than two constants by building a temporary b-tree of
    the list, and a CHECK does so for every row it checks: a tenth of the instructions of an
    inbound message went there. The comparisons accept exactly the same values. SQLite cannot
    alter a constraint, but for a change that every stored row still satisfies and that leaves
    the file format alone it documents editing the schema's text in place
    (https://www.sqlite.org/lang_altertable.html#otheralter), which is what this does, inside
    the migration's transaction, with the schema version raised so every connection re-reads it.
    """
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.execute("PRAGMA writable_schema=ON")
    try:
        conn.execute("SAVEPOINT checks")
        try:
            changed = False
            for table, (column, values) in _IN_CHECKS.items():
                # sqlite_master: the older name, which every SQLite knows.
                (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
                old, new = _in_check(column, values), _comparison_check(column, values)
                if sql.count(new) == 1:
                    continue  # rewritten already
                if sql.count(old) != 1:
                    raise RuntimeError(f"table {table}: expected the constraint {old} once in its schema")
                conn.execute(
                    "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = ?", (sql.replace(old, new), table)
                )
                changed = True
            if changed:
                conn.execute(f"PRAGMA schema_version={version + 1}")
        except sqlite3.DatabaseError as exc:
            if "may not be modified" not in str(exc):
                raise
            # A build of SQLite in defensive mode refuses schema edits. The IN lists are correct,
            # only slower: keep them rather than refuse to start.
            conn.execute("ROLLBACK TO checks")
            log.warning("CHECK constraints kept as IN lists (this SQLite refuses schema edits: %s)", exc)
        finally:
            conn.execute("RELEASE checks")
    finally:
        conn.execute("PRAGMA writable_schema=OFF")


# An e-mail address that may not be in its canonical form: one beyond ASCII (its text is shorter
# than its UTF-8 bytes), or one with a Punycode label.
_MAYBE_NOT_CANONICAL = "(instr({0}, 'xn--') > 0 OR length({0}) != length(CAST({0} AS BLOB)))"


def canonical_mail_identities(conn: sqlite3.Connection) -> None:
    """Rewrite stored e-mail identities to their canonical form (``identity.canonical_email``):
    ``info@xn--mller-bau-q9a.de`` and ``info@müller-bau.de`` were two identities, often of two
    contacts, so one resident had two histories and an answer from the other form opened a case
    of its own. Addresses that become one are one identity; contacts whose own (not merely
    claimed) addresses become one are merged (``_merge_contact``). Outbox rows follow, so that a
    failure still marks the identity and a fallback does not try the same mailbox twice."""
    now = datetime.now(UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    found = conn.execute(
        f"SELECT id, address FROM identities WHERE kind = 'email' AND {_MAYBE_NOT_CANONICAL.format('address')}"
    ).fetchall()
    groups: dict[str, list[int]] = {}
    for identity_id, address in found:
        canonical = canonical_email(address)
        if canonical != address:
            groups.setdefault(canonical, []).append(identity_id)
    for canonical, ids in groups.items():
        already = conn.execute("SELECT id FROM identities WHERE kind = 'email' AND address = ?", (canonical,)).fetchone()
        _one_identity(conn, [*ids, already[0]] if already else ids, canonical, now)
    # By id, found in one pass: the outbox has no index on its addresses, and a pass for each
    # address took minutes on a large file.
    sent = conn.execute(
        f"SELECT id, to_address FROM outbox WHERE to_kind = 'email' AND {_MAYBE_NOT_CANONICAL.format('to_address')}"
    ).fetchall()
    rewrites = [(canonical, outbox_id) for outbox_id, address in sent if (canonical := canonical_email(address)) != address]
    conn.executemany("UPDATE outbox SET to_address = ? WHERE id = ?", rewrites)
    if groups:
        log.info("e-mail identities in their canonical form: %d rewritten", sum(len(ids) for ids in groups.values()))


_IDENTITY_COLUMNS = "id, contact_id, claimed, last_inbound_at, last_inbound_channel, failed_at, created_at"


def _identity_rows(conn: sqlite3.Connection, ids: list[int]) -> list[tuple]:
    return conn.execute(
        f"SELECT {_IDENTITY_COLUMNS} FROM identities WHERE id IN ({', '.join('?' * len(ids))})", ids
    ).fetchall()


def _one_identity(conn: sqlite3.Connection, ids: list[int], canonical: str, now: str) -> None:
    """Make the identities ``ids`` (one address in several forms) one identity ``canonical``.

    Whose it is, as if the address had been written one way from the start:
    - the contacts that hold it as their own address (not ``claimed``) are one person, merged
      into the oldest of them (``_merge_contact``);
    - a form of it that some other contact merely named (typed into a web form) is dropped, as
      resolution takes a claimed address from its claimant when the owner writes from it; the
      claimant's contact is never merged, so nobody gains the owner's history by naming them;
    - when every form is only claimed, the latest claimant keeps the claim.
    The identity keeps the latest inbound of its forms, the earliest creation, and a failure
    only where it came after that latest inbound (an inbound message clears one)."""
    rows = _identity_rows(conn, ids)
    own = [row for row in rows if not row[2]]
    if own:
        contacts = sorted({survivor(conn, row[1]) for row in own})
        target = contacts[0]
        if len(contacts) > 1:
            latest = max(contacts, key=lambda c: conn.execute(
                "SELECT COALESCE(MAX(last_inbound_at), '') FROM identities WHERE contact_id = ?", (c,)).fetchone()[0])
            for other in contacts[1:]:
                _merge_contact(conn, target, other, now)
            _take_language(conn, target, latest)
            log.info("contacts %s merged into contact %d: one e-mail address (%s)", contacts[1:], target, canonical)
        rows = _identity_rows(conn, ids)
        kept = [row for row in rows if not row[2] and survivor(conn, row[1]) == target]
        claimed = 0
    else:
        latest_claim = max(rows, key=lambda row: (row[3] or "", row[6] or "", row[0]))
        target = survivor(conn, latest_claim[1])
        kept = [row for row in rows if survivor(conn, row[1]) == target]
        claimed = 1
    keeper = max(kept, key=lambda row: (row[3] or "", row[0]))
    last_inbound = keeper[3]
    failed = max((row[5] for row in kept if row[5]), default=None)
    if failed is not None and last_inbound is not None and failed < last_inbound:
        failed = None
    created = min(row[6] for row in kept)
    conn.execute(f"DELETE FROM identities WHERE id IN ({', '.join('?' * (len(ids) - 1))})",
                 [i for i in ids if i != keeper[0]])
    conn.execute(
        "UPDATE identities SET address = ?, contact_id = ?, claimed = ?, last_inbound_at = ?, last_inbound_channel = ?,"
        " failed_at = ?, created_at = ? WHERE id = ?",
        (canonical, target, claimed, last_inbound, keeper[4], failed, created, keeper[0]),
    )


def _merge_contact(conn: sqlite3.Connection, target: int, other: int, now: str) -> None:
    """Merge ``other`` into ``target`` because their own addresses turned out to be one: its
    identities (claims stay claims: unlike a staff merge, nobody said the rest are one
    person's), conversations and messages move, and ``other`` points to ``target``
    (``merged_into``), keeping its own fields. ``target`` keeps its name, or takes the other's
    (the service never overwrites a known name); it is a customer if either was, with its own
    customer number or else the other's (no claim left beside a confirmed number); its language
    is settled by ``_take_language``."""
    conn.execute("UPDATE identities SET contact_id = ? WHERE contact_id = ?", (target, other))
    conn.execute("UPDATE conversations SET contact_id = ? WHERE contact_id = ?", (target, other))
    conn.execute("UPDATE messages SET contact_id = ? WHERE contact_id = ?", (target, other))
    conn.execute("UPDATE contacts SET merged_into = ?, updated_at = ? WHERE id = ?", (target, now, other))
    name, language, is_customer, number, claim = conn.execute(
        "SELECT display_name, language, is_customer, customer_number, customer_claim FROM contacts WHERE id = ?", (other,)
    ).fetchone()
    kept_number = conn.execute("SELECT customer_number FROM contacts WHERE id = ?", (target,)).fetchone()[0]
    if number and kept_number and number != kept_number:
        log.warning("contact %d keeps customer number %s; contact %d, merged into it, keeps %s on its own row",
                    target, kept_number, other, number)
    conn.execute(
        "UPDATE contacts SET display_name = COALESCE(display_name, ?), language = COALESCE(language, ?),"
        " is_customer = MAX(is_customer, ?), customer_number = COALESCE(customer_number, ?),"
        " customer_claim = COALESCE(customer_claim, ?), updated_at = ? WHERE id = ?",
        (name, language, is_customer, number, claim, now, target),
    )
    conn.execute("UPDATE contacts SET customer_claim = NULL WHERE id = ? AND is_customer = 1", (target,))


def _take_language(conn: sqlite3.Connection, target: int, latest: int) -> None:
    """``target`` speaks the language of whichever merged contact wrote last (``latest``), as a
    contact's language follows its latest message; kept when that one has none."""
    if latest != target:
        conn.execute(
            "UPDATE contacts SET language = COALESCE((SELECT language FROM contacts WHERE id = ?), language) WHERE id = ?",
            (latest, target),
        )


MIGRATIONS: list[tuple[int, str, str | Callable[[sqlite3.Connection], None]]] = [
    (
        1,
        "initial schema",
        """
CREATE TABLE contacts (
    id INTEGER PRIMARY KEY,
    display_name TEXT,
    language TEXT,
    is_customer INTEGER NOT NULL DEFAULT 0,
    customer_number TEXT,
    customer_claim TEXT,
    merged_into INTEGER REFERENCES contacts(id),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE identities (
    id INTEGER PRIMARY KEY,
    contact_id INTEGER NOT NULL REFERENCES contacts(id),
    kind TEXT NOT NULL,
    address TEXT NOT NULL,
    last_inbound_at TEXT,
    last_inbound_channel TEXT,
    failed_at TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (kind, address)
);
CREATE INDEX identities_contact ON identities(contact_id);

CREATE TABLE customers (
    customer_number TEXT PRIMARY KEY,
    name TEXT,
    email TEXT,
    phone TEXT,
    street TEXT,
    postcode TEXT,
    city TEXT,
    imported_at TEXT NOT NULL
);

CREATE TABLE conversations (
    id INTEGER PRIMARY KEY,
    case_reference TEXT NOT NULL UNIQUE,
    status_token TEXT NOT NULL UNIQUE,
    contact_id INTEGER NOT NULL REFERENCES contacts(id),
    channel TEXT NOT NULL,
    recipient TEXT,
    unit TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'answered', 'waiting', 'closed')),
    topic TEXT,
    language TEXT NOT NULL,
    subject TEXT,
    area TEXT,
    routing_rule TEXT NOT NULL,
    routing_reason TEXT NOT NULL,
    deadline TEXT,
    escalate_at TEXT,
    escalation_level INTEGER NOT NULL DEFAULT 0,
    assignee TEXT,
    flags TEXT NOT NULL DEFAULT '[]',
    linked_to INTEGER REFERENCES conversations(id),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    last_inbound_at TEXT,
    first_answered_at TEXT,
    answered_at TEXT,
    closed_at TEXT
);
CREATE INDEX conversations_contact ON conversations(contact_id, state);
CREATE INDEX conversations_unit ON conversations(unit, id);
CREATE INDEX conversations_state ON conversations(state, id);
CREATE INDEX conversations_channel ON conversations(channel, id);
CREATE INDEX conversations_deadline ON conversations(deadline) WHERE deadline IS NOT NULL;
CREATE INDEX conversations_escalate ON conversations(escalate_at) WHERE escalate_at IS NOT NULL;

CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER REFERENCES conversations(id),
    contact_id INTEGER REFERENCES contacts(id),
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out', 'internal')),
    kind TEXT NOT NULL,
    channel TEXT NOT NULL,
    channel_message_id TEXT,
    target_message_id INTEGER REFERENCES messages(id),
    author TEXT,
    subject TEXT,
    text TEXT,
    language TEXT,
    payload TEXT,
    delivery_status TEXT,
    provider_id TEXT,
    created_at TEXT NOT NULL,
    edited_at TEXT,
    deleted_at TEXT
);
CREATE UNIQUE INDEX messages_dedupe ON messages(channel, channel_message_id) WHERE channel_message_id IS NOT NULL;
CREATE INDEX messages_conversation ON messages(conversation_id, id);
CREATE INDEX messages_contact ON messages(contact_id, id);
CREATE INDEX messages_target ON messages(target_message_id) WHERE target_message_id IS NOT NULL;
CREATE INDEX messages_provider ON messages(channel, provider_id) WHERE provider_id IS NOT NULL;

CREATE TABLE thread_keys (
    channel TEXT NOT NULL,
    key TEXT NOT NULL,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    PRIMARY KEY (channel, key)
) WITHOUT ROWID;

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id),
    conversation_id INTEGER REFERENCES conversations(id),
    channel TEXT NOT NULL,
    kind TEXT NOT NULL,
    to_kind TEXT NOT NULL,
    to_address TEXT NOT NULL,
    primary_delivery INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'sent', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    claimed_until TEXT,
    hint TEXT,
    last_error TEXT,
    provider_id TEXT,
    delivery_status TEXT,
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX outbox_due ON outbox(state, next_attempt_at);
CREATE INDEX outbox_message ON outbox(message_id);
CREATE INDEX outbox_provider ON outbox(channel, provider_id) WHERE provider_id IS NOT NULL;

CREATE TABLE delivery_events (
    id INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    outbox_id INTEGER REFERENCES outbox(id),
    status TEXT NOT NULL,
    error_code TEXT,
    error_detail TEXT,
    at TEXT NOT NULL
);
CREATE INDEX delivery_events_outbox ON delivery_events(outbox_id);

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER REFERENCES conversations(id),
    kind TEXT NOT NULL,
    actor TEXT,
    data TEXT,
    at TEXT NOT NULL
);
CREATE INDEX events_conversation ON events(conversation_id, id);

CREATE TABLE escalations (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    level INTEGER NOT NULL,
    from_unit TEXT NOT NULL,
    to_unit TEXT NOT NULL,
    reason TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX escalations_conversation ON escalations(conversation_id, id);

CREATE TABLE callback_attempts (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    outcome TEXT NOT NULL CHECK (outcome IN ('reached', 'not_reached', 'wrong_number')),
    note TEXT,
    staff TEXT,
    at TEXT NOT NULL
);
CREATE INDEX callback_attempts_conversation ON callback_attempts(conversation_id, id);
""",
    ),
    (
        2,
        "indexes for threading by sender and the conversation view",
        """
CREATE INDEX conversations_contact_channel ON conversations(contact_id, channel, id);
CREATE INDEX outbox_conversation ON outbox(conversation_id, id);
""",
    ),
    (
        3,
        "drop indexes that later ones made redundant",
        """
DROP INDEX conversations_contact;
DROP INDEX conversations_deadline;
""",
    ),
    (
        4,
        "full-text search over inbound messages",
        """
CREATE VIRTUAL TABLE message_search USING fts5(body, content='', tokenize='unicode61 remove_diacritics 2');
""" + _INDEX_INBOUND_MESSAGES,
    ),
    (5, "CHECK constraints as comparisons instead of IN lists", checks_as_comparisons),
    (
        6,
        "find delivery statuses by provider id",
        """
CREATE INDEX delivery_events_provider ON delivery_events(channel, provider_id);
""",
    ),
    (
        7,
        "keep what a failed status asks for until its send is recorded",
        """
ALTER TABLE delivery_events ADD COLUMN resend_hint TEXT;
ALTER TABLE delivery_events ADD COLUMN permanent INTEGER;
""",
    ),
    (
        8,
        "find statuses of a send whose answer never came by the idempotency key the provider echoes",
        """
ALTER TABLE delivery_events ADD COLUMN idempotency_key TEXT;
CREATE INDEX delivery_events_unmatched_key ON delivery_events(idempotency_key)
    WHERE outbox_id IS NULL AND idempotency_key IS NOT NULL;
""",
    ),
    (
        9,
        "statistics of a period read the conversations of that period, not every one of the unit",
        """
CREATE INDEX conversations_created ON conversations(created_at);
""",
    ),
    (
        10,
        "an address a sender merely named (a form's phone field) is a claim until its owner writes from it",
        """
ALTER TABLE identities ADD COLUMN claimed INTEGER NOT NULL DEFAULT 0;
""",
    ),
    (
        11,
        "the inbox lists the conversations with a flag (a call-back to make) by an index of each flag's",
        # One partial index a flag: a list by flag walks exactly its conversations, newest first,
        # however many carry other flags (some stay for good). A flag added later needs its own.
        # "flags != '[]'" first: a new conversation, which has none, is passed over by one
        # comparison an index (the eight cost about 1.2 us a new conversation, 1.7 without it).
        "".join(
            f"CREATE INDEX conversations_flag_{flag} ON conversations(id)"
            f" WHERE flags != '[]' AND instr(flags, '\"{flag}\"') > 0;\n"
            for flag in (
                "callback_required", "callback_failed", "undeliverable", "owner_not_notified", "no_number",
                "unsupported", "provider_error", "transcription_failed",
            )
        ),
    ),
    (
        12,
        "a staff action sent again with the same Idempotency-Key gets the first answer instead of being done twice",
        """
CREATE TABLE request_keys (
    staff TEXT NOT NULL,
    key TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (staff, key)
);
CREATE INDEX request_keys_created ON request_keys(created_at);
""",
    ),
    (
        13,
        "search finds words with umlauts written without the dots: the index is built again with that spelling too",
        _REINDEX_INBOUND_MESSAGES,
    ),
    (
        14,
        "an e-mail address is one identity whichever form its domain was written in (Punycode or Unicode)",
        canonical_mail_identities,
    ),
    (
        15,
        "search finds ø, æ, ł and the other letters Unicode does not decompose written plain: the index is built again",
        _REINDEX_INBOUND_MESSAGES,
    ),
]
