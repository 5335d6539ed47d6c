"""Versioned schema migrations, applied in order at start; each runs once, in its own
transaction, and is recorded in ``schema_migrations``. A migration is SQL, or a function of the
connection where SQL alone cannot say it."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

log = logging.getLogger("contact_router.store")

# Every inbound message into the search index, as the ingest path indexes one
# (``search.search_text``): when the index is made, and when what it holds changes.
_INDEX_INBOUND_MESSAGES = """
INSERT INTO message_search (rowid, body)
    SELECT m.id, cr_search_text(m.subject, m.text, k.display_name)
    FROM messages m LEFT JOIN contacts k ON k.id = m.contact_id
    WHERE m.direction = 'in';
"""

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
        "INSERT INTO message_search (message_search) VALUES ('delete-all');\n" + _INDEX_INBOUND_MESSAGES,
    ),
]
