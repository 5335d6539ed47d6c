"""SQLite storage: one writer that commits whatever is queued as one transaction (group
commit), and an aiosqlite connection for reads.

Every write is a unit of work: a synchronous function that gets the writer's connection. The
writer runs all queued units in one transaction; if one raises after changing rows, it rolls
the transaction back and runs them again, each inside its own savepoint, so one failing unit
leaves out only itself.
Then it commits once (WAL, synchronous=FULL) and answers each caller. A caller's ``await store.write(fn)`` returns only after its unit is durable, which is
what lets an HTTP handler give a provider its 2xx only after the commit.

The writer uses the standard ``sqlite3`` module: its units run on the event loop, and so does
BEGIN while the write lock is free; COMMIT (the fsync) and a BEGIN that has to wait for another
writer run in the writer's own thread. aiosqlite would put every statement through its thread,
and lets no callable run there. Reads (the inbox) go through aiosqlite.

A transaction takes at most ``MAX_BATCH`` units: under overload the queue is worked off in
bounded slices, so the event loop keeps answering between them instead of stalling for one
transaction of thousands of units.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from ..channel import StorageUnavailable
from ..search import search_text
from .migrations import MIGRATIONS

T = TypeVar("T")
log = logging.getLogger("contact_router.store")

Work = Callable[[sqlite3.Connection], Any]

# Units per transaction: enough to share one fsync among every request of a busy moment (at
# c=50 a batch holds about 20), small enough that one batch blocks the loop for a few ms only.
MAX_BATCH = 64
# The writer connection's page cache. The working set of the ingest path is the right-hand
# edges of a few indexes plus lookups by primary key; 8 MiB holds that with room to spare,
# whereas a 64 MiB cache only grows the process by as much under sustained load.
CACHE_KIB = 8192
# Long reads (``fetchall_apart``) running at once; more wait for a turn.
MAX_REPORTS = 2


def iso(dt: datetime | None) -> str | None:
    """Fixed-width UTC timestamp, so that text order is time order."""
    if dt is None:
        return None
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    # Formatted by hand: half the time of isoformat() plus slicing, and called several times
    # for every message. %-formatting, because an f-string with format specs takes twice as long.
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031
        dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second, dt.microsecond
    )


def parse_iso(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value)  # strptime costs ~60 us; this ~1 us


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    return conn


class SchemaTooNew(sqlite3.DatabaseError):
    """The database records migrations this release does not know: a newer release wrote it."""


def _refuse_newer(conn: sqlite3.Connection, done: set[int]) -> None:
    """Raise ``SchemaTooNew`` when ``done`` holds a version this release has no migration for:
    its schema may differ in ways this code cannot know, so it must not read or write it."""
    unknown = done - {version for version, _, _ in MIGRATIONS}
    if not unknown:
        return
    file = next((row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"), "") or "(in memory)"
    raise SchemaTooNew(
        f"the database {file} is at schema version {max(unknown)}, newer than this release of contact-router knows"
        f" (up to {MIGRATIONS[-1][0]}): run the release that wrote it, or restore a backup from before that"
        " upgrade; the file was left as it is"
    )


def apply_migrations(conn: sqlite3.Connection) -> list[int]:
    """Apply the migrations not yet recorded; returns the versions applied now. A file that
    records a version this release does not know is refused (``SchemaTooNew``), unchanged."""
    # Migrations may call the same text folding the application uses (search backfill).
    conn.create_function("cr_search_text", 3, search_text, deterministic=True)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    _refuse_newer(conn, done)
    applied = []
    for version, name, sql in MIGRATIONS:
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        # Another process (the CLI beside the service) may have applied it while we waited.
        if conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,)).fetchone():
            conn.execute("COMMIT")
            continue
        try:
            if callable(sql):
                sql(conn)
            else:
                for statement in sql.split(";\n"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, iso(datetime.now(UTC))),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # else SQLite rolled back itself (a full disk), and ROLLBACK would hide why
                conn.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied


def rewrite_header(conn: sqlite3.Connection) -> None:
    """Write the header's user version as it is: a write that changes nothing, which fails when
    the database cannot store (read-only, full) where a read would not notice."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.execute(f"PRAGMA user_version = {int(version)}")


def begin_if_free(conn: sqlite3.Connection, wait: str) -> bool:
    """BEGIN IMMEDIATE at once when the write lock is free; False, and no transaction, when
    another connection holds it. ``wait`` (a ``PRAGMA busy_timeout``) is set again afterwards."""
    conn.execute("PRAGMA busy_timeout=0")
    try:
        conn.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise
        return False
    finally:
        conn.execute(wait)


def check_writable(conn: sqlite3.Connection) -> None:
    """Raise SQLite's error when the database cannot be written: a file this process may read
    but not write (its mode, an immutable flag, a read-only mount) opens without complaint, and
    the service would start only to refuse every message.

    A write lock another process holds (``import-customers`` with a large file) shows that the
    file takes writes: the check does not wait for it, or a restart waited and then failed."""
    wait = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    if not begin_if_free(conn, f"PRAGMA busy_timeout={int(wait)}"):
        return
    try:
        rewrite_header(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def run_units(conn: sqlite3.Connection, works: list[Work], savepoint: str = "unit") -> list[tuple[bool, Any]]:
    """Run each unit of work inside the caller's transaction so that a unit that raises is
    rolled back alone. Returns (True, result) or (False, exception) per unit.

    The usual case takes one savepoint around them all: SQLite copies every page into a
    statement journal the first time it changes within a savepoint, and one savepoint per unit
    made it copy the pages the units share once per unit (measured: about a quarter of the
    ingest path's time). A unit that raises before changing a row (a staff action on a
    conversation that is not there) has nothing to undo. Only when a unit raises after changing
    rows is the whole set rolled back and run again, each unit in its own savepoint. A unit must
    therefore be repeatable: a function of the connection only, as every unit is, since its
    caller hears only after the commit."""
    if len(works) > 1:
        conn.execute(f"SAVEPOINT {savepoint}_all")
        try:
            outcomes = run_without_savepoints(conn, works, nested=True)
            if outcomes is None:
                conn.execute(f"ROLLBACK TO {savepoint}_all")
                outcomes = _run_each(conn, works, savepoint)
            return outcomes
        finally:
            if conn.in_transaction:  # else SQLite rolled back everything, savepoints too
                conn.execute(f"RELEASE {savepoint}_all")
    return _run_each(conn, works, savepoint)


def run_without_savepoints(
    conn: sqlite3.Connection, works: list[Work], *, nested: bool = False
) -> list[tuple[bool, Any]] | None:
    """Run the units one after another; None as soon as one raises after changing rows (its
    changes cannot be undone alone: the caller rolls back and uses ``_run_each``).

    When SQLite rolled the whole transaction back itself (disk full), the units must run
    again in a new one (None), or the next ones would run outside any; ``nested`` (units
    within a unit) raises the unit's error instead, since only the outer transaction can
    begin again, and it must see the database's error, not a lost savepoint's."""
    outcomes: list[tuple[bool, Any]] = []
    for work in works:
        changes = conn.total_changes
        try:
            outcomes.append((True, work(conn)))
        except Exception as exc:
            if not conn.in_transaction:
                if nested:
                    raise
                return None
            if conn.total_changes != changes:
                return None
            outcomes.append((False, exc))
    return outcomes


def _run_each(conn: sqlite3.Connection, works: list[Work], savepoint: str) -> list[tuple[bool, Any]]:
    outcomes: list[tuple[bool, Any]] = []
    for work in works:
        conn.execute(f"SAVEPOINT {savepoint}")
        try:
            value = work(conn)
        except Exception as exc:  # this unit only
            if not conn.in_transaction:  # SQLite rolled back everything: nothing here holds
                raise
            conn.execute(f"ROLLBACK TO {savepoint}")
            conn.execute(f"RELEASE {savepoint}")
            outcomes.append((False, exc))
        else:
            conn.execute(f"RELEASE {savepoint}")
            outcomes.append((True, value))
    return outcomes


# SQLite's primary result codes that, raised by a unit's statement, blame the database and not
# the unit: the disk is full or failing, the file read-only, gone, corrupt, or locked by another
# process beyond the timeout. Any other error (a constraint, a value too big, a bug) is the
# unit's own. (SQLITE_LOCKED comes only from a unit's own misuse of its connection, and
# SQLITE_NOMEM arrives as MemoryError.) A failed BEGIN or COMMIT is the database's whatever
# its code.
_OUTAGE_CODES = frozenset({
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_PERM,
})


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a unit's statement, says the database cannot store anything now."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and (code & 0xFF) in _OUTAGE_CODES


def unavailable(exc: BaseException) -> StorageUnavailable:
    """``StorageUnavailable`` for an error of the database, with that error as its cause."""
    error = StorageUnavailable(f"the database cannot store now: {exc or type(exc).__name__}")
    error.__cause__ = exc
    return error


class SQLiteStore:
    """The database: ``write`` for units of work (group-committed), ``db`` for reads."""

    lock_wait_seconds = 10.0
    """How long a transaction waits for the write lock that another process holds (a CLI
    command, a second instance) before its callers hear ``StorageUnavailable``: within the
    time providers wait for a webhook's answer (Twilio: 15 s), so that they get the 503."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._queue: list[tuple[Work, asyncio.Future[Any], Callable[[Any], None] | None]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.db: aiosqlite.Connection | None = None
        self._in_flight = False
        # At most two long reports at once, each with a connection and a thread of its own.
        self._reports = asyncio.Semaphore(MAX_REPORTS)
        self.commits = 0
        self.units_committed = 0
        self.commit_seconds = 0.0
        self.outages = 0
        """Writes refused because the database could not store (``StorageUnavailable``)."""
        self.outage: str | None = None
        """Why the last transaction failed, until one that wrote rows commits."""
        self.committed_at = 0.0
        """When (``time.monotonic``) a transaction that wrote rows last committed."""

    async def open(self) -> None:
        """Open the writer (applying the migrations) and the reader; what was opened is closed
        again when a step fails, so that no thread of it keeps the process alive."""
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_wait = f"PRAGMA busy_timeout={int(self.lock_wait_seconds * 1000)}"  # once, not per transaction
        loop = asyncio.get_running_loop()
        self._writer = await loop.run_in_executor(self._executor, _connect, self.path)
        applied = await loop.run_in_executor(self._executor, apply_migrations, self._writer)
        if applied:  # which wrote to the file: it takes writes
            log.info("applied migrations %s to %s", applied, self.path)
        else:
            await loop.run_in_executor(self._executor, check_writable, self._writer)
        self.db = await aiosqlite.connect(self.path)
        self.db.row_factory = sqlite3.Row
        await self.db.execute("PRAGMA foreign_keys=ON")
        await self.db.execute("PRAGMA busy_timeout=30000")
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._write_loop(), name="sqlite-group-commit")

    async def close(self) -> None:
        if self._task is not None:
            # Let queued units and the transaction under way finish before closing, so that no
            # caller hears "failed" about a unit that was committed.
            while not self.settled:  # noqa: ASYNC110 - only at shutdown, briefly
                await asyncio.sleep(0.001)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
            for _, future, _ in self._queue:  # asked for between the last look and the cancel
                if not future.done():
                    future.set_exception(StorageUnavailable("the store closed before this write ran"))
            self._queue = []
        if self.db is not None:
            await self.db.close()
            self.db = None
        if self._writer is not None:
            writer = self._writer
            self._writer = None
            await asyncio.get_running_loop().run_in_executor(self._executor, writer.close)
        self._executor.shutdown(wait=True)

    @property
    def settled(self) -> bool:
        """No write is queued or under way: a read now sees every write asked for so far."""
        return not self._queue and not self._in_flight

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in the next group transaction and return its result once committed.

        An exception raised by ``work`` rolls back that unit only and is raised here. When the
        database itself fails (BEGIN or COMMIT fails, or a statement with ``is_outage``),
        ``StorageUnavailable`` is raised instead, with SQLite's error as its cause: nothing of
        the unit was stored.
        """
        return await self.submit(work)

    def submit(
        self, work: Callable[[sqlite3.Connection], T], *, abandoned: Callable[[T], None] | None = None
    ) -> asyncio.Future[T]:
        """Queue ``work`` for the next group transaction; the future is ``write``'s answer. Once
        queued, the unit runs whether or not anyone still awaits it: when its caller was
        cancelled meanwhile (a client that hung up), which cancels the future, ``abandoned`` is
        called with the unit's result once it is committed, so that what follows the commit
        follows it all the same. (Not ``asyncio.shield``: its extra future cost every caller a
        turn of the loop before it could answer, 15 % of the webhooks a second at c=50.)"""
        if self._wakeup is None:
            raise RuntimeError("store is not open")
        if self._task is None:  # closed: no writer would ever run it, and the caller waited for ever
            raise StorageUnavailable("the store is closed (the service is shutting down)")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((work, future, abandoned))
        self._wakeup.set()
        return future

    async def _write_loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._queue:
                continue
            if len(self._queue) > MAX_BATCH:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                self._wakeup.set()  # the rest goes into the next transaction
            else:
                batch, self._queue = self._queue, []
            self._in_flight = True
            started = time.perf_counter()
            changes = self._writer.total_changes if self._writer is not None else 0
            try:
                outcomes = await self._commit_batch(loop, [w for w, _, _ in batch])
            except BaseException as exc:  # the commit itself failed: nobody's unit is durable
                if is_outage(exc):  # a unit's statement failed so that SQLite ended the transaction
                    exc = unavailable(exc)
                if isinstance(exc, StorageUnavailable):
                    self.outage = str(exc)
                    self.outages += len(batch)
                    log.error("group commit failed: %s", exc)
                else:
                    log.exception("group commit failed")
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError("commit failed"))
                self._in_flight = False
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            self.commits += 1
            self.units_committed += len(batch)
            self.commit_seconds += time.perf_counter() - started
            if self._writer is not None and self._writer.total_changes != changes:
                # Rows written and committed: the database stores. (A transaction that wrote
                # nothing, such as a claim with nothing due, commits even on a full disk.)
                self.outage = None
                self.committed_at = time.monotonic()
            for (_, fut, abandoned), (ok, value) in zip(batch, outcomes, strict=True):
                if fut.done():
                    if ok and abandoned is not None and fut.cancelled():
                        try:
                            abandoned(value)
                        except Exception:  # the commit stands; the next units get their answers
                            log.exception("a committed unit's follow-up failed")
                    continue
                if ok:
                    fut.set_result(value)
                elif is_outage(value):
                    self.outages += 1
                    fut.set_exception(unavailable(value))
                else:
                    fut.set_exception(value)
            self._in_flight = False
            # Let the callers answer (their handlers write the responses) before the units of
            # the next transaction take the loop: otherwise every answer waited for them too.
            await asyncio.sleep(0)

    async def _commit_batch(self, loop: asyncio.AbstractEventLoop, works: list[Work]) -> list[tuple[bool, Any]]:
        """COMMIT (which waits for an fsync) runs in the writer thread; the units themselves run
        right here on the event loop. They are short, CPU-bound Python and SQLite calls: running
        them in a second thread only made the two threads fight over the GIL (measured: several
        times slower under load)."""
        conn = self._writer
        assert conn is not None
        await self._begin(loop, conn)
        try:
            # The usual case: no unit raises after changing rows, and none needs a savepoint of
            # its own (see ``run_units``; here even the one around them all is saved).
            outcomes = run_without_savepoints(conn, works)
            if outcomes is None:
                if conn.in_transaction:  # SQLite itself rolls back on some errors (disk full)
                    conn.execute("ROLLBACK")
                await self._begin(loop, conn)
                outcomes = _run_each(conn, works, "unit")
            try:
                await loop.run_in_executor(self._executor, conn.execute, "COMMIT")
            except Exception as exc:  # never a unit's fault
                raise unavailable(exc)  # noqa: B904 - its cause is set
        except BaseException:
            if conn.in_transaction:
                await asyncio.shield(loop.run_in_executor(self._executor, conn.execute, "ROLLBACK"))
            raise
        return outcomes

    async def _begin(self, loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE right here when the write lock is free (the usual case: this process
        is the only writer), else wait for the lock in the writer thread.

        A hop to the writer thread costs far more than the statement: its result comes back
        through a busy event loop, and the thread first has to win the GIL from it (measured
        under load at c=50: BEGIN 5 to 8 ms per batch in the thread, about 60 us here)."""
        try:
            if begin_if_free(conn, self._lock_wait):
                return
            await loop.run_in_executor(self._executor, conn.execute, "BEGIN IMMEDIATE")
        except Exception as exc:  # never a unit's fault
            raise unavailable(exc)  # noqa: B904 - its cause is set

    async def probe(self) -> None:
        """A write that touches the file (the header's user version, rewritten as it is) in the
        next transaction: raises ``StorageUnavailable`` when the database cannot store, such as
        read-only or full, which a read does not notice. For ``/healthz``."""
        await self.write(rewrite_header)

    async def fetchall(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run a read query on the reader connection."""
        assert self.db is not None
        return list(await self.db.execute_fetchall(sql, params))

    async def fetchall_apart(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run a long read (a report over every conversation) on a connection of its own, so
        that the inbox's other reads, the status pages and /healthz do not queue behind it on
        the shared reader. WAL lets it read alongside the writer and the reader."""
        async with self._reports, aiosqlite.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True) as db:
            db.row_factory = sqlite3.Row
            await db.execute("PRAGMA busy_timeout=30000")
            return list(await db.execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None
