"""The shared inbox API: scopes, filters, pagination, actions, errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import pytest

from router.hookspecs import Capabilities, Channel, OutboundMessage, RetryableDeliveryError, SendResult, hookimpl
from router.inbox import api
from router.outbox import OutboxPolicy
from router.store.sqlite import _connect, apply_migrations, iso
from router.testing import CoreHarness

from ..reliability.helpers import wait_until
from .helpers import vm_steps, webform_message


async def _case(harness, **kwargs):
    result = await harness.core.ingest(webform_message(**kwargs))
    return result.conversation_id


async def test_scopes_contractor_hotline_sales_and_bad_tokens(harness):
    contractor_case = await _case(harness)
    sales_case = await _case(harness, text="Frage zu meinem Tarif", topic="contract", postcode="99999")
    status, listing = await harness.api("GET", "/api/v1/conversations", token="contractor")
    assert status == 200 and [i["id"] for i in listing["items"]] == [contractor_case]
    status, _ = await harness.api("GET", f"/api/v1/conversations/{sales_case}", token="contractor")
    assert status == 404
    status, body = await harness.api("POST", f"/api/v1/conversations/{sales_case}/replies", token="contractor", json={"text": "x"})
    assert status == 404 and body["error"]["code"] == "not_found"
    # the hotline oversees its contractor
    status, detail = await harness.api("GET", f"/api/v1/conversations/{contractor_case}", token="hotline")
    assert status == 200 and detail["unit"] == "tiefbau-muster"
    status, listing = await harness.api("GET", "/api/v1/conversations", token="hotline")
    assert contractor_case in [i["id"] for i in listing["items"]] and sales_case not in [i["id"] for i in listing["items"]]
    # a token of an unrelated unit (sales) gets 404
    status, body = await harness.api("GET", "/api/v1/conversations", token=None)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = await harness.api("GET", "/api/v1/conversations", token="wrong-token-value")
    assert status == 401
    status, body = await harness.api("GET", f"/api/v1/conversations/{contractor_case}", token="admin")
    assert status == 200



async def test_the_unit_filter_narrows_a_members_units_and_never_widens_them(harness):
    """``?unit=`` picks one of the caller's units; naming another unit listed that unit's
    conversations to a contractor, the subjects and names of residents it has no business with."""
    contractor_case = await _case(harness)
    sales_case = await _case(harness, text="Frage zu meinem Tarif", topic="contract", postcode="99999")
    status, listing = await harness.api("GET", "/api/v1/conversations?unit=vertrieb", token="contractor")
    assert status == 200 and listing["items"] == []
    status, listing = await harness.api("GET", "/api/v1/conversations?unit=tiefbau-muster", token="contractor")
    assert [i["id"] for i in listing["items"]] == [contractor_case]
    status, listing = await harness.api("GET", "/api/v1/conversations?unit=vertrieb", token="admin")
    assert [i["id"] for i in listing["items"]] == [sales_case]

async def test_sales_token_does_not_see_contractor_case(tmp_path):
    from router.testing import CoreHarness, load_raw_config

    raw = load_raw_config()
    raw["staff"].append({"name": "sales", "token": "sales-token-123", "units": ["vertrieb"]})
    from router.testing import example_config

    async with CoreHarness(tmp_path / "d", config=example_config(raw)) as harness:
        case = await _case(harness)
        status, body = await harness.api("GET", f"/api/v1/conversations/{case}", token="sales-token-123")
        assert status == 404
        status, listing = await harness.api("GET", "/api/v1/conversations", token="sales-token-123")
        assert listing["items"] == []


async def test_filters_and_cursor_pagination(harness):
    ids = [await _case(harness, text=f"Baustelle Nummer {i}") for i in range(5)]
    status, page = await harness.api("GET", "/api/v1/conversations?limit=2")
    assert [i["id"] for i in page["items"]] == ids[::-1][:2] and page["next_cursor"]
    status, page2 = await harness.api("GET", f"/api/v1/conversations?limit=2&cursor={page['next_cursor']}")
    assert [i["id"] for i in page2["items"]] == ids[::-1][2:4]
    status, page3 = await harness.api("GET", f"/api/v1/conversations?limit=2&cursor={page2['next_cursor']}")
    assert [i["id"] for i in page3["items"]] == ids[:1] and page3["next_cursor"] is None
    status, by_unit = await harness.api("GET", "/api/v1/conversations?unit=tiefbau-muster&state=open&channel=webform")
    assert len(by_unit["items"]) == 5
    status, none = await harness.api("GET", "/api/v1/conversations?channel=whatsapp")
    assert none["items"] == []
    ref = by_unit["items"][0]["case_reference"]
    status, found = await harness.api("GET", f"/api/v1/conversations?q={ref.lower()}")
    assert [i["case_reference"] for i in found["items"]] == [ref]
    status, overdue = await harness.api("GET", "/api/v1/conversations?overdue=true")
    assert overdue["items"] == []
    harness.clock.advance(timedelta(days=3))
    status, overdue = await harness.api("GET", "/api/v1/conversations?overdue=true")
    assert len(overdue["items"]) == 5 and all(i["overdue"] for i in overdue["items"])


async def test_the_call_backs_to_make_are_listed_by_their_flag(harness):
    """A phone agent's work list: the conversations flagged for a call-back, and no longer once
    the person was reached."""
    await _case(harness, text="Baustelle ohne Rückruf")
    call_back = await _case(harness, text="Baustelle, bitte zurückrufen", flags=["callback_required"])
    unsupported = await _case(harness, text="Baustelle mit Aufkleber", flags=["unsupported"])

    async def listed(query: str) -> list[int]:
        status, page = await harness.api("GET", f"/api/v1/conversations?{query}")
        assert status == 200, page
        return [i["id"] for i in page["items"]]

    assert await listed("flag=callback_required") == [call_back]
    assert await listed("flag=unsupported") == [unsupported]
    assert await listed("flag=callback_required&q=Baustelle") == [call_back]  # with the free-text search
    assert await listed("flag=callback_required&unit=tiefbau-muster&state=open") == [call_back]
    assert await listed("flag=undeliverable") == []
    status, _ = await harness.api("POST", f"/api/v1/conversations/{call_back}/callbacks", json={"outcome": "reached"})
    assert status == 201
    assert await listed("flag=callback_required") == []


async def test_bad_parameters_and_bodies_are_400_with_field(harness):
    case = await _case(harness)
    import base64

    huge = base64.urlsafe_b64encode(b"c:" + b"9" * 30).decode().rstrip("=")
    for query, field in ((f"cursor={huge}", "cursor"), ("state=weird", "state"), ("overdue=yes", "overdue"), ("limit=0", "limit"), ("limit=abc", "limit"),
                         ("cursor=!!!", "cursor"), ("unit=nope", "unit"), ("flag=urgent", "flag")):
        status, body = await harness.api("GET", f"/api/v1/conversations?{query}")
        assert status == 400 and body["error"]["field"] == field, (query, body)
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/replies", data=b"{", headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/replies", json={"text": ""})
    assert status == 400 and body["error"]["field"] == "text"
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/replies", json=["text"])
    assert status == 400
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/transfer", json={"unit": "nope"})
    assert status == 400 and body["error"]["field"] == "unit"
    status, body = await harness.api("GET", "/api/v1/conversations/abc")
    assert status == 400
    status, body = await harness.api("GET", "/api/v1/conversations/999999")
    assert status == 404
    assert await harness.count("messages", "direction = 'out' AND kind = 'reply'") == 0


async def test_notes_assign_transfer_close_reopen(harness):
    case = await _case(harness)
    status, note = await harness.api("POST", f"/api/v1/conversations/{case}/notes", token="contractor", json={"text": "Kolonne informiert"})
    assert status == 201 and note["direction"] == "internal"
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/assign", token="contractor", json={"assignee": "Polier Schmidt"})
    assert status == 200 and detail["assignee"] == "Polier Schmidt"
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/transfer", token="hotline", json={"unit": "bauhotline", "reason": "Betrifft mehrere Baustellen"})
    assert status == 200 and detail["unit"] == "bauhotline" and detail["routing"] == {"rule": "transfer", "reason": "Betrifft mehrere Baustellen"}
    assert any(e["kind"] == "transferred" and e["data"]["from_unit"] == "tiefbau-muster" for e in detail["events"])
    notifications = await harness.rows("SELECT to_address FROM outbox WHERE kind = 'notification'")
    assert notifications == [{"to_address": "bau@example.org"}]
    # the contractor lost it
    status, _ = await harness.api("GET", f"/api/v1/conversations/{case}", token="contractor")
    assert status == 404
    # notes are not shown to the resident
    view = await harness.core.store.fetchone("SELECT status_token FROM conversations WHERE id = ?", (case,))
    page = await (await harness.client.get(f"/channels/webform/status/{view['status_token']}")).text()
    assert "Kolonne informiert" not in page
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/close")
    assert detail["state"] == "closed" and detail["deadline"] is None
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/close")
    assert status == 409
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/reopen")
    assert detail["state"] == "acknowledged" and detail["deadline"] is not None


async def test_message_to_closed_conversation_reopens_within_window_else_links(harness):
    case = await _case(harness)
    await harness.api("POST", f"/api/v1/conversations/{case}/close")
    row = await harness.core.store.fetchone("SELECT status_token, case_reference FROM conversations WHERE id = ?", (case,))
    again = await harness.core.ingest(webform_message("Noch eine Frage", thread={"status_token": row["status_token"]}))
    assert again.conversation_id == case and again.acknowledged
    status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
    assert detail["state"] in ("open", "acknowledged") and any(e["kind"] == "reopened" for e in detail["events"])
    await harness.api("POST", f"/api/v1/conversations/{case}/close")
    harness.clock.advance(timedelta(days=30))
    later = await harness.core.ingest(webform_message(f"Wieder da, Fall {row['case_reference']}"))
    assert later.conversation_id != case and later.opened
    status, detail = await harness.api("GET", f"/api/v1/conversations/{later.conversation_id}")
    assert detail["linked_to"] == case
    # the old conversation's own status token, too long after closing: a new one, opened now
    # (so that conversation_routed fires for it)
    via_token = await harness.core.ingest(webform_message("Und noch etwas", thread={"status_token": row["status_token"]}))
    assert via_token.conversation_id not in (case, later.conversation_id) and via_token.opened


async def test_contacts_get_and_merge_history_follows(harness):
    a = await harness.core.ingest(webform_message(email="a@example.net"))
    b = await harness.core.ingest(webform_message("Noch ein Anliegen", email="b@example.net"))
    status, ca = await harness.api("GET", f"/api/v1/conversations/{a.conversation_id}")
    status, cb = await harness.api("GET", f"/api/v1/conversations/{b.conversation_id}")
    assert ca["contact"]["id"] != cb["contact"]["id"]
    status, merged = await harness.api("POST", f"/api/v1/contacts/{ca['contact']['id']}/merge", json={"other_contact_id": cb["contact"]["id"]})
    assert status == 200
    assert {i["address"] for i in merged["identities"]} == {"a@example.net", "b@example.net"}
    status, cb = await harness.api("GET", f"/api/v1/conversations/{b.conversation_id}")
    assert cb["contact"]["id"] == ca["contact"]["id"]
    # a new message from b's address lands on the survivor
    c = await harness.core.ingest(webform_message("Drittes Anliegen", email="b@example.net"))
    status, cc = await harness.api("GET", f"/api/v1/conversations/{c.conversation_id}")
    assert cc["contact"]["id"] == ca["contact"]["id"]
    status, body = await harness.api("POST", f"/api/v1/contacts/{ca['contact']['id']}/merge", json={"other_contact_id": cb["contact"]["id"]})
    assert status in (404, 409)
    status, body = await harness.api("POST", f"/api/v1/contacts/{ca['contact']['id']}/merge", json={"other_contact_id": "x"})
    assert status == 400
    status, body = await harness.api("POST", f"/api/v1/contacts/{ca['contact']['id']}/merge", json={"other_contact_id": 2**70})
    assert status == 400 and body["error"]["field"] == "other_contact_id"


async def test_units_me_health_metrics(harness):
    status, units = await harness.api("GET", "/api/v1/units", token="contractor")
    assert [u["id"] for u in units["items"]] == ["tiefbau-muster"]
    status, me = await harness.api("GET", "/api/v1/me", token="hotline")
    assert me["units"] == ["bauhotline", "kundenservice", "tiefbau-muster"]
    await _case(harness)
    response = await harness.client.get("/healthz")
    assert response.status == 200 and (await response.json())["status"] == "ok"
    text = await (await harness.client.get("/metrics")).text()
    assert 'contact_router_messages_received_total{channel="webform",duplicate="false"} 1' in text
    assert "# TYPE contact_router_outbox_rows gauge" in text


async def test_metrics_count_each_units_overdue_conversations(harness):
    """What an operator alerts on is an answer that is late: /metrics counted messages and
    deliveries, and not the conversations past their deadline. Counters that only grow are
    typed as counters, so that ``rate()`` and ``increase()`` treat a restart as one."""
    contractor = await _case(harness)
    await _case(harness)
    sales = await _case(harness, text="Frage zu meinem Tarif", topic="contract", postcode="99999")
    closed = await _case(harness, text="Frage zu meinem Vertrag", topic="contract", postcode="99999")
    text = await (await harness.client.get("/metrics")).text()
    assert "# TYPE contact_router_conversations_overdue gauge" in text
    assert "contact_router_conversations_overdue{" not in text  # none is late yet
    for kind in ("group_commits", "group_commit_units", "storage_unavailable"):
        assert f"# TYPE contact_router_{kind} counter" in text
    status, _ = await harness.api("POST", f"/api/v1/conversations/{closed}/close", json={})
    assert status == 200
    harness.clock.advance(timedelta(days=30))
    text = await (await harness.client.get("/metrics")).text()
    lines = [line for line in text.splitlines() if line.startswith("contact_router_conversations_overdue")]
    assert lines == ['contact_router_conversations_overdue{unit="tiefbau-muster"} 2',
                     'contact_router_conversations_overdue{unit="vertrieb"} 1'], lines
    status, _ = await harness.api("POST", f"/api/v1/conversations/{contractor}/replies", json={"text": "Wir kümmern uns."})
    assert status == 201
    await harness.run_outbox()  # answered once the answer is delivered
    status, _ = await harness.api("POST", f"/api/v1/conversations/{sales}/wait", json={})
    assert status == 200
    text = await (await harness.client.get("/metrics")).text()
    lines = [line for line in text.splitlines() if line.startswith("contact_router_conversations_overdue")]
    assert lines == ['contact_router_conversations_overdue{unit="tiefbau-muster"} 1'], lines


async def test_health_fails_while_the_database_refuses_writes_and_metrics_count_the_refusals(harness):
    """A read-only or full database still answers reads: /healthz answered "ok" while every
    message was refused. It now writes, unless a transaction committed just now."""
    case = await _case(harness)
    commits = harness.core.store.commits
    response = await harness.client.get("/healthz")
    assert response.status == 200 and harness.core.store.commits == commits  # fresh: no write of its own
    harness.refuse_writes()
    try:
        status, body = await harness.api("POST", f"/api/v1/conversations/{case}/notes", json={"text": "Rückruf vereinbart"})
        assert status == 503 and body["error"]["code"] == "unavailable"
        response = await harness.client.get("/healthz")  # the failed write makes it look
        assert response.status == 503 and "readonly" in (await response.json())["detail"]
        # A transaction that writes no rows (an outbox claim with nothing due) commits even on a
        # full disk: it must not make /healthz trust the database again.
        harness.refuse_writes(False)
        await harness.core.store.write(lambda conn: None)
        harness.refuse_writes()
        response = await harness.client.get("/healthz")
        assert response.status == 503
    finally:
        harness.refuse_writes(False)
    response = await harness.client.get("/healthz")
    assert response.status == 200 and (await response.json())["status"] == "ok"
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case}/notes", json={"text": "Rückruf vereinbart"})
    assert status == 201 and harness.core.store.outage is None
    text = await (await harness.client.get("/metrics")).text()
    assert "contact_router_storage_unavailable 3" in text


async def test_health_shows_the_deliveries_due_and_how_long_the_oldest_has_waited(harness):
    """/healthz looked at the database and the workers' tasks only: acknowledgements that did
    not go out were not to be seen there."""
    response = await harness.client.get("/healthz")
    assert (await response.json())["outbox"] == {"due": 0, "oldest_due_seconds": None, "retrying": 0}
    await _case(harness)
    harness.clock.advance(timedelta(seconds=90))
    await _case(harness)
    harness.clock.advance(timedelta(seconds=30))
    response = await harness.client.get("/healthz")
    body = await response.json()
    # No worker runs here (the test drives the outbox): shown, and no reason to fail.
    assert response.status == 200 and body["status"] == "ok"
    assert body["outbox"] == {"due": 2, "oldest_due_seconds": 120.0, "retrying": 0}
    await harness.run_outbox()
    response = await harness.client.get("/healthz")
    assert (await response.json())["outbox"] == {"due": 0, "oldest_due_seconds": None, "retrying": 0}


class ChatPlugin:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    @hookimpl
    def register_channels(self):
        return [self.channel]


def _chat(key: str, number: int) -> dict:
    return {"channel": "healthchat", "channel_message_id": key, "text": "Baustelle vor dem Haus",
            "sender": {"kind": "phone", "address": f"+49151123{number:05d}"}}


class StuckChat(Channel):
    """A plugin whose send never ends, not even when the outbox's timeout cancels it (it
    swallows the cancellation, as a careless retry loop does): the worker's task runs on, but
    waits for that send and claims nothing more."""

    name = "healthchat"
    capabilities = Capabilities(identity_kinds=("phone",))

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def send(self, message: OutboundMessage) -> SendResult:
        self.calls += 1
        while not self.release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.release.wait()
        return SendResult(provider_id=f"stuck-{message.outbox_id}")


async def test_health_fails_when_the_outbox_is_stuck_with_deliveries_due(tmp_path, monkeypatch):
    """The outbox's task alive, but sending nothing: /healthz said ok while every
    acknowledgement stayed queued, and only a restart would have sent them."""
    monkeypatch.setattr(api, "OUTBOX_STALL_SECONDS", 0.5)
    plugin = ChatPlugin(StuckChat())
    policy = OutboxPolicy(poll_seconds=0.02, send_timeout=0.1)
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy, run_workers=True) as harness:
        try:
            await harness.core.ingest(_chat("stuck-1", 1))
            assert await wait_until(lambda: plugin.channel.calls == 1, 10, 0.01)
            await harness.core.ingest(_chat("stuck-2", 2))  # due, and never claimed
            response = await harness.client.get("/healthz")
            body = await response.json()
            assert response.status == 200 and body["outbox"]["due"] == 1  # due just now: no reason to fail yet
            harness.clock.advance(timedelta(seconds=1))

            async def unhealthy() -> bool:
                return (await harness.client.get("/healthz")).status == 503

            assert await wait_until(unhealthy, 10, 0.05)
            body = await (await harness.client.get("/healthz")).json()
            assert body["status"] == "error" and "outbox" in body["detail"] and "restart" in body["detail"], body
            assert body["outbox"]["due"] == 1 and body["outbox"]["oldest_due_seconds"] >= 1
        finally:
            plugin.channel.release.set()

        async def healthy() -> bool:
            return (await harness.client.get("/healthz")).status == 200

        assert await wait_until(lambda: plugin.channel.calls == 2, 10, 0.01)
        assert await wait_until(healthy, 10, 0.05)


class DownChat(Channel):
    """A provider that is down: every send fails after a moment."""

    name = "healthchat"
    capabilities = Capabilities(identity_kinds=("phone",))

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, message: OutboundMessage) -> SendResult:
        self.calls += 1
        await asyncio.sleep(0.01)
        raise RetryableDeliveryError("503 Service Unavailable")


async def test_health_shows_a_backlog_behind_a_provider_that_is_down_without_failing(tmp_path, monkeypatch):
    """A provider's outage is no reason to restart the service: a restart mends no provider,
    and an orchestrator would restart a healthy service in a loop. While the outbox keeps
    trying (each failure is an outcome), /healthz stays 200 and shows what waits, also when
    deliveries have been due for longer than a stuck outbox is allowed."""
    monkeypatch.setattr(api, "OUTBOX_STALL_SECONDS", 1.0)
    plugin = ChatPlugin(DownChat())
    policy = OutboxPolicy(poll_seconds=0.02, send_timeout=5, batch_size=1, concurrency=1, base_delay=40, max_delay=40,
                          retry_seconds=86400)
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy, run_workers=True) as harness:
        for i in range(5):
            await harness.core.ingest(_chat(f"down-{i}", i))
        assert await wait_until(lambda: plugin.channel.calls >= 1, 10, 0.01)
        seen = []
        until = time.monotonic() + 3 * api.OUTBOX_STALL_SECONDS
        while time.monotonic() < until:
            harness.clock.advance(timedelta(seconds=30))  # the retries fall due, and what is due waits longer
            response = await harness.client.get("/healthz")
            body = await response.json()
            assert response.status == 200, body
            seen.append(body["outbox"])
            await asyncio.sleep(0.05)
        assert max(o["oldest_due_seconds"] or 0 for o in seen) > api.OUTBOX_STALL_SECONDS
        assert max(o["retrying"] for o in seen) > 0
        assert await harness.count("outbox", "state = 'sent'") == 0


def _health_cost(tmp_path, sent: int, due: int, limit: int) -> tuple[int, tuple]:
    """SQLite VM steps of /healthz's look at the outbox, with ``sent`` rows sent and ``due``
    rows due, counting up to ``limit``; and what it read."""
    conn = _connect(tmp_path / f"health-{sent}-{due}.sqlite3")
    apply_migrations(conn)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO messages (id, direction, kind, channel, text, created_at) VALUES (1, 'out', 'ack', 'c', 't', 'x')")
    conn.executemany(
        "INSERT INTO outbox (message_id, channel, kind, to_kind, to_address, state, next_attempt_at, idempotency_key,"
        " created_at, updated_at) VALUES (1, 'c', 'ack', 'phone', '+491701234567', ?, ?, ?, 'x', 'x')",
        [("sent" if i < sent else "pending", f"2026-01-01T00:{i % 60:02d}:00.{i:06d}Z", f"k{i}") for i in range(sent + due)],
    )
    conn.execute("COMMIT")
    params = {"now": iso(datetime(2026, 1, 2, tzinfo=UTC)), "limit": limit}
    steps, row = vm_steps(conn, lambda: tuple(conn.execute(api.OUTBOX_HEALTH_SQL, params).fetchone()))
    conn.close()
    return steps, row


def test_health_reads_the_outbox_by_its_index_not_the_whole_table(tmp_path):
    """/healthz is asked every few seconds: a million rows sent, or a backlog of a million
    due, must not make each answer read them all."""
    few, row = _health_cost(tmp_path, 0, 10, 100)
    history, _ = _health_cost(tmp_path, 20_000, 10, 100)
    assert history < 2 * few, (few, history)
    at_limit, _ = _health_cost(tmp_path, 0, 100, 100)
    backlog, row = _health_cost(tmp_path, 0, 20_000, 100)
    assert backlog < 2 * at_limit, (at_limit, backlog)
    assert row[0] == 100  # counted up to the limit
    plan = " ".join(r[3] for r in sqlite3.connect(tmp_path / "health-0-10.sqlite3").execute(
        "EXPLAIN QUERY PLAN " + api.OUTBOX_HEALTH_SQL, {"now": "x", "limit": 1}))
    assert "SCAN outbox" not in plan and "outbox_due" in plan, plan


async def test_callback_reached_answers_the_conversation(harness):
    case = await _case(harness)
    token = (await harness.core.store.fetchone("SELECT status_token FROM conversations WHERE id = ?", (case,)))["status_token"]
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": "maybe"})
    assert status == 400 and body["error"]["field"] == "outcome"
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": "reached", "note": "INTERN: Rückruf erledigt"})
    assert status == 201 and body["answered"] is True
    page = await (await harness.client.get(f"/channels/webform/status/{token}")).text()
    assert "INTERN" not in page  # staff notes on call-backs are not for the resident
    status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
    assert detail["state"] == "answered" and detail["callbacks"][0]["outcome"] == "reached"


async def test_demo_tokens_are_refused_when_not_allowed(tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from router.app import create_app
    from router.config import load_config

    app = create_app(load_config(env={}), data_dir=tmp_path / "d", entrypoints=("webform",), run_workers=False,
                     allow_demo_tokens=False)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        response = await client.get("/api/v1/conversations", headers={"Authorization": "Bearer demo-admin"})
        assert response.status == 401


async def test_demo_tokens_are_refused_through_a_proxy(tmp_path):
    """Listening on loopback was the only condition: a reverse proxy on the same machine passed
    the README's demo-admin token from anywhere."""
    from aiohttp.test_utils import TestClient, TestServer

    from router.app import create_app
    from router.config import load_config

    app = create_app(load_config(env={}), data_dir=tmp_path / "d", entrypoints=("webform",), run_workers=False)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        demo = {"Authorization": "Bearer demo-admin"}
        response = await client.get("/api/v1/conversations", headers=demo)
        assert response.status == 200  # on this machine, as the README's tour uses it
        for proxied in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}, {"X-Real-IP": "203.0.113.9"}):
            response = await client.get("/api/v1/conversations", headers={**demo, **proxied})
            assert response.status == 401 and (await response.json())["error"]["code"] == "unauthorized"


async def test_the_residents_status_link_is_not_shown_to_an_external_unit(harness):
    """The link is the resident's key to the whole conversation: a contractor kept reading it
    (and writing as the resident) after the conversation was transferred away from them."""
    case = await _case(harness)
    status, seen = await harness.api("GET", f"/api/v1/conversations/{case}", token="hotline")
    assert status == 200 and seen["unit"] == "tiefbau-muster" and seen["status_url"].startswith("http")
    status, seen = await harness.api("GET", f"/api/v1/conversations/{case}", token="contractor")
    assert status == 200 and "status_url" not in seen
    status, seen = await harness.api("POST", f"/api/v1/conversations/{case}/assign", token="contractor",
                                     json={"assignee": "Kolonne 3"})
    assert status == 200 and "status_url" not in seen


async def test_the_residents_status_link_is_taken_out_of_the_texts_an_external_unit_reads(harness):
    """The acknowledgement carries the link in its text: the field alone was hidden."""
    case = await _case(harness)
    status, full = await harness.api("GET", f"/api/v1/conversations/{case}", token="hotline")
    url = full["status_url"]
    token = url.rsplit("/", 1)[-1]
    ack = next(m for m in full["messages"] if m["kind"] == "ack")
    assert url in ack["text"]  # the hotline gives the link out again on the phone
    joined = await harness.core.ingest(webform_message(f"Mein Link {url} geht nicht, Kennung {token}",
                                                       thread={"status_token": token},
                                                       meta={"quoted": f"> Den Stand sehen Sie hier: {url}"}))
    assert joined.conversation_id == case
    status, seen = await harness.api("GET", f"/api/v1/conversations/{case}", token="contractor")
    assert status == 200
    assert token not in json.dumps(seen) and "[status link]" in json.dumps(seen)
    resident = [m for m in seen["messages"] if m["direction"] == "in"][-1]
    assert resident["text"] == "Mein Link [status link] geht nicht, Kennung [status link]"
    assert resident["meta"]["quoted"] == "> Den Stand sehen Sie hier: [status link]"
    # another conversation's link, quoted or pasted into this one, is someone's key too
    other = await harness.core.ingest(webform_message("Frage zum Tarif", topic="contract", postcode="99999",
                                                      email="nachbar@example.org"))
    assert other.unit != "tiefbau-muster"
    await harness.core.ingest(webform_message(f"Siehe auch {other.status_url} und {other.status_token}.",
                                              thread={"status_token": token}))
    status, seen = await harness.api("GET", f"/api/v1/conversations/{case}", token="contractor")
    assert other.status_token not in json.dumps(seen)
    assert [m for m in seen["messages"] if m["direction"] == "in"][-1]["text"] == "Siehe auch [status link] und [status link]."
    assert next(m for m in seen["messages"] if m["kind"] == "ack")["text"] == ack["text"].replace(url, "[status link]")


async def test_a_status_link_in_a_subject_or_a_call_back_note_is_hidden_from_an_external_unit_too(harness):
    """Only the messages were scrubbed: a resident who pasted an older case's link into a new
    case's subject gave it to the contractor, in the detail and in the list."""
    first = await harness.core.ingest(webform_message("Erste Anfrage", email="a@example.net"))
    second = await harness.core.ingest(webform_message("Baustelle vor dem Haus", email="a@example.net",
                                                       subject=f"Link {first.status_url} geht nicht"))
    assert second.unit == "tiefbau-muster"
    await harness.api("POST", f"/api/v1/conversations/{second.conversation_id}/callbacks", token="hotline",
                      json={"outcome": "not_reached", "note": f"Link genannt: {first.status_token}"})
    status, seen = await harness.api("GET", f"/api/v1/conversations/{second.conversation_id}", token="contractor")
    assert status == 200 and seen["subject"] == "Link [status link] geht nicht"
    status, listing = await harness.api("GET", "/api/v1/conversations", token="contractor")
    assert status == 200 and [i["subject"] for i in listing["items"] if i["id"] == second.conversation_id] == [
        "Link [status link] geht nicht"]
    assert first.status_token not in json.dumps(seen) + json.dumps(listing)
    # the hotline, an own unit, sees it as written
    status, listing = await harness.api("GET", "/api/v1/conversations", token="hotline")
    assert any(first.status_token in (i["subject"] or "") for i in listing["items"])


@pytest.mark.parametrize(("action", "body"), [
    ("assign", {"assignee": "Polier Schmidt"}),
    ("replies", {"text": "Wir kommen morgen."}),
    ("notes", {"text": "Kolonne informiert"}),
    ("wait", None),
    ("close", None),
    ("callbacks", {"outcome": "not_reached"}),
])
async def test_a_staff_action_on_a_conversation_that_moved_away_meanwhile_changes_nothing(harness, action, body):
    """The unit was checked before the action waited for its write: a contractor whose action
    raced the hotline's transfer assigned, answered or closed a conversation of another unit,
    and was shown its detail."""
    case = await _case(harness)
    state = (await harness.rows("SELECT state FROM conversations WHERE id = ?", (case,)))[0]["state"]
    (moved, _), (status, answer) = await asyncio.gather(
        harness.api("POST", f"/api/v1/conversations/{case}/transfer", token="hotline", json={"unit": "kundenservice"}),
        harness.api("POST", f"/api/v1/conversations/{case}/{action}", token="contractor", json=body or {}),
    )
    assert moved == 200
    assert status == 404 and answer["error"]["code"] == "not_found", answer
    conv = (await harness.rows("SELECT unit, state, assignee FROM conversations WHERE id = ?", (case,)))[0]
    assert (conv["unit"], conv["state"], conv["assignee"]) == ("kundenservice", state, None)
    assert not await harness.rows("SELECT 1 FROM messages WHERE author = 'contractor'")
    assert not await harness.rows("SELECT 1 FROM callback_attempts")
    assert not await harness.rows("SELECT 1 FROM events WHERE conversation_id = ? AND actor = 'contractor'", (case,))


@pytest.mark.parametrize(("action", "token", "body", "method", "to"), [
    ("assign", "contractor", {"assignee": "Polier Schmidt"}, "assign", "kundenservice"),
    ("close", "contractor", None, "set_state", "kundenservice"),
    ("wait", "contractor", None, "set_state", "kundenservice"),
    ("reopen", "contractor", None, "set_state", "kundenservice"),
    ("transfer", "hotline", {"unit": "bauhotline"}, "transfer", "vertrieb"),  # to a unit the caller sees
])
async def test_an_action_that_was_done_is_not_answered_404_when_the_case_moved_on_before_its_answer(
        harness, monkeypatch, action, token, body, method, to):
    """Another request's transfer committed after the action's write and before its answer read
    the detail (what asyncio.gather of the two requests hits in most runs): the action was done,
    and answered 404 "conversation not found", which says it changed nothing. Staff did it again."""
    case = await _case(harness)
    if action == "reopen":
        await harness.core.set_state(case, "close", "admin")
    transfer, done = harness.core.transfer, getattr(harness.core, method)

    async def then_moved(*args, **kwargs):
        await done(*args, **kwargs)
        await transfer(case, to, "", "admin")  # the other request, between the write and the answer

    monkeypatch.setattr(harness.core, method, then_moved)
    status, answer = await harness.api("POST", f"/api/v1/conversations/{case}/{action}", token=token, json=body or {})
    assert status == 200 and answer == {"id": case, "unit": to, "moved": True}, (status, answer)
    kinds = {"assign": "assigned", "close": "closed", "wait": "waiting", "reopen": "reopened", "transfer": "transferred"}
    done_by_caller = await harness.rows("SELECT kind FROM events WHERE conversation_id = ? AND actor = ?", (case, token))
    assert [e["kind"] for e in done_by_caller] == [kinds[action]]  # ... and it was done, once
    # Without the other request, the answer is the detail, as before.
    monkeypatch.undo()
    await harness.core.transfer(case, "tiefbau-muster", "", "admin")
    if action == "reopen":
        await harness.core.set_state(case, "close", "admin")
    elif action in ("wait", "close"):
        await harness.core.set_state(case, "reopen", "admin")
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/{action}", token=token, json=body or {})
    assert status == 200 and detail["id"] == case and "messages" in detail and "moved" not in detail, detail


async def test_a_merged_contact_answers_where_it_went_to_staff_who_see_the_survivor(harness):
    """Its conversations went to the survivor, so it had no units left: it answered 404 even to
    an admin, and nobody could learn where a contact id from an old link or export had gone."""
    first = await harness.core.ingest(webform_message(email="a@example.net"))  # the contractor's unit
    second = await harness.core.ingest(webform_message(email="b@example.net"))
    sales = await harness.core.ingest(webform_message("Frage zu meinem Tarif", email="c@example.net", topic="contract",
                                                      postcode="99999"))
    a, b, c = [(await harness.rows("SELECT contact_id FROM conversations WHERE id = ?", (r.conversation_id,)))[0]["contact_id"]
               for r in (first, second, sales)]
    status, _ = await harness.api("POST", f"/api/v1/contacts/{a}/merge", json={"other_contact_id": b})
    assert status == 200
    for token in ("admin", "hotline", "contractor"):  # each sees the survivor's conversation
        status, body = await harness.api("GET", f"/api/v1/contacts/{b}", token=token)
        assert status == 200 and body["id"] == b and body["merged_into"] == a and body["identities"] == [], (token, body)
    # The survivor merged on in turn: the chain is followed, and only staff who see where the
    # conversations are now see the contacts merged on the way.
    status, _ = await harness.api("POST", f"/api/v1/contacts/{c}/merge", json={"other_contact_id": a})
    assert status == 200
    await harness.core.transfer(first.conversation_id, "vertrieb", "", "admin")
    await harness.core.transfer(second.conversation_id, "vertrieb", "", "admin")
    for contact in (a, b):
        status, body = await harness.api("GET", f"/api/v1/contacts/{contact}")
        assert status == 200 and body["merged_into"] == {a: c, b: a}[contact], body
        for token in ("hotline", "contractor"):  # the survivor's conversations are all the sales unit's now
            status, body = await harness.api("GET", f"/api/v1/contacts/{contact}", token=token)
            assert status == 404 and body["error"]["code"] == "not_found", (contact, token, body)
    # A contact that has conversations is still scoped by them.
    status, _ = await harness.api("GET", f"/api/v1/contacts/{c}", token="contractor")
    assert status == 404


async def test_a_call_back_attempt_writes_its_time_as_the_detail_does(harness):
    """The POST answer wrote the store's form (2026-11-30T08:00:00.000000Z), the detail's
    callbacks[].at the API's (2026-11-30T08:00:00Z): a client comparing them saw two attempts."""
    from datetime import UTC, datetime

    case = await _case(harness)
    harness.clock.set(datetime(2026, 11, 30, 8, 0, tzinfo=UTC))
    path = f"/api/v1/conversations/{case}/callbacks"
    status, logged = await harness.api("POST", path, json={"outcome": "not_reached"}, headers={"Idempotency-Key": "k1"})
    assert status == 201 and logged["attempt"]["at"] == "2026-11-30T08:00:00Z", logged
    status, again = await harness.api("POST", path, json={"outcome": "not_reached"}, headers={"Idempotency-Key": "k1"})
    assert status == 201 and again == logged  # a replay answers as the first time
    harness.clock.set(datetime(2026, 11, 30, 8, 0, 1, 500000, tzinfo=UTC))
    status, later = await harness.api("POST", path, json={"outcome": "wrong_number"})
    assert later["attempt"]["at"] == "2026-11-30T08:00:01.500000Z"
    status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
    assert [c["at"] for c in detail["callbacks"]] == [logged["attempt"]["at"], later["attempt"]["at"]]


async def test_merge_needs_sight_of_every_conversation_of_both_contacts(harness):
    mine = await harness.core.ingest(webform_message(email="a@example.net"))
    theirs = await harness.core.ingest(webform_message("Tarif?", email="b@example.net", topic="contract", postcode="99999"))
    also_mine = await harness.core.ingest(webform_message("Baustelle", email="b@example.net"))
    status, a = await harness.api("GET", f"/api/v1/conversations/{mine.conversation_id}", token="hotline")
    status, b = await harness.api("GET", f"/api/v1/conversations/{also_mine.conversation_id}", token="hotline")
    status, body = await harness.api("POST", f"/api/v1/contacts/{a['contact']['id']}/merge", token="hotline",
                                     json={"other_contact_id": b["contact"]["id"]})
    assert status == 404  # b also has a sales conversation the hotline must not move
    status, detail = await harness.api("GET", f"/api/v1/conversations/{theirs.conversation_id}")
    assert detail["contact"]["id"] == b["contact"]["id"]


async def test_staff_see_which_addresses_are_only_claimed(harness):
    """A number typed into a form beside an e-mail address is a claim until its owner writes from
    it; the docs named a ``claimed`` field that the API did not have."""
    form = webform_message(sender={"kind": "email", "address": "jemand@example.org", "display_name": "Jemand",
                                   "other_identities": [{"kind": "phone", "address": "+4915199999999"}]})
    case = await harness.core.ingest(form)
    status, detail = await harness.api("GET", f"/api/v1/conversations/{case.conversation_id}")
    expected = [("email", "jemand@example.org", False, False), ("phone", "+4915199999999", True, False)]
    assert [(i["kind"], i["address"], i["claimed"], i["failed"]) for i in detail["contact"]["identities"]] == expected
    status, contact = await harness.api("GET", f"/api/v1/contacts/{detail['contact']['id']}")
    assert [(i["kind"], i["address"], i["claimed"], i["failed"]) for i in contact["identities"]] == expected


async def test_staff_of_external_units_merge_no_contacts(harness):
    """A merge makes one person's addresses the other's, and an answer goes to the address used
    last: a contractor merged a form it had sent with its own address into a resident's
    contact, and the resident's next answer, with their status link, went to the contractor."""
    resident = await harness.core.ingest(webform_message("Baustelle vor dem Haus", email="resident@example.net"))
    own = await harness.core.ingest(webform_message("Baustelle Gehweg", email="dispo@contractor.example"))
    contacts = [(await harness.rows("SELECT contact_id FROM conversations WHERE id = ?", (c.conversation_id,)))[0]["contact_id"]
                for c in (resident, own)]
    status, body = await harness.api("POST", f"/api/v1/contacts/{contacts[0]}/merge", token="contractor",
                                     json={"other_contact_id": contacts[1]})
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert [r["merged_into"] for r in await harness.rows("SELECT merged_into FROM contacts ORDER BY id")] == [None, None]
    status, reply = await harness.api("POST", f"/api/v1/conversations/{resident.conversation_id}/replies",
                                      token="contractor", json={"text": "Wir kommen morgen."})
    assert status == 201
    rows = await harness.rows("SELECT to_address FROM outbox WHERE message_id = ?", (reply["id"],))
    assert [r["to_address"] for r in rows] == ["resident@example.net"]
    # The hotline, an own unit that oversees the contractor, may merge the two.
    status, _ = await harness.api("POST", f"/api/v1/contacts/{contacts[0]}/merge", token="hotline",
                                  json={"other_contact_id": contacts[1]})
    assert status == 200


def found(body):
    """The conversation ids of a listing, in its order."""
    return [i["id"] for i in body["items"]]


async def test_free_text_search_folds_umlauts_and_needs_every_word(harness):
    a = await harness.core.ingest(webform_message("Die Straßensperrung in der Musterstraße dauert schon Wochen"))
    b = await harness.core.ingest(webform_message("Frage zum Tarif", email="b@example.net", topic="contract", postcode="99999"))
    status, body = await harness.api("GET", "/api/v1/conversations?q=strassensperr")
    assert found(body) == [a.conversation_id]
    status, body = await harness.api("GET", "/api/v1/conversations?q=MUSTERSTRASSE wochen")
    assert found(body) == [a.conversation_id]
    status, body = await harness.api("GET", "/api/v1/conversations?q=musterstrasse tarif")
    assert found(body) == []
    status, body = await harness.api("GET", "/api/v1/conversations?q=Erika")  # the sender's name
    assert set(found(body)) == {a.conversation_id, b.conversation_id}
    status, body = await harness.api("GET", '/api/v1/conversations?q=" OR * NEAR(')  # no FTS syntax gets through
    assert status == 200 and found(body) == []


async def test_a_search_finds_umlauts_written_without_their_dots(harness):
    """Staff without an umlaut on their keyboard (a contractor's crew, a phone) type "Muller" or
    "Ozturk", and residents do so too: "muller" did not find "Müller", nor "Müller" a resident
    who wrote "Muller", since umlauts were only folded to ae, oe, ue."""
    named = webform_message("Straße gesperrt – Zufahrt für Müllabfuhr? 🚧")
    named["sender"]["display_name"] = "Jürgen Weiß-Öztürk"
    dotted = await harness.core.ingest(named)
    # typed on a Mac: u and a combining diaeresis (NFD)
    mac = await harness.core.ingest(webform_message("Frau Mu\u0308ller wartet auf Rückruf", email="b@example.net"))
    plain = await harness.core.ingest(webform_message("Herr Muller aus der Nummer 5", email="c@example.net"))
    spelt = await harness.core.ingest(webform_message("Familie Mueller, Hausnummer 7", email="d@example.net"))

    async def search(q: str) -> set[int]:
        status, body = await harness.api("GET", "/api/v1/conversations", params={"q": q})
        assert status == 200, body
        return set(found(body))

    assert await search("ozturk") == {dotted.conversation_id}
    assert await search("Weiss-Ozturk") == {dotted.conversation_id}
    assert await search("mullabfuhr") == {dotted.conversation_id}
    assert await search("Fur Mullabfuhr") == {dotted.conversation_id}
    assert await search("muller") == {mac.conversation_id, plain.conversation_id}
    assert await search("Müller") == {mac.conversation_id, plain.conversation_id, spelt.conversation_id}
    assert await search("Mu\u0308ller") == {mac.conversation_id, plain.conversation_id, spelt.conversation_id}
    assert await search("Mueller") == {mac.conversation_id, spelt.conversation_id}  # as before
    assert await search("Müller 5") == {plain.conversation_id}
    assert await search("Rückruf Müller") == {mac.conversation_id}
    assert await search("ruckruf") == {mac.conversation_id}
    # Nobody wrote "Guenes": the other word's indexed words are all looked at all the same.
    gunes = await harness.core.ingest(webform_message("Herr Gunes meldet eine Baustelle", email="e@example.net"))
    await harness.core.ingest(webform_message("Bauarbeiten seit Montag", email="f@example.net"))
    assert await search("Güneş Bau") == {gunes.conversation_id}


async def test_a_search_finds_letters_that_unicode_does_not_decompose_written_plain(harness):
    """ "Sorensen" did not find "Sørensen", nor "Lodz" "Łódź", nor "Yilmaz" a sender named
    "Yılmaz": NFKD leaves ø, ł and ı as they are, so they were never folded."""
    named = webform_message("Grøft foran huset, Bjørn Løkken")
    named["sender"]["display_name"] = "Søren Sørensen"
    danish = await harness.core.ingest(named)
    polish = await harness.core.ingest(webform_message("Koparka stoi w Łodzi, Żółtowski", email="b@example.net"))
    turkish = webform_message("Baustelle vor dem Haus", email="c@example.net")
    turkish["sender"]["display_name"] = "Ömer Yılmaz"
    turkish = await harness.core.ingest(turkish)
    plain = await harness.core.ingest(webform_message("Herr Sorensen, Haus 4", email="d@example.net"))

    async def search(q: str) -> set[int]:
        status, body = await harness.api("GET", "/api/v1/conversations", params={"q": q})
        assert status == 200, body
        return set(found(body))

    assert await search("Sorensen") == {danish.conversation_id, plain.conversation_id}
    assert await search("Soerensen") == {danish.conversation_id}
    assert await search("Sørensen") == {danish.conversation_id, plain.conversation_id}
    assert await search("SØREN groft") == {danish.conversation_id}
    assert await search("Lokken") == await search("Løkken") == {danish.conversation_id}
    assert await search("lodzi zoltowski") == {polish.conversation_id}
    assert await search("Yilmaz") == await search("Yılmaz") == {turkish.conversation_id}


async def test_a_search_without_any_word_is_no_search(harness):
    """q=+ (a search box holding a space, which a URL's query turns into "+") or q=- listed
    nothing, while q= listed everything: a q without a word is no search either."""
    cases = [await _case(harness, text=f"Baustelle Nummer {i}") for i in range(3)]
    await harness.core.set_state(cases[0], "close", "admin")
    for filters in ({}, {"state": "closed"}):
        status, everything = await harness.api("GET", "/api/v1/conversations", params=filters)
        assert status == 200 and found(everything)
        for q in (" ", "   ", "-", "+", "--", " - ", ".,;!?", "\t", "„“", "—"):
            status, body = await harness.api("GET", "/api/v1/conversations", params={**filters, "q": q})
            assert status == 200 and found(body) == found(everything), (q, filters, body)
    # Words in it are still a search, and must all occur.
    status, body = await harness.api("GET", "/api/v1/conversations", params={"q": "- nummer -"})
    assert found(body) == sorted(cases, reverse=True)
    status, body = await harness.api("GET", "/api/v1/conversations", params={"q": "+ nirgends"})
    assert status == 200 and found(body) == []


async def test_a_search_of_more_words_than_it_takes_is_refused_naming_q(harness):
    """The words after the tenth were dropped: a search found what did not have them."""
    await harness.core.ingest(webform_message("eins zwei drei vier fünf sechs sieben acht neun zehn"))
    ten = "eins zwei drei vier fünf sechs sieben acht neun zehn"
    status, body = await harness.api("GET", f"/api/v1/conversations?q={ten}")
    assert status == 200 and len(found(body)) == 1
    status, body = await harness.api("GET", f"/api/v1/conversations?q={ten} elf")
    assert status == 400 and body["error"]["field"] == "q" and "10 words" in body["error"]["message"]


async def test_a_one_character_search_word_matches_whole_words_only(harness):
    four = await harness.core.ingest(webform_message("Vor Hausnummer 4 ist der Gehweg offen"))
    await harness.core.ingest(webform_message("Die Leitung in Nummer 4711 ist kaputt", email="b@example.net"))
    await harness.core.ingest(webform_message("Seit 42 Tagen eine Baustelle", email="c@example.net"))
    status, body = await harness.api("GET", "/api/v1/conversations?q=4")
    assert status == 200 and found(body) == [four.conversation_id]
    status, body = await harness.api("GET", "/api/v1/conversations?q=hausnummer 4")
    assert found(body) == [four.conversation_id]
    status, body = await harness.api("GET", "/api/v1/conversations?q=47")  # two characters: a word start again
    assert len(found(body)) == 1 and found(body) != [four.conversation_id]


async def test_malformed_requests_get_a_json_4xx_and_change_nothing(harness):
    case = (await harness.core.ingest(webform_message())).conversation_id
    url = f"{harness.base_url}/api/v1/conversations/{case}"
    admin = {"Authorization": "Bearer test-admin-token"}
    before = await harness.count("messages")

    async def raw(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        response = await harness.client.session.post(url + path, data=body, headers=headers)
        return response.status, await response.json()

    # a token with bytes that are no UTF-8: an unknown token, not a crash
    writer_headers = {"Authorization": "Bearer \xe9t\xe9"}
    status, body = await raw("/notes", b'{"text": "x"}', {**writer_headers, "Content-Type": "application/json"})
    assert status == 401 and body["error"]["code"] == "unauthorized"
    # half a UTF-16 pair, nesting deeper than the parser goes, bytes that are no UTF-8
    for payload in (b'{"text": "Notiz \\ud800"}', b"[" * 100_000, b'{"text": "\xff\xfe"}'):
        status, body = await raw("/notes", payload, {**admin, "Content-Type": "application/json"})
        assert status == 400 and body["error"]["code"] == "invalid_json", payload[:30]
    # a charset JSON does not have is ignored: the body is UTF-8 JSON all the same
    status, body = await raw("/notes", '{"text": "Grüße"}'.encode(), {**admin, "Content-Type": "application/json; charset=bogus"})
    assert status == 201 and body["text"] == "Grüße"
    # assign needs the field: null unassigns, a missing key is a mistake
    status, body = await raw("/assign", b"{}", {**admin, "Content-Type": "application/json"})
    assert status == 400 and body["error"]["field"] == "assignee"
    assert await harness.count("messages") == before + 1  # only the one valid note
    status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
    assert detail["assignee"] is None


# -- which index walks a filtered list ---------------------------------------------------------

def _history(path, closed: int):
    """A migrated file with ``closed`` closed conversations of one unit (history), and contact 1
    with an overdue phone conversation and a closed one: what a list filter must find without
    reading the history."""
    import sqlite3

    from router.store.sqlite import _connect, apply_migrations

    conn = _connect(path)
    conn.row_factory = sqlite3.Row
    apply_migrations(conn)
    stamp = "2026-01-01T00:00:00.000000Z"
    conn.executemany(
        "INSERT INTO contacts (id, created_at, updated_at) VALUES (?, ?, ?)", [(i, stamp, stamp) for i in range(1, closed + 2)]
    )
    rows = [(i, f"K-{i:06d}", f"t{i}", i, "webform", "kundenservice", "closed", "de", "r", "x", None, stamp, stamp)
            for i in range(2, closed + 2)]
    rows += [(closed + 2, "K-OVERDUE", "t-overdue", 1, "phone", "kundenservice", "acknowledged", "de", "r", "x",
              "2026-01-01T01:00:00.000000Z", stamp, stamp),
             (closed + 3, "K-OLD", "t-old", 1, "webform", "kundenservice", "closed", "de", "r", "x", None, stamp, stamp),
             (1, "K-HOTLINE", "t-hotline", 1, "phone", "bauhotline", "closed", "de", "r", "x", None, stamp, stamp)]
    conn.executemany(
        "INSERT INTO conversations (id, case_reference, status_token, contact_id, channel, unit, state, language,"
        " routing_rule, routing_reason, deadline, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.execute("""UPDATE conversations SET flags = '["callback_required"]' WHERE case_reference = 'K-OVERDUE'""")
    conn.execute("""UPDATE conversations SET flags = '["callback_failed"]' WHERE case_reference = 'K-HOTLINE'""")
    # Some flags stay for good: every other conversation of the history has one
    conn.execute("""UPDATE conversations SET flags = '["callback_required", "no_number"]'"""
                 " WHERE state = 'closed' AND id % 2 = 0 AND contact_id != 1")
    return conn


def test_every_flag_has_its_index(tmp_path):
    """A list by flag walks the flag's partial index; a flag without one would read every row."""
    from router.tracking import FLAGS

    conn = _history(tmp_path / "flags.sqlite3", 10)
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {f"conversations_flag_{flag}" for flag in FLAGS} <= indexes


def _list_cost(conn, **filters) -> tuple[int, list[str]]:
    """VM steps (in hundreds) of one list page with these filters, and the case references."""
    from datetime import UTC, datetime

    from router.config import load_config
    from router.inbox.queries import list_query

    sql, params = list_query(
        filters.get("units", ["kundenservice"]), filters.get("state"), filters.get("channel"), filters.get("overdue"),
        filters.get("contact_id"), datetime(2026, 1, 2, tzinfo=UTC), flag=filters.get("flag"), limit=50,
        all_units=load_config(env={}).units,
    )
    steps, rows = vm_steps(conn, lambda: conn.execute(sql, params).fetchall(), every=100)
    return steps, [r["case_reference"] for r in rows]


def test_list_filters_read_the_workload_or_the_contact_not_the_history(tmp_path):
    """A contact's conversations, the overdue ones and a rare state within a channel are found
    without reading every conversation of the unit or channel (SQLite read the whole unit for a
    contact's three conversations: 280 ms at a million)."""
    small = _history(tmp_path / "small.sqlite3", 100)
    large = _history(tmp_path / "large.sqlite3", 5000)
    cases = [
        ({"contact_id": 1}, ["K-OLD", "K-OVERDUE"]),
        ({"contact_id": 1, "state": "closed"}, ["K-OLD"]),
        ({"overdue": True}, ["K-OVERDUE"]),
        ({"state": "acknowledged", "channel": "phone"}, ["K-OVERDUE"]),
        ({"overdue": True, "channel": "phone", "units": ["kundenservice", "vertrieb"]}, ["K-OVERDUE"]),
        ({"overdue": True, "units": ["kundenservice", "vertrieb"]}, ["K-OVERDUE"]),  # not each unit's history
        # a token of several units that have few conversations among many (the history is
        # kundenservice's): the primary key walked the whole table
        ({"units": ["bauhotline", "tiefbau-muster"]}, ["K-HOTLINE"]),
        ({"units": ["bauhotline", "tiefbau-muster"], "state": "closed"}, ["K-HOTLINE"]),
        ({"units": ["bauhotline", "kundenservice"], "state": "acknowledged"}, ["K-OVERDUE"]),
        # ... and with a channel that is rare among those units' conversations
        ({"units": ["bauhotline", "kundenservice"], "channel": "phone"}, ["K-OVERDUE", "K-HOTLINE"]),
        ({"units": ["bauhotline", "kundenservice"], "channel": "phone", "state": "closed"}, ["K-HOTLINE"]),
        # the flagged, among a history that is half flagged: the workload first, then the flag
        ({"flag": "callback_failed", "units": ["bauhotline", "tiefbau-muster"]}, ["K-HOTLINE"]),
        ({"flag": "callback_required", "state": "acknowledged", "units": ["bauhotline", "kundenservice"]}, ["K-OVERDUE"]),
        ({"flag": "callback_required", "state": "acknowledged"}, ["K-OVERDUE"]),
        ({"flag": "callback_required", "overdue": True}, ["K-OVERDUE"]),
    ]
    for filters, expected in cases:
        few, found = _list_cost(small, **filters)
        many, found_in_large = _list_cost(large, **filters)
        assert found == found_in_large == expected, filters
        assert many <= few + 2, (filters, few, many)


async def test_stats_median_time_to_first_answer(harness):
    """The median is worked out in SQL, per channel and unit: the middle value, or the mean of
    the two middle ones."""
    ids = [await _case(harness) for _ in range(5)]
    answered_after = {ids[0]: 60, ids[1]: 600, ids[2]: 120, ids[3]: 3600}  # ids[4] unanswered

    def answer(conn):
        for conversation_id, seconds in answered_after.items():
            conn.execute(
                "UPDATE conversations SET created_at = '2026-03-02T08:00:00.000000Z',"
                " first_answered_at = strftime('%Y-%m-%dT%H:%M:%fZ', '2026-03-02T08:00:00', ?) WHERE id = ?",
                (f"+{seconds} seconds", conversation_id),
            )

    await harness.core.store.write(answer)
    status, body = await harness.api("GET", "/api/v1/stats")
    assert status == 200
    (row,) = [r for r in body["items"] if r["unit"] == "tiefbau-muster"]
    assert row["received"] == 5 and row["answered"] == 4
    assert row["median_first_answer_seconds"] == 360.0  # (120 + 600) / 2

    answered_after.clear()
    answered_after[ids[4]] = 30
    await harness.core.store.write(answer)
    status, body = await harness.api("GET", "/api/v1/stats")
    (row,) = [r for r in body["items"] if r["unit"] == "tiefbau-muster"]
    assert row["median_first_answer_seconds"] == 120.0  # 30, 60, 120, 600, 3600


async def test_stats_count_as_acknowledged_only_what_an_acknowledgement_reached(harness):
    """Any state but open counted: a mailing list's message (a waiting conversation with no
    acknowledgement at all) and a case closed before its acknowledgement went out."""
    machine = await harness.core.ingest(webform_message("Newsletter Dezember", ack_suppressed="list"))
    closed = await _case(harness)
    status, _ = await harness.api("POST", f"/api/v1/conversations/{closed}/close")
    assert status == 200 and not machine.acknowledged
    status, body = await harness.api("GET", "/api/v1/stats")
    (row,) = [r for r in body["items"] if r["unit"] == "tiefbau-muster"]
    assert (row["received"], row["acknowledged"]) == (2, 0)
    await harness.run_outbox()  # the closed case's acknowledgement goes out after all
    status, body = await harness.api("GET", "/api/v1/stats")
    (row,) = [r for r in body["items"] if r["unit"] == "tiefbau-muster"]
    assert (row["received"], row["acknowledged"]) == (2, 1)


async def _created_at(harness, stamps: dict[int, str]) -> None:
    def write(conn):
        for conversation_id, stamp in stamps.items():
            conn.execute("UPDATE conversations SET created_at = ? WHERE id = ?", (stamp, conversation_id))

    await harness.core.store.write(write)


async def test_stats_of_a_period_count_the_conversations_created_in_it(harness):
    ids = [await _case(harness) for _ in range(4)]
    await _created_at(harness, {
        ids[0]: "2026-02-28T22:59:59.999999Z",  # 23:59:59 on 28 February in Berlin: before
        ids[1]: "2026-02-28T23:00:00.000000Z",  # midnight of 1 March in Berlin: the first instant
        ids[2]: "2026-03-15T12:00:00.000000Z",
        ids[3]: "2026-03-31T22:00:00.000000Z",  # midnight of 1 April in Berlin (summer time): after
    })

    async def received(**period: str) -> tuple[int, dict]:
        query = "&".join(f"{k}={v}" for k, v in period.items())
        status, body = await harness.api("GET", f"/api/v1/stats?{query}")
        assert status == 200, body
        rows = [r for r in body["items"] if r["unit"] == "tiefbau-muster"]
        return (rows[0]["received"] if rows else 0), body

    count, body = await received(**{"from": "2026-03-01", "to": "2026-04-01"})  # dates: the service's timezone
    assert count == 2
    # written as every time of the API is (the detail's, a list's): not as the store keeps them
    assert (body["from"], body["to"]) == ("2026-02-28T23:00:00Z", "2026-03-31T22:00:00Z")
    count, _ = await received(**{"from": "2026-03-01T00:00:00%2B01:00"})  # an offset of its own; open end
    assert count == 3
    count, _ = await received(**{"from": "2026-03-01T00:00:00+01:00"})  # "+" unescaped: a space in a query
    assert count == 3
    count, _ = await received(to="2026-03-15T12:00:00Z")  # exclusive
    assert count == 2
    count, body = await received(to="2026-03-15t12:00:00z")  # RFC 3339 allows "t" and "z" in lower case
    assert count == 2 and body["to"] == "2026-03-15T12:00:00Z"
    count, body = await received(to="2026-03-15T12:00:00.25Z")  # a fraction of a second, when it has one
    assert count == 3 and body["to"] == "2026-03-15T12:00:00.250000Z"
    count, body = await received()
    assert count == 4 and body["from"] is None and body["to"] is None


@pytest.mark.parametrize(("query", "field"), [
    ("from=yesterday", "from"),
    ("to=2026-13-01", "to"),
    ("from=0001-01-01", "from"),
    ("from=2026-03-02&to=2026-03-01", "to"),
    ("from=2026-03-02&to=2026-03-02", "to"),
    ("from=9999-12-31T23:00:00-14:00", "from"),  # beyond what a datetime holds in UTC
    ("from=2026W441", "from"),  # ISO week dates and the like: Python reads them, the API does not
    ("from=20261101", "from"),
    ("from=2026-11-01&from=2026-12-01", "from"),
])
async def test_stats_refuse_a_period_that_is_not_one(harness, query, field):
    status, body = await harness.api("GET", f"/api/v1/stats?{query}")
    assert status == 400
    assert body["error"]["code"] == "invalid_parameter" and body["error"]["field"] == field


def test_stats_of_a_period_read_that_period_not_the_history(tmp_path):
    """Without a period the statistics read every conversation of the units (6.8 s at a
    million); a period's are found through conversations_created."""
    from router.inbox.queries import stats_query

    def cost(conn):
        sql, params = stats_query(["kundenservice"], "2026-03-01T00:00:00.000000Z",
                                  "2026-01-01T00:30:00.000000Z", "2026-01-02T00:00:00.000000Z")
        steps, rows = vm_steps(conn, lambda: conn.execute(sql, params).fetchall(), every=100)
        return steps, [(r["channel"], r["received"]) for r in rows]

    small, large = _history(tmp_path / "small.sqlite3", 100), _history(tmp_path / "large.sqlite3", 5000)
    for conn in (small, large):  # the history was created at midnight; two conversations within the period
        conn.execute("UPDATE conversations SET created_at = '2026-01-01T01:00:00.000000Z'"
                     " WHERE case_reference IN ('K-OVERDUE', 'K-OLD')")
    few, found_in_small = cost(small)
    many, found_in_large = cost(large)
    assert found_in_small == found_in_large == [("phone", 1), ("webform", 1)]
    assert many <= few + 2, (few, many)


@pytest.mark.parametrize("query", ["", "&state=closed", "&state=open", "&channel=webform", "&overdue=false"])
async def test_a_token_of_several_units_pages_through_exactly_its_conversations(harness, query):
    """Each unit's newest, then the newest of those: page by page, no row skipped or repeated."""
    topics = ["construction", "contract", "construction", "billing", "construction"]
    ids = [await _case(harness, text=f"Anliegen {n}", topic=topics[n % 5], postcode="12345" if n % 3 else "99999")
           for n in range(24)]
    await harness.api("POST", f"/api/v1/conversations/{ids[3]}/close")
    await harness.api("POST", f"/api/v1/conversations/{ids[9]}/close")
    hotline = ("bauhotline", "kundenservice", "tiefbau-muster")  # its own two, and the contractor it oversees
    where = {"": "", "&state=closed": " AND state = 'closed'", "&state=open": " AND state = 'open'",
             "&channel=webform": " AND channel = 'webform'", "&overdue=false": ""}[query]
    expected = [r["id"] for r in await harness.rows(
        f"SELECT id FROM conversations WHERE unit IN (?, ?, ?){where} ORDER BY id DESC", hotline)]
    assert expected and len(expected) < len(ids)  # some of the hotline's, not all
    seen, cursor = [], None
    for _ in range(30):
        status, page = await harness.api(
            "GET", f"/api/v1/conversations?limit=2{query}" + (f"&cursor={cursor}" if cursor else ""), token="hotline")
        assert status == 200
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == expected


async def test_waiting_can_be_undone_and_empty_optional_fields_are_not_given(harness):
    """Staff who set wait by mistake could only close and reopen; a web page that posts an empty
    optional field ("reason": "") was answered 400."""
    case = await _case(harness)
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/wait")
    assert status == 200 and detail["state"] == "waiting" and detail["deadline"] is None
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/reopen")
    assert status == 200 and detail["state"] == "acknowledged" and detail["deadline"] is not None
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/reopen")
    assert status == 409 and body["error"]["code"] == "not_closed"
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/transfer",
                                       json={"unit": "kundenservice", "reason": "  "})
    assert status == 200 and detail["routing"]["reason"] == "Transferred by admin."
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": "not_reached", "note": ""})
    assert status == 201 and body["attempt"]["note"] is None
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/replies", json={"text": " "})
    assert status == 400 and body["error"]["field"] == "text"  # a required one still must say something


async def test_a_merge_checks_the_units_again_in_its_write(harness):
    """The contractor's sight of both contacts was checked only before the merge waited for its
    write: a transfer in between let it move a conversation it no longer saw."""
    from router.core import ActionError

    mine = await harness.core.ingest(webform_message(email="a@example.net"))
    also = await harness.core.ingest(webform_message("Baustelle", email="b@example.net"))
    contacts = [(await harness.rows("SELECT contact_id FROM conversations WHERE id = ?", (c.conversation_id,)))[0]["contact_id"]
                for c in (mine, also)]
    await harness.core.transfer(also.conversation_id, "kundenservice", "", "hotline")  # after the API's look
    with pytest.raises(ActionError) as caught:
        await harness.core.merge_contacts(contacts[0], contacts[1], "contractor", units={"tiefbau-muster"})
    assert caught.value.status == 404
    merged = await harness.rows("SELECT merged_into FROM contacts WHERE id = ?", (contacts[1],))
    assert merged[0]["merged_into"] is None
    await harness.core.merge_contacts(contacts[0], contacts[1], "hotline", units={"tiefbau-muster", "kundenservice"})


async def test_a_status_link_written_into_another_link_is_hidden_from_a_contractor(harness):
    """Outlook's Safe Links write the link percent-encoded into theirs (``?url=http%3A%2F%2F…
    %2Fstatus%2F<token>&data=…``): a resident who answered quoting the acknowledgement gave
    the contractor the token, after its ``%2F``."""
    from urllib.parse import quote

    first = await harness.core.ingest(webform_message())
    safelink = "https://eur01.safelinks.protection.outlook.com/?url=" + quote(first.status_url, safe="") + "&data=05%7C02"
    await harness.core.ingest(webform_message("Danke, noch eine Frage zur Absperrung", thread={"status_token": first.status_token},
                                              meta={"quoted": f"> Den Stand sehen Sie hier: {safelink}"}))
    status, seen = await harness.api("GET", f"/api/v1/conversations/{first.conversation_id}", token="contractor")
    assert status == 200 and first.status_token not in json.dumps(seen)
    assert "%2Fstatus%2F[status link]&data=05%7C02" in json.dumps(seen)
    # written twice over (a tracking redirect inside Safe Links): %252F before the token
    twice = "https://eur01.safelinks.protection.outlook.com/?url=" + quote(
        "https://t.example/r?u=" + quote(first.status_url, safe=""), safe="")
    assert "%252F" + first.status_token in twice
    await harness.core.ingest(webform_message("Noch eine Frage", thread={"status_token": first.status_token},
                                              meta={"quoted": f"> {twice}"}))
    status, seen = await harness.api("GET", f"/api/v1/conversations/{first.conversation_id}", token="contractor")
    assert first.status_token not in json.dumps(seen)
    # A digest or id longer than a token stays as it is.
    digest = "ab" * 32
    await harness.core.ingest(webform_message(f"Anhang {digest} und %2F{digest}", thread={"status_token": first.status_token}))
    status, seen = await harness.api("GET", f"/api/v1/conversations/{first.conversation_id}", token="contractor")
    assert seen["messages"][-1]["text"] == f"Anhang {digest} und %2F{digest}"


async def test_hiding_status_links_from_a_long_unbroken_text_takes_linear_time(harness):
    """The pattern began with \\S*: 80,000 characters without a space took 11 to 26 s of the
    event loop when a contractor opened the conversation."""
    import time

    case = await _case(harness)
    (row,) = await harness.rows("SELECT status_token FROM conversations WHERE id = ?", (case,))
    await harness.core.ingest(webform_message("x" * 150_000, thread={"status_token": row["status_token"]}))
    started = time.process_time()  # CPU seconds of the service, which runs in this process
    status, seen = await harness.api("GET", f"/api/v1/conversations/{case}", token="contractor")
    assert status == 200 and time.process_time() - started < 2
    assert seen["messages"][-1]["text"] == "x" * 150_000


async def test_a_reply_goes_to_an_address_no_provider_refused_when_the_contact_has_one(harness):
    """The answer goes to the contact's latest address its channel can reach, but not to one a
    provider refused for good while another is left: it bounced again, and the resident waited."""
    sender = {"kind": "email", "address": "anwohner@example.net", "display_name": "Erika Mustermann",
              "other_identities": [{"kind": "email", "address": "erika.m@example.net"}]}
    case = await _case(harness, sender=sender)
    await harness.core.store.write(lambda conn: conn.execute(
        "UPDATE identities SET failed_at = '2026-11-30T07:00:00.000000Z' WHERE address = 'anwohner@example.net'"))
    status, reply = await harness.api("POST", f"/api/v1/conversations/{case}/replies", json={"text": "Ab Freitag frei."})
    assert status == 201, reply
    (row,) = await harness.rows("SELECT to_address FROM outbox WHERE kind = 'reply'")
    assert row["to_address"] == "erika.m@example.net"


async def test_a_conversation_outside_the_callers_units_is_404_whatever_the_request_says(harness):
    """It answers as if it did not exist: a malformed body to another unit's case was a 400,
    which told a contractor which case numbers exist elsewhere."""
    sales_case = await _case(harness, text="Frage zu meinem Tarif", topic="contract", postcode="99999")
    for action, body in (("replies", {"text": ""}), ("notes", {}), ("assign", {"assignee": 7}),
                         ("transfer", {"unit": "nirgendwo"}), ("callbacks", {"outcome": "vielleicht"})):
        status, answer = await harness.api("POST", f"/api/v1/conversations/{sales_case}/{action}", token="contractor",
                                           json=body)
        assert (status, answer["error"]["code"]) == (404, "not_found"), action


async def _listed(harness, query: str, token: str = "admin") -> tuple[list[int], str | None]:
    """One list page's ids and its next_cursor; the page must be a 200."""
    status, page = await harness.api("GET", f"/api/v1/conversations?{query}", token=token)
    assert status == 200, (query, page)
    return [i["id"] for i in page["items"]], page["next_cursor"]


async def test_the_page_that_ends_the_list_has_no_cursor(harness):
    """Every page but the last has a next_cursor, and the last has none, also when it is full:
    for a token of one unit, of several (each unit's newest, then the newest of those, also when
    all of them lie in one unit) and of all, in a list and in a search."""
    ids = [await _case(harness, text=f"Baustelle Nummer {n}") for n in range(4)]
    for token in ("contractor", "hotline", "admin"):  # one unit; several (each unit's newest); all
        for query in ("limit=2", "limit=2&q=Baustelle", "limit=2&state=open"):
            first, cursor = await _listed(harness, query, token)
            assert first == ids[:1:-1] and cursor, (token, query)
            rest, cursor = await _listed(harness, f"{query}&cursor={cursor}", token)
            assert (rest, cursor) == (ids[1::-1], None), (token, query)
        assert await _listed(harness, "limit=4", token) == (ids[::-1], None)
        first, cursor = await _listed(harness, "limit=3", token)
        assert first == ids[:0:-1] and await _listed(harness, f"limit=3&cursor={cursor}", token) == (ids[:1], None)


async def _page_through(harness, query: str, token: str, between) -> list[int]:
    """Every id of a listing, page by page (``limit=3``), calling ``between(seen)`` before each
    further page."""
    seen, cursor = [], None
    for _ in range(40):
        page, cursor = await _listed(harness, f"limit=3{query}" + (f"&cursor={cursor}" if cursor else ""), token)
        seen += page
        if not cursor:
            return seen
        await between(seen)
    raise AssertionError("the pages did not end")


@pytest.mark.parametrize(("token", "query"), [
    ("admin", ""), ("hotline", ""), ("contractor", ""),
    ("admin", "&q=Anliegen"), ("hotline", "&q=Anliegen"), ("contractor", "&q=Anliegen"),
    ("hotline", "&q=zq"),  # a word that begins too many indexed words to list them
])
async def test_paging_lists_each_conversation_once_while_cases_arrive_and_change(harness, token, query):
    """A staff member pages through the inbox while residents write and colleagues act: every
    conversation that was there when the first page was read comes exactly once, in order,
    whatever arrives or changes state between two pages (new ones are above the cursor, and
    come with the next first page)."""
    topics = ["construction", "contract", "construction", "other", "construction"]
    cases = [await harness.core.ingest(webform_message(
        f"Anliegen zq{n:02d}", topic=topics[n % 5], postcode="12345" if n % 3 else "99999")) for n in range(16)]
    # more words beginning with "zq" than a search lists itself (router.search.MAX_TERMS)
    cases.append(await harness.core.ingest(webform_message(
        "Anliegen " + " ".join(f"zqx{n:02d}" for n in range(40)), topic="other")))
    units = api.visible_units(harness.config, next(m for m in harness.config.staff if m.name == token))
    expected = [c.conversation_id for c in reversed(cases)
                if (await harness.rows("SELECT unit FROM conversations WHERE id = ?", (c.conversation_id,)))[0]["unit"] in units]
    assert 5 < len(expected)
    token_of = {c.conversation_id: c.status_token for c in cases}
    arrived = iter(range(100))

    async def meanwhile(seen: list[int]) -> None:
        n = next(arrived)
        await harness.core.ingest(webform_message(f"Anliegen zq neu {n}"))  # a new case, in every token's units
        ahead = [i for i in expected if i not in seen]
        for target in (seen[-1], ahead[0]):  # a resident writes again in a listed case and in one to come
            await harness.core.ingest(webform_message(f"Anliegen zq Nachtrag {n}", thread={"status_token": token_of[target]}))
        for target, action in ((ahead[-1], "close"), (seen[0], "wait"), (ahead[0], "assign")):
            status, body = await harness.api("POST", f"/api/v1/conversations/{target}/{action}",
                                             json={"assignee": "Kim"} if action == "assign" else None)
            assert status in (200, 409), body
        await harness.api("POST", f"/api/v1/conversations/{seen[-1]}/replies", json={"text": "Wir kümmern uns."})
        await harness.run_outbox()

    assert await _page_through(harness, query, token, meanwhile) == expected


async def test_filters_combined_list_the_intersection(harness):
    """The filters unit, state, overdue, channel and q, in every combination, list what passes
    each of them and lies in the token's units (one, several or all)."""
    def whatsapp(text: str, number: str) -> dict:
        return webform_message(text, channel="whatsapp", sender={"kind": "whatsapp", "address": number, "display_name": "W"})

    async def batch(tag: str) -> None:
        for message in (webform_message(f"Zaun an der Baustelle {tag}"), webform_message(f"Zaun am Gehweg {tag}"),
                        webform_message(f"Bagger vor der Tür {tag}"),
                        webform_message(f"Zaun kaputt {tag}", topic="other", postcode="99999"),
                        webform_message(f"Zaun an der Baustelle {tag}", postcode="99999"),
                        whatsapp(f"Zaun an der Baustelle {tag}", f"49151{tag}1"), whatsapp(f"Bagger {tag}", f"49151{tag}2")):
            await harness.core.ingest(message)

    await batch("111")
    await harness.run_outbox()
    harness.clock.advance(timedelta(days=3))  # the first batch is overdue now
    await batch("222")
    await harness.run_outbox()
    for case in (2, 4, 9):  # closed: never overdue
        status, _ = await harness.api("POST", f"/api/v1/conversations/{case}/close")
        assert status == 200
    with_word = {r["conversation_id"] for r in await harness.rows(
        "SELECT conversation_id FROM messages WHERE direction = 'in' AND text LIKE 'Zaun%'")}
    _, everything = await harness.api("GET", "/api/v1/conversations?limit=200")
    items = everything["items"]
    assert len(items) == 14
    wanted = {"unit": "tiefbau-muster", "state": "acknowledged", "overdue": "true", "channel": "webform", "q": "Zaun"}
    results: dict[tuple[str, str, int], list[int]] = {}
    for token in ("admin", "hotline", "contractor"):
        units = api.visible_units(harness.config, next(m for m in harness.config.staff if m.name == token))
        for overdue in ("true", "false"):
            filters = {**wanted, "overdue": overdue}
            for mask in range(32):
                chosen = {k: v for n, (k, v) in enumerate(filters.items()) if mask >> n & 1}
                expected = [i["id"] for i in items if i["unit"] in units
                            and all(i["id"] in with_word if k == "q" else str(i[k]).lower() == v for k, v in chosen.items())]
                query = "&".join(f"{k}={v}" for k, v in chosen.items())
                assert await _listed(harness, query, token) == (expected, None), (token, query)
                results[token, overdue, mask] = expected
    assert results["admin", "true", 31] == [1]  # all five
    for n, name in enumerate(wanted):  # each filter decides somewhere, beside the others
        assert any(results[key] != results[key[0], key[1], key[2] & ~(1 << n)] for key in results if key[2] >> n & 1), name


# RFC 3339's date-time: a full date, "T", a full time with an optional fraction, and an offset.
_RFC3339 = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})"


async def test_times_carry_an_offset_and_overdue_begins_after_the_deadline(harness):
    """Deadlines and times are RFC 3339 with an offset; a conversation is overdue once its
    deadline has passed, not at it, and the list, the detail, both overdue filters and /stats
    agree at that instant and just after it. An answered or closed case is never overdue."""
    case = await _case(harness)
    answered = await _case(harness)
    closed = await _case(harness)
    status, _ = await harness.api("POST", f"/api/v1/conversations/{answered}/replies", json={"text": "Ab Freitag frei."})
    assert status == 201
    await harness.run_outbox()
    status, _ = await harness.api("POST", f"/api/v1/conversations/{closed}/close")
    assert status == 200
    status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
    times = [detail[k] for k in ("deadline", "created_at", "updated_at", "last_inbound_at")]
    times += [m["created_at"] for m in detail["messages"]] + [e["at"] for e in detail["events"]]
    for value in times:
        assert re.fullmatch(_RFC3339, value), value
    deadline = datetime.fromisoformat(detail["deadline"])
    assert deadline.utcoffset() == timedelta(0) and deadline > datetime.fromisoformat(detail["created_at"])
    _, answered_detail = await harness.api("GET", f"/api/v1/conversations/{answered}")
    assert answered_detail["state"] == "answered"

    async def seen() -> tuple:
        _, page = await harness.api("GET", "/api/v1/conversations")
        _, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
        late, _ = await _listed(harness, "overdue=true")
        in_time, _ = await _listed(harness, "overdue=false")
        _, stats = await harness.api("GET", "/api/v1/stats")
        (row,) = [r for r in stats["items"] if r["unit"] == "tiefbau-muster"]
        return ([i["id"] for i in page["items"] if i["overdue"]], detail["overdue"], late, in_time, row["overdue"])

    on_time = ([], False, [], [closed, answered, case], 0)
    harness.clock.set(deadline - timedelta(microseconds=1))
    assert await seen() == on_time
    harness.clock.set(deadline)
    assert await seen() == on_time
    harness.clock.set(deadline + timedelta(microseconds=1))
    assert await seen() == ([case], True, [case], [closed, answered], 1)
    harness.clock.set(deadline + timedelta(seconds=1))
    assert await seen() == ([case], True, [case], [closed, answered], 1)


async def test_a_contractor_sees_nothing_of_another_units_conversation_anywhere(harness):
    """Not in the list (by any filter or search), the detail, an action, /stats, a contact's view
    or a conversation linked to one of its own: another unit's case answers as if it did not
    exist, and nothing of it (words, names, addresses, case references) is in any answer."""
    own = await harness.core.ingest(webform_message("Baustelle vor dem Haus"))
    sales = await harness.core.ingest(webform_message(
        "Zebrastreifen Tarifwechsel", topic="contract", postcode="99999",
        sender={"kind": "email", "address": "geheim@example.com", "display_name": "Gisela Geheimrat"}))
    # the contractor's resident also wrote to customer care
    care = await harness.core.ingest(webform_message("Zebrastreifen Rechnung", topic="other", postcode="99999"))
    # a case of the contractor's, settled long ago: the resident writes again (a new case, linked to
    # it), and it is then moved to customer care, where it goes on without the contractor
    old = await harness.core.ingest(webform_message("Baustelle im Lindenweg", email="alt@example.net"))
    status, _ = await harness.api("POST", f"/api/v1/conversations/{old.conversation_id}/close")
    assert status == 200
    harness.clock.advance(timedelta(days=30))
    again = await harness.core.ingest(webform_message("Baustelle schon wieder", email="alt@example.net",
                                                      thread={"status_token": old.status_token}))
    assert (await harness.rows("SELECT linked_to, unit FROM conversations WHERE id = ?", (again.conversation_id,)))[0] == {
        "linked_to": old.conversation_id, "unit": "tiefbau-muster"}
    for action, body in (("reopen", None), ("transfer", {"unit": "kundenservice"}),
                         ("notes", {"text": "Zebrastreifen intern geklärt"})):
        status, answer = await harness.api("POST", f"/api/v1/conversations/{old.conversation_id}/{action}", json=body)
        assert status in (200, 201), answer
    others = [sales.conversation_id, care.conversation_id, old.conversation_id]
    references = [r["case_reference"] for r in await harness.rows(
        "SELECT case_reference FROM conversations WHERE id IN (?, ?)", (sales.conversation_id, care.conversation_id))]
    sales_contact, own_contact = [(await harness.rows("SELECT contact_id FROM conversations WHERE id = ?", (c,)))[0]["contact_id"]
                                  for c in (sales.conversation_id, own.conversation_id)]
    answers: list[object] = []

    async def ask(method: str, path: str, expected: int, **kwargs) -> object:
        status, body = await harness.api(method, path, token="contractor", **kwargs)
        assert status == expected, (path, body)
        answers.append(body)
        return body

    mine = [again.conversation_id, own.conversation_id]
    for query in ("", "unit=tiefbau-muster", "q=Baustelle", "state=open", "overdue=true", "overdue=false", "channel=webform"):
        listed = await ask("GET", f"/api/v1/conversations?{query}", 200)
        assert {i["id"] for i in listed["items"]} <= set(mine), query
    for query in ("unit=vertrieb", "unit=kundenservice", "q=Zebrastreifen", "q=Gisela", "q=geheim", "q=Rechnung",
                  f"contact={sales_contact}", *(f"q={r}" for r in references), f"q={references[0].lower()}"):
        assert (await ask("GET", f"/api/v1/conversations?{query}", 200))["items"] == [], query
    listed = await ask("GET", f"/api/v1/conversations?contact={own_contact}", 200)
    assert [i["id"] for i in listed["items"]] == [own.conversation_id]
    (linked,) = [i for i in (await ask("GET", "/api/v1/conversations", 200))["items"] if i["id"] == again.conversation_id]
    assert linked["linked_to"] == old.conversation_id
    for conversation_id in (*others, 999_999):  # as if it did not exist
        nowhere = await ask("GET", f"/api/v1/conversations/{conversation_id}", 404)
        assert nowhere == {"error": {"code": "not_found", "message": "conversation not found"}}
        for action, body in (("replies", {"text": "x"}), ("notes", {"text": "x"}), ("close", None), ("assign", {"assignee": "K"})):
            answer = await ask("POST", f"/api/v1/conversations/{conversation_id}/{action}", 404, json=body)
            assert answer["error"]["code"] == "not_found"
        answer = await ask("POST", f"/api/v1/conversations/{conversation_id}/replies", 404, json={"text": "x"},
                           headers={"Idempotency-Key": f"k-{conversation_id}"})
        assert answer["error"]["code"] == "not_found"
    await ask("GET", f"/api/v1/conversations/{again.conversation_id}", 200)
    await ask("GET", f"/api/v1/contacts/{sales_contact}", 404)
    await ask("GET", f"/api/v1/contacts/{own_contact}", 200)
    for query in ("", "?from=2026-01-01", "?from=2026-01-01&to=2027-12-31"):
        stats = await ask("GET", f"/api/v1/stats{query}", 200)
        assert {r["unit"] for r in stats["items"]} == {"tiefbau-muster"} and sum(r["received"] for r in stats["items"]) == 2
    assert (await ask("GET", "/api/v1/units", 200))["items"][0]["id"] == "tiefbau-muster"
    assert len((await ask("GET", "/api/v1/units", 200))["items"]) == 1
    assert (await ask("GET", "/api/v1/me", 200))["units"] == ["tiefbau-muster"]
    seen = json.dumps(answers, ensure_ascii=False)
    for secret in ("Zebrastreifen", "Gisela", "Geheimrat", "geheim@example.com", "Rechnung", "intern", *references):
        assert secret not in seen, secret
    # the hotline, which oversees the contractor, does not see the sales case either
    status, listed = await harness.api("GET", "/api/v1/conversations?q=Zebrastreifen", token="hotline")
    assert status == 200 and [i["id"] for i in listed["items"]] == [care.conversation_id]


async def test_every_4xx_is_the_json_error_naming_its_parameter(harness):
    """A client shows the staff member what to change: every refusal is a JSON error with a code
    and a message, and names the query parameter, path id or field it refuses."""
    import base64

    def cursor(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    case = await _case(harness)
    refused = [
        *(("GET", f"/api/v1/conversations?{p}={v}", p) for p, v in (
            ("unit", "nope"), ("unit", ""), ("state", "weird"), ("state", ""), ("overdue", "yes"), ("overdue", ""),
            ("overdue", "TRUE"), ("limit", "0"), ("limit", "201"), ("limit", "abc"), ("limit", ""), ("limit", "1.5"),
            ("cursor", "!!!"), ("cursor", cursor("c:0")), ("cursor", cursor("c:-1")), ("cursor", cursor("x:5")),
            ("cursor", cursor("c:4611686018427387905")), ("cursor", cursor("c:")), ("contact", "0"), ("contact", "abc"),
            ("contact", "4611686018427387905"), ("flag", "urgent"), ("flag", ""), ("q", "x" * 201),
            ("q", "+".join(["Wort"] * 11)))),
        ("GET", "/api/v1/stats?from=yesterday", "from"),
        ("GET", "/api/v1/stats?to=2026-02-30", "to"),
        ("GET", "/api/v1/stats?from=2026-03-02&to=2026-03-01", "to"),
        ("GET", "/api/v1/conversations/abc", "id"),
        ("GET", "/api/v1/conversations/0", "id"),
        ("GET", "/api/v1/contacts/4611686018427387905", "id"),
        ("POST", "/api/v1/conversations/0/replies", "id"),
        ("POST", f"/api/v1/conversations/{case}/replies", "text"),
        ("POST", f"/api/v1/conversations/{case}/assign", "assignee"),
        ("POST", f"/api/v1/conversations/{case}/transfer", "unit"),
        ("POST", f"/api/v1/conversations/{case}/callbacks", "outcome"),
    ]
    for method, path, field in refused:
        response = await harness.client.request(method, path, json={} if method == "POST" else None,
                                                headers={"Authorization": f"Bearer {harness.tokens['admin']}"})
        body = await response.json() if response.content_type == "application/json" else await response.text()
        assert response.status == 400 and isinstance(body, dict), (path, response.status, body)
        error = body["error"]
        assert set(body) == {"error"} and error["field"] == field, (path, body)
        assert error["code"] in ("invalid_parameter", "invalid_field") and error["message"], (path, body)
    for method, path, token, status, code in (
        ("GET", "/api/v1/conversations", None, 401, "unauthorized"),
        ("GET", f"/api/v1/conversations/{case}", "wrong-token", 401, "unauthorized"),
        ("GET", "/api/v1/conversations/999999", "admin", 404, "not_found"),
        ("GET", "/api/v1/contacts/999999", "admin", 404, "not_found"),
        ("DELETE", f"/api/v1/conversations/{case}", "admin", 405, "method_not_allowed"),
    ):
        answer_status, body = await harness.api(method, path, token=token)
        assert answer_status == status and body["error"]["code"] == code and body["error"]["message"], (path, body)
    assert await harness.count("messages", "direction = 'out' AND kind = 'reply'") == 0
