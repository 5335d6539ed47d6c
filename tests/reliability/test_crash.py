"""Kill -9 in the middle of a webhook stream: what was answered 2xx survives, exactly once,
with its acknowledgement queued; the provider's retry of everything creates no duplicates."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from .helpers import FakeGraph, ServiceProcess, post_webhook, wa_number, whatsapp_body

MESSAGES = 1500
CONCURRENCY = 16


async def test_kill_9_mid_stream_loses_nothing_acknowledged(tmp_path: Path) -> None:
    graph = FakeGraph()
    await graph.start()
    service = ServiceProcess(tmp_path, graph.url)
    await service.start()
    bodies = {f"wamid.crash.{i}": whatsapp_body(f"wamid.crash.{i}", wa_number(i)) for i in range(MESSAGES)}
    answered: dict[str, int] = {}
    try:
        queue = list(bodies.items())

        async def sender(session: aiohttp.ClientSession) -> None:
            while queue:
                message_id, body = queue.pop(0)
                answered[message_id] = await post_webhook(session, service.url, body)

        async def killer() -> None:
            # Kill once a few hundred messages are in, while requests are in flight.
            for _ in range(300):
                if len(answered) >= 300:
                    break
                await asyncio.sleep(0.02)
            service.kill9()

        async with aiohttp.ClientSession() as session:
            await asyncio.wait_for(
                asyncio.gather(killer(), *(sender(session) for _ in range(CONCURRENCY))), timeout=120
            )
        acknowledged = {m for m, status in answered.items() if 200 <= status < 300}
        refused = [m for m, status in answered.items() if status and not 200 <= status < 300 and status != 0]
        assert not refused, f"statuses other than 2xx or a broken connection: {refused[:5]}"
        assert 0 < len(acknowledged) < MESSAGES, "the kill must land mid-stream"

        # After the crash, before restart: every 2xx message is in the file exactly once,
        # each in its own conversation with its acknowledgement queued.
        stored = {
            r["channel_message_id"]: r
            for r in service.rows(
                "SELECT m.channel_message_id, m.conversation_id, COUNT(*) OVER (PARTITION BY m.channel_message_id) AS n,"
                " (SELECT COUNT(*) FROM outbox o JOIN messages a ON a.id = o.message_id"
                "   WHERE o.conversation_id = m.conversation_id AND o.kind = 'ack') AS acks"
                " FROM messages m WHERE m.channel = 'whatsapp' AND m.direction = 'in'"
            )
        }
        missing = acknowledged - set(stored)
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:3]}"
        assert all(stored[m]["n"] == 1 for m in stored)
        assert all(stored[m]["acks"] == 1 for m in acknowledged), "every acknowledged message has one ack queued"

        # Restart and let the provider retry everything, the acknowledged ones included.
        await service.start()
        async with aiohttp.ClientSession() as session:
            statuses: list[int] = []
            items = list(bodies.values())
            for start in range(0, len(items), 50):
                statuses += await asyncio.gather(*(post_webhook(session, service.url, b) for b in items[start:start + 50]))
        assert set(statuses) == {200}, f"retries answered {sorted(set(statuses))}"
        counts = service.rows(
            "SELECT COUNT(*) AS messages, COUNT(DISTINCT channel_message_id) AS distinct_ids,"
            " COUNT(DISTINCT conversation_id) AS conversations FROM messages WHERE channel = 'whatsapp' AND direction = 'in'"
        )[0]
        assert counts["messages"] == counts["distinct_ids"] == MESSAGES
        assert counts["conversations"] == MESSAGES
        acks = service.rows("SELECT conversation_id, COUNT(*) AS n FROM outbox WHERE kind = 'ack' GROUP BY conversation_id")
        assert len(acks) == MESSAGES and all(r["n"] == 1 for r in acks), "one acknowledgement per conversation, no more"
    finally:
        service.stop()
        await graph.stop()
