"""The provider is down (503, then timeouts) and comes back: every queued acknowledgement and
reply is delivered, none twice, and meanwhile the inbox shows what is pending."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from .helpers import ADMIN_TOKEN, FakeGraph, ServiceProcess, post_webhook, wa_number, wait_until, whatsapp_body

SENDERS = 5


async def test_outage_then_recovery_delivers_everything_once(tmp_path: Path) -> None:
    graph = FakeGraph()
    graph.mode = "503"
    await graph.start()
    service = ServiceProcess(tmp_path, graph.url)
    await service.start()
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        async with aiohttp.ClientSession() as session:

            async def api(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
                async with session.request(method, f"{service.url}{path}", headers=auth, **kwargs) as resp:
                    return resp.status, await resp.json()

            statuses = await asyncio.gather(*(
                post_webhook(session, service.url, whatsapp_body(f"wamid.outage.{i}", wa_number(500 + i)))
                for i in range(SENDERS)
            ))
            assert statuses == [200] * SENDERS, "ingest does not depend on the provider"
            assert await wait_until(lambda: len(graph.requests) >= SENDERS, timeout=15)

            status, listing = await api("GET", "/api/v1/conversations?channel=whatsapp")
            assert status == 200 and len(listing["items"]) == SENDERS
            conversation_id = listing["items"][0]["id"]
            status, _ = await api("POST", f"/api/v1/conversations/{conversation_id}/replies",
                                  json={"text": "Die Baustelle ist Ende der Woche geräumt."})
            assert status == 201

            async def all_failed_once() -> bool:
                views = [(await api("GET", f"/api/v1/conversations/{item['id']}"))[1] for item in listing["items"]]
                return all(
                    v["pending_deliveries"] >= 1
                    and any(d["state"] in ("pending", "sending") and (d["last_error"] or d["state"] == "sending")
                            for m in v["messages"] for d in m.get("deliveries", []))
                    for v in views
                )

            assert await wait_until(all_failed_once, timeout=15), "the inbox shows the pending deliveries"
            _, view = await api("GET", f"/api/v1/conversations/{conversation_id}")
            assert view["pending_deliveries"] == 2, "the acknowledgement and the reply wait"

            graph.mode = "timeout"
            await asyncio.sleep(2.5)
            graph.mode = "ok"

            def outbox() -> list[Any]:
                return service.rows("SELECT idempotency_key, state FROM outbox")

            assert await wait_until(lambda: all(r["state"] == "sent" for r in outbox()), timeout=60), outbox()
            keys = [r["idempotency_key"] for r in outbox()]
            assert len(keys) == SENDERS + 1
            delivered = Counter(graph.delivered_keys())
            assert set(delivered) == set(keys), "everything queued reached the provider"
            assert max(delivered.values()) == 1, f"sent twice: {[k for k, n in delivered.items() if n > 1]}"
            assert any(r["mode"] == "timeout" for r in graph.requests) or any(r["mode"] == "503" for r in graph.requests)
            for item in listing["items"]:
                _, view = await api("GET", f"/api/v1/conversations/{item['id']}")
                assert view["pending_deliveries"] == 0
                outbound = [m for m in view["messages"] if m["direction"] == "out"]
                assert outbound and all(m["delivery_status"] == "sent" for m in outbound)
    finally:
        service.stop()
        await graph.stop()
