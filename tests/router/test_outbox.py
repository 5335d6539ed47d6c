"""The outbox: statuses that overtake the send, repeated callbacks, retries and fallbacks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
from datetime import UTC, datetime, timedelta, timezone

import pytest

from router import tracking
from router.hookspecs import (
    NOT_CONFIGURED,
    Capabilities,
    Channel,
    DeliveryUpdate,
    OutboundMessage,
    PermanentDeliveryError,
    ResendAsDeliveryError,
    RetryableDeliveryError,
    SendResult,
    hookimpl,
)
from router.inbox.queries import rfc3339
from router.outbox import OutboxPolicy, OutboxWorker, apply_delivery_update, claim_due
from router.store.sqlite import _connect, apply_migrations, iso
from router.testing import CoreHarness

from ..reliability.helpers import wait_until
from .helpers import vm_steps, webform_message

# How long a test waits for the worker's background work: ample on a busy machine, and well
# below the 30 s poll of the tests that show a new row wakes the worker without it.
WAIT = 10.0


class RaceChat(Channel):
    """A provider whose 'delivered' callback arrives before its send call returns."""

    name = "racechat"
    capabilities = Capabilities(identity_kinds=("phone",), delivery_receipts=True, threads_by_sender=True)

    def __init__(self) -> None:
        self.fail_next: list[Exception] = []
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        if self.fail_next:
            raise self.fail_next.pop(0)
        self.sent.append(message)
        provider_id = f"rc-{message.outbox_id}-{message.attempt}"
        await self.context.record_delivery(DeliveryUpdate(provider_id=provider_id, status="delivered"))
        return SendResult(provider_id=provider_id)


class Plugin:
    def __init__(self, channel: Channel | None = None) -> None:
        self.channel = channel or RaceChat()

    @hookimpl
    def register_channels(self):
        return [self.channel]


def inbound(key: str, text: str = "Hallo, wann wird die Straße wieder geöffnet?") -> dict:
    return {"channel": "racechat", "channel_message_id": key, "sender": {"kind": "phone", "address": "+4915112345678"}, "text": text}


async def test_a_status_that_overtakes_the_send_is_applied(tmp_path):
    plugin = Plugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        result = await harness.core.ingest(inbound("m1"))
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": "Ab Montag."})
        await harness.run_outbox()
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        reply = next(m for m in detail["messages"] if m["kind"] == "reply")
        assert reply["delivery_status"] == "delivered"
        assert detail["state"] == "answered"
        assert await harness.count("delivery_events", "outbox_id IS NULL") == 0


async def test_a_repeated_status_callback_changes_nothing(tmp_path):
    plugin = Plugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        await harness.core.ingest(inbound("m1"))
        await harness.run_outbox()
        provider_id = (await harness.rows("SELECT provider_id FROM outbox"))[0]["provider_id"]
        update = DeliveryUpdate(provider_id=provider_id, status="read", at=harness.clock.now())
        before = await harness.count("delivery_events")
        assert await harness.core.record_delivery("racechat", update) is True
        assert await harness.core.record_delivery("racechat", update) is True
        assert await harness.count("delivery_events") == before + 1


async def test_retryable_errors_are_retried_and_permanent_ones_flag_the_conversation(tmp_path):
    plugin = Plugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        plugin.channel.fail_next = [RetryableDeliveryError("503"), RetryableDeliveryError("timeout")]
        result = await harness.core.ingest(inbound("m1"))
        from datetime import timedelta

        for _ in range(10):  # the frozen clock moves past each backoff
            await harness.run_outbox()
            if plugin.channel.sent:
                break
            harness.clock.advance(timedelta(seconds=1))
        assert len(plugin.channel.sent) == 1 and plugin.channel.sent[0].attempt == 3
        keys = {row["idempotency_key"] for row in await harness.rows("SELECT idempotency_key FROM outbox")}
        assert plugin.channel.sent[0].idempotency_key in keys
        plugin.channel.fail_next = [PermanentDeliveryError("number unknown")]
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": "Antwort"})
        await harness.run_outbox()
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert {"undeliverable", "callback_required"} <= set(detail["flags"])
        reply = next(m for m in detail["messages"] if m["kind"] == "reply")
        assert reply["delivery_status"] == "failed" and reply["deliveries"][0]["last_error"] == "number unknown"


async def test_a_channel_that_keeps_crashing_is_given_up_on_like_a_failing_provider(tmp_path):
    """A plugin bug is retried with backoff, and after max_attempts the conversation is flagged
    for a call-back: never retried for ever with nobody told."""
    from datetime import timedelta

    from router.outbox import OutboxPolicy

    plugin = Plugin()
    policy = OutboxPolicy(base_delay=0.01, max_delay=0.05, poll_seconds=0.05, send_timeout=5, max_attempts=3, retry_seconds=0)
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy) as harness:
        plugin.channel.fail_next = [KeyError("bug")] * 10
        result = await harness.core.ingest(inbound("m1"))
        for _ in range(10):
            await harness.run_outbox()
            harness.clock.advance(timedelta(seconds=1))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        (ack,) = [m for m in detail["messages"] if m["kind"] == "ack"]
        assert ack["delivery_status"] == "failed"
        assert ack["deliveries"][0]["last_error"].startswith("gave up after 3 attempts: KeyError")
        assert {"undeliverable", "callback_required"} <= set(detail["flags"])
        assert len(plugin.channel.fail_next) == 7  # three attempts, then no more


OUTAGE_POLICY = OutboxPolicy(base_delay=0.01, max_delay=0.05, poll_seconds=0.05, send_timeout=5, max_attempts=3,
                             retry_seconds=3600)


async def _failing_for(harness: CoreHarness, plugin: Plugin, *, attempts: int, every: timedelta, failures: int = 0):
    """A message whose acknowledgement the provider refuses (503), tried ``attempts`` times
    ``every`` so long apart; the ingest result."""
    plugin.channel.fail_next = [RetryableDeliveryError("503 Service Unavailable")] * (failures or attempts)
    result = await harness.core.ingest(inbound("m1"))
    for _ in range(attempts):
        await harness.run_outbox()
        harness.clock.advance(every)
    return result


async def test_an_outage_longer_than_the_attempts_is_waited_out_for_retry_seconds(tmp_path):
    """Eight attempts with backoff took about three minutes: a provider down for ten lost every
    acknowledgement queued meanwhile for good (failed, flagged for a call-back, never resent).
    Now a row is retried until it has had its attempts and retry_seconds have passed."""
    plugin = Plugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=OUTAGE_POLICY) as harness:
        # six attempts in ten minutes: more than max_attempts, less than an hour
        result = await _failing_for(harness, plugin, attempts=6, every=timedelta(seconds=100))
        rows = await harness.rows("SELECT state, attempts FROM outbox WHERE kind = 'ack'")
        assert [(r["state"], r["attempts"]) for r in rows] == [("pending", 6)]
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert detail["pending_deliveries"] == 1 and "callback_required" not in detail["flags"]
        await harness.run_outbox()  # the provider is back
        assert [m.to for m in plugin.channel.sent] == [inbound("m1")["sender"]["address"]]
        assert (await harness.rows("SELECT state FROM outbox WHERE kind = 'ack'"))[0]["state"] == "sent"


async def test_a_row_is_given_up_once_it_had_its_attempts_and_retry_seconds_passed(tmp_path):
    plugin = Plugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=OUTAGE_POLICY) as harness:
        result = await _failing_for(harness, plugin, attempts=5, every=timedelta(minutes=20), failures=20)
        rows = await harness.rows("SELECT state, last_error FROM outbox WHERE kind = 'ack'")
        assert rows[0]["state"] == "failed" and rows[0]["last_error"].startswith("gave up after 4 attempts")
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert "callback_required" in detail["flags"]


async def test_an_answer_that_fails_for_good_puts_the_conversation_back_under_a_deadline(tmp_path):
    """A bounced answer left the case answered: no deadline, never escalated, never overdue,
    while the resident had heard nothing. With the answer lost, it waits for one again."""
    plugin = Plugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        result = await harness.core.ingest(inbound("m1"))
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": "Ab Montag."})
        await harness.run_outbox()
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert detail["state"] == "answered" and detail["deadline"] is None
        reply = next(m for m in detail["messages"] if m["kind"] == "reply")
        provider_id = (await harness.rows("SELECT provider_id FROM outbox WHERE message_id = ?", (reply["id"],)))[0]["provider_id"]
        await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=provider_id, status="failed", permanent=True,
                                                                      error_detail="mailbox unavailable"))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert detail["state"] == "acknowledged" and detail["deadline"] is not None
        assert {"undeliverable", "callback_required"} <= set(detail["flags"])
        assert any(e["kind"] == "answer_lost" for e in detail["events"])
        harness.clock.set(datetime.fromisoformat(detail["deadline"].replace("Z", "+00:00")) + timedelta(minutes=1))
        assert len(await harness.escalate()) == 1  # and escalates when nobody answers again


async def test_an_answer_lost_after_the_case_was_closed_reopens_it(tmp_path):
    """Answer and close at once, then the answer bounces: the case stayed closed, its flags in a
    list nobody looks at."""
    plugin = Plugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        result = await harness.core.ingest(inbound("m1"))
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": "Erledigt."})
        await harness.run_outbox()
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/close")
        (row,) = await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'reply'")
        await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=row["provider_id"], status="failed",
                                                                      permanent=True))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert detail["state"] == "acknowledged" and detail["deadline"] is not None
        assert any(e["kind"] == "answer_lost" for e in detail["events"])


async def test_a_failed_answer_followed_by_one_that_arrived_leaves_the_case_answered(tmp_path):
    plugin = Plugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        result = await harness.core.ingest(inbound("m1"))
        for text in ("Ab Montag.", "Korrektur: ab Dienstag."):
            await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": text})
            await harness.run_outbox()
        first = (await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'reply' ORDER BY id LIMIT 1"))[0]
        await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=first["provider_id"], status="failed",
                                                                      permanent=True))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert detail["state"] == "answered"


class SilentAfterChat(RaceChat):
    """RaceChat, whose provider reports nothing more for a send while ``quiet``: taken, on its
    way, and not (yet) delivered. ``receipts`` False: a provider without delivery receipts."""

    def __init__(self, receipts: bool = True) -> None:
        super().__init__()
        self.capabilities = dataclasses.replace(RaceChat.capabilities, delivery_receipts=receipts)
        self.quiet = False

    async def send(self, message: OutboundMessage) -> SendResult:
        if not self.quiet:
            return await super().send(message)
        self.sent.append(message)
        return SendResult(provider_id=f"rc-{message.outbox_id}-{message.attempt}")


@pytest.mark.parametrize("receipts", [True, False], ids=["receipts", "no-receipts"])
async def test_an_answer_lost_while_a_newer_one_is_only_on_its_way_waits_for_that_one(tmp_path, receipts):
    """The delivered answer was reported failed after all (a late bounce) while a newer answer
    was only sent, not delivered: the case stayed answered with no answer known to have reached
    the person, and nothing escalated it if the newer one never arrived. It waits again, and
    the newer answer answers it once delivered. Without delivery receipts, sent is delivered."""
    chat = SilentAfterChat(receipts)
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(chat)]) as harness:
        result = await harness.core.ingest(inbound("m1"))
        case = result.conversation_id
        await harness.api("POST", f"/api/v1/conversations/{case}/replies", json={"text": "Ab Montag."})
        await harness.run_outbox()
        chat.quiet = True
        await harness.api("POST", f"/api/v1/conversations/{case}/replies", json={"text": "Korrektur: ab Dienstag."})
        await harness.run_outbox()
        first, second = await harness.rows("SELECT provider_id, delivery_status FROM outbox WHERE kind = 'reply' ORDER BY id")
        assert (first["delivery_status"], second["delivery_status"]) == ("delivered", "sent")
        await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=first["provider_id"], status="failed",
                                                                      permanent=True))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
        if not receipts:
            assert detail["state"] == "answered"  # the newer answer went, and that is as good as delivered
            return
        assert detail["state"] == "acknowledged" and detail["deadline"] is not None
        assert [e["kind"] for e in detail["events"]].count("answer_lost") == 1
        await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=second["provider_id"], status="delivered"))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
        assert detail["state"] == "answered" and detail["deadline"] is None


@pytest.mark.parametrize("settled", ["wait", "close"])
async def test_an_answer_lost_on_a_settled_case_while_a_newer_one_is_on_its_way_waits_for_its_outcome(tmp_path, settled):
    """Staff answered twice and set the case waiting (or closed it); the first answer bounced
    while the second was on its way. Unlike an answered case, a waiting or closed one claims no
    answer arrived: it stays as staff left it until the newer answer's outcome is known, and
    that answer's loss reopens it."""
    chat = SilentAfterChat()
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(chat)]) as harness:
        case = (await harness.core.ingest(inbound("m1"))).conversation_id
        await harness.api("POST", f"/api/v1/conversations/{case}/replies", json={"text": "Ab Montag."})
        await harness.run_outbox()
        chat.quiet = True
        await harness.api("POST", f"/api/v1/conversations/{case}/replies", json={"text": "Korrektur: ab Dienstag."})
        await harness.run_outbox()
        status, _ = await harness.api("POST", f"/api/v1/conversations/{case}/{settled}")
        assert status == 200
        first, second = await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'reply' ORDER BY id")
        await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=first["provider_id"], status="failed",
                                                                      permanent=True))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
        assert detail["state"] == ("waiting" if settled == "wait" else "closed")
        await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=second["provider_id"], status="failed",
                                                                      permanent=True))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
        assert detail["state"] == "acknowledged" and detail["deadline"] is not None


class BouncingMail(Channel):
    """A mail channel whose every send is refused for good (the address bounces)."""

    name = "mailchat"
    capabilities = Capabilities(identity_kinds=("email",))

    async def send(self, message: OutboundMessage) -> SendResult:
        raise PermanentDeliveryError("550 mailbox unavailable")


async def test_an_answer_never_falls_back_to_a_number_a_stranger_typed_into_a_form(tmp_path):
    """A stranger sent the form with the resident's (still unknown) e-mail address and their own
    phone number; the resident's own mail then landed on that contact, and when the answer to it
    bounced, the fallback sent it by SMS to the stranger's phone."""
    phone = RaceChat()

    class Both:
        @hookimpl
        def register_channels(self):
            return [phone, BouncingMail()]

    async with CoreHarness(tmp_path / "d", plugins=[Both()]) as harness:
        await harness.core.ingest({"channel": "webform", "channel_message_id": "f1", "text": "Frage",
                                   "sender": {"kind": "email", "address": "erika@example.net",
                                              "other_identities": [{"kind": "phone", "address": "+4915199999999"}]}})
        mail = await harness.core.ingest({"channel": "mailchat", "channel_message_id": "<m1@example.net>",
                                          "text": "Meine Vertragsnummer ist 998877", "sender": {"kind": "email",
                                                                                             "address": "erika@example.net"}})
        await harness.api("POST", f"/api/v1/conversations/{mail.conversation_id}/replies",
                          json={"text": "Ihre Restschuld beträgt 1.234 EUR."})
        await harness.run_outbox()
        assert [m.to for m in phone.sent] == []
        assert await harness.count("outbox", "to_address = '+4915199999999'") == 0
        status, detail = await harness.api("GET", f"/api/v1/conversations/{mail.conversation_id}")
        assert "callback_required" in detail["flags"]


def test_the_backoff_of_a_row_retried_for_weeks_stays_a_number():
    from router.outbox import OutboxPolicy

    assert 450 <= OutboxPolicy().delay(5000) <= 900


def _database(path):
    """A migrated file with one outbound message for outbox rows to point at."""
    conn = _connect(path)
    conn.row_factory = sqlite3.Row
    apply_migrations(conn)
    conn.execute("INSERT INTO messages (id, direction, kind, channel, text, created_at) VALUES (1, 'out', 'ack', 'c', 't', 'x')")
    return conn


def _claim_cost(tmp_path, backlog: int) -> tuple[int, list[int]]:
    """SQLite VM steps of one claim of 10 rows with ``backlog`` rows due, and the ids claimed."""
    conn = _database(tmp_path / f"claim-{backlog}.sqlite3")
    conn.executemany(
        "INSERT INTO outbox (message_id, channel, kind, to_kind, to_address, state, next_attempt_at, idempotency_key,"
        " created_at, updated_at) VALUES (1, 'c', 'ack', 'phone', '+491701234567', 'pending', ?, ?, 'x', 'x')",
        [(f"2026-01-01T00:00:{i % 60:02d}.{i:06d}Z", f"k{i}") for i in range(backlog)],
    )
    steps, claimed = vm_steps(conn, lambda: claim_due(conn, datetime(2026, 1, 2, tzinfo=UTC), OutboxPolicy(batch_size=10)))
    return steps, [row["id"] for row in claimed]


def test_a_claim_reads_its_batch_not_the_whole_backlog(tmp_path):
    """Under load thousands of acknowledgements can be due at once; a claim of ten must not
    read and sort all of them (it did: one statement with OR and ORDER BY)."""
    small, first = _claim_cost(tmp_path, 20)
    large, _ = _claim_cost(tmp_path, 5000)
    assert len(first) == 10
    assert large < 2 * small, (small, large)


def test_a_claim_takes_the_rows_that_have_waited_longest_first(tmp_path):
    """With more rows due than a batch holds, those due earliest go first, after the rows a
    dead worker held: claimed newest first, a row due for an hour waited behind every new
    acknowledgement for as long as they kept coming."""
    conn = _database(tmp_path / "order.sqlite3")
    conn.executemany(
        "INSERT INTO outbox (id, message_id, channel, kind, to_kind, to_address, state, next_attempt_at, claimed_until,"
        " idempotency_key, created_at, updated_at) VALUES (?, 1, 'c', 'ack', 'phone', '+491701234567', ?, ?, ?, ?, 'x', 'x')",
        [(1, "pending", "2026-01-01T00:00:50.000000Z", None, "k1"),
         (2, "pending", "2026-01-01T00:00:10.000000Z", None, "k2"),
         (3, "pending", "2026-01-01T00:00:30.000000Z", None, "k3"),
         (4, "sending", "2026-01-01T00:00:55.000000Z", "2026-01-01T00:00:58.000000Z", "k4"),
         (5, "pending", "2026-01-01T00:00:20.000000Z", None, "k5")],
    )
    claimed = claim_due(conn, datetime(2026, 1, 1, 0, 1, tzinfo=UTC), OutboxPolicy(batch_size=3))
    assert sorted(row["id"] for row in claimed) == [2, 4, 5]


def _status_cost(tmp_path, history: int) -> tuple[int, str]:
    """VM steps of one status callback with ``history`` earlier statuses of other messages
    stored, and the outbox row's delivery status afterwards."""
    conn = _database(tmp_path / f"status-{history}.sqlite3")
    conn.execute(
        "INSERT INTO outbox (id, message_id, channel, kind, to_kind, to_address, state, next_attempt_at, idempotency_key,"
        " provider_id, delivery_status, created_at, updated_at)"
        " VALUES (1, 1, 'c', 'ack', 'phone', '+491701234567', 'sent', 'x', 'k', 'wamid.ours', 'sent', 'x', 'x')"
    )
    conn.executemany(
        "INSERT INTO delivery_events (channel, provider_id, status, at) VALUES ('c', ?, 'read', 'x')",
        [(f"wamid.other.{i}",) for i in range(history)],
    )
    now = datetime(2026, 1, 2, tzinfo=UTC)
    steps, _ = vm_steps(conn, lambda: apply_delivery_update(
        conn, "c", DeliveryUpdate(provider_id="wamid.ours", status="delivered"), frozenset(), {}, now))
    return steps, conn.execute("SELECT delivery_status FROM outbox WHERE id = 1").fetchone()[0]


def test_a_status_callback_does_not_read_every_status_ever_received(tmp_path):
    """Providers report sent, delivered and read for every message: the check for a repeated
    callback read the whole delivery_events table each time (a scan; millions of rows in a
    year), inside the write transaction every message waits for."""
    small, status = _status_cost(tmp_path, 20)
    large, _ = _status_cost(tmp_path, 5000)
    assert status == "delivered"
    assert large < 2 * small, (small, large)


class StaggeredChat(Channel):
    """A provider whose answers come back one after another, as real ones do; a send to
    ``hold_for`` waits until the test releases it."""

    name = "staggered"
    capabilities = Capabilities(identity_kinds=("phone",), delivery_receipts=True, threads_by_sender=True)

    def __init__(self) -> None:
        self.hold_for: str | None = None
        self.release = asyncio.Event()
        self.calls = 0

    async def send(self, message: OutboundMessage) -> SendResult:
        self.calls += 1
        if message.to == self.hold_for:
            await self.release.wait()
        else:
            await asyncio.sleep(0.001 * (self.calls % 4))
        return SendResult(provider_id=f"st-{message.outbox_id}")


async def _ingest_senders(harness: CoreHarness, count: int) -> None:
    for i in range(count):
        await harness.core.ingest({"channel": "staggered", "channel_message_id": f"s{i}", "text": "Baustelle vor dem Haus",
                                   "sender": {"kind": "phone", "address": f"+4915112345{i:03d}"}})


@contextlib.asynccontextmanager
async def idle_worker(harness: CoreHarness):
    """The outbox worker's loop, started and waiting: its first, empty claim is committed, so
    that what the test does next meets a worker that sleeps until something wakes it."""
    commits = harness.core.store.commits
    worker = asyncio.create_task(harness.core.outbox.run())
    await wait_until(lambda: harness.core.store.commits > commits, WAIT, 0.005)
    await asyncio.sleep(0.005)  # from the claim's commit into the wait
    try:
        yield worker
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker


async def test_the_outcomes_of_a_batch_are_committed_together(tmp_path):
    """Twelve acknowledgements, four sends at a time, answers arriving one after another: one
    transaction claims them and one records every outcome. Recorded as they came, each outcome
    cost a commit with its fsync, more than the send itself."""
    plugin = Plugin(StaggeredChat())
    policy = OutboxPolicy(concurrency=4, poll_seconds=0.05, send_timeout=5, gather_seconds=5)
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy) as harness:
        await _ingest_senders(harness, 12)
        commits = harness.core.store.commits
        assert await harness.core.outbox.run_once() == 12
        assert harness.core.store.commits - commits == 2
        assert await harness.count("outbox", "state = 'sent'") == 12
        assert await harness.count("conversations", "state = 'acknowledged'") == 12


async def test_a_slow_send_holds_back_the_outcomes_of_the_others_no_longer_than_gather_seconds(tmp_path):
    plugin = Plugin(StaggeredChat())
    plugin.channel.hold_for = "+4915112345000"
    policy = OutboxPolicy(concurrency=4, poll_seconds=0.05, send_timeout=5, gather_seconds=0.05)
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy) as harness:
        await _ingest_senders(harness, 6)
        batch = asyncio.create_task(harness.core.outbox.run_once())
        await wait_until(lambda: _sent(harness, 5), WAIT, 0.01)
        assert await harness.count("outbox", "state = 'sent'") == 5
        assert await harness.count("outbox", "state = 'sending'") == 1
        assert not batch.done()
        plugin.channel.release.set()
        assert await batch == 6
        assert await harness.count("outbox", "state = 'sent'") == 6


async def test_a_batch_that_was_not_full_is_not_claimed_again_at_once(tmp_path):
    """After a batch that took everything due the worker waits for new rows (or the poll)
    instead of claiming again: at a low rate that empty claim was one commit in four."""
    plugin = Plugin(StaggeredChat())
    policy = OutboxPolicy(poll_seconds=30, send_timeout=5)
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy) as harness, idle_worker(harness):
        commits = harness.core.store.commits
        await _ingest_senders(harness, 1)  # one commit, and it wakes the worker
        await wait_until(lambda: _sent(harness, 1), WAIT, 0.01)
        await asyncio.sleep(0.2)
        assert await harness.count("outbox", "state = 'sent'") == 1
        assert harness.core.store.commits - commits == 3  # the message, the claim, the outcome
        await _ingest_senders(harness, 2)  # a new row wakes the worker again
        await wait_until(lambda: _sent(harness, 2), WAIT, 0.01)
        assert await harness.count("outbox", "state = 'sent'") == 2


async def _sent(harness: CoreHarness, rows: int) -> bool:
    return await harness.count("outbox", "state = 'sent'") == rows


class FallbackChat(StaggeredChat):
    """A second channel that reaches the same phone numbers (as SMS does)."""

    name = "fallback"


class TwoChannels:
    def __init__(self) -> None:
        self.channel, self.fallback = StaggeredChat(), FallbackChat()

    @hookimpl
    def register_channels(self):
        return [self.channel, self.fallback]


@pytest.mark.parametrize("failure", ["resend", "permanent", "gave up"])
async def test_a_row_its_own_batch_made_due_goes_out_at_once_not_at_the_next_poll(tmp_path, failure):
    """The worker no longer claims again after a batch that was not full: a row that the
    batch's own outcome made due (a resend in another form, a fallback to another channel)
    must wake it, or it waits for the poll."""
    plugins = TwoChannels()
    error = {"resend": ResendAsDeliveryError("outside the window", hint="template"),
             "permanent": PermanentDeliveryError("not on this channel"),
             "gave up": RetryableDeliveryError("503")}[failure]
    send = plugins.channel.send

    async def failing_first(message: OutboundMessage) -> SendResult:
        if message.attempt == 1 and message.hint is None:
            raise error
        return await send(message)

    plugins.channel.send = failing_first
    policy = OutboxPolicy(poll_seconds=30, send_timeout=5, max_attempts=1, retry_seconds=0)
    async with CoreHarness(tmp_path / "d", plugins=[plugins], outbox_policy=policy) as harness, idle_worker(harness):
        await _ingest_senders(harness, 1)
        await wait_until(lambda: _sent(harness, 1), WAIT, 0.01)
        sent = await harness.rows("SELECT channel, hint FROM outbox WHERE state = 'sent'")
        if failure == "resend":
            assert sent == [{"channel": "staggered", "hint": "template"}]
        else:
            assert sent == [{"channel": "fallback", "hint": None}]


async def test_a_failure_reported_before_a_resent_row_was_recorded_sends_its_fallback_at_once(tmp_path):
    """A worker died after the provider took the message; its failure callback arrived and was
    kept unmatched. When the lease expires the row is sent again (same idempotency key, same
    provider id), and recording that send applies the failure: its fallback is due at once."""
    plugins = TwoChannels()

    async def same_id_per_key(message: OutboundMessage) -> SendResult:
        return SendResult(provider_id=f"p-{message.idempotency_key}")

    plugins.channel.send = same_id_per_key
    policy = OutboxPolicy(poll_seconds=30, send_timeout=5, lease_seconds=120)
    async with CoreHarness(tmp_path / "d", plugins=[plugins], outbox_policy=policy) as harness:
        await _ingest_senders(harness, 1)
        [item] = await harness.core.store.write(lambda conn: claim_due(conn, harness.clock.now(), policy))  # then it died
        failed = DeliveryUpdate(provider_id=f"p-{item['idempotency_key']}", status="failed")
        assert await harness.core.record_delivery("staggered", failed) is False  # not known yet: kept
        async with idle_worker(harness) as worker:
            harness.clock.advance(timedelta(seconds=121))
            harness.core.outbox.wake.set()  # the lease ran out: the poll's turn, without the wait
            await wait_until(lambda: _sent(harness, 1), WAIT, 0.01)
            rows = await harness.rows("SELECT channel, state FROM outbox ORDER BY id")
            assert rows == [{"channel": "staggered", "state": "failed"}, {"channel": "fallback", "state": "sent"}]
            assert not worker.done()


async def test_a_channel_that_returns_no_send_result_is_retried_like_a_crash(tmp_path):
    plugin = Plugin(StaggeredChat())

    async def returns_nothing(message: OutboundMessage) -> None:
        return None

    plugin.channel.send = returns_nothing
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        await _ingest_senders(harness, 1)
        assert await harness.core.outbox.run_once() == 1
        [row] = await harness.rows("SELECT state, last_error FROM outbox")
        assert row == {"state": "pending", "last_error": "the channel returned NoneType, not a SendResult"}



class OvertakenChat(StaggeredChat):
    """A provider whose failure callback for the first attempt arrives before the send returns."""

    def __init__(self, failure: DeliveryUpdate) -> None:
        super().__init__()
        self.failure = failure

    async def send(self, message: OutboundMessage) -> SendResult:
        provider_id = f"ov-{message.outbox_id}-{message.attempt}"
        if message.attempt == 1:
            await self.context.record_delivery(dataclasses.replace(self.failure, provider_id=provider_id))
        return SendResult(provider_id=provider_id)


@pytest.mark.parametrize(("failure", "expected"), [
    # 131047 (outside the 24-hour window): the same row again, as the template
    (DeliveryUpdate(provider_id="", status="failed", resend_hint="template", permanent=False),
     [{"channel": "staggered", "state": "sent", "hint": "template", "attempts": 2}]),
    # a failure that is not permanent: the same row again later, no fallback
    (DeliveryUpdate(provider_id="", status="failed", permanent=False),
     [{"channel": "staggered", "state": "pending", "hint": None, "attempts": 1}]),
    # a permanent one: the other channel
    (DeliveryUpdate(provider_id="", status="failed"),
     [{"channel": "staggered", "state": "failed", "hint": None, "attempts": 1},
      {"channel": "fallback", "state": "sent", "hint": None, "attempts": 1}]),
])
async def test_a_failure_that_overtakes_the_send_is_applied_as_the_provider_asked(tmp_path, failure, expected):
    """A failed status that arrives before the send's outcome is recorded used to be kept
    without its resend hint and as permanent: a message outside WhatsApp's window was then
    sent to another channel (or given up) instead of being sent again as the template."""
    plugins = TwoChannels()
    plugins.channel = OvertakenChat(failure)
    async with CoreHarness(tmp_path / "d", plugins=[plugins]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        rows = await harness.rows("SELECT channel, state, hint, attempts FROM outbox ORDER BY id")
        assert rows == expected


class LateFailureChat(StaggeredChat):
    """A provider whose permanent failure for the first attempt arrives while the second attempt
    (a retry after a failure that was not permanent) is on its way."""

    def __init__(self, second_id: str) -> None:
        super().__init__()
        self.second_id = second_id

    async def send(self, message: OutboundMessage) -> SendResult:
        if message.attempt == 1:
            return SendResult(provider_id="late-1")
        await self.context.record_delivery(DeliveryUpdate(provider_id="late-1", status="failed"))
        return SendResult(provider_id=self.second_id)


@pytest.mark.parametrize(("second_id", "expected"), [
    # the second attempt was taken: the first attempt's failure changes nothing
    ("late-2", [{"channel": "staggered", "state": "sent", "provider_id": "late-2"}]),
    # the provider gave the second attempt the first one's id (the same idempotency key): the
    # failure is this send's, and is applied once it is recorded
    ("late-1", [{"channel": "staggered", "state": "failed", "provider_id": "late-1"},
                {"channel": "fallback", "state": "sent", "provider_id": "st-2"}]),
])
async def test_a_late_failure_of_an_earlier_attempt_does_not_overrule_the_send_under_way(tmp_path, second_id, expected):
    """A failure callback names the provider id of a send. While the row is being sent again,
    the id on the row is the earlier attempt's: acting on it failed the row and queued its
    fallback, and then the send under way marked the same row sent, so the person got the
    message on both channels."""
    plugins = TwoChannels()
    plugins.channel = LateFailureChat(second_id)
    async with CoreHarness(tmp_path / "d", plugins=[plugins]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        retry = DeliveryUpdate(provider_id="late-1", status="failed", error_code="131000", permanent=False)
        assert await harness.core.record_delivery("staggered", retry) is True
        harness.clock.advance(timedelta(seconds=38))
        await harness.run_outbox()
        await harness.run_outbox()
        rows = await harness.rows("SELECT channel, state, provider_id FROM outbox ORDER BY id")
        assert rows == expected
        flags = await harness.rows("SELECT flags FROM conversations")
        assert "undeliverable" not in flags[0]["flags"]


class ReportsFailedChat(StaggeredChat):
    """A provider that takes every send and reports it failed later (WhatsApp's 131048 spam
    rate limit, Twilio's 30008, a temporary bounce): the status is what says it failed."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        return SendResult(provider_id=f"rf-{message.outbox_id}-{message.attempt}")


async def _report_failed(harness: CoreHarness, update: DeliveryUpdate) -> None:
    [row] = await harness.rows("SELECT provider_id FROM outbox WHERE channel = 'staggered'")
    assert await harness.core.record_delivery("staggered", dataclasses.replace(update, provider_id=row["provider_id"]))


async def test_a_send_the_provider_keeps_reporting_failed_is_given_up_and_falls_back(tmp_path):
    """A failure the provider reports as not permanent was retried every 30 s for ever, past
    max_attempts: no fallback, no flag, nobody told, and every send paid for."""
    plugins = TwoChannels()
    plugins.channel = ReportsFailedChat()
    policy = OutboxPolicy(poll_seconds=0.05, send_timeout=5, max_attempts=3)  # the default retry_seconds: a refusal is no outage
    failed = DeliveryUpdate(provider_id="", status="failed", error_code="131048", permanent=False)
    async with CoreHarness(tmp_path / "d", plugins=[plugins], outbox_policy=policy) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        await _report_failed(harness, failed)
        harness.clock.advance(timedelta(seconds=29))  # not within seconds: at least 30 s
        await harness.run_outbox()
        assert len(plugins.channel.sent) == 1
        for attempt in (2, 3):
            harness.clock.advance(timedelta(seconds=120))
            await harness.run_outbox()
            assert len(plugins.channel.sent) == attempt
            await _report_failed(harness, failed)
        await harness.run_outbox()
        rows = await harness.rows("SELECT channel, state, attempts, last_error FROM outbox ORDER BY id")
        assert rows == [{"channel": "staggered", "state": "failed", "attempts": 3, "last_error": "gave up after 3 attempts: 131048"},
                        {"channel": "fallback", "state": "sent", "attempts": 1, "last_error": None}]
        assert len(plugins.channel.sent) == 3
        # a rate limit that did not lift says nothing about the number
        assert await harness.count("identities", "failed_at IS NOT NULL") == 0


class DeduplicatingChat(StaggeredChat):
    """A provider that deduplicates by idempotency key, as plugins are told to use it: a send
    under a key it has seen answers with that send's id and sends nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.by_key: dict[str, str] = {}
        self.delivered: list[tuple[int, str | None]] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        if message.idempotency_key not in self.by_key:
            self.by_key[message.idempotency_key] = f"dd-{len(self.by_key) + 1}"
            self.delivered.append((message.attempt, message.hint))
        return SendResult(provider_id=self.by_key[message.idempotency_key])


@pytest.mark.parametrize("failure", [
    DeliveryUpdate(provider_id="", status="failed", error_code="131000", permanent=False),
    DeliveryUpdate(provider_id="", status="failed", error_code="131047", resend_hint="template", permanent=False),
])
async def test_a_send_the_provider_reported_failed_goes_again_under_a_key_of_its_own(tmp_path, failure):
    """Under the same key a deduplicating provider answered with the failed send's id and sent
    nothing, and the row was marked sent: the person got nothing, not even the template."""
    plugin = Plugin(DeduplicatingChat())
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        [first] = await harness.rows("SELECT idempotency_key FROM outbox")
        await _report_failed(harness, failure)
        harness.clock.advance(timedelta(seconds=120))
        await harness.run_outbox()
        assert plugin.channel.delivered == [(1, None), (2, failure.resend_hint)]
        [row] = await harness.rows("SELECT state, provider_id, idempotency_key FROM outbox")
        assert row["state"] == "sent" and row["provider_id"] == "dd-2"
        assert row["idempotency_key"] != first["idempotency_key"]


async def test_a_send_refused_for_another_form_goes_again_under_a_key_of_its_own(tmp_path):
    """A provider that deduplicates by key keeps its answer to a key, a refusal too: the same
    message in another form under the refused send's key would be refused again."""
    plugin = Plugin(DeduplicatingChat())
    refused: set[str] = set()
    deliver = plugin.channel.send

    async def outside_the_window(message: OutboundMessage) -> SendResult:
        if message.idempotency_key in refused or message.hint is None:
            refused.add(message.idempotency_key)
            raise ResendAsDeliveryError("outside the 24-hour window", hint="template")
        return await deliver(message)

    plugin.channel.send = outside_the_window
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        await harness.run_outbox()
        assert plugin.channel.delivered == [(2, "template")]
        assert await harness.count("outbox", "state = 'sent'") == 1


class LostAnswerChat(StaggeredChat):
    """A provider that takes the first send and reports on it, while its answer to the send
    itself never arrives (a timeout): only the status, with the key echoed, tells it went out."""

    def __init__(self, echoes_key: bool) -> None:
        super().__init__()
        self.echoes_key = echoes_key
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        if len(self.sent) == 1:
            key = message.idempotency_key if self.echoes_key else None
            await self.context.record_delivery(DeliveryUpdate(provider_id="lost-1", status="sent", idempotency_key=key))
            raise RetryableDeliveryError("the provider did not answer in time", code="timeout")
        return SendResult(provider_id=f"lost-{len(self.sent)}")


@pytest.mark.parametrize("echoes_key", [True, False])
async def test_a_send_whose_answer_was_lost_is_not_sent_again_when_a_status_names_its_key(tmp_path, echoes_key):
    """The issue's worker-crash promise: duplicates are avoided where the provider offers a key.
    WhatsApp echoes it in every status; a provider that does not gets the message twice."""
    plugin = Plugin(LostAnswerChat(echoes_key))
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        harness.clock.advance(timedelta(seconds=60))
        await harness.run_outbox()
        [row] = await harness.rows("SELECT state, provider_id, attempts FROM outbox")
        assert row == {"state": "sent", "provider_id": "lost-1" if echoes_key else "lost-2", "attempts": 2}
        assert len(plugin.channel.sent) == (1 if echoes_key else 2)
        assert await harness.count("delivery_events", "outbox_id IS NULL") == (0 if echoes_key else 1)
        assert await harness.count("conversations", "state = 'acknowledged'") == 1


async def test_a_status_that_names_the_key_of_a_row_waiting_to_be_sent_again_records_the_send(tmp_path):
    """The answer to the send timed out and the row waits for its retry; then the provider's
    status arrives, with the key: the send went through, and is not made again."""
    plugin = Plugin(StaggeredChat())
    sent: list[OutboundMessage] = []

    async def times_out(message: OutboundMessage) -> SendResult:
        sent.append(message)
        raise TimeoutError

    plugin.channel.send = times_out
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        [row] = await harness.rows("SELECT state, idempotency_key FROM outbox")
        assert row["state"] == "pending"
        delivered = DeliveryUpdate(provider_id="wamid.late", status="delivered", idempotency_key=row["idempotency_key"])
        assert await harness.core.record_delivery("staggered", delivered) is True
        harness.clock.advance(timedelta(seconds=60))
        await harness.run_outbox()
        assert len(sent) == 1
        [row] = await harness.rows("SELECT state, provider_id, delivery_status FROM outbox")
        assert row == {"state": "sent", "provider_id": "wamid.late", "delivery_status": "delivered"}


class SilentlyTakingChat(StaggeredChat):
    """A provider that takes the first send without answering in time (or refuses it with a
    503), then takes every later one; its statuses echo the key if ``status_wait`` is set."""

    def __init__(self, status_wait: timedelta | None, outcome_unknown: bool) -> None:
        super().__init__()
        self.capabilities = dataclasses.replace(StaggeredChat.capabilities, status_wait=status_wait)
        self.outcome_unknown = outcome_unknown
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        if len(self.sent) == 1:
            raise RetryableDeliveryError("no answer" if self.outcome_unknown else "503", code="timeout" if self.outcome_unknown else "503",
                                         outcome_unknown=self.outcome_unknown)
        return SendResult(provider_id=f"taken-{len(self.sent)}")


@pytest.mark.parametrize(
    "status_wait, outcome_unknown, sends_after_5s",
    [
        pytest.param(timedelta(seconds=20), True, 1, id="echoes-key-no-answer"),
        pytest.param(None, True, 2, id="no-key-in-statuses"),
        pytest.param(timedelta(seconds=20), False, 2, id="refused-503"),
    ],
)
async def test_a_send_without_an_answer_waits_for_a_status_where_statuses_echo_the_key(
    tmp_path, status_wait, outcome_unknown, sends_after_5s
):
    """After a timeout the first retry came due within 1 to 2 s, before a status of the send
    that went through could arrive, and the message went twice. Where statuses echo the key,
    the retry now waits ``status_wait``; where they don't, or the provider refused the send (it
    answered), backoff alone decides."""
    plugin = Plugin(SilentlyTakingChat(status_wait, outcome_unknown))
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        harness.clock.advance(timedelta(seconds=5))
        await harness.run_outbox()
        assert len(plugin.channel.sent) == sends_after_5s
        if sends_after_5s == 1:
            [row] = await harness.rows("SELECT state, idempotency_key, next_attempt_at FROM outbox")
            wait = (datetime.fromisoformat(row["next_attempt_at"]) - harness.clock.now()).total_seconds() + 5
            assert row["state"] == "pending" and 20 <= wait <= 25
            status = DeliveryUpdate(provider_id="taken-1", status="sent", idempotency_key=row["idempotency_key"])
            assert await harness.core.record_delivery("staggered", status) is True
            harness.clock.advance(timedelta(seconds=30))
            await harness.run_outbox()
            assert len(plugin.channel.sent) == 1
        [row] = await harness.rows("SELECT state, provider_id FROM outbox")
        assert row == {"state": "sent", "provider_id": "taken-1" if sends_after_5s == 1 else "taken-2"}


async def test_rows_reported_failed_together_do_not_all_come_due_at_the_same_instant(tmp_path):
    """A temporary failure waits at least 30 s; at that floor every row got exactly 30 s, so a
    provider's burst of failures came back as one burst."""
    plugins = TwoChannels()
    plugins.channel = ReportsFailedChat()
    failed = DeliveryUpdate(provider_id="", status="failed", error_code="130429", permanent=False)
    async with CoreHarness(tmp_path / "d", plugins=[plugins]) as harness:
        await _ingest_senders(harness, 8)
        await harness.run_outbox()
        for row in await harness.rows("SELECT provider_id FROM outbox WHERE channel = 'staggered'"):
            assert await harness.core.record_delivery("staggered", dataclasses.replace(failed, provider_id=row["provider_id"]))
        rows = await harness.rows("SELECT next_attempt_at FROM outbox WHERE state = 'pending'")
        waits = {(datetime.fromisoformat(r["next_attempt_at"]) - harness.clock.now()).total_seconds() for r in rows}
        assert len(rows) == 8 and len(waits) > 1
        assert all(30 <= w <= 37.5 for w in waits)


async def test_a_retry_with_no_status_kept_for_its_key_costs_no_extra_commit(tmp_path):
    """Before a retry the worker looks for a status of the earlier send. It looked inside a
    write unit, a commit of its own for every retried row though nearly always nothing is found."""
    plugin = Plugin(SilentlyTakingChat(None, True))
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        harness.clock.advance(timedelta(seconds=5))
        commits = harness.core.store.commits
        assert await harness.core.outbox.run_once() == 1
        assert harness.core.store.commits - commits == 2  # the claim and the outcome
        assert len(plugin.channel.sent) == 2


async def test_a_status_still_being_committed_when_the_retry_looks_is_seen(tmp_path):
    """The look for an earlier send's status is a read when nothing is being written; a read
    sees only what is committed, so a status whose write is queued or under way at that moment
    was missed and the message went twice. While writes are pending the look is a write unit,
    queued behind them."""
    plugin = Plugin(SilentlyTakingChat(timedelta(seconds=20), True))
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        [row] = await harness.rows("SELECT idempotency_key FROM outbox")
        harness.clock.advance(timedelta(seconds=60))
        store, write = harness.core.store, harness.core.store.write
        statuses: list[asyncio.Task] = []

        async def status_right_after_the_claim(work):
            result = await write(work)
            if not statuses and isinstance(result, list) and result and "idempotency_key" in result[0]:
                status = DeliveryUpdate(provider_id="taken-1", status="sent", idempotency_key=row["idempotency_key"])
                statuses.append(asyncio.create_task(harness.core.record_delivery("staggered", status)))
                await asyncio.sleep(0)  # its unit is queued, not committed
            return result

        store.write = status_right_after_the_claim
        try:
            assert await harness.core.outbox.run_once() == 1
            await asyncio.gather(*statuses)
        finally:
            store.write = write
        assert len(statuses) == 1 and len(plugin.channel.sent) == 1
        [row] = await harness.rows("SELECT state, provider_id FROM outbox")
        assert row == {"state": "sent", "provider_id": "taken-1"}


class HangingChat(SilentlyTakingChat):
    """The first send never answers: the worker's own ``send_timeout`` ends it."""

    async def send(self, message: OutboundMessage) -> SendResult:
        if not self.sent:
            self.sent.append(message)
            await asyncio.sleep(3600)
        return await super().send(message)


async def test_a_send_the_worker_stopped_waiting_for_waits_for_its_status_too(tmp_path):
    plugin = Plugin(HangingChat(timedelta(seconds=20), True))
    policy = OutboxPolicy(base_delay=0.01, max_delay=0.05, poll_seconds=0.05, send_timeout=0.2)
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        [row] = await harness.rows("SELECT state, last_error FROM outbox")
        assert row == {"state": "pending", "last_error": "timed out"}
        harness.clock.advance(timedelta(seconds=5))
        await harness.run_outbox()
        assert len(plugin.channel.sent) == 1  # not within the backoff: the status may yet come
        harness.clock.advance(timedelta(seconds=30))
        await harness.run_outbox()
        assert len(plugin.channel.sent) == 2


class TakenWhileTheDiskFills(StaggeredChat):
    """The provider takes the message; meanwhile the database stops taking writes, for a while."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[OutboundMessage] = []
        self.harness: CoreHarness | None = None

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        assert self.harness is not None
        self.harness.refuse_writes()
        asyncio.get_running_loop().call_later(0.2, self.harness.refuse_writes, False)
        return SendResult(provider_id=f"disk-{len(self.sent)}")


async def test_a_send_whose_outcome_the_database_refused_is_recorded_once_it_is_back(tmp_path):
    """The outcome's commit failed and was dropped: the row stayed 'sending' and went out a
    second time once its lease ran out (an e-mail or SMS twice). It is tried again instead."""
    plugin = Plugin(TakenWhileTheDiskFills())
    policy = OutboxPolicy(base_delay=0.01, max_delay=0.05, poll_seconds=0.05, send_timeout=5, outcome_retry_seconds=0.1)
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy) as harness:
        plugin.channel.harness = harness
        await _ingest_senders(harness, 1)
        assert await harness.core.outbox.run_once() == 1
        [row] = await harness.rows("SELECT state, provider_id, attempts FROM outbox")
        assert row == {"state": "sent", "provider_id": "disk-1", "attempts": 1}
        harness.clock.advance(timedelta(seconds=300))  # past any lease
        await harness.run_outbox()
        assert len(plugin.channel.sent) == 1


class NeverAnswers(SilentlyTakingChat):
    """Every send goes without an answer; statuses (if any) come from the test."""

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        raise RetryableDeliveryError("no answer", code="timeout", outcome_unknown=True)


@pytest.mark.parametrize("status_comes", [True, False])
async def test_the_last_attempt_waits_for_its_status_before_falling_back(tmp_path, status_comes):
    """At max_attempts a send without an answer was given up at once and fell back to another
    channel; when its status then showed it had gone through, the person had it twice."""
    plugins = TwoChannels()
    plugins.channel = NeverAnswers(timedelta(seconds=20), True)
    policy = OutboxPolicy(base_delay=0.01, max_delay=0.05, poll_seconds=0.05, send_timeout=5, max_attempts=2, retry_seconds=0)
    async with CoreHarness(tmp_path / "d", plugins=[plugins], outbox_policy=policy) as harness:
        await _ingest_senders(harness, 1)
        for _ in range(2):
            await harness.run_outbox()
            harness.clock.advance(timedelta(seconds=5))
        assert len(plugins.channel.sent) == 1  # the first retry waits for a status, too
        harness.clock.advance(timedelta(seconds=30))
        await harness.run_outbox()
        assert len(plugins.channel.sent) == 2
        [row] = await harness.rows("SELECT state, idempotency_key, last_error FROM outbox")
        assert row["state"] == "pending" and row["last_error"].endswith("waiting for a status of the last one")
        if status_comes:
            status = DeliveryUpdate(provider_id="wamid.last", status="delivered", idempotency_key=row["idempotency_key"])
            assert await harness.core.record_delivery("staggered", status) is True
        harness.clock.advance(timedelta(seconds=30))
        await harness.run_outbox()
        await harness.run_outbox()
        assert len(plugins.channel.sent) == 2  # no third send either way
        rows = await harness.rows("SELECT channel, state, last_error FROM outbox ORDER BY id")
        if status_comes:
            assert [(r["channel"], r["state"]) for r in rows] == [("staggered", "sent")]
        else:
            assert [(r["channel"], r["state"]) for r in rows] == [("staggered", "failed"), ("fallback", "sent")]
            assert rows[0]["last_error"] == "gave up after 2 attempts: no answer"


class CancellingChat(StaggeredChat):
    """A plugin whose send awaits a task of its own that something else cancelled (a shared
    login refresh that a timed-out send took down with it)."""

    name = "staggered"

    def __init__(self) -> None:
        super().__init__()
        self.cancel_next = 1

    async def send(self, message: OutboundMessage) -> SendResult:
        if self.cancel_next:
            self.cancel_next -= 1
            shared = asyncio.get_running_loop().create_future()
            shared.cancel()
            await shared  # raises CancelledError inside the plugin
        return await super().send(message)




class RefusingEveryForm(StaggeredChat):
    async def send(self, message: OutboundMessage) -> SendResult:
        self.calls += 1
        raise ResendAsDeliveryError("not in this form either", hint="template" if message.hint is None else "text")


async def test_a_channel_that_refuses_every_form_is_given_up_not_asked_for_ever(tmp_path):
    """Each refusal was resent at once without counting: about a thousand provider calls a
    second, for ever, and the person never flagged for a call-back."""
    plugin = Plugin(RefusingEveryForm())
    policy = OutboxPolicy(poll_seconds=0.05, send_timeout=5, base_delay=0.01, max_delay=0.02, max_attempts=3)  # the default retry_seconds: a refusal is no outage
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy) as harness:
        await _ingest_senders(harness, 1)
        for _ in range(30):
            await harness.run_outbox()
            await asyncio.sleep(0.03)
            if await harness.count("outbox", "state = 'failed'"):
                break
        assert await harness.count("outbox", "state = 'failed'") == 1
        assert plugin.channel.calls <= 6
        (conversation,) = await harness.rows("SELECT flags FROM conversations")
        assert "callback_required" in conversation["flags"]


async def test_a_row_for_a_channel_no_longer_configured_is_given_up_and_leaves_a_trace(tmp_path):
    """Retried for ever: the acknowledgement stayed pending and the conversation showed nothing."""
    policy = OutboxPolicy(poll_seconds=0.05, send_timeout=5, base_delay=0.01, max_delay=0.02, max_attempts=3, retry_seconds=0)
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(StaggeredChat())], outbox_policy=policy) as harness:
        await _ingest_senders(harness, 1)
        harness.core.channels.pop("staggered")  # as if its plugin were gone after a restart
        for _ in range(10):
            await harness.run_outbox()
            harness.clock.advance(timedelta(seconds=1))
            if await harness.count("outbox", "state = 'failed'"):
                break
        assert await harness.count("outbox", "state = 'failed'") == 1
        (conversation,) = await harness.rows("SELECT flags FROM conversations")
        assert "callback_required" in conversation["flags"]


async def test_attempts_run_out_on_a_plugin_error_without_marking_the_address_failed(tmp_path):
    """A bug in a plugin (or a provider's outage) marked the person's number as failed, for
    every later reply; only the provider refusing the recipient says the address is wrong."""
    plugins = TwoChannels()

    async def broken(message: OutboundMessage) -> SendResult:
        raise KeyError("to")

    plugins.channel.send = broken
    policy = OutboxPolicy(poll_seconds=30, send_timeout=5, max_attempts=1, retry_seconds=0)
    async with CoreHarness(tmp_path / "d", plugins=[plugins], outbox_policy=policy) as harness:
        await _ingest_senders(harness, 1)
        for _ in range(3):
            await harness.run_outbox()
        assert await harness.rows("SELECT channel, state FROM outbox ORDER BY id") == [
            {"channel": "staggered", "state": "failed"}, {"channel": "fallback", "state": "sent"}]
        assert await harness.count("identities", "failed_at IS NOT NULL") == 0


@pytest.mark.parametrize("address_failed", [True, False])
async def test_a_permanent_error_marks_the_address_failed_only_when_it_says_so(tmp_path, address_failed):
    """An empty text or a channel without configuration marked the person's number as failed
    for every later reply; the plugin says whether the address is what failed."""
    plugins = TwoChannels()

    async def refuse(message: OutboundMessage) -> SendResult:
        raise PermanentDeliveryError("refused", code="x", address_failed=address_failed)

    plugins.channel.send = refuse
    async with CoreHarness(tmp_path / "d", plugins=[plugins]) as harness:
        await _ingest_senders(harness, 1)
        for _ in range(2):
            await harness.run_outbox()
        assert await harness.count("outbox", "channel = 'fallback' AND state = 'sent'") == 1
        assert await harness.count("identities", "failed_at IS NOT NULL") == int(address_failed)


async def test_a_lost_answer_does_not_reopen_a_case_the_resident_wrote_in_since(tmp_path):
    """The resident thanked, staff closed, then the provider reported the answer failed: the
    case was reopened and escalated."""
    plugin = Plugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        result = await harness.core.ingest(inbound("m1"))
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": "Erledigt."})
        await harness.run_outbox()
        await harness.core.ingest(inbound("m2", "Danke, alles klar!"))
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/close")
        (row,) = await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'reply'")
        await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=row["provider_id"], status="failed",
                                                                      permanent=True))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert detail["state"] == "closed"


async def test_an_acknowledgement_that_fails_after_the_case_was_closed_puts_nobody_on_the_call_back_list(harness):
    """Closed before its acknowledgement went (a duplicate, spam): the failure flagged the
    closed case callback_required, and it showed on the call-back list."""
    from router.channel import PermanentDeliveryError

    case = (await harness.core.ingest(webform_message(email="weg@example.org"))).conversation_id
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/close")
    assert status == 200 and detail["state"] == "closed"

    async def refuse(message):
        raise PermanentDeliveryError("recipient refused")

    for channel in harness.core.channels.values():
        channel.send = refuse
    await harness.run_outbox()
    status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
    assert (detail["state"], detail["flags"]) == ("closed", [])
    assert [e["kind"] for e in detail["events"]].count("undeliverable") == 1
    status, listing = await harness.api("GET", "/api/v1/conversations?flag=callback_required")
    assert listing["items"] == []


class PluginAbort(BaseException):
    """Another framework's exception that is no ``Exception`` (trio's, gevent's Timeout)."""


class AbortingChat(StaggeredChat):
    def __init__(self) -> None:
        super().__init__()
        self.abort_next = 1

    async def send(self, message: OutboundMessage) -> SendResult:
        if self.abort_next:
            self.abort_next -= 1
            raise PluginAbort("boom")
        return await super().send(message)


@pytest.mark.parametrize(("channel", "error"), [
    (CancellingChat, "cancelled inside the plugin"),  # as if the service were stopping: nothing logged
    (AbortingChat, "PluginAbort: boom"),  # through ``except Exception``
])
async def test_a_plugin_error_that_is_no_exception_does_not_end_the_outbox(tmp_path, channel, error):
    """Either ended the worker's loop: the row stayed 'sending', every message after it stayed
    queued until a restart, webhooks still answered 2xx, and /healthz said ok."""
    plugin = Plugin(channel())
    policy = OutboxPolicy(poll_seconds=0.05, send_timeout=5, base_delay=0.01, max_delay=0.05)
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy) as harness, idle_worker(harness) as worker:
        await _ingest_senders(harness, 2)
        await wait_until(lambda: _sent(harness, 2), WAIT, 0.01)
        assert not worker.done()
        errors = [r["last_error"] for r in await harness.rows("SELECT last_error FROM outbox ORDER BY id")]
        assert sum(error in (e or "") for e in errors) == 1, errors  # retried, then sent


class CarelessChat(StaggeredChat):
    """A plugin that passes an exception as the message, or Retry-After as the header's text."""

    def __init__(self, error) -> None:
        super().__init__()
        self.error = error

    async def send(self, message: OutboundMessage) -> SendResult:
        self.calls += 1
        raise self.error()


@pytest.mark.parametrize(("error", "state", "last_error"), [
    (lambda: PermanentDeliveryError(ValueError("number unknown")), "failed", "number unknown"),
    (lambda: RetryableDeliveryError(OSError("connection reset")), "pending", "connection reset"),
    (lambda: RetryableDeliveryError("429 Too Many Requests", retry_after="30"), "pending", "429 Too Many Requests"),
    (lambda: RetryableDeliveryError("slow down", retry_after="soon"), "pending", "slow down"),
])
async def test_an_error_with_a_value_of_the_wrong_type_is_recorded_all_the_same(tmp_path, error, state, last_error):
    """Its outcome could not be recorded (``error[:1000]`` of an exception, ``max("30", ...)``):
    the row stayed 'sending' and went out again at every lease, for ever; a permanent one
    never fell back and never flagged the person for a call-back."""
    plugin = Plugin(CarelessChat(error))
    policy = OutboxPolicy(poll_seconds=0.05, send_timeout=5, base_delay=0.01, max_delay=0.05, max_attempts=3, retry_seconds=0)
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox(rounds=1)
        (row,) = await harness.rows("SELECT state, last_error, next_attempt_at FROM outbox")
        assert (row["state"], row["last_error"]) == (state, last_error)
        if last_error == "429 Too Many Requests":  # the provider's 30 s, not the backoff's fraction of a second
            wait = datetime.fromisoformat(row["next_attempt_at"].replace("Z", "+00:00")) - harness.clock.now()
            assert timedelta(seconds=29) <= wait <= timedelta(seconds=31), wait
        if state == "failed":
            (conversation,) = await harness.rows("SELECT flags FROM conversations")
            assert "callback_required" in conversation["flags"]


def test_a_retry_after_is_seconds_or_nothing():
    assert RetryableDeliveryError("x", retry_after="30").retry_after == 30.0
    assert RetryableDeliveryError("x", retry_after=2).retry_after == 2.0
    assert RetryableDeliveryError("x", retry_after=0).retry_after == 0.0
    for value in ("soon", -1, float("nan"), float("inf"), "1e12", 10**5000, True, None, object()):
        assert RetryableDeliveryError("x", retry_after=value).retry_after is None, value


def test_a_worker_loop_closed_at_teardown_ends(caplog):
    """``except BaseException`` took in GeneratorExit too: a loop closed at the event loop's end
    logged "outbox batch failed" and awaited again, which a closed coroutine may not."""
    import logging
    import types

    from router.core import Core

    async def forever() -> None:
        await asyncio.sleep(3600)  # a batch, or an escalation pass, in flight

    worker = object.__new__(OutboxWorker)
    worker.run_once = forever
    worker.policy = types.SimpleNamespace(batch_size=10, poll_seconds=1)
    worker.wake = asyncio.Event()
    core = object.__new__(Core)
    core.escalate_due = forever
    for coro in (worker.run(), core.run_scheduler()):
        loop = asyncio.new_event_loop()
        try:
            task = loop.create_task(coro)
            loop.run_until_complete(asyncio.sleep(0.01))
            with caplog.at_level(logging.ERROR):
                coro.close()  # what becomes of a pending task's coroutine dropped at shutdown
        finally:
            task._log_destroy_pending = False
            loop.close()
    assert "failed" not in caplog.text


async def test_a_late_status_of_the_acknowledgement_does_not_undo_the_answer(tmp_path):
    """The acknowledgement makes an open conversation acknowledged, and nothing else: its
    'read' coming after staff answered put the case back to waiting for an answer, without a
    deadline: neither done nor ever escalated."""
    plugin = Plugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        result = await harness.core.ingest(inbound("m1"))
        await harness.run_outbox()
        (ack,) = await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'ack'")
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": "Ab Montag."})
        await harness.run_outbox()
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert detail["state"] == "answered"
        harness.clock.advance(timedelta(minutes=1))
        await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=ack["provider_id"], status="read"))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert (detail["state"], detail["deadline"]) == ("answered", None)


class MailRecorder(Channel):
    """An e-mail channel that keeps what it was asked to send; the addresses in ``refuse``
    bounce for good."""

    name = "email"
    capabilities = Capabilities(identity_kinds=("email",))

    def __init__(self, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        if message.to in self.refuse:
            raise PermanentDeliveryError("550 mailbox unavailable")
        self.sent.append(message)
        return SendResult(provider_id=f"mail-{message.outbox_id}-{message.attempt}")


async def test_a_units_notification_never_carries_the_residents_status_link(tmp_path):
    """The status link is the resident's key to the conversation: the mail telling a unit it
    owns the case must not hand it over (the e-mail channel writes a status_url into the mail,
    and a contractor kept it after the case moved on)."""
    mail = MailRecorder()
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(mail)]) as harness:
        result = await harness.core.ingest(webform_message())
        harness.clock.set(result.deadline + timedelta(minutes=1))
        assert len(await harness.escalate()) == 1
        await harness.run_outbox()
        notices = [m for m in mail.sent if m.kind == "notification"]
        assert notices and result.case_reference in notices[0].text
        assert all(m.status_url is None for m in notices)


class SmsChat(Channel):
    """A second channel to the same numbers (SMS beside a chat): takes every send, or refuses
    every one for good."""

    name = "smschat"
    capabilities = Capabilities(identity_kinds=("phone",))

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        if self.refuse:
            raise PermanentDeliveryError("21610 unsubscribed")
        self.sent.append(message)
        return SendResult(provider_id=f"sms-{message.outbox_id}-{message.attempt}")


def _chat_and_sms(sms: SmsChat):
    class Both:
        @hookimpl
        def register_channels(self):
            return [RaceChat(), sms]

    return Both()


async def _answered_then_failed(harness) -> int:
    """A chat case whose answer was delivered, then reported failed for good; returns its id."""
    result = await harness.core.ingest(inbound("m1"))
    await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": "Ab Montag."})
    await harness.run_outbox()
    (reply,) = await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'reply'")
    await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=reply["provider_id"], status="failed",
                                                                  permanent=True, at=harness.clock.now()))
    return result.conversation_id


async def test_an_answer_whose_fallback_fails_too_is_lost(tmp_path):
    """The answer failed on the chat and its fallback by SMS was refused as well: nobody got it,
    so the case waits for an answer again. The failed first try is no copy that arrived."""
    async with CoreHarness(tmp_path / "d", plugins=[_chat_and_sms(SmsChat(refuse=True))]) as harness:
        case = await _answered_then_failed(harness)
        await harness.run_outbox()  # the fallback by SMS, refused
        assert await harness.count("outbox", "kind = 'reply' AND state = 'failed'") == 2
        status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
        assert detail["state"] == "acknowledged" and detail["deadline"] is not None
        assert any(e["kind"] == "answer_lost" for e in detail["events"])


async def test_a_second_failed_status_after_the_fallback_arrived_flags_nothing(tmp_path):
    """A provider reports a failure twice (Twilio: undelivered, then failed); the answer went out
    by SMS meanwhile. The second report put the case on the call-back list all the same."""
    sms = SmsChat()
    async with CoreHarness(tmp_path / "d", plugins=[_chat_and_sms(sms)]) as harness:
        case = await _answered_then_failed(harness)
        await harness.run_outbox()
        assert [m.kind for m in sms.sent] == ["reply"]
        harness.clock.advance(timedelta(seconds=30))
        (reply,) = await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'reply' AND channel = 'racechat'")
        await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=reply["provider_id"], status="failed",
                                                                      permanent=True, at=harness.clock.now()))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{case}")
        assert detail["flags"] == [] and detail["state"] == "answered"
        assert not any(e["kind"] == "undeliverable" for e in detail["events"])


async def test_a_notification_that_reaches_the_new_owner_clears_owner_not_notified(tmp_path):
    """The flag says the current owner was never told: once a later notification reaches the
    unit that owns the case now, it goes, or the case stays on that list for good."""
    mail = MailRecorder(refuse=frozenset({"bau@example.org"}))
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(mail)]) as harness:
        result = await harness.core.ingest(webform_message())
        harness.clock.set(result.deadline + timedelta(minutes=1))
        assert [e["to_unit"] for e in await harness.escalate()] == ["bauhotline"]
        await harness.run_outbox()  # bau@example.org bounces
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert "owner_not_notified" in detail["flags"]
        harness.clock.advance(timedelta(days=1))
        assert [e["to_unit"] for e in await harness.escalate()] == ["kundenservice"]
        await harness.run_outbox()  # service@example.org takes it
        assert [m.to for m in mail.sent if m.kind == "notification"] == ["service@example.org"]
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert "owner_not_notified" not in detail["flags"]


class AskingForTheSameForm(StaggeredChat):
    async def send(self, message: OutboundMessage) -> SendResult:
        self.calls += 1
        raise ResendAsDeliveryError("outside the 24-hour window", hint="template")


async def test_a_channel_that_asks_again_for_the_form_it_was_sent_in_waits_its_backoff(tmp_path):
    """A refusal asking for the form the row was just sent in is a refusal like any other: sent
    again after the backoff, not at once (a provider call per claim, until the attempts ran out)."""
    plugin = Plugin(AskingForTheSameForm())
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()  # the frozen clock: a backoff never falls due here
        assert plugin.channel.calls == 2  # as text, then once as the template it asked for
        (row,) = await harness.rows("SELECT state, hint, attempts, next_attempt_at FROM outbox")
        assert (row["state"], row["hint"], row["attempts"]) == ("pending", "template", 2)
        assert row["next_attempt_at"] > iso(harness.clock.now())


class GatedChat(Channel):
    """A chat whose inbound messages come over HTTP and whose sends wait at a gate the test
    opens: a staff answer is on its way while the resident writes again."""

    name = "gatedchat"
    capabilities = Capabilities(identity_kinds=("phone",), delivery_receipts=True, threads_by_sender=True)

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = asyncio.Event()
        self.sent: list[OutboundMessage] = []

    def routes(self) -> list:
        from aiohttp import web

        async def receive(request: web.Request) -> web.Response:
            body = await request.json()
            await self.context.ingest({
                "channel": self.name, "channel_message_id": body["id"], "text": body["text"],
                "sender": {"kind": "phone", "address": "+4915112345678"}, "ack_suppressed": body.get("auto"),
            })
            return web.json_response({"ok": True})

        return [web.post("/inbound", receive)]

    async def send(self, message: OutboundMessage) -> SendResult:
        self.in_flight.set()
        await self.gate.wait()
        self.sent.append(message)
        return SendResult(provider_id=f"gc-{message.outbox_id}-{message.attempt}")


async def _write_while_the_answer_is_on_its_way(harness: CoreHarness, chat: GatedChat, body: dict) -> dict:
    """The resident's first message, acknowledged; a staff answer whose send is held at the gate
    while ``body`` comes in over HTTP; then the answer is delivered. Returns the detail."""
    assert (await harness.client.post("/channels/gatedchat/inbound", json={"id": "m1", "text": "Wann ist die Straße frei?"})).status == 200
    await harness.run_outbox()
    (conv,) = await harness.rows("SELECT id FROM conversations")
    status, _ = await harness.api("POST", f"/api/v1/conversations/{conv['id']}/replies", json={"text": "Ab Freitag."})
    assert status == 201
    chat.gate.clear()
    chat.in_flight.clear()
    sending = asyncio.create_task(harness.run_outbox())
    await asyncio.wait_for(chat.in_flight.wait(), 5)
    harness.clock.advance(timedelta(minutes=3))
    answer = await harness.client.post("/channels/gatedchat/inbound", json=body)
    assert answer.status == 200
    harness.clock.advance(timedelta(minutes=1))
    chat.gate.set()
    await sending
    reply = await harness.rows("SELECT delivery_status FROM messages WHERE kind = 'reply'")
    assert reply == [{"delivery_status": "sent"}]
    sent = chat.sent[-1]
    await harness.core.record_delivery("gatedchat", DeliveryUpdate(provider_id=f"gc-{sent.outbox_id}-{sent.attempt}",
                                                                   status="delivered"))
    status, detail = await harness.api("GET", f"/api/v1/conversations/{conv['id']}")
    assert status == 200
    return detail


async def test_a_message_written_while_the_answer_was_on_its_way_is_still_to_be_answered(tmp_path):
    """The answer reached the resident, but it was written before their next message: that one
    waits for an answer, its deadline counted from when it came. Marked answered, the
    conversation kept no deadline, and the second question was never answered nor escalated."""
    chat = GatedChat()
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(chat)]) as harness:
        written = harness.clock.now() + timedelta(minutes=3)
        detail = await _write_while_the_answer_is_on_its_way(harness, chat, {"id": "m2", "text": "Und wer repariert den Zaun?"})
        assert detail["state"] == "acknowledged"
        assert detail["deadline"] == rfc3339(iso(tracking.deadline_for(harness.config, detail["unit"], written)))
        assert [e["kind"] for e in detail["events"]][-2:] == ["answered", "awaiting_answer"]
        assert detail["first_answered_at"] is not None  # the first answer did reach the resident
        assert await harness.escalate() == []
        harness.clock.advance(timedelta(days=30))
        assert [e["conversation"]["id"] for e in await harness.escalate()] == [detail["id"]]


async def test_an_auto_reply_that_came_while_the_answer_was_on_its_way_changes_nothing(tmp_path):
    chat = GatedChat()
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(chat)]) as harness:
        detail = await _write_while_the_answer_is_on_its_way(
            harness, chat, {"id": "m2", "text": "Ich bin bis Montag nicht im Büro.", "auto": "auto-reply"})
        assert detail["state"] == "answered" and detail["deadline"] is None


async def test_a_copy_of_an_answer_delivered_after_the_resident_wrote_again_answers_nothing(harness):
    """The answer reached the resident on the form's page; its copy by mail was delivered only
    after the resident had asked again. The copy marked the conversation answered a second
    time (a second event and hook) and restarted the new question's deadline and escalation
    level, though it was written before that question and answers nothing of it."""
    from router.outbox import OutboxPolicy, record_sent

    case = await harness.core.ingest(webform_message())
    await harness.run_outbox()
    status, reply = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/replies",
                                      json={"text": "Die Baugrube wird am Freitag geschlossen."})
    assert status == 201
    await harness.core.store.write(lambda conn: conn.execute(  # its copy by mail, still on its way
        "INSERT INTO outbox (message_id, conversation_id, channel, kind, to_kind, to_address, primary_delivery, state,"
        " attempts, next_attempt_at, created_at, updated_at, idempotency_key) SELECT message_id, conversation_id, 'email',"
        " kind, 'email', 'anwohner@example.net', 0, 'sending', 1, created_at, created_at, created_at,"
        " idempotency_key || '-copy' FROM outbox WHERE message_id = ?", (reply["id"],)))
    await harness.run_outbox()  # the answer on the page: answered
    harness.clock.advance(timedelta(minutes=10))
    await harness.core.ingest(webform_message("Und der Gehweg?", thread={"status_token": case.status_token}))
    harness.clock.advance(timedelta(hours=5))
    assert [e["level"] for e in await harness.escalate()] == [1]
    before = (await harness.rows("SELECT * FROM conversations WHERE id = ?", (case.conversation_id,)))[0]

    def copy_delivered(conn):
        copy = conn.execute("SELECT * FROM outbox WHERE channel = 'email' AND message_id = ?", (reply["id"],)).fetchone()
        return record_sent(conn, copy, "mail-1", "sent", None, True, harness.clock.now(), OutboxPolicy())

    assert await harness.core.store.write(copy_delivered) is None
    after = (await harness.rows("SELECT * FROM conversations WHERE id = ?", (case.conversation_id,)))[0]
    assert {k: after[k] for k in ("state", "deadline", "escalation_level", "unit")} == {
        k: before[k] for k in ("state", "deadline", "escalation_level", "unit")}
    assert await harness.count("events", "conversation_id = ? AND kind = 'answered'", (case.conversation_id,)) == 1


async def _answer_with_a_copy_on_its_way(harness):
    """A web-form case, acknowledged, and a staff answer with a mail copy of it being sent."""
    case = await harness.core.ingest(webform_message())
    await harness.run_outbox()
    status, reply = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/replies",
                                      json={"text": "Die Baugrube wird am Freitag geschlossen."})
    assert status == 201
    await harness.core.store.write(lambda conn: conn.execute(
        "INSERT INTO outbox (message_id, conversation_id, channel, kind, to_kind, to_address, primary_delivery, state,"
        " attempts, next_attempt_at, created_at, updated_at, idempotency_key) SELECT message_id, conversation_id, 'email',"
        " kind, 'email', 'anwohner@example.net', 0, 'sending', 1, created_at, created_at, created_at,"
        " idempotency_key || '-copy' FROM outbox WHERE message_id = ?", (reply["id"],)))
    return case, reply


async def _lose_the_answer_on_the_page(harness, reply):
    """The answer's own delivery (on the web form's page) fails for good."""
    from router.outbox import OutboxPolicy, record_failure

    def primary_lost(conn):
        primary = conn.execute("SELECT id FROM outbox WHERE channel = 'webform' AND message_id = ?", (reply["id"],)).fetchone()
        record_failure(conn, primary["id"], "bounced", None, harness.core.channels, harness.clock.now(),
                       address_failed=False, policy=OutboxPolicy())

    await harness.core.store.write(primary_lost)


async def test_a_copy_of_an_answer_that_was_lost_answers_when_it_arrives(harness):
    """The answer's own delivery failed for good after it had counted (a bounce), so the
    conversation waits again; its copy, still on its way then, arrives later: that is the
    answer reaching the resident, and it answers the conversation."""
    from router.outbox import OutboxPolicy, record_sent

    case, reply = await _answer_with_a_copy_on_its_way(harness)
    await harness.run_outbox()
    harness.clock.advance(timedelta(minutes=10))

    await _lose_the_answer_on_the_page(harness, reply)
    (row,) = await harness.rows("SELECT state FROM conversations WHERE id = ?", (case.conversation_id,))
    assert row["state"] == "acknowledged"

    def copy_delivered(conn):
        copy = conn.execute("SELECT * FROM outbox WHERE channel = 'email' AND message_id = ?", (reply["id"],)).fetchone()
        return record_sent(conn, copy, "mail-1", "sent", None, True, harness.clock.now(), OutboxPolicy())

    assert await harness.core.store.write(copy_delivered) is not None
    (row,) = await harness.rows("SELECT state FROM conversations WHERE id = ?", (case.conversation_id,))
    assert row["state"] == "answered"


async def test_a_channel_is_told_when_the_person_sent_their_latest_message_by_the_providers_clock(tmp_path):
    """A reply window counted from a message's arrival stays open after the provider closed it
    when the provider delivered the message late: the channel also gets the latest send time
    its provider gave (``sent_at``, any offset), which is not the latest message to arrive."""
    sms = SmsChat()
    async with CoreHarness(tmp_path / "d", plugins=[_chat_and_sms(sms)]) as harness:
        start = harness.clock.now()

        def message(key: str, ago: timedelta | None) -> dict:
            sent = {"sent_at": (start - ago).astimezone(timezone(timedelta(hours=2))).isoformat()} if ago else {}
            return {"channel": "smschat", "channel_message_id": key, "sender": {"kind": "phone", "address": "+4915112345678"},
                    "text": "Wann kommt der Anschluss?", **sent}

        await harness.core.ingest(message("s1", timedelta(hours=1)))
        harness.clock.advance(timedelta(minutes=5))
        await harness.core.ingest(message("s2", timedelta(hours=30)))  # delivered late, after s1
        await harness.run_outbox()
        assert {(m.last_inbound_at, m.last_inbound_sent_at) for m in sms.sent} == {
            (start + timedelta(minutes=5), start - timedelta(hours=1))}

        harness.clock.advance(timedelta(minutes=5))
        await harness.core.ingest(message("s3", None))  # no send time: its arrival counts
        await harness.run_outbox()
        assert (sms.sent[-1].last_inbound_at, sms.sent[-1].last_inbound_sent_at) == (harness.clock.now(),) * 2


async def test_the_latest_send_time_is_looked_up_without_reading_the_persons_whole_history(tmp_path):
    """Messages are read newest first, only back to one that arrived before the latest send
    time found: a contact with hundreds of messages costs what one with two does."""
    sms = SmsChat()
    async with CoreHarness(tmp_path / "d", plugins=[_chat_and_sms(sms)]) as harness:
        await harness.core.ingest({"channel": "smschat", "channel_message_id": "first", "text": "Hallo",
                                   "sender": {"kind": "phone", "address": "+4915112345678"}})
        (contact,) = await harness.rows("SELECT contact_id FROM messages WHERE channel_message_id = 'first'")
        for n in range(300):
            harness.clock.advance(timedelta(minutes=1))
            await harness.core.store.write(lambda conn, n=n: conn.execute(
                "INSERT INTO messages (contact_id, direction, kind, channel, channel_message_id, text, payload, created_at)"
                " VALUES (?, 'in', 'message', 'smschat', ?, 'x', ?, ?)",
                (contact["contact_id"], f"h{n}", json.dumps({"sent_at": iso(harness.clock.now() - timedelta(seconds=2))}),
                 iso(harness.clock.now()))))
        from router.outbox import _last_inbound

        def lookup(conn):
            return _last_inbound(conn, contact["contact_id"], "smschat")

        steps, (arrived, sent) = await harness.core.store.write(lambda conn: vm_steps(conn, lambda: lookup(conn)))
        assert arrived == iso(harness.clock.now()) and sent == iso(harness.clock.now() - timedelta(seconds=2))
        assert steps < 20, steps


class QuietChat(StaggeredChat):
    """A chat whose provider takes every send and reports nothing by itself: the test sends
    the statuses."""

    name = "quietchat"


async def _end_state(harness: CoreHarness, conversation_id: int) -> dict:
    """What a conversation, its messages, deliveries and addresses came to: every column of the
    conversation but its random reference and token, and which answers answered it or were
    lost (``answered`` and ``answer_lost`` events, what ``answered_by`` reads). The other events
    are its history, which tells the order the statuses came in."""
    (conv,) = await harness.rows("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
    for random_column in ("case_reference", "status_token"):
        conv.pop(random_column)
    messages = await harness.rows("SELECT id, kind, delivery_status FROM messages WHERE conversation_id = ? ORDER BY id",
                                  (conversation_id,))
    rows = await harness.rows("SELECT message_id, channel, state, delivery_status FROM outbox WHERE conversation_id = ?"
                              " ORDER BY id", (conversation_id,))
    events = await harness.rows("SELECT kind, json_extract(data, '$.message_id') AS message_id FROM events"
                                " WHERE conversation_id = ? AND kind IN ('answered', 'answer_lost')", (conversation_id,))
    identities = await harness.rows("SELECT kind, address, failed_at FROM identities ORDER BY id")
    return {"conversation": conv, "messages": messages, "outbox": rows, "identities": identities,
            "events": sorted((e["kind"], e["message_id"]) for e in events)}


# Two staff answers (0 and 1) in one conversation, both taken by the provider, and what it then
# reports of them together (a WhatsApp webhook's list of statuses, Twilio callbacks at once).
OUTCOMES_TOGETHER = {
    "first delivered, second failed": [(0, "delivered"), (1, "failed")],
    "first failed, second delivered": [(0, "failed"), (1, "delivered")],
    "first read, second failed": [(0, "read"), (1, "failed")],
    "one answer delivered and failed": [(0, "delivered"), (0, "failed")],
    "both failed": [(0, "failed"), (1, "failed")],
}


@pytest.mark.parametrize("close", [False, True], ids=["open", "closed"])
@pytest.mark.parametrize("outcomes", list(OUTCOMES_TOGETHER.values()), ids=list(OUTCOMES_TOGETHER))
async def test_delivery_outcomes_reported_together_give_the_same_result_in_either_order(tmp_path, outcomes, close):
    """The order in which a provider lists the statuses of one batch is no order of events:
    the first answer delivered and the second lost left the case answered when the loss came
    first, and waiting for an answer again when it came last."""
    results = []
    for order in (outcomes, outcomes[::-1]):
        async with CoreHarness(tmp_path / f"d{len(results)}", plugins=[Plugin(QuietChat())]) as harness:
            case = await harness.core.ingest({"channel": "quietchat", "channel_message_id": "q1", "text": "Baustelle?",
                                              "sender": {"kind": "phone", "address": "+4915112345678"}})
            await harness.run_outbox()
            for text in ("Ab Montag.", "Und der Gehweg ab Dienstag."):
                status, _ = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/replies",
                                              json={"text": text})
                assert status == 201
            await harness.run_outbox()
            if close:
                await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/close")
            replies = await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'reply' ORDER BY id")
            harness.clock.advance(timedelta(minutes=5))
            await _report_outcomes(harness, replies, order)
            results.append(await _end_state(harness, case.conversation_id))
    assert results[0] == results[1]



async def _report_outcomes(harness: CoreHarness, replies: list[dict], order: list[tuple[int, str]]) -> None:
    """Report what became of the answers (``replies[i]``), in ``order``, as the provider would:
    a failure for good, as WhatsApp's 131026 (the number cannot receive messages)."""
    for answer, status in order:
        update = DeliveryUpdate(provider_id=replies[answer]["provider_id"], status=status,
                                permanent=True, error_code="131026" if status == "failed" else None)
        assert await harness.core.record_delivery("quietchat", update) is True

# The first answer delivered before, then reported lost (a late bounce) together with what
# became of the second: a loss first reopens the answered case while the second answer is on its
# way. (Both lost on an answered case is left out: each order names the answer whose loss it took
# first, though the conversation, its deliveries and its addresses end alike.)
LATE_LOSS_WITH_OUTCOME = {
    "second delivered": ([(0, "failed"), (1, "delivered")], ("open", "close", "wait")),
    "second read": ([(0, "failed"), (1, "read")], ("open", "close", "wait")),
    "second failed": ([(0, "failed"), (1, "failed")], ("close", "wait")),
}


@pytest.mark.parametrize(("outcomes", "settle"), [
    pytest.param(outcomes, settle, id=f"{name}-{settle}")
    for name, (outcomes, settles) in LATE_LOSS_WITH_OUTCOME.items() for settle in settles])
async def test_a_late_loss_and_a_newer_answers_outcome_reported_together_give_the_same_result_in_either_order(
    tmp_path, outcomes, settle,
):
    """The first answer was delivered (and the case answered, set waiting or closed); then the
    provider reports it failed after all, together with the second answer's outcome. Its loss
    listed first reopened the answered case and the second answer's delivery answered it again;
    listed last, the first answer still stood as the one that answered it. Either way now it
    stands no more, and the second answers the case."""
    results = []
    for order in (outcomes, outcomes[::-1]):
        async with CoreHarness(tmp_path / f"d{len(results)}", plugins=[Plugin(QuietChat())]) as harness:
            case = await harness.core.ingest({"channel": "quietchat", "channel_message_id": "q1", "text": "Baustelle?",
                                              "sender": {"kind": "phone", "address": "+4915112345678"}})
            base = f"/api/v1/conversations/{case.conversation_id}"
            await harness.run_outbox()
            for text in ("Ab Montag.", "Und der Gehweg ab Dienstag."):
                status, _ = await harness.api("POST", f"{base}/replies", json={"text": text})
                assert status == 201
            await harness.run_outbox()
            replies = await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'reply' ORDER BY id")
            harness.clock.advance(timedelta(minutes=1))
            assert await harness.core.record_delivery("quietchat", DeliveryUpdate(provider_id=replies[0]["provider_id"],
                                                                                  status="delivered"))
            if settle != "open":
                status, _ = await harness.api("POST", f"{base}/{settle}")
                assert status == 200
            harness.clock.advance(timedelta(minutes=5))
            await _report_outcomes(harness, replies, order)
            results.append(await _end_state(harness, case.conversation_id))
    assert results[0] == results[1]
    first, second = (m["id"] for m in results[0]["messages"] if m["kind"] == "reply")
    if settle == "open":
        assert results[0]["conversation"]["state"] == "answered"
        assert results[0]["events"] == [("answer_lost", first), ("answered", first), ("answered", second)]


class AnswersOnlyAcks(NeverAnswers):
    """Takes acknowledgements; a staff answer's send never gets an answer (a timeout), though
    the provider may have taken it. Statuses echo the key (``status_wait``)."""

    async def send(self, message: OutboundMessage) -> SendResult:
        if message.kind == "ack":
            return SendResult(provider_id=f"ack-{message.outbox_id}")
        return await super().send(message)


# At most two attempts, then a last look for a status after status_wait (20 s), then given up.
LAST_LOOK_POLICY = OutboxPolicy(base_delay=0.01, max_delay=0.05, poll_seconds=0.05, send_timeout=5, max_attempts=2,
                                retry_seconds=0)


async def _until_given_up(harness: CoreHarness, kind: str) -> dict:
    """Run the outbox, 30 s apart, until the row of ``kind`` failed; returns it."""
    for _ in range(6):
        await harness.run_outbox()
        (row,) = await harness.rows("SELECT * FROM outbox WHERE kind = ?", (kind,))
        if row["state"] == "failed":
            return row
        harness.clock.advance(timedelta(seconds=30))
    raise AssertionError(f"the {kind} was not given up: {row}")


@pytest.mark.parametrize("closed", [False, True], ids=["waiting-for-it", "answered-and-closed"])
async def test_a_delivered_reported_after_the_outbox_gave_up_counts_as_delivered(tmp_path, closed):
    """The answer's sends got no answer in time and the outbox gave up: the case was flagged for
    a call-back (and, answered and closed at once, waited for an answer again). Then the
    provider reported it delivered after all. That report was kept and tied to nothing: the
    person had the answer, and the case stayed on the call-back list, unanswered."""
    chat = AnswersOnlyAcks(timedelta(seconds=20), True)
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(chat)], outbox_policy=LAST_LOOK_POLICY) as harness:
        await _ingest_senders(harness, 1)
        (conv,) = await harness.rows("SELECT id FROM conversations")
        base = f"/api/v1/conversations/{conv['id']}"
        await harness.run_outbox()
        status, reply = await harness.api("POST", f"{base}/replies", json={"text": "Ab Montag ist frei."})
        assert status == 201
        if closed:
            await harness.api("POST", f"{base}/close")
        row = await _until_given_up(harness, "reply")
        assert len(chat.sent) == 2 and row["last_error"] == "gave up after 2 attempts: no answer"
        status, detail = await harness.api("GET", base)
        assert {"undeliverable", "callback_required"} <= set(detail["flags"])
        assert detail["state"] == "acknowledged" and detail["deadline"] is not None

        # A late "sent" proves nothing on a channel with receipts; it gives the row its id.
        late_sent = DeliveryUpdate(provider_id="wamid.late", status="sent", idempotency_key=row["idempotency_key"])
        assert await harness.core.record_delivery("staggered", late_sent) is True
        (after,) = await harness.rows("SELECT state, provider_id FROM outbox WHERE id = ?", (row["id"],))
        assert after == {"state": "failed", "provider_id": "wamid.late"}
        # The delivery, found by that id (Twilio's callbacks carry no key of their own).
        harness.clock.advance(timedelta(minutes=2))
        assert await harness.core.record_delivery("staggered", DeliveryUpdate(provider_id="wamid.late", status="delivered"))
        (after,) = await harness.rows("SELECT state, provider_id, delivery_status, last_error FROM outbox WHERE id = ?",
                                      (row["id"],))
        assert after == {"state": "sent", "provider_id": "wamid.late", "delivery_status": "delivered", "last_error": None}
        status, detail = await harness.api("GET", base)
        assert (detail["state"], detail["deadline"], detail["flags"]) == ("answered", None, [])
        (answer,) = [m for m in detail["messages"] if m["id"] == reply["id"]]
        assert answer["delivery_status"] == "delivered"
        kinds = [e["kind"] for e in detail["events"]]
        assert kinds.count("answered") == 1 and kinds.count("delivered_after_all") == 1
        assert await harness.count("delivery_events", "outbox_id IS NULL") == 0

        # Nothing is sent again, and the same report again changes nothing.
        before = await _end_state(harness, conv["id"])
        events = await harness.count("events")
        for status in ("delivered", "read"):
            await harness.core.record_delivery("staggered", DeliveryUpdate(provider_id="wamid.late", status=status))
        harness.clock.advance(timedelta(hours=1))
        await harness.run_outbox()
        assert len(chat.sent) == 2
        after_state = await _end_state(harness, conv["id"])
        assert after_state["messages"][-1]["delivery_status"] == "read"
        after_state["messages"][-1]["delivery_status"] = "delivered"
        after_state["outbox"][-1]["delivery_status"] = "delivered"
        assert after_state == before and await harness.count("events") == events


async def test_a_fallback_queued_when_the_outbox_gave_up_is_not_sent_once_the_send_is_reported_delivered(tmp_path):
    """Given up on the chat, the acknowledgement was queued by SMS; the chat's delivery report
    came before the SMS went: the person would have had it twice."""
    plugins = TwoChannels()
    plugins.channel = NeverAnswers(timedelta(seconds=20), True)
    async with CoreHarness(tmp_path / "d", plugins=[plugins], outbox_policy=LAST_LOOK_POLICY) as harness:
        await _ingest_senders(harness, 1)
        for _ in range(3):  # two attempts, the last look, then given up: the fallback is queued
            await harness.core.outbox.run_once()
            harness.clock.advance(timedelta(seconds=30))
        rows = await harness.rows("SELECT channel, state, idempotency_key FROM outbox ORDER BY id")
        assert [(r["channel"], r["state"]) for r in rows] == [("staggered", "failed"), ("fallback", "pending")]
        delivered = DeliveryUpdate(provider_id="wamid.ack", status="delivered", idempotency_key=rows[0]["idempotency_key"])
        assert await harness.core.record_delivery("staggered", delivered) is True
        await harness.run_outbox()
        assert plugins.fallback.calls == 0
        rows = await harness.rows("SELECT channel, state, last_error FROM outbox ORDER BY id")
        assert [(r["channel"], r["state"]) for r in rows] == [("staggered", "sent"), ("fallback", "failed")]
        assert rows[1]["last_error"] == "not sent: staggered reported the message delivered after all"
        (conv,) = await harness.rows("SELECT state, flags FROM conversations")
        assert conv == {"state": "acknowledged", "flags": "[]"}
        (event,) = await harness.rows("SELECT data FROM events WHERE kind = 'delivered_after_all'")
        assert json.loads(event["data"])["fallbacks_not_sent"] == 1


async def test_a_call_back_still_to_make_stays_on_the_list_when_the_acknowledgement_arrives_late(tmp_path):
    """A missed call's acknowledgement, given up on, then reported delivered: the person has
    it, so ``undeliverable`` goes; the missed call is still to be called back."""
    plugin = Plugin(NeverAnswers(timedelta(seconds=20), True))
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=LAST_LOOK_POLICY) as harness:
        await harness.core.ingest({"channel": "staggered", "channel_message_id": "call-1", "kind": "missed_call",
                                   "sender": {"kind": "phone", "address": "+4915112345678"}})
        row = await _until_given_up(harness, "ack")
        (conv,) = await harness.rows("SELECT state, flags FROM conversations")
        assert conv == {"state": "open", "flags": '["callback_required", "undeliverable"]'}
        delivered = DeliveryUpdate(provider_id="wamid.ack", status="read", idempotency_key=row["idempotency_key"])
        assert await harness.core.record_delivery("staggered", delivered) is True
        (conv,) = await harness.rows("SELECT state, flags FROM conversations")
        assert conv == {"state": "acknowledged", "flags": '["callback_required"]'}


class TimesOutThenRefused(NeverAnswers):
    """The first send gets no answer (the provider took it); the next is refused for good, and
    the refusal says the number is bad."""

    async def send(self, message: OutboundMessage) -> SendResult:
        if self.sent:
            self.sent.append(message)
            raise PermanentDeliveryError("131026 message undeliverable", code="131026")
        return await super().send(message)


async def test_a_number_refused_after_a_send_to_it_that_arrived_is_good_again(tmp_path):
    plugin = Plugin(TimesOutThenRefused(timedelta(seconds=20), True))
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=LAST_LOOK_POLICY) as harness:
        await _ingest_senders(harness, 1)
        row = await _until_given_up(harness, "ack")
        (identity,) = await harness.rows("SELECT failed_at FROM identities")
        assert identity["failed_at"] is not None
        delivered = DeliveryUpdate(provider_id="wamid.first", status="delivered", idempotency_key=row["idempotency_key"])
        assert await harness.core.record_delivery("staggered", delivered) is True
        (identity,) = await harness.rows("SELECT failed_at FROM identities")
        assert identity["failed_at"] is None
        (conv,) = await harness.rows("SELECT state, flags FROM conversations")
        assert conv == {"state": "acknowledged", "flags": "[]"}


class NamesNoId(StaggeredChat):
    """A provider that takes every send without naming its id in the answer (Twilio's 2xx cut
    short); its statuses carry the send's key, and the first may overtake the answer."""

    def __init__(self, status_first: bool) -> None:
        super().__init__()
        self.status_first = status_first
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        if self.status_first:
            await self.context.record_delivery(DeliveryUpdate(provider_id=f"SM{len(self.sent)}", status="delivered",
                                                              idempotency_key=message.idempotency_key))
        return SendResult(provider_id="")


@pytest.mark.parametrize("status_first", [False, True], ids=["status-after-the-answer", "status-before-the-answer"])
async def test_a_send_taken_without_an_id_gets_the_id_of_its_first_status(tmp_path, status_first):
    chat = NamesNoId(status_first)
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(chat)]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        (row,) = await harness.rows("SELECT state, provider_id, delivery_status, idempotency_key FROM outbox")
        assert row["state"] == "sent"
        if not status_first:
            assert (row["provider_id"], row["delivery_status"]) == (None, "sent")
            update = DeliveryUpdate(provider_id="SM1", status="delivered", idempotency_key=row["idempotency_key"])
            assert await harness.core.record_delivery("staggered", update) is True
        (row,) = await harness.rows("SELECT provider_id, delivery_status FROM outbox")
        assert row == {"provider_id": "SM1", "delivery_status": "delivered"}
        (message,) = await harness.rows("SELECT provider_id, delivery_status FROM messages WHERE kind = 'ack'")
        assert message == {"provider_id": "SM1", "delivery_status": "delivered"}
        assert await harness.count("delivery_events", "outbox_id IS NULL") == 0
        assert len(chat.sent) == 1


async def test_a_send_time_at_the_start_of_the_calendar_does_not_stop_the_outbox(tmp_path):
    """``sent_at`` is any RFC 3339 time a provider gave: 0001-01-01T00:30:00+01:00 is one, and
    in UTC it falls before year 1. Written as UTC for the channel, it raised in every claim of
    the outbox, so no acknowledgement of anyone's was sent again; it counts as no send time."""
    sms = SmsChat()
    async with CoreHarness(tmp_path / "d", plugins=[_chat_and_sms(sms)]) as harness:
        await harness.core.ingest({"channel": "smschat", "channel_message_id": "s1", "text": "Wann kommt der Anschluss?",
                                   "sender": {"kind": "phone", "address": "+4915112345678"},
                                   "sent_at": "0001-01-01T00:30:00+01:00"})
        await harness.run_outbox()
        assert [(m.last_inbound_at, m.last_inbound_sent_at) for m in sms.sent] == [(harness.clock.now(),) * 2]


def test_each_retry_waits_twice_as_long_as_the_one_before_up_to_max_delay():
    """The first retry waits ``base_delay`` (with jitter down to half), each further one twice
    as long, and none longer than ``max_delay``."""
    policy = OutboxPolicy(base_delay=2.0, max_delay=900.0)
    for attempts, longest in [(1, 2.0), (2, 4.0), (3, 8.0), (9, 512.0), (10, 900.0), (40, 900.0)]:
        waits = [policy.delay(attempts) for _ in range(50)]
        assert all(longest / 2 <= wait <= longest for wait in waits), (attempts, min(waits), max(waits))


async def test_a_number_refused_again_since_stays_failed_when_an_earlier_send_arrives_after_all(tmp_path):
    """A send reported delivered after its row failed makes its number good again, but not
    when the provider refused that number once more since: that refusal still stands."""
    plugin = Plugin(TimesOutThenRefused(timedelta(seconds=20), True))
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=LAST_LOOK_POLICY) as harness:
        await _ingest_senders(harness, 1)
        row = await _until_given_up(harness, "ack")
        (conv,) = await harness.rows("SELECT id FROM conversations")
        harness.clock.advance(timedelta(minutes=5))
        status, _ = await harness.api("POST", f"/api/v1/conversations/{conv['id']}/replies", json={"text": "Ab Montag."})
        assert status == 201
        await harness.run_outbox()  # refused for good, later than the acknowledgement's failure
        (identity,) = await harness.rows("SELECT failed_at FROM identities")
        refused_at = identity["failed_at"]
        assert refused_at > row["updated_at"]
        delivered = DeliveryUpdate(provider_id="wamid.first", status="delivered", idempotency_key=row["idempotency_key"])
        assert await harness.core.record_delivery("staggered", delivered) is True
        assert await harness.rows("SELECT failed_at FROM identities") == [{"failed_at": refused_at}]


async def test_a_late_delivered_of_a_send_refused_for_its_form_marks_nothing_delivered(tmp_path):
    """The provider reported the send failed and asked for another form (WhatsApp's 131047):
    the message is queued again as that form. A "delivered" for the failed send, late, is no
    delivery of the message: it stays queued, and goes as the template."""
    chat = ReportsFailedChat()
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(chat)]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        (first,) = await harness.rows("SELECT provider_id FROM outbox")
        refused = DeliveryUpdate(provider_id=first["provider_id"], status="failed", error_code="131047",
                                 resend_hint="template", permanent=False, at=harness.clock.now())
        assert await harness.core.record_delivery("staggered", refused) is True
        harness.clock.advance(timedelta(seconds=5))
        late = DeliveryUpdate(provider_id=first["provider_id"], status="delivered", at=harness.clock.now())
        await harness.core.record_delivery("staggered", late)
        (message,) = await harness.rows("SELECT delivery_status FROM messages WHERE kind = 'ack'")
        assert message["delivery_status"] == "queued"
        (row,) = await harness.rows("SELECT state, delivery_status FROM outbox")
        assert row["state"] == "pending" and row["delivery_status"] != "delivered"
        await harness.run_outbox()
        assert [m.hint for m in chat.sent] == [None, "template"]
        (row,) = await harness.rows("SELECT state, provider_id, delivery_status FROM outbox")
        assert row == {"state": "sent", "provider_id": f"rf-{chat.sent[-1].outbox_id}-2", "delivery_status": "sent"}


class OneIdPerRow(ReportsFailedChat):
    """A provider that names every send of a row with the same id (as the web form's status
    page does): a second send of it reuses the first one's id."""

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        return SendResult(provider_id=f"row-{message.outbox_id}")


async def test_a_failure_reported_for_an_earlier_send_is_not_applied_again_to_the_next(tmp_path):
    """A failure that was applied (the row went again later) is not kept for the row's next
    send: recorded again under the same id, that send would be failed by it in turn."""
    chat = OneIdPerRow()
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(chat)]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        await _report_failed(harness, DeliveryUpdate(provider_id="", status="failed", error_code="131000", permanent=False,
                                                     at=harness.clock.now()))
        harness.clock.advance(timedelta(seconds=120))
        await harness.run_outbox()
        assert len(chat.sent) == 2
        assert await harness.rows("SELECT state, delivery_status FROM outbox") == [{"state": "sent", "delivery_status": "sent"}]
        harness.clock.advance(timedelta(hours=1))
        await harness.run_outbox()
        assert len(chat.sent) == 2


async def test_an_answer_whose_copy_went_out_is_not_lost_when_its_own_delivery_fails(harness):
    """The answer's copy (a web-form answer's mail) went out; then its own delivery failed for
    good. The answer reached the person by the copy: the conversation stays answered."""
    from router.outbox import OutboxPolicy, record_sent

    case, reply = await _answer_with_a_copy_on_its_way(harness)
    await harness.run_outbox()  # the answer on the page: answered

    def copy_sent(conn):
        copy = conn.execute("SELECT * FROM outbox WHERE channel = 'email' AND message_id = ?", (reply["id"],)).fetchone()
        return record_sent(conn, copy, "mail-1", "sent", None, True, harness.clock.now(), OutboxPolicy())

    await harness.core.store.write(copy_sent)
    harness.clock.advance(timedelta(minutes=10))

    await _lose_the_answer_on_the_page(harness, reply)
    (row,) = await harness.rows("SELECT state, deadline FROM conversations WHERE id = ?", (case.conversation_id,))
    assert row == {"state": "answered", "deadline": None}
    assert await harness.count("events", "conversation_id = ? AND kind = 'answer_lost'", (case.conversation_id,)) == 0


class NotConfiguredYet(StaggeredChat):
    """A channel that cannot send until an operator fixes its settings (no mail relay yet)."""

    def __init__(self) -> None:
        super().__init__()
        self.configured = False

    async def send(self, message: OutboundMessage) -> SendResult:
        self.calls += 1
        if not self.configured:
            raise RetryableDeliveryError("no relay configured", code=NOT_CONFIGURED)
        return await super().send(message)


async def test_a_channel_that_is_not_configured_yet_keeps_its_messages_queued_past_every_attempt(tmp_path):
    """Its messages wait for the operator, however many attempts and however long: given up,
    they would fall back or land on the call-back list for a fault of ours, never to be sent."""
    plugin = Plugin(NotConfiguredYet())
    policy = OutboxPolicy(poll_seconds=0.05, send_timeout=5, base_delay=0.01, max_delay=0.02, max_attempts=2, retry_seconds=0)
    async with CoreHarness(tmp_path / "d", plugins=[plugin], outbox_policy=policy) as harness:
        await _ingest_senders(harness, 1)
        for _ in range(5):
            await harness.run_outbox()
            harness.clock.advance(timedelta(seconds=1))
        assert plugin.channel.calls == 5
        assert await harness.rows("SELECT state, attempts FROM outbox") == [{"state": "pending", "attempts": 5}]
        (conversation,) = await harness.rows("SELECT flags FROM conversations")
        assert conversation["flags"] == "[]"
        plugin.channel.configured = True
        await harness.run_outbox()
        assert await harness.rows("SELECT state FROM outbox") == [{"state": "sent"}]


async def test_an_answer_lost_after_the_case_escalated_counts_its_escalations_afresh(tmp_path):
    """The case had escalated before it was answered; the answer then bounced. It waits for an
    answer again as a new question does: from the first escalation step, not from where the
    earlier wait left off."""
    plugin = Plugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        result = await harness.core.ingest(inbound("m1"))
        await harness.run_outbox()
        harness.clock.set(result.deadline + timedelta(minutes=1))
        assert [e["level"] for e in await harness.escalate()] == [1]
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": "Ab Montag."})
        await harness.run_outbox()
        (reply,) = await harness.rows("SELECT provider_id FROM outbox WHERE kind = 'reply'")
        harness.clock.advance(timedelta(minutes=5))
        await harness.core.record_delivery("racechat", DeliveryUpdate(provider_id=reply["provider_id"], status="failed",
                                                                      permanent=True, at=harness.clock.now()))
        (conv,) = await harness.rows("SELECT state, deadline, escalate_at, escalation_level FROM conversations")
        assert conv["state"] == "acknowledged" and conv["deadline"] is not None
        assert (conv["escalation_level"], conv["escalate_at"]) == (0, conv["deadline"])


async def test_a_units_notification_is_no_reply_in_the_residents_mail_thread(tmp_path):
    """The mail telling a unit it owns a case must not name the resident's messages as the
    ones it answers: with their ids in In-Reply-To and References, the unit's reply (or its
    auto-reply) would thread into the resident's conversation as if the resident had written."""
    mail = MailRecorder()
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(mail)]) as harness:
        result = await harness.core.ingest({"channel": "email", "channel_message_id": "<frage-1@example.net>",
                                            "sender": {"kind": "email", "address": "anwohner@example.net"},
                                            "subject": "Baustelle", "text": "Wann ist der Gehweg wieder frei?"})
        await harness.run_outbox()
        (ack,) = [m for m in mail.sent if m.kind == "ack"]
        assert ack.thread_refs == ("<frage-1@example.net>",)
        harness.clock.set(result.deadline + timedelta(minutes=1))
        assert len(await harness.escalate()) == 1
        await harness.run_outbox()
        notices = [m for m in mail.sent if m.kind == "notification"]
        assert notices and all(m.thread_refs == () for m in notices)


async def test_a_status_callback_without_a_time_of_its_own_sent_again_changes_nothing(tmp_path):
    """Twilio's callbacks carry no time: each is stamped on arrival. The same failure sent
    again a little later is the provider repeating itself, not a second failure that
    pushes the next attempt back (or counts towards giving up)."""
    chat = ReportsFailedChat()
    async with CoreHarness(tmp_path / "d", plugins=[Plugin(chat)]) as harness:
        await _ingest_senders(harness, 1)
        await harness.run_outbox()
        failed = DeliveryUpdate(provider_id="", status="failed", error_code="30008", permanent=False)
        await _report_failed(harness, failed)
        before = await harness.rows("SELECT state, next_attempt_at, idempotency_key FROM outbox")
        events = await harness.count("delivery_events")
        harness.clock.advance(timedelta(seconds=10))
        await _report_failed(harness, failed)
        assert await harness.rows("SELECT state, next_attempt_at, idempotency_key FROM outbox") == before
        assert await harness.count("delivery_events") == events
