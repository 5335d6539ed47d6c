"""The upgrade path of a running installation: a file written at any older schema version, with
rows in it, is brought up to date at start with every row kept; a migration that is killed or
fails leaves the old version; a file of a newer version is refused."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import router.store.sqlite as sqlite_store
from router.identity import canonical_email, survivor
from router.search import search_text
from router.store.migrations import MIGRATIONS
from router.store.sqlite import SQLiteStore, apply_migrations
from router.testing import CoreHarness

LATEST = MIGRATIONS[-1][0]
ALL_VERSIONS = [v for v, _, _ in MIGRATIONS]
DB = "contact-router.sqlite3"


def at(day: int, hour: int = 8) -> str:
    return f"2026-03-{day:02d}T{hour:02d}:00:00.000000Z"


def _at_version(path: Path, version: int, monkeypatch: pytest.MonkeyPatch) -> sqlite3.Connection:
    """A file as the release whose newest migration was ``version`` left it."""
    conn = sqlite3.connect(path, isolation_level=None)
    with monkeypatch.context() as patch:
        patch.setattr(sqlite_store, "MIGRATIONS", MIGRATIONS[:version])
        assert apply_migrations(conn) == ALL_VERSIONS[:version]
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _write_rows(conn: sqlite3.Connection, version: int) -> None:
    """Rows of every kind, written with the SQL of the release at ``version``: three residents
    (one of them, before migration 14, two contacts for one mailbox in its two spellings), a
    contact a staff member merged, their cases with messages, answers, an edit and a note,
    acknowledgements in the outbox with their delivery statuses, an escalation, a call-back
    attempt and, from migration 4 on, the search index as that release kept it."""
    conn.execute("BEGIN")
    x = conn.execute
    x("INSERT INTO customers (customer_number, name, email, city, imported_at) VALUES"
      " ('K-0815', 'Müller Bau GmbH', 'info@müller-bau.de', 'Musterstadt', ?)", (at(1),))
    # Contact 3 wrote from the Punycode form of contact 2's address; once e-mail addresses have one
    # form (migration 14) that is a mailbox of its own.
    third = "info@xn--mller-bau-q9a.de" if version < 14 else "jürgen@exämple.de"
    contacts = [
        (1, "Erika Mustermann", "de", 0, None, None, None),
        (2, None, "de", 1, "K-0815", None, None),
        (3, "Søren Sørensen", "en", 0, None, "K-0815", None),
        (4, "Erika M.", "de", 0, None, None, 1),  # merged by staff into contact 1
    ]
    for cid, name, language, customer, number, claim, merged in contacts:
        x("INSERT INTO contacts (id, display_name, language, is_customer, customer_number, customer_claim, merged_into,"
          " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
          (cid, name, language, customer, number, claim, merged, at(cid), at(cid + 1)))
    identities = [
        (1, 1, "email", "erika@example.net", at(2), "webform", None),
        (2, 1, "phone", "+4915112345678", at(3), "whatsapp", None),
        (3, 2, "email", "info@müller-bau.de", at(4), "email", at(5)),
        (4, 3, "email", third, at(6), "email", None),
        (5, 4, "email", "erika.m@example.net", None, None, None),
    ]
    for row in identities:
        x("INSERT INTO identities (id, contact_id, kind, address, last_inbound_at, last_inbound_channel, failed_at,"
          " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*row, at(row[1])))
    if version >= 10:  # an address typed into a web form: a claim
        x("INSERT INTO identities (id, contact_id, kind, address, claimed, created_at) VALUES (6, 1, 'phone',"
          " '+493012345678', 1, ?)", (at(2),))
    conversations = [
        (1, "2026-000001", "tok-1", 1, "webform", "bauhotline", "acknowledged", "de", "Gehweg gesperrt",
         '["callback_required"]', None, 1, None),
        (2, "2026-000002", "tok-2", 2, "email", "stoerung", "answered", "de", "Müllabfuhr", "[]", None, 0, at(9)),
        (3, "2026-000003", "tok-3", 3, "email", "kundenservice", "closed", "en", "Grøft", "[]", 2, 0, None),
    ]
    for cid, ref, token, contact, channel, unit, state, language, subject, flags, linked, level, answered in conversations:
        x("INSERT INTO conversations (id, case_reference, status_token, contact_id, channel, unit, state, topic, language,"
          " subject, routing_rule, routing_reason, deadline, escalate_at, escalation_level, flags, linked_to,"
          " created_at, updated_at, last_inbound_at, first_answered_at, answered_at, closed_at)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'topic', 'topic matched', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
          (cid, ref, token, contact, channel, unit, state, unit, language, subject, at(20), at(12), level, flags,
           linked, at(cid + 5), at(cid + 6), at(cid + 5), answered, answered, at(15) if state == "closed" else None))
    messages = [
        (1, 1, 1, "in", "text", "webform", "form:1", None, None, None, "Baustelle vor dem Haus, Gehweg gesperrt"),
        (2, 1, 1, "out", "ack", "webform", None, None, "system", None, "Eingangsbestätigung"),
        (3, 2, 2, "in", "text", "email", "<a1@müller-bau.de>", None, None, "Müllabfuhr", "Die Tonne in der Straße"),
        (4, 2, 2, "out", "reply", "email", None, None, "hotline", None, "Wir kümmern uns"),
        (5, 2, 2, "internal", "note", "email", None, None, "hotline", None, "Rückruf Frau Weiß"),
        (6, 3, 3, "in", "text", "email", "<b1@example>", None, None, "Grøft", "Grøft foran huset i Łódź"),
        (7, 3, 3, "in", "edit", "email", "<b2@example>", 6, None, None, "Grøften er fyldt"),
        (8, 1, 1, "in", "text", "whatsapp", "wamid.1", None, None, None, "Noch offen?"),
    ]
    for mid, conv, contact, direction, kind, channel, channel_id, target, author, subject, text in messages:
        x("INSERT INTO messages (id, conversation_id, contact_id, direction, kind, channel, channel_message_id,"
          " target_message_id, author, subject, text, language, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'de', ?)",
          (mid, conv, contact, direction, kind, channel, channel_id, target, author, subject, text, at(conv + 5, mid)))
    x("INSERT INTO thread_keys (channel, key, conversation_id) VALUES ('email', '<a1@müller-bau.de>', 2),"
      " ('email', '<b1@example>', 3)")
    outbox = [
        (1, 2, 1, "webform", "ack", "email", "erika@example.net", "sent", "prov-1"),
        (2, 4, 2, "email", "reply", "email", "info@müller-bau.de", "sent", "prov-2"),
        (3, 4, 2, "email", "reply", "email", third, "failed", None),
        (4, 2, 1, "whatsapp", "ack", "phone", "+4915112345678", "pending", None),
    ]
    for oid, message, conv, channel, kind, to_kind, address, state, provider in outbox:
        x("INSERT INTO outbox (id, message_id, conversation_id, channel, kind, to_kind, to_address, state, attempts,"
          " next_attempt_at, provider_id, idempotency_key, created_at, updated_at)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?)",
          (oid, message, conv, channel, kind, to_kind, address, state, at(10), provider, f"key-{oid}", at(9), at(10)))
    x("INSERT INTO delivery_events (id, channel, provider_id, outbox_id, status, at) VALUES"
      " (1, 'webform', 'prov-1', 1, 'delivered', ?), (2, 'email', 'prov-2', 2, 'failed', ?)", (at(10), at(11)))
    if version >= 7:
        x("UPDATE delivery_events SET resend_hint = 'other_channel', permanent = 1 WHERE id = 2")
    if version >= 8:
        x("INSERT INTO delivery_events (id, channel, provider_id, status, idempotency_key, at) VALUES"
          " (3, 'whatsapp', 'wamid.x', 'sent', 'key-4', ?)", (at(11),))
    x("INSERT INTO events (conversation_id, kind, actor, data, at) VALUES (1, 'created', 'system', '{}', ?),"
      " (2, 'answered', 'hotline', '{\"message_id\": 4}', ?), (NULL, 'import', 'admin', NULL, ?)", (at(6), at(9), at(1)))
    x("INSERT INTO escalations (conversation_id, level, from_unit, to_unit, reason, at) VALUES"
      " (1, 1, 'bauhotline', 'kundenservice', 'deadline passed', ?)", (at(12),))
    x("INSERT INTO callback_attempts (conversation_id, outcome, note, staff, at) VALUES"
      " (1, 'not_reached', 'Mailbox', 'hotline', ?)", (at(12),))
    if version >= 12:
        x("INSERT INTO request_keys (staff, key, request, response, created_at) VALUES"
          " ('hotline', 'req-1', '{}', '{\"status\": 200}', ?)", (at(9),))
    if version >= 4:  # the index as its release wrote it for each inbound message
        conn.create_function("cr_search_text", 3, search_text, deterministic=True)
        x("INSERT INTO message_search (rowid, body) SELECT m.id, cr_search_text(m.subject, m.text, k.display_name)"
          " FROM messages m LEFT JOIN contacts k ON k.id = m.contact_id WHERE m.direction = 'in'")
    x("COMMIT")


# Rows no migration touches: every one must come through as it was.
_UNTOUCHED = ("customers", "thread_keys", "events", "escalations", "callback_attempts", "delivery_events", "request_keys")


def _table_rows(conn: sqlite3.Connection, table: str) -> list[dict]:
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY rowid")]
    except sqlite3.OperationalError:  # a table of a later release
        return []
    finally:
        conn.row_factory = None


def _snapshot(conn: sqlite3.Connection) -> dict[str, list[dict]]:
    tables = (*_UNTOUCHED, "contacts", "identities", "conversations", "messages", "outbox")
    return {table: _table_rows(conn, table) for table in tables}


def _as_before(rows: list[dict], before: list[dict]) -> list[dict]:
    """``rows`` with only the columns the rows ``before`` had: a column added since holds its
    default (checked apart), and the rows must otherwise be what they were."""
    if not before:
        return rows
    return [{k: v for k, v in row.items() if k in before[0]} for row in rows]


def _schema(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    return sorted(conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall())


def _index_terms(conn: sqlite3.Connection) -> set[tuple[str, int, int]]:
    """What the search index holds: (term, message id, offset) for every token indexed."""
    conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.check_terms USING fts5vocab(main, message_search, instance)")
    try:
        return set(conn.execute("SELECT term, doc, offset FROM temp.check_terms"))
    finally:
        conn.execute("DROP TABLE temp.check_terms")


def _expected_terms(conn: sqlite3.Connection) -> set[tuple[str, int, int]]:
    """What indexing every stored inbound message now, as ingest does, gives: built apart."""
    reference = sqlite3.connect(":memory:")
    reference.execute("CREATE VIRTUAL TABLE message_search USING fts5(body, tokenize='unicode61 remove_diacritics 2')")
    rows = conn.execute("SELECT m.id, m.subject, m.text, k.display_name FROM messages m"
                        " LEFT JOIN contacts k ON k.id = m.contact_id WHERE m.direction = 'in'").fetchall()
    reference.executemany("INSERT INTO message_search (rowid, body) VALUES (?, ?)",
                          [(mid, search_text(subject, text, name)) for mid, subject, text, name in rows])
    return _index_terms(reference)


def _assert_upgraded(conn: sqlite3.Connection, before: dict[str, list[dict]], fresh_schema: list) -> None:
    """Every migration recorded, the schema a fresh file's, every row kept, the invariants whole."""
    assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")] == ALL_VERSIONS
    assert _schema(conn) == fresh_schema
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    after = {table: _as_before(rows, before[table]) for table, rows in _snapshot(conn).items()}
    for table in _UNTOUCHED:
        assert after[table] == before[table], table
    # Contacts keep their rows; one whose mailbox turned out to be another's now points to it.
    assert [{k: v for k, v in c.items() if k not in ("merged_into", "updated_at", "display_name", "language",
                                                      "customer_claim")} for c in after["contacts"]] == [
        {k: v for k, v in c.items() if k not in ("merged_into", "updated_at", "display_name", "language", "customer_claim")}
        for c in before["contacts"]]
    owner = {c["id"]: survivor(conn, c["id"]) for c in after["contacts"]}
    for table in ("conversations", "messages"):
        assert [{**r, "contact_id": owner.get(r["contact_id"], r["contact_id"])} for r in before[table]] == after[table]
    assert [{**r, "to_address": canonical_email(r["to_address"]) if r["to_kind"] == "email" else r["to_address"]}
            for r in before["outbox"]] == after["outbox"]
    # Each mailbox one identity in its one form, of the contact that now holds it.
    addresses = [(i["kind"], i["address"]) for i in after["identities"]]
    assert len(set(addresses)) == len(addresses)
    assert {(i["kind"], canonical_email(i["address"]) if i["kind"] == "email" else i["address"], owner[i["contact_id"]])
            for i in before["identities"]} == {(i["kind"], i["address"], owner[i["contact_id"]]) for i in after["identities"]}
    assert all(owner[i["contact_id"]] == i["contact_id"] or i["contact_id"] == 4 for i in after["identities"])
    # The search index holds exactly the inbound messages, each as ingest would index it now.
    assert _index_terms(conn) == _expected_terms(conn)


@pytest.fixture(scope="module")
def fresh_schema(tmp_path_factory) -> list:
    conn = sqlite3.connect(tmp_path_factory.mktemp("fresh") / DB, isolation_level=None)
    apply_migrations(conn)
    try:
        return _schema(conn)
    finally:
        conn.close()


@pytest.mark.parametrize("version", ALL_VERSIONS[:-1])
async def test_a_file_at_any_older_version_is_brought_up_to_date_with_every_row_kept(
    tmp_path, monkeypatch, fresh_schema, version
):
    """Each release's file, with rows written as that release wrote them, starts on this one:
    the migrations after its version are applied, in order, once; nothing is lost, the foreign
    keys and unique keys hold, the search index matches the messages, and the service works on it."""
    data = tmp_path / "data"
    data.mkdir()
    conn = _at_version(data / DB, version, monkeypatch)
    _write_rows(conn, version)
    before = _snapshot(conn)
    conn.close()

    store = SQLiteStore(data / DB)
    await store.open()
    await store.close()

    conn = sqlite3.connect(data / DB, isolation_level=None)
    try:
        _assert_upgraded(conn, before, fresh_schema)
        if version < 14:  # the two spellings of one mailbox: one resident with both histories
            assert conn.execute("SELECT merged_into FROM contacts WHERE id = 3").fetchone() == (2,)
    finally:
        conn.close()
    async with CoreHarness(data) as harness:
        for q, conversation in (("Lodz", 3), ("Tonne Strasse", 2), ("gesperrt", 1)):
            status, body = await harness.api("GET", "/api/v1/conversations", params={"q": q})
            assert status == 200 and [i["id"] for i in body["items"]] == [conversation], q
        status, body = await harness.api("GET", "/api/v1/conversations/3")
        assert status == 200 and [m["id"] for m in body["messages"]] == [6, 7]


# Run in a process of its own: open the file as the service does and apply the migrations, and
# die by SIGKILL (no cleanup runs, as in a power cut) when the statement ``argv[2]`` starts for
# the ``argv[3]``-th time, or, with ``argv[4]`` set, that many VM steps into it.
_KILLED_MIGRATING = """
import os, signal, sys
from pathlib import Path
from router.store.sqlite import _connect, apply_migrations

conn = _connect(Path(sys.argv[1]))
marker, nth, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seen = 0

def kill(*_):
    os.kill(os.getpid(), signal.SIGKILL)

def trace(sql):
    global seen
    if sql.lstrip().startswith(marker):
        seen += 1
        if seen == nth:
            if steps:
                conn.set_progress_handler(kill, steps)
            else:
                kill()

conn.set_trace_callback(trace)
apply_migrations(conn)
print("finished without being killed")
"""


def _kill_while_migrating(path: Path, marker: str, nth: int = 1, steps: int = 0) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_MIGRATING, str(path), marker, str(nth), str(steps)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-2000:])


# Where a migration is killed: (the statement that starts, its occurrence, VM steps into it).
_LAST_STEP = "its work done, its version about to be recorded"
_KILL_MID = [
    (5, "the second table's constraints rewritten in the schema", ("UPDATE sqlite_master", 2, 0)),
    (13, "the search index emptied, being built again", ("INSERT INTO message_search (rowid, body)", 1, 20)),
    (14, "identities merged, the outbox not yet rewritten", ("UPDATE outbox SET to_address", 1, 0)),
    (15, "the search index emptied, being built again", ("INSERT INTO message_search (rowid, body)", 1, 20)),
]


@pytest.mark.parametrize(
    ("version", "where", "point"),
    [(v, _LAST_STEP, ("INSERT INTO schema_migrations", 1, 0)) for v in ALL_VERSIONS[1:]] + _KILL_MID,
)
def test_a_migration_killed_part_way_leaves_the_old_version_and_the_next_start_completes_it(
    tmp_path, monkeypatch, fresh_schema, version, where, point
):
    """SIGKILL while a migration runs (a deploy that restarts the service, an OOM kill): the file
    is exactly as before it, schema, rows, search index and recorded versions, and the next start
    applies the rest as if nothing had happened. A migration and the record of its version are
    one transaction."""
    path = tmp_path / DB
    conn = _at_version(path, version - 1, monkeypatch)
    _write_rows(conn, version - 1)
    before, dump = _snapshot(conn), list(conn.iterdump())
    conn.close()

    _kill_while_migrating(path, *point)

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert list(conn.iterdump()) == dump, where
        assert apply_migrations(conn) == ALL_VERSIONS[version - 1:]
        _assert_upgraded(conn, before, fresh_schema)
    finally:
        conn.close()


def test_a_full_disk_part_way_through_a_migration_leaves_the_old_version(tmp_path, monkeypatch, fresh_schema):
    """The disk fills while migration 11 writes its indexes (SQLite's real SQLITE_FULL, here by a
    cap on the file's pages): the start fails with SQLite's error, the indexes already written
    are gone with the rest of the migration, and once there is room again it is applied whole."""
    path = tmp_path / DB
    conn = _at_version(path, 10, monkeypatch)
    _write_rows(conn, 10)
    before, dump = _snapshot(conn), list(conn.iterdump())
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 3}")  # room for some of its eight indexes
    with pytest.raises(sqlite3.OperationalError, match="full") as caught:
        apply_migrations(conn)
    assert caught.value.sqlite_errorcode == sqlite3.SQLITE_FULL
    assert not conn.in_transaction
    assert list(conn.iterdump()) == dump
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert apply_migrations(conn) == ALL_VERSIONS[10:]
    _assert_upgraded(conn, before, fresh_schema)
    conn.close()


async def test_a_file_of_a_newer_version_is_refused_naming_both_versions_and_left_as_it_is(tmp_path):
    """A file the next release migrated (a rollback of the deploy, a backup restored onto an old
    machine) was opened as if it were known: its newer migrations silently ignored, this release
    wrote rows in a schema it does not know. It is refused at start, naming the file's version and
    the newest this release knows, before anything is written."""
    path = tmp_path / DB
    conn = sqlite3.connect(path, isolation_level=None)
    apply_migrations(conn)
    conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'a later release', ?)",
                 (LATEST + 1, at(1)))
    dump = list(conn.iterdump())
    conn.close()

    store = SQLiteStore(path)
    with pytest.raises(sqlite3.DatabaseError) as caught:
        await store.open()
    message = str(caught.value)
    assert f"schema version {LATEST + 1}" in message and f"up to {LATEST}" in message and str(path) in message, message
    assert store.db is None and store._writer is None
    conn = sqlite3.connect(path, isolation_level=None)
    assert list(conn.iterdump()) == dump
    conn.close()


def test_serve_on_a_file_of_a_newer_version_ends_with_one_line_naming_the_versions(tmp_path, capsys):
    """What the operator sees: one line, no traceback, and nothing of the service started."""
    from router.cli import main

    data = tmp_path / "data"
    data.mkdir()
    conn = sqlite3.connect(data / DB, isolation_level=None)
    apply_migrations(conn)
    conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'a later release', ?)",
                 (LATEST + 2, at(1)))
    conn.close()
    assert main(["serve", "--port", "0", "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err[-800:]
    assert f"schema version {LATEST + 2}" in err and f"up to {LATEST}" in err, err
