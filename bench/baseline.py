"""The baseline the product is measured against: a bare aiohttp handler that checks the
webhook signature, parses the same JSON body (no schema validation), and durably commits three
rows per request (contact upsert, message, outbox row) to SQLite through aiosqlite, WAL and
synchronous=FULL, with group commit across concurrent requests; 200 only after the commit.

Run: ``python bench/baseline.py --port 9002 --db /tmp/x/baseline.sqlite3``. It uses uvloop when
installed, as ``contact-router serve`` does, so both run on the same event loop kind.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
from aiohttp import web

SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (id INTEGER PRIMARY KEY, wa_id TEXT NOT NULL UNIQUE, name TEXT, last_seen TEXT);
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, wa_message_id TEXT NOT NULL UNIQUE, wa_id TEXT NOT NULL,
    text TEXT, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, wa_message_id TEXT NOT NULL, to_address TEXT NOT NULL,
    text TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending');
"""

DB = web.AppKey("db", aiosqlite.Connection)
WRITER = web.AppKey("writer", object)
SECRET = web.AppKey("secret", str)

Row = tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]]


class GroupWriter:
    """One writer task: whatever is queued when it wakes goes into one transaction."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.queue: list[tuple[Row, asyncio.Future[None]]] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def write(self, row: Row) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append((row, future))
        self.wakeup.set()
        await future

    async def run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            if not self.queue:
                continue
            batch, self.queue = self.queue, []
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                await self.db.executemany(
                    "INSERT INTO contacts (wa_id, name, last_seen) VALUES (?, ?, ?)"
                    " ON CONFLICT (wa_id) DO UPDATE SET name = excluded.name, last_seen = excluded.last_seen",
                    [r[0] for r, _ in batch],
                )
                await self.db.executemany(
                    "INSERT OR IGNORE INTO messages (wa_message_id, wa_id, text, created_at) VALUES (?, ?, ?, ?)",
                    [r[1] for r, _ in batch],
                )
                await self.db.executemany(
                    "INSERT INTO outbox (wa_message_id, to_address, text) VALUES (?, ?, ?)", [r[2] for r, _ in batch]
                )
                await self.db.commit()
            except Exception as exc:  # the commit failed: nobody's rows are durable
                if self.db.in_transaction:
                    await self.db.rollback()
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)


async def webhook(request: web.Request) -> web.Response:
    body = await request.read()
    expected = "sha256=" + hmac.new(request.app[SECRET].encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, request.headers.get("X-Hub-Signature-256", "")):
        return web.json_response({"error": {"code": "invalid_signature", "message": "bad signature"}}, status=401)
    try:
        data = json.loads(body)
        value = data["entry"][0]["changes"][0]["value"]
        message = value["messages"][0]
        name = value["contacts"][0]["profile"]["name"]
        wa_id, message_id, text = message["from"], message["id"], message["text"]["body"]
    except (ValueError, KeyError, IndexError, TypeError):
        return web.json_response({"error": {"code": "bad_request", "message": "unexpected body"}}, status=400)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    writer: GroupWriter = request.app[WRITER]  # type: ignore[assignment]
    await writer.write(((wa_id, name, now), (message_id, wa_id, text, now), (message_id, wa_id, "Danke")))
    return web.json_response({"messages": 1, "statuses": 0})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def make_app(db_path: Path, secret: str) -> web.Application:
    app = web.Application()
    app[SECRET] = secret

    async def db_ctx(app: web.Application) -> AsyncIterator[None]:
        db = await aiosqlite.connect(db_path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.executescript(SCHEMA)
        writer = GroupWriter(db)
        writer.task = asyncio.create_task(writer.run())
        app[DB] = db
        app[WRITER] = writer
        yield
        writer.task.cancel()
        await db.close()

    app.cleanup_ctx.append(db_ctx)
    app.router.add_post("/channels/whatsapp/webhook", webhook)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--secret", default="bench-app-secret")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(args.db, args.secret), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
