"""Time the inbox queries on a seeded database and show their query plans.

    python bench/queries.py --db /tmp/seed/contact-router.sqlite3 --repeat 20

Runs the real ``router/inbox/queries.py`` functions (inbox list with each filter, the next page,
one conversation's view, the statistics of a period) and the escalation scheduler's overdue scan
(the same SQL as ``router.tracking.escalate_due``), prints the median and worst time of each and the
``EXPLAIN QUERY PLAN`` of every statement they ran. Read-only apart from migrations and, once,
the search index (see ``fill_search_index``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from router.clock import Clock
from router.inbox.queries import conversation_detail, list_conversations, outbox_backlog, overdue_by_unit, stats
from router.search import search_text
from router.store.sqlite import SQLiteStore, apply_migrations, iso
from router.tracking import OVERDUE_SCAN

ALL_UNITS = ("bauhotline", "kundenservice", "stoerung", "tiefbau-muster", "vertrieb")


class RecordingStore(SQLiteStore):
    """Remembers every read statement, to explain it afterwards."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.statements: list[tuple[str, Any]] = []

    async def fetchall(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        self.statements.append((sql, params))
        return await super().fetchall(sql, params)

    async def fetchall_apart(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        self.statements.append((sql, params))
        return await super().fetchall_apart(sql, params)


def fill_search_index(db: Path) -> int:
    """Index the inbound messages for free-text search if the index is empty; returns how many.

    ``bench/seed.py`` inserts its messages after the migrations ran, so migration 4's backfill
    found none and a freshly seeded file has an empty ``message_search``: every q case would
    then time a search that matches nothing. This runs the same statement as that backfill."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        apply_migrations(conn)  # an older file gets the index (and its backfill) here
        conn.create_function("cr_search_text", 3, search_text, deterministic=True)
        if conn.execute("SELECT rowid FROM message_search LIMIT 1").fetchone() is not None:
            return 0
        conn.execute("BEGIN IMMEDIATE")
        cursor = conn.execute(
            "INSERT INTO message_search (rowid, body)"
            " SELECT m.id, cr_search_text(m.subject, m.text, k.display_name)"
            " FROM messages m LEFT JOIN contacts k ON k.id = m.contact_id WHERE m.direction = 'in'"
        )
        conn.execute("COMMIT")
        return cursor.rowcount
    finally:
        conn.close()


async def run(db: Path, repeat: int, target_ms: float) -> dict[str, Any]:
    store = RecordingStore(db)
    await store.open()
    core = SimpleNamespace(store=store, clock=Clock(), status_url=lambda token: f"/status/{token}",
                           config=SimpleNamespace(units=dict.fromkeys(ALL_UNITS)))
    now = core.clock.now()
    newest = (await store.fetchone("SELECT MAX(id) FROM conversations"))[0]
    middle = newest // 2
    contact = (await store.fetchone("SELECT contact_id FROM conversations WHERE id = ?", (middle,)))[0]
    reference = (await store.fetchone("SELECT case_reference FROM conversations WHERE id = ?", (middle,)))[0]
    cases: list[tuple[str, Any]] = [
        ("list, all units", lambda: list_conversations(core, units=ALL_UNITS)),
        ("list, contractor unit", lambda: list_conversations(core, units=("tiefbau-muster",))),
        ("list, hotline units + state=open", lambda: list_conversations(core, units=("bauhotline", "kundenservice"), state="open")),
        ("list, hotline units (its two and its contractor)",
         lambda: list_conversations(core, units=("bauhotline", "kundenservice", "tiefbau-muster"))),
        ("list, hotline units + state=closed",
         lambda: list_conversations(core, units=("bauhotline", "kundenservice", "tiefbau-muster"), state="closed")),
        ("list, channel=email", lambda: list_conversations(core, units=ALL_UNITS, channel="email")),
        ("list, overdue=true", lambda: list_conversations(core, units=ALL_UNITS, overdue=True)),
        ("list, overdue=true, one unit", lambda: list_conversations(core, units=("stoerung",), overdue=True)),
        ("list, q=case reference", lambda: list_conversations(core, units=ALL_UNITS, q=reference)),
        ("list, contact", lambda: list_conversations(core, units=ALL_UNITS, contact_id=contact)),
        ("list, contact + one unit", lambda: list_conversations(core, units=("kundenservice",), contact_id=contact)),
        ("list, contact + state=closed", lambda: list_conversations(core, units=ALL_UNITS, state="closed", contact_id=contact)),
        ("list, overdue=true, contractor unit", lambda: list_conversations(core, units=("tiefbau-muster",), overdue=True)),
        ("list, state=acknowledged + channel=email, contractor unit",
         lambda: list_conversations(core, units=("tiefbau-muster",), state="acknowledged", channel="email")),
        ("list, state=closed, contractor unit", lambda: list_conversations(core, units=("tiefbau-muster",), state="closed")),
        # Flags: one in twenty of the workload is a call-back to make, one in fifty of the
        # history has no number; nothing is undeliverable, so that list finds its index empty.
        ("list, flag=callback_required", lambda: list_conversations(core, units=ALL_UNITS, flag="callback_required")),
        ("list, flag=callback_required, contractor unit",
         lambda: list_conversations(core, units=("tiefbau-muster",), flag="callback_required")),
        ("list, flag=no_number + state=closed, hotline units",
         lambda: list_conversations(core, units=("bauhotline", "kundenservice", "tiefbau-muster"), state="closed",
                                    flag="no_number")),
        ("list, flag=undeliverable (none)", lambda: list_conversations(core, units=ALL_UNITS, flag="undeliverable")),
        ("list, flag=callback_required + q=every-message word",
         lambda: list_conversations(core, units=ALL_UNITS, flag="callback_required", q="Gehweg")),
        ("list, page in the middle", lambda: list_conversations(core, units=ALL_UNITS, before_id=middle)),
        ("conversation view", lambda: conversation_detail(core, middle)),
        ("overdue scan (scheduler)", lambda: store.fetchall(OVERDUE_SCAN, (iso(core.clock.now()), 200))),
        ("list, q=rare words (full-text index)", lambda: list_conversations(core, units=ALL_UNITS, q="Anliegen 4242")),
        ("list, q=a word in every message", lambda: list_conversations(core, units=ALL_UNITS, q="Gehweg")),
        # The seeded sender names are "Person <n>" and words match as prefixes, so a number picks
        # a known share of the conversations, clustered by id: "424242" one, "4242" 111 (the
        # newest 424299), "42" 11,111 (1 %, the newest 429999). A word of one character matches
        # whole words only: "4" finds "Person 4" alone (as a prefix it found 111,111, 11 %).
        ("list, q=words of one conversation", lambda: list_conversations(core, units=ALL_UNITS, q="Person 424242")),
        ("list, q=a word in 111 conversations", lambda: list_conversations(core, units=ALL_UNITS, q="4242")),
        ("list, q=a word in 1 % of conversations", lambda: list_conversations(core, units=ALL_UNITS, q="42")),
        ("list, q=one character (a whole word)", lambda: list_conversations(core, units=ALL_UNITS, q="4")),
        ("list, q=1 % word, contractor unit", lambda: list_conversations(core, units=("tiefbau-muster",), q="42")),
        ("list, q=every-message word + a rare one", lambda: list_conversations(core, units=ALL_UNITS, q="Gehweg 4242")),
        ("list, q=every-message word, contractor unit", lambda: list_conversations(core, units=("tiefbau-muster",), q="Gehweg")),
        ("list, q=every-message word, hotline units + state=open",
         lambda: list_conversations(core, units=("bauhotline", "kundenservice"), state="open", q="Gehweg")),
        ("list, q=every-message word, overdue, one unit",
         lambda: list_conversations(core, units=("stoerung",), overdue=True, q="Gehweg")),
        ("list, q=every-message word, page in the middle",
         lambda: list_conversations(core, units=ALL_UNITS, q="Gehweg", before_id=middle)),
        ("list, q=every-message word, one contact",
         lambda: list_conversations(core, units=ALL_UNITS, q="Gehweg", contact_id=contact)),
        # Statistics read every conversation of a period (the seeded ones are spread over a year):
        # their cost follows the period, not the history. Without a period, several seconds.
        ("stats, all units, last day", lambda: stats(core, ALL_UNITS, now - timedelta(days=1), now)),
        ("stats, all units, last 7 days", lambda: stats(core, ALL_UNITS, now - timedelta(days=7), now)),
        ("stats, contractor unit, last 30 days", lambda: stats(core, ("tiefbau-muster",), now - timedelta(days=30), now)),
        # A scrape of /metrics: the outbox backlog and the overdue workload by unit.
        ("metrics, outbox rows not sent", lambda: outbox_backlog(core)),
        ("metrics, overdue conversations by unit", lambda: overdue_by_unit(core)),
    ]
    results: dict[str, Any] = {"conversations": newest, "queries": []}
    for name, call in cases:
        store.statements.clear()
        await call()
        statements = list(store.statements)
        timings = []
        for _ in range(repeat):
            started = time.perf_counter()
            await call()
            timings.append((time.perf_counter() - started) * 1000)
        plans = []
        for sql, params in statements:
            rows = await store.db.execute_fetchall(f"EXPLAIN QUERY PLAN {sql}", params)
            plans.append({"sql": " ".join(sql.split())[:160], "plan": [r[3] for r in rows]})
        median, worst = statistics.median(timings), max(timings)
        results["queries"].append({"name": name, "median_ms": round(median, 3), "max_ms": round(worst, 3),
                                   "under_target": worst <= target_ms, "plans": plans})
    await store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--target-ms", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.db.exists():
        parser.error(f"{args.db} does not exist: seed it with bench/seed.py first")
    started = time.perf_counter()
    indexed = fill_search_index(args.db)
    if indexed:
        print(f"indexed {indexed} inbound messages for free-text search in {time.perf_counter() - started:.0f} s")
    results = asyncio.run(run(args.db, max(1, min(args.repeat, 1000)), args.target_ms))
    print(f"{results['conversations']} conversations; target {args.target_ms} ms\n")
    for q in results["queries"]:
        mark = "ok " if q["under_target"] else "SLOW"
        print(f"{mark} {q['median_ms']:9.2f} ms median {q['max_ms']:9.2f} ms max  {q['name']}")
        for p in q["plans"]:
            print(f"        {p['sql'][:110]}")
            for step in p["plan"]:
                print(f"          -> {step}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
