"""Storage: migrations, restarts, group commit, and units of work that fail alone."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from zoneinfo import ZoneInfo

import pytest

from router.store.migrations import MIGRATIONS
from router.store.sqlite import SQLiteStore, apply_migrations, iso, parse_iso, run_units
from router.testing import CoreHarness

from .helpers import webform_message


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
