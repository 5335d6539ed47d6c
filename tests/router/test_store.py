"""Storage: migrations, restarts, group commit, and units of work that fail alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from router.channel import StorageUnavailable
from router.store import migrations
from router.store.migrations import MIGRATIONS
from router.store.sqlite import SQLiteStore, apply_migrations, iso, parse_iso, run_units
from router.testing import CoreHarness

from .helpers import vm_steps, webform_message


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 11, 30, 15, 4, 5, 123456, tzinfo=UTC),
        datetime(2026, 11, 30, 15, 4, 5, tzinfo=UTC),  # no microseconds: still six digits
        datetime(2026, 3, 29, 2, 30, tzinfo=ZoneInfo("Europe/Berlin")),  # the hour that does not exist
        datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Berlin")),
        datetime(2026, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    ],
)
def test_iso_is_fixed_width_utc_and_round_trips(when):
    text = iso(when)
    assert text == when.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    assert len(text) == 27 and text.endswith("Z")
    assert parse_iso(text) == when.astimezone(UTC)


def good(i: int):
    """A unit that writes one event and answers ``i``."""
    def work(conn):
        conn.execute("INSERT INTO events (kind, at) VALUES (?, ?)", (f"ok-{i}", "2026-01-01T00:00:00.000000Z"))
        return i
    return work


def bad(conn):
    """A unit that writes, then fails: its row must not survive."""
    conn.execute("INSERT INTO events (kind, at) VALUES ('half-written', '2026-01-01T00:00:00.000000Z')")
    raise ValueError("boom")


def test_migrations_applied_twice_are_harmless(tmp_path):
    conn = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    assert apply_migrations(conn) == [v for v, _, _ in MIGRATIONS]
    assert apply_migrations(conn) == []
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [v for v, _, _ in MIGRATIONS]


CHECKED_COLUMNS = [
    ("conversations", "state", "open"),
    ("messages", "direction", "in"),
    ("outbox", "state", "pending"),
    ("callback_attempts", "outcome", "reached"),
]


def _checks_refuse_bad_values(conn: sqlite3.Connection) -> None:
    """Every checked column still refuses what it refused, and accepts what it accepted."""
    for table, column, good_value in CHECKED_COLUMNS:
        conn.execute("SAVEPOINT probe")
        try:
            conn.execute(f"UPDATE {table} SET {column} = ?", (good_value,))
            with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
                conn.execute(f"UPDATE {table} SET {column} = 'bogus'")
        finally:
            conn.execute("ROLLBACK TO probe")
            conn.execute("RELEASE probe")


def _opens_temporary_btrees(conn: sqlite3.Connection, sql: str, params: tuple) -> bool:
    return any(row[1] == "OpenEphemeral" for row in conn.execute(f"EXPLAIN {sql}", params))


OUTBOX_INSERT = (
    "INSERT INTO outbox (message_id, channel, kind, to_kind, to_address, state, next_attempt_at, idempotency_key,"
    " created_at, updated_at) VALUES (?, 'webform', 'ack', 'email', 'a@example.org', 'pending', ?, ?, ?, ?)"
)


async def test_checks_written_as_comparisons_refuse_the_same_values_without_temporary_btrees(tmp_path):
    """Migration 5 on a database with rows: CHECK (x IN (...)) built a temporary b-tree of
    the list for every row written; the comparisons do not, refuse the same values, and the
    file stays intact."""
    data = tmp_path / "data"
    async with CoreHarness(data) as harness:
        result = await harness.core.ingest(webform_message())
    # No statement cache: an EXPLAIN prepared before the migration would list the old program.
    conn = sqlite3.connect(data / "contact-router.sqlite3", isolation_level=None, cached_statements=0)
    stamp = "2026-01-01T00:00:00.000000Z"
    params = (result.message_id, stamp, "key-1", stamp, stamp)
    conn.execute(
        "INSERT INTO callback_attempts (conversation_id, outcome, at) VALUES (?, 'reached', ?)",
        (result.conversation_id, stamp),
    )
    # Undo migration 5 by hand, as a database written before it looks.
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.execute("PRAGMA writable_schema=ON")
    for table, (column, values) in migrations._IN_CHECKS.items():
        (sql,) = conn.execute("SELECT sql FROM sqlite_schema WHERE name = ?", (table,)).fetchone()
        old = migrations._comparison_check(column, values)
        assert old in sql
        sql = sql.replace(old, migrations._in_check(column, values))
        conn.execute("UPDATE sqlite_schema SET sql = ? WHERE name = ?", (sql, table))
    conn.execute(f"PRAGMA schema_version={version + 1}")
    conn.execute("PRAGMA writable_schema=OFF")
    conn.execute("DELETE FROM schema_migrations WHERE version = 5")
    # Open across the migration: it re-reads the schema at its next statement.
    other = sqlite3.connect(data / "contact-router.sqlite3", isolation_level=None, cached_statements=0)
    assert _opens_temporary_btrees(other, OUTBOX_INSERT, params)
    _checks_refuse_bad_values(conn)

    assert apply_migrations(conn) == [5]

    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    schema = " ".join(row[0] for row in conn.execute("SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL"))
    assert " IN (" not in schema
    for name, connection in (("migrating", conn), ("other", other)):
        _checks_refuse_bad_values(connection)
        assert not _opens_temporary_btrees(connection, OUTBOX_INSERT, params), name
    async with CoreHarness(data) as again:
        status, view = await again.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert status == 200 and view["case_reference"] == result.case_reference


async def test_restart_keeps_everything(tmp_path):
    data = tmp_path / "data"
    async with CoreHarness(data) as first:
        result = await first.core.ingest(webform_message())
        await first.run_outbox()
        status, before = await first.api("GET", f"/api/v1/conversations/{result.conversation_id}")
    async with CoreHarness(data) as second:
        status, after = await second.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert status == 200
        assert after["case_reference"] == before["case_reference"]
        assert [m["text"] for m in after["messages"]] == [m["text"] for m in before["messages"]]
        assert after["state"] == "acknowledged"
        # the same provider message again, after the restart: still deduplicated
        again = await second.core.ingest({**webform_message(), "channel_message_id": "restart-check"})
        dup = await second.core.ingest({**webform_message(), "channel_message_id": "restart-check"})
        assert dup.duplicate and dup.conversation_id == again.conversation_id


async def test_group_commit_shares_transactions_and_isolates_failures(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        works = [store.write(good(i)) for i in range(50)] + [store.write(bad)]
        results = await asyncio.gather(*works, return_exceptions=True)
        assert results[:50] == list(range(50))
        assert isinstance(results[50], ValueError)
        rows = await store.fetchall("SELECT kind FROM events")
        assert len(rows) == 50 and all(r["kind"].startswith("ok-") for r in rows)
        assert store.commits < 50  # concurrent units shared commits
    finally:
        await store.close()


async def test_write_before_open_is_an_error(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    with pytest.raises(RuntimeError):
        await store.write(lambda conn: None)


async def test_a_failing_unit_in_the_middle_leaves_the_others_written_once(tmp_path):
    """The units run without savepoints first; a failure reruns them one by one, so the
    units before the failing one must not end up written twice."""
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        works = [good(i) for i in range(5)] + [bad] + [good(i) for i in range(5, 10)]
        results = await asyncio.gather(*(store.write(w) for w in works), return_exceptions=True)
        assert results[:5] == list(range(5)) and results[6:] == list(range(5, 10))
        assert isinstance(results[5], ValueError)
        kinds = sorted(r["kind"] for r in await store.fetchall("SELECT kind FROM events"))
        assert kinds == sorted(f"ok-{i}" for i in range(10))

        # The same inside one unit (how the outbox records a set of outcomes).
        nested = await store.write(partial(run_units, works=[good(20), bad, good(21)], savepoint="outcome"))
        assert [ok for ok, _ in nested] == [True, False, True]
        kinds = [r["kind"] for r in await store.fetchall("SELECT kind FROM events WHERE kind IN ('ok-20', 'ok-21', 'half-written')")]
        assert sorted(kinds) == ["ok-20", "ok-21"]
    finally:
        await store.close()


async def test_a_unit_that_fails_before_writing_costs_the_others_nothing(tmp_path):
    """A staff action on a conversation that is not there raises before it writes: the other
    units of its transaction run once, not again in savepoints of their own."""
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        runs: list[int] = []

        def counted(i: int):
            def work(conn):
                runs.append(i)  # a probe for this test only: real units touch nothing but the database
                return good(i)(conn)
            return work

        def not_found(conn):
            conn.execute("SELECT 1 FROM conversations WHERE id = 424242").fetchone()
            raise LookupError("conversation not found")

        works = [counted(0), not_found, counted(1)]
        results = await asyncio.gather(*(store.write(w) for w in works), return_exceptions=True)
        assert results[0] == 0 and results[2] == 1 and isinstance(results[1], LookupError)
        assert runs == [0, 1]
        assert sorted(r["kind"] for r in await store.fetchall("SELECT kind FROM events")) == ["ok-0", "ok-1"]
    finally:
        await store.close()


async def test_a_transaction_that_sqlite_rolled_back_itself_leaves_nothing_half_written(tmp_path):
    """On some errors (disk full, I/O) SQLite ends the whole transaction itself. The units after
    the failing one must not go on in autocommit, each statement durable on its own, while their
    callers hear that the transaction failed."""
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        def disk_full(conn):
            conn.execute("ROLLBACK")  # what SQLite does itself on SQLITE_FULL
            raise sqlite3.OperationalError("database or disk is full")

        results = await asyncio.gather(*(store.write(w) for w in [good(0), disk_full, good(1)]), return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results)
        assert await store.fetchall("SELECT kind FROM events") == []
        assert await store.write(good(2)) == 2  # the writer goes on
    finally:
        await store.close()


async def test_units_within_a_unit_hear_sqlites_own_rollback_as_storage_unavailable(tmp_path):
    """The outbox records a batch's outcomes as units within one unit (``run_units``). When
    SQLite ended the whole transaction itself (disk full), the lost savepoint's "no such
    savepoint" came out instead of the database's error: a plain error, so the outbox dropped
    the outcomes instead of keeping them until the database takes writes again."""
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        def disk_full(conn):
            conn.execute("INSERT INTO events (kind, at) VALUES ('half', '2026-01-01T00:00:00.000000Z')")
            conn.execute("ROLLBACK")  # what SQLite does itself on some SQLITE_FULL and SQLITE_IOERR
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = sqlite3.SQLITE_FULL
            raise exc

        with pytest.raises(StorageUnavailable) as caught:
            await store.write(partial(run_units, works=[good(1), disk_full, good(2)], savepoint="outcome"))
        assert caught.value.__cause__.sqlite_errorcode == sqlite3.SQLITE_FULL
        assert await store.fetchall("SELECT kind FROM events") == []
        assert await store.write(good(3)) == 3  # the writer goes on
    finally:
        await store.close()


async def test_a_database_that_refuses_writes_is_storage_unavailable_and_a_units_own_error_is_not(tmp_path):
    """Read-only (the BEGIN fails) and full (an INSERT fails half-way through a unit): the callers
    hear ``StorageUnavailable`` with SQLite's error as the cause, so that HTTP answers 503 and the
    IMAP import does not blame the mail; a unit's own error stays what it is."""
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        writer = store._writer
        writer.execute("PRAGMA query_only = ON")
        results = await asyncio.gather(store.write(good(0)), store.write(bad), return_exceptions=True)
        assert all(isinstance(r, StorageUnavailable) for r in results)
        assert isinstance(results[0].__cause__, sqlite3.OperationalError)
        assert "readonly" in str(results[0])
        writer.execute("PRAGMA query_only = OFF")

        pages = writer.execute("PRAGMA page_count").fetchone()[0]
        writer.execute(f"PRAGMA max_page_count = {pages}")

        def big(conn):
            conn.execute("INSERT INTO events (kind, at, data) VALUES ('big', '2026-01-01T00:00:00.000000Z', ?)", ("x" * 200_000,))

        with pytest.raises(StorageUnavailable) as caught:
            await store.write(big)
        assert caught.value.__cause__.sqlite_errorcode == sqlite3.SQLITE_FULL
        assert await store.fetchall("SELECT kind FROM events") == []
        writer.execute("PRAGMA max_page_count = 1073741823")

        with pytest.raises(ValueError):
            await store.write(bad)

        def rolls_back(conn):  # its own error, though SQLite ends the whole transaction for it
            conn.execute("INSERT OR ROLLBACK INTO events (kind, at) VALUES (NULL, NULL)")

        outages = store.outages
        results = await asyncio.gather(store.write(good(9)), store.write(rolls_back), return_exceptions=True)
        assert isinstance(results[1], sqlite3.IntegrityError) and store.outages == outages
        with pytest.raises(sqlite3.IntegrityError):
            await store.write(lambda conn: conn.execute("INSERT INTO events (kind, at) VALUES (NULL, NULL)"))
        assert await store.write(good(1)) == 1  # the writer goes on
        assert [r["kind"] for r in await store.fetchall("SELECT kind FROM events")] == ["ok-1"]
    finally:
        await store.close()



async def test_a_database_error_that_ends_only_its_statement_is_storage_unavailable_too(tmp_path):
    """SQLite may undo only the failing statement of a full or failing disk and keep the
    transaction: the unit's caller heard a plain OperationalError (a 500, a mail set aside as
    unprocessable) instead of ``StorageUnavailable``, and the refusal was not counted."""
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        def statement_failed(conn):
            conn.execute("INSERT INTO events (kind, at) VALUES ('half', '2026-01-01T00:00:00.000000Z')")
            exc = sqlite3.OperationalError("disk I/O error")
            exc.sqlite_errorcode = sqlite3.SQLITE_IOERR
            raise exc

        outages = store.outages
        results = await asyncio.gather(store.write(good(1)), store.write(statement_failed), return_exceptions=True)
        assert results[0] == 1 and isinstance(results[1], StorageUnavailable)
        assert results[1].__cause__.sqlite_errorcode == sqlite3.SQLITE_IOERR
        assert store.outages == outages + 1
        assert [r["kind"] for r in await store.fetchall("SELECT kind FROM events")] == ["ok-1"]
    finally:
        await store.close()

async def test_a_write_lock_held_by_another_process_is_storage_unavailable_after_the_wait(tmp_path):
    """Waiting 30 s for the lock outlasted providers' patience (Twilio waits 15 s for a
    webhook): they heard nothing useful. After ``lock_wait_seconds`` the callers hear
    ``StorageUnavailable`` (503), and the writer goes on once the lock is free."""
    store = SQLiteStore(tmp_path / "db.sqlite3")
    store.lock_wait_seconds = 0.3
    await store.open()
    other = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # a CLI import, say, in the middle of its transaction
        started = asyncio.get_running_loop().time()
        with pytest.raises(StorageUnavailable) as caught:
            await store.write(good(0))
        assert 0.25 <= asyncio.get_running_loop().time() - started < 5
        assert caught.value.__cause__.sqlite_errorcode == sqlite3.SQLITE_BUSY
        other.execute("COMMIT")
        assert await store.write(good(1)) == 1
    finally:
        other.close()
        await store.close()


async def test_a_long_report_runs_apart_and_the_shared_reader_keeps_answering(tmp_path):
    """A read over everything (the stats at a million conversations take seconds) must not make
    the inbox's other reads wait on the one shared reader connection."""
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        # A read that takes a while: counting to a few million in a recursive CTE.
        slow = asyncio.create_task(store.fetchall_apart(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000) SELECT COUNT(*) FROM n"
        ))
        await asyncio.sleep(0.01)  # it is under way
        assert not slow.done()
        quick = await asyncio.wait_for(store.fetchall("SELECT COUNT(*) FROM conversations"), 5)
        assert quick[0][0] == 0
        assert not slow.done(), "the quick read should not have waited for the report"
        assert (await slow)[0][0] == 3000000
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await store.fetchall_apart("INSERT INTO events (kind, at) VALUES ('x', 'y')")
    finally:
        await store.close()


class _DefensiveSQLite:
    """A connection as a SQLite built in defensive mode answers a schema edit."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: tuple = ()):
        if sql.startswith("UPDATE sqlite_master"):
            raise sqlite3.DatabaseError("table sqlite_master may not be modified")
        return self.conn.execute(sql, params)


def test_a_sqlite_that_refuses_schema_edits_keeps_the_in_lists_and_starts(tmp_path, caplog):
    conn = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    for _version, _, sql in MIGRATIONS[:4]:
        for statement in sql.split(";\n"):
            if statement.strip() and "cr_search_text" not in statement:
                conn.execute(statement)
    before = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'outbox'").fetchone()[0]
    conn.execute("BEGIN IMMEDIATE")
    migrations.checks_as_comparisons(_DefensiveSQLite(conn))
    conn.execute("COMMIT")
    assert conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'outbox'").fetchone()[0] == before
    assert conn.execute("PRAGMA writable_schema").fetchone()[0] == 0
    assert "kept as IN lists" in caplog.text


def test_migration_5_on_a_rewritten_schema_changes_nothing_and_other_errors_are_not_swallowed(tmp_path):
    conn = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    apply_migrations(conn)
    before = [row[0] for row in conn.execute("SELECT sql FROM sqlite_master ORDER BY name")]
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.execute("BEGIN IMMEDIATE")
    migrations.checks_as_comparisons(conn)  # a second start that raced the first
    conn.execute("COMMIT")
    assert [row[0] for row in conn.execute("SELECT sql FROM sqlite_master ORDER BY name")] == before
    assert conn.execute("PRAGMA schema_version").fetchone()[0] == version

    class Broken(_DefensiveSQLite):
        def execute(self, sql: str, params: tuple = ()):
            if sql.startswith("SELECT sql FROM sqlite_master"):
                raise sqlite3.DatabaseError("database disk image is malformed")
            return self.conn.execute(sql, params)

    conn.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        migrations.checks_as_comparisons(Broken(conn))
    conn.execute("ROLLBACK")


class _StaleFirstRead:
    """A connection whose first look at the applied versions is from before another process
    applied them all (it read, then waited for the write lock)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.stale = True

    def execute(self, sql: str, params: tuple = ()):
        if self.stale and sql.startswith("SELECT version FROM schema_migrations"):
            self.stale = False
            return self.conn.execute("SELECT version FROM schema_migrations WHERE 0")
        return self.conn.execute(sql, params)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


def test_two_processes_starting_at_once_apply_each_migration_once(tmp_path):
    first = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    second = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    assert apply_migrations(first) == [v for v, _, _ in MIGRATIONS]
    assert apply_migrations(_StaleFirstRead(second)) == []
    versions = [r[0] for r in second.execute("SELECT version FROM schema_migrations")]
    assert versions == [v for v, _, _ in MIGRATIONS]


async def test_reports_run_at_most_two_at_once(tmp_path):
    from router.store.sqlite import MAX_REPORTS

    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1500000) SELECT COUNT(*) FROM n"
        reports = [asyncio.create_task(store.fetchall_apart(slow)) for _ in range(MAX_REPORTS + 2)]
        await asyncio.sleep(0.01)
        assert store._reports.locked()  # the third and fourth wait their turn
        assert [r[0][0] for r in await asyncio.gather(*reports)] == [1500000] * (MAX_REPORTS + 2)
        assert not store._reports.locked()
    finally:
        await store.close()


async def test_a_write_after_close_is_refused_not_left_waiting(tmp_path):
    """A task still running at shutdown (the outbox's outcomes) queued its write behind a
    writer that was gone, and waited for ever."""
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    await store.close()
    async with asyncio.timeout(2):
        with pytest.raises(StorageUnavailable):
            await store.write(good(1))


async def test_migration_13_indexes_the_stored_messages_with_umlauts_written_without_dots(tmp_path):
    """Messages stored before the index had the spelling without dots ("Muller" for "Müller")
    are found by it once the service starts on the new version, and by every search as before."""
    # The index as the version before wrote it: folded text and name only.
    await _search_index_rebuilt_by_migration(
        tmp_path / "data", 13, "Müllabfuhr kommt nicht durch die Straße", "Jürgen Weiß-Öztürk",
        "muellabfuhr kommt nicht durch die strasse juergen weiss-oeztuerk",
        ("mullabfuhr", "Ozturk", "Müllabfuhr", "muellabfuhr", "Strasse", "Weiß"))


async def _search_index_rebuilt_by_migration(
    data: Path, version: int, text: str, name: str, indexed_before: str, found_by: tuple[str, ...]
) -> None:
    """Store a message, write its search entry as ``indexed_before`` (what the version before
    ``version`` indexed) and forget ``version``; start again: each of ``found_by`` finds it."""
    async with CoreHarness(data) as harness:
        message = webform_message(text)
        message["sender"]["display_name"] = name
        old = await harness.core.ingest(message)
    conn = sqlite3.connect(data / "contact-router.sqlite3", isolation_level=None)
    conn.execute("INSERT INTO message_search (message_search) VALUES ('delete-all')")
    conn.execute("INSERT INTO message_search (rowid, body) VALUES (?, ?)", (old.message_id, indexed_before))
    conn.execute("DELETE FROM schema_migrations WHERE version = ?", (version,))
    conn.close()

    async with CoreHarness(data) as harness:
        for q in found_by:
            status, body = await harness.api("GET", "/api/v1/conversations", params={"q": q})
            assert status == 200 and [i["id"] for i in body["items"]] == [old.conversation_id], q
        assert [r["version"] for r in await harness.rows("SELECT version FROM schema_migrations WHERE version = ?",
                                                          (version,))] == [version]


async def test_migration_14_makes_each_mail_address_one_identity_and_merges_the_contacts_it_split(tmp_path):
    """A file written before e-mail domains had one form: a resident who wrote from
    info@müller-bau.de and from info@xn--mller-bau-q9a.de was two contacts, and a third form
    of it was typed into someone's web form. Once the service starts on the new version, the
    address is one identity of one contact with both histories, the typist's contact keeps
    nothing of it, and nothing else changes."""
    data = tmp_path / "data"
    async with CoreHarness(data) as harness:
        first = await harness.core.ingest(webform_message("Müllabfuhr kommt nicht", email="first@placeholder.example"))
        second = await harness.core.ingest(webform_message("Grube offen", email="second@placeholder.example", language="en"))
        form = webform_message("Frage", email="typist@example.net")
        form["sender"]["other_identities"] = [{"kind": "email", "address": "other@placeholder.example"}]
        typist = await harness.core.ingest(form)
        lone = await harness.core.ingest(webform_message("Hallo", email="lone@placeholder.example"))
        invalid = await harness.core.ingest(webform_message("Hallo", email="info@xn--zz.de"))
        await harness.run_outbox()
    conn = sqlite3.connect(data / "contact-router.sqlite3", isolation_level=None)
    contact = {result: conn.execute("SELECT contact_id FROM messages WHERE id = ?", (result.message_id,)).fetchone()[0]
               for result in (first, second, typist, lone, invalid)}
    # What the version before stored: each address as written, lower-cased and NFC.
    for placeholder, written in (("first@placeholder.example", "info@müller-bau.de"),
                                 ("second@placeholder.example", "info@xn--mller-bau-q9a.de"),
                                 ("other@placeholder.example", "info@\uff4d\u00fcller-bau.de"),
                                 ("lone@placeholder.example", "jürgen@xn--exmple-cua.de")):
        conn.execute("UPDATE identities SET address = ? WHERE address = ?", (written, placeholder))
        conn.execute("UPDATE outbox SET to_address = ? WHERE to_address = ?", (written, placeholder))
    conn.execute("UPDATE identities SET last_inbound_at = '2026-12-01T00:00:00.000000Z' WHERE address = ?",
                 ("info@xn--mller-bau-q9a.de",))
    conn.execute("UPDATE contacts SET display_name = NULL, is_customer = 1, customer_number = 'K-0815' WHERE id = ?",
                 (contact[second],))
    conn.execute("UPDATE contacts SET customer_claim = 'K-0815' WHERE id = ?", (contact[first],))
    assert conn.execute("SELECT claimed FROM identities WHERE address = ?", ("info@\uff4d\u00fcller-bau.de",)).fetchone() == (1,)
    conn.execute("DELETE FROM schema_migrations WHERE version = 14")
    conn.close()

    async with CoreHarness(data) as harness:
        resident = contact[first]  # the older of the two
        identities = await harness.rows("SELECT contact_id, address, claimed, last_inbound_at FROM identities WHERE kind = 'email'"
                                        " ORDER BY address")
        assert [(i["contact_id"], i["address"], i["claimed"]) for i in identities] == [
            (resident, "info@müller-bau.de", 0),
            (contact[invalid], "info@xn--zz.de", 0),
            (contact[lone], "jürgen@exämple.de", 0),
            (contact[typist], "typist@example.net", 0),
        ]
        assert identities[0]["last_inbound_at"] == "2026-12-01T00:00:00.000000Z"
        [kept] = await harness.rows("SELECT * FROM contacts WHERE id = ?", (resident,))
        assert kept["merged_into"] is None
        # the first contact's name, the language of the one that wrote last, the other's customer number
        assert (kept["display_name"], kept["language"]) == ("Erika Mustermann", "en")
        assert (kept["is_customer"], kept["customer_number"], kept["customer_claim"]) == (1, "K-0815", None)
        [merged] = await harness.rows("SELECT merged_into, customer_number FROM contacts WHERE id = ?", (contact[second],))
        assert merged == {"merged_into": resident, "customer_number": "K-0815"}
        for result in (first, second):
            [row] = await harness.rows("SELECT m.contact_id, c.contact_id AS owner FROM messages m"
                                       " JOIN conversations c ON c.id = m.conversation_id WHERE m.id = ?", (result.message_id,))
            assert row == {"contact_id": resident, "owner": resident}
        assert sorted(r["to_address"] for r in await harness.rows("SELECT to_address FROM outbox")) == [
            "info@müller-bau.de", "info@müller-bau.de", "info@xn--zz.de", "jürgen@exämple.de", "typist@example.net"]
        status, body = await harness.api("GET", f"/api/v1/contacts/{resident}")
        assert status == 200 and [i["address"] for i in body["identities"]] == ["info@müller-bau.de"]
        status, body = await harness.api("GET", f"/api/v1/contacts/{contact[second]}")
        assert status == 200 and body["merged_into"] == resident
        # the next mail from either form is the resident's, in their open case
        again = await harness.core.ingest(webform_message("Noch offen", email="INFO@XN--MLLER-BAU-Q9A.DE"))
        assert (await harness.rows("SELECT contact_id FROM messages WHERE id = ?", (again.message_id,)))[0]["contact_id"] == resident
        assert await harness.rows("PRAGMA foreign_key_check") == []
        assert [r["version"] for r in await harness.rows("SELECT version FROM schema_migrations WHERE version = 14")] == [14]


def test_migration_14_keeps_a_claim_with_its_latest_claimant_and_a_failure_that_came_last(tmp_path):
    """Forms that were only typed into web forms stay one claim, of whoever named the address
    last, and merge no contacts; a contact's two forms of one address become one identity that
    is failed when the last thing that happened to either was a failed delivery."""
    conn = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    apply_migrations(conn)
    at = "2026-01-0{}T00:00:00.000000Z".format
    for contact in (1, 2, 3):
        conn.execute("INSERT INTO contacts (id, created_at, updated_at) VALUES (?, ?, ?)", (contact, at(contact), at(contact)))
    conn.executemany(
        "INSERT INTO identities (contact_id, kind, address, claimed, last_inbound_at, failed_at, created_at)"
        " VALUES (?, 'email', ?, ?, ?, ?, ?)",
        [(1, "a@xn--mller-bau-q9a.de", 1, None, None, at(1)),
         (2, "a@müller-bau.de", 1, None, None, at(2)),
         (3, "b@müller-bau.de", 0, at(3), None, at(3)),
         (3, "b@xn--mller-bau-q9a.de", 0, at(4), at(5), at(4))],
    )
    conn.execute("BEGIN")
    migrations.canonical_mail_identities(conn)
    conn.execute("COMMIT")
    rows = conn.execute("SELECT contact_id, address, claimed, last_inbound_at, failed_at, created_at FROM identities"
                        " ORDER BY address").fetchall()
    assert rows == [(2, "a@müller-bau.de", 1, None, None, at(2)), (3, "b@müller-bau.de", 0, at(4), at(5), at(3))]
    assert conn.execute("SELECT COUNT(*) FROM contacts WHERE merged_into IS NOT NULL").fetchone() == (0,)


async def test_migration_15_indexes_the_stored_messages_with_letters_unicode_does_not_decompose_folded(tmp_path):
    """Messages stored before ø, ł and the like were folded ("Sørensen" indexed as itself) are
    found by their plain spellings once the service starts on the new version."""
    # The index as the version before wrote it: ø and ł left as they are.
    await _search_index_rebuilt_by_migration(
        tmp_path / "data", 15, "Grøft foran huset i Łódź", "Søren Sørensen", "grøft foran huset i łodz søren sørensen",
        ("Sorensen", "Soerensen", "Sørensen", "groft", "Lodz", "Łódź", "huset"))


def test_migration_14_rewrites_the_outbox_in_one_pass_however_many_addresses_change(tmp_path):
    """Each outbox row to an address not in its canonical form is rewritten by its id: a pass
    over the whole outbox for each such address took 52 s at 200,000 rows and 2,000 addresses,
    and grows with their product (a service that does not start for an hour)."""
    conn = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    apply_migrations(conn)
    stamp = "2026-01-01T00:00:00.000000Z"
    conn.execute("INSERT INTO contacts (id, created_at, updated_at) VALUES (1, ?, ?)", (stamp, stamp))
    conn.execute("INSERT INTO messages (id, contact_id, direction, kind, channel, created_at) VALUES (1, 1, 'out', 'ack',"
                 " 'email', ?)", (stamp,))
    changed, unchanged = 300, 3000
    addresses = [f"user{i}@xn--mller-bau-q9a.de" for i in range(changed)] + [f"user{i}@example.org" for i in range(unchanged)]
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO outbox (message_id, channel, kind, to_kind, to_address, state, next_attempt_at, idempotency_key,"
        " created_at, updated_at) VALUES (1, 'email', 'ack', 'email', ?, 'sent', ?, ?, ?, ?)",
        [(address, stamp, f"key-{i}", stamp, stamp) for i, address in enumerate(addresses)],
    )
    steps, _ = vm_steps(conn, lambda: migrations.canonical_mail_identities(conn), every=1000)
    conn.execute("COMMIT")
    assert sorted(r[0] for r in conn.execute("SELECT to_address FROM outbox WHERE to_address LIKE '%.de'")) == sorted(
        f"user{i}@müller-bau.de" for i in range(changed))
    # One pass over the outbox and an update by id for each changed row: a few hundred
    # thousand steps; a pass for each changed address took hundreds of millions.
    assert steps < 1_000, steps


@contextlib.contextmanager
def _read_only_file(path: Path) -> Iterator[None]:
    """``path`` as a file this process may read but not write: its mode, or for root, who
    writes whatever the mode, the immutable flag (as a read-only mount of the file would)."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    try:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make a file read-only for root here: {exc}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_database_file_that_cannot_be_written_is_refused_at_start(tmp_path, capsys):
    """A database file the service may read but not write (restored by another user, an
    immutable flag, a file mounted read-only) opened without a word when no migration was due:
    the service started, looked healthy to its supervisor and answered every message 503. The
    start fails instead, naming the file and SQLite's reason, and the file is left as it was."""
    from router.cli import main

    data = tmp_path / "data"
    path = data / "contact-router.sqlite3"

    async def open_and_close() -> SQLiteStore:
        store = SQLiteStore(path)
        try:
            await store.open()
        finally:
            await store.close()
        return store

    asyncio.run(open_and_close())
    for name in ("contact-router.sqlite3-wal", "contact-router.sqlite3-shm"):
        (data / name).unlink(missing_ok=True)
    content = path.read_bytes()
    with _read_only_file(path):
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            asyncio.run(open_and_close())
        assert main(["serve", "--port", "0", "--data-dir", str(data)]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1, err[-800:]
        assert f"--data-dir {data}" in err and "contact-router.sqlite3" in err and "readonly" in err, err
        assert path.read_bytes() == content


async def test_every_connection_has_the_pragmas_it_depends_on(tmp_path):
    """The writer commits durably in WAL with foreign keys enforced and waits for another
    process's lock; the shared reader and a report's connection of its own wait for a lock
    rather than fail a read at once, and the shared reader checks foreign keys as the writer does."""
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        assert await store.write(good(1)) == 1
        writer = store._writer
        assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert writer.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert writer.execute("PRAGMA busy_timeout").fetchone()[0] == int(store.lock_wait_seconds * 1000)
        for pragma, value in (("journal_mode", "wal"), ("foreign_keys", 1), ("busy_timeout", 30000)):
            assert (await store.fetchall(f"PRAGMA {pragma}"))[0][0] == value, pragma
        for pragma, value in (("journal_mode", "wal"), ("busy_timeout", 30000)):
            assert (await store.fetchall_apart(f"PRAGMA {pragma}"))[0][0] == value, pragma
    finally:
        await store.close()


async def test_a_file_that_is_no_database_is_refused_and_left_as_it_is(tmp_path):
    """Something else at the database's path (a text file, a truncated copy): SQLite's error
    comes out of ``open``, nothing of the store stays open, and not a byte of the file changes."""
    path = tmp_path / "contact-router.sqlite3"
    content = "Kundenliste;Stand März\n".encode() * 200
    path.write_bytes(content)
    store = SQLiteStore(path)
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        await store.open()
    assert store.db is None and store._writer is None
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contact-router.sqlite3"]


async def test_a_database_another_process_is_writing_opens_without_waiting_for_it(tmp_path):
    """The check at start that the file takes writes waited for the write lock: a ``serve``
    restarted while ``import-customers`` held it (a large file) waited 30 s and then refused to
    start. A lock held by another writer shows the file takes writes; the start goes on."""
    path = tmp_path / "contact-router.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    importer = sqlite3.connect(path, isolation_level=None)
    importer.execute("BEGIN IMMEDIATE")
    try:
        store = SQLiteStore(path)
        started = time.monotonic()
        await asyncio.wait_for(store.open(), 10)
        assert time.monotonic() - started < 2
        assert store._writer.execute("PRAGMA busy_timeout").fetchone()[0] == 30000  # as it was: writes wait again
    finally:
        importer.execute("ROLLBACK")
        importer.close()
    try:
        assert await store.write(lambda conn: conn.execute("SELECT 1").fetchone()[0]) == 1
    finally:
        await store.close()
