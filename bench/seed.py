"""Seed a database with many conversations, fast, on the real schema.

    python bench/seed.py --conversations 1000000 --db /tmp/seed/contact-router.sqlite3

Creates one contact and WhatsApp identity per conversation, an inbound message and a queued or
sent acknowledgement per conversation, spread over the example units and channels. Shaped like a
service that has run for a while: the newest ``--workload`` conversations (1 % by default) are
open, acknowledged, waiting or answered (about a third of the open and acknowledged ones
overdue), everything older is answered or closed. Uses ``router.store.sqlite.apply_migrations`` and ``executemany`` in
chunks; the file is then usable by ``contact-router serve --data-dir`` and ``bench/queries.py``.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from router.store.sqlite import apply_migrations, iso

UNITS = ("kundenservice", "vertrieb", "bauhotline", "stoerung", "tiefbau-muster")
WORKLOAD_STATES = ("open",) * 1 + ("acknowledged",) * 3 + ("answered",) * 2 + ("waiting",) * 1
HISTORY_STATES = ("answered",) * 3 + ("closed",) * 7
CHANNELS = ("whatsapp",) * 5 + ("webform",) * 3 + ("email",) * 2
ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
CHUNK = 50_000


def case_reference(n: int) -> str:
    chars = []
    for _ in range(6):
        n, r = divmod(n, len(ALPHABET))
        chars.append(ALPHABET[r])
    return "K-" + "".join(chars)


def seed(path: Path, conversations: int, now: datetime, rng: random.Random, workload: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    apply_migrations(conn)
    start_id = (conn.execute("SELECT COALESCE(MAX(id), 0) FROM conversations").fetchone()[0] or 0) + 1
    workload_from = start_id + conversations - (conversations // 100 if workload is None else workload)
    for chunk_start in range(start_id, start_id + conversations, CHUNK):
        ids = range(chunk_start, min(chunk_start + CHUNK, start_id + conversations))
        contacts, identities, convs, messages, outbox = [], [], [], [], []
        for i in ids:
            # Over the last year, in the order of the ids as a running service creates them
            # (give or take ten minutes), so a period's conversations are neighbours in the file.
            age = (start_id + conversations - i) / conversations * 60 * 24 * 365
            created = now - timedelta(minutes=age + rng.randint(0, 10))
            stamp = iso(created)
            state = rng.choice(WORKLOAD_STATES if i >= workload_from else HISTORY_STATES)
            channel = rng.choice(CHANNELS)
            unit = rng.choice(UNITS)
            deadline = None
            escalate_at = None
            if state in ("open", "acknowledged"):
                # Most waiting conversations are inside their deadline; about one in three is late.
                due = now + timedelta(hours=rng.uniform(-24, 48))
                deadline = escalate_at = iso(due)
            # A call-back to make for one in twenty of the workload; a withheld number stays
            # flagged in the history (one in fifty).
            flags = "[]"
            if state in WORKLOAD_STATES and rng.random() < 0.05:
                flags = '["callback_required"]'
            elif state not in WORKLOAD_STATES and rng.random() < 0.02:
                flags = '["no_number"]'
            contacts.append((i, f"Person {i}", "de", rng.random() < 0.3, stamp, stamp))
            identities.append((i, i, "phone", f"+49151{i:08d}", stamp, channel, stamp))
            convs.append((i, case_reference(i * 7919 + 13), f"tok{i:012d}", i, channel, unit, state, "construction", "de",
                          f"Anliegen {i}", "construction-in-area", "seeded", deadline, escalate_at, stamp, stamp, stamp,
                          stamp if state in ("answered", "closed") else None, stamp if state == "closed" else None,
                          flags))
            sent = state != "open"
            messages.append((2 * i - 1, i, i, "in", "message", channel, f"seed.{i}", "Der Gehweg ist gesperrt.", None, stamp))
            messages.append((2 * i, i, i, "out", "ack", channel, None, "Vielen Dank, Ihre Fallnummer ...",
                             "delivered" if sent else "queued", stamp))
            outbox.append((i, 2 * i, i, channel, "ack", "phone", f"+49151{i:08d}", "sent" if sent else "pending",
                           1 if sent else 0, stamp, f"ack:{i}", stamp, stamp))
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO contacts (id, display_name, language, is_customer, created_at, updated_at)"
                         " VALUES (?, ?, ?, ?, ?, ?)", contacts)
        conn.executemany("INSERT INTO identities (id, contact_id, kind, address, last_inbound_at, last_inbound_channel,"
                         " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)", identities)
        conn.executemany(
            "INSERT INTO conversations (id, case_reference, status_token, contact_id, channel, unit, state, topic, language,"
            " subject, routing_rule, routing_reason, deadline, escalate_at, created_at, updated_at, last_inbound_at,"
            " first_answered_at, closed_at, flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", convs)
        conn.executemany("INSERT INTO messages (id, conversation_id, contact_id, direction, kind, channel,"
                         " channel_message_id, text, delivery_status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         messages)
        conn.executemany(
            "INSERT INTO outbox (id, message_id, conversation_id, channel, kind, to_kind, to_address, state, attempts,"
            " next_attempt_at, idempotency_key, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            outbox)
        conn.execute("COMMIT")
        print(f"  {ids[-1] - start_id + 1} conversations", flush=True)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--db", type=Path, required=True, help="SQLite file (created; the schema is the real one)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workload", type=int, help="newest conversations still in work (default: 1 %%)")
    args = parser.parse_args()
    if not 0 < args.conversations <= 5_000_000:
        parser.error("--conversations must be between 1 and 5,000,000")
    started = time.perf_counter()
    seed(args.db, args.conversations, datetime.now(UTC), random.Random(args.seed), args.workload)
    size = args.db.stat().st_size / 1e6
    print(f"seeded {args.conversations} conversations in {time.perf_counter() - started:.1f} s ({size:.0f} MB)")


if __name__ == "__main__":
    main()
