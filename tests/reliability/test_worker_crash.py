"""The outbox worker dies in the middle of a send: after the restart every message is sent at
least once, nothing is marked sent or delivered that was not, and every attempt carries the same
idempotency key (``biz_opaque_callback_data`` on WhatsApp)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from router.outbox import OutboxPolicy
from router.testing import CoreHarness

from .helpers import (
    APP_SECRET,
    PHONE_NUMBER_ID,
    FakeGraph,
    sign,
    wa_number,
    wait_until,
    whatsapp_body,
    whatsapp_status_body,
)

POLICY = OutboxPolicy(base_delay=0.01, max_delay=0.05, poll_seconds=0.05, send_timeout=5, lease_seconds=120)


def harness(data_dir: Path, graph: FakeGraph) -> CoreHarness:
    env = {"WHATSAPP_APP_SECRET": APP_SECRET, "WHATSAPP_VERIFY_TOKEN": "verify", "WHATSAPP_ACCESS_TOKEN": "access",
           "WHATSAPP_PHONE_NUMBER_ID": PHONE_NUMBER_ID, "WHATSAPP_GRAPH_URL": graph.url}
    return CoreHarness(data_dir, entrypoints=("webform", "whatsapp"), env=env, outbox_policy=POLICY)


async def post_signed(h: CoreHarness, body: bytes) -> None:
    response = await h.client.post("/channels/whatsapp/webhook", data=body,
                                    headers={"X-Hub-Signature-256": sign(body), "Content-Type": "application/json"})
    assert response.status == 200


async def kill_worker_mid_send(h: CoreHarness, graph: FakeGraph, prefix: str, first_number: int, count: int) -> None:
    """``count`` messages from new senders, then the worker dies with their acknowledgements
    in flight (the provider holds them)."""
    for i in range(count):
        await post_signed(h, whatsapp_body(f"wamid.{prefix}.{i}", wa_number(first_number + i)))
    assert h.core.outbox is not None
    worker = asyncio.create_task(h.core.outbox.run_once())
    assert await wait_until(lambda: len(graph.requests) == count, timeout=10)
    worker.cancel()
    await asyncio.gather(worker, return_exceptions=True)


async def test_worker_dies_mid_send(tmp_path: Path) -> None:
    graph = FakeGraph()
    await graph.start()
    try:
        graph.mode = "hang"
        async with harness(tmp_path / "data", graph) as h:
            await kill_worker_mid_send(h, graph, "worker", 700, 3)
            rows = await h.rows("SELECT o.state, o.provider_id, o.delivery_status, m.delivery_status AS message_status"
                                " FROM outbox o JOIN messages m ON m.id = o.message_id")
            assert len(rows) == 3
            for row in rows:
                assert row["state"] == "sending" and row["provider_id"] is None
                assert row["delivery_status"] in (None, "queued") and row["message_status"] in (None, "queued")
            keys_before = {r["idempotency_key"] for r in await h.rows("SELECT idempotency_key FROM outbox")}

        graph.mode = "ok"
        async with harness(tmp_path / "data", graph) as h:  # the restart, on the same file
            assert await h.run_outbox() == 0, "a fresh lease is respected: no second sender at once"
            h.clock.advance(timedelta(seconds=POLICY.lease_seconds + 1))
            assert await h.run_outbox() == 3
            rows = await h.rows("SELECT idempotency_key, state, provider_id, attempts FROM outbox")
            assert all(r["state"] == "sent" and r["provider_id"] and r["attempts"] == 2 for r in rows)
        attempts_by_key: dict[str, int] = {}
        for request in graph.requests:
            attempts_by_key[request["key"]] = attempts_by_key.get(request["key"], 0) + 1
        assert set(attempts_by_key) == keys_before, "retries reuse the idempotency key"
        assert all(n == 2 for n in attempts_by_key.values())
        assert sorted(graph.delivered_keys()) == sorted(keys_before), "each sent at least once, accepted once"
    finally:
        await graph.stop()


async def test_a_send_the_provider_took_before_the_worker_died_is_not_sent_again(tmp_path: Path) -> None:
    """WhatsApp echoes the idempotency key in its statuses: a status that arrives while the row
    is held by a dead worker shows the send went through, and the restart records it instead of
    sending it again. The row without such a status is sent again, with its key."""
    graph = FakeGraph()
    await graph.start()
    try:
        graph.mode = "hang"
        async with harness(tmp_path / "data", graph) as h:
            await kill_worker_mid_send(h, graph, "took", 800, 2)
            took = graph.requests[0]
            await post_signed(h, whatsapp_status_body("wamid.TOOK", "delivered", took["payload"]["to"], took["key"]))

        graph.mode = "ok"
        async with harness(tmp_path / "data", graph) as h:
            h.clock.advance(timedelta(seconds=POLICY.lease_seconds + 1))
            assert await h.run_outbox() == 2
            rows = {r["idempotency_key"]: r for r in await h.rows("SELECT idempotency_key, state, provider_id, delivery_status FROM outbox")}
            assert rows[took["key"]] == {"idempotency_key": took["key"], "state": "sent", "provider_id": "wamid.TOOK",
                                         "delivery_status": "delivered"}
            other = next(r for key, r in rows.items() if key != took["key"])
            assert other["state"] == "sent" and other["provider_id"] != "wamid.TOOK"
        assert [r["key"] for r in graph.requests].count(took["key"]) == 1, "not sent twice"
        assert len(graph.requests) == 3
    finally:
        await graph.stop()
