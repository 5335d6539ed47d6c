"""A mail that fails to import every time is set aside after ``max_attempts`` instead of
blocking its mailbox, against the fake IMAP server and the whole service.

The poller is built here with a receive function that hands mail to the real channel but fails
on the mail marked ``GIFT`` (the poller's one seam: whatever ``receive`` raises counts as a
failed import), as a broken mail or a transient fault would."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from plugins.email.imap import IMPORTED_KEYWORD, ImapMailbox, ImapPoller, ImportFailed
from router import files
from router.testing import CoreHarness

from .fake_imap import FakeImapServer
from .test_imap import eventually, mail, settings_for

LOG = logging.getLogger("tests.imap")
SECRET = "einspeisen-geheim"


class FailingReceive:
    """The channel's IMAP receive, except that a mail containing ``GIFT`` raises for its first
    ``failures`` deliveries (every time when ``failures`` is None)."""

    def __init__(self, harness: CoreHarness, failures: int | None = None) -> None:
        self.channel: Any = harness.core.channels["email"]
        self.failures = failures
        self.poisoned = 0
        self.calls = 0
        self.delivered: list[bytes] = []

    async def __call__(self, raw: bytes, envelope_to: list[str] | None) -> None:
        self.calls += 1
        if b"GIFT" in raw:
            self.poisoned += 1
            if self.failures is None or self.poisoned <= self.failures:
                raise RuntimeError(f"cannot digest this mail (attempt {self.poisoned})")
        await self.channel._receive_imported(raw, envelope_to)
        self.delivered.append(raw)


def poison() -> bytes:
    return mail(1).replace(b"Wer hilft mir? (1)", b"GIFT (1)")


@pytest.fixture
async def imap() -> AsyncIterator[FakeImapServer]:
    async with FakeImapServer(idle=False) as server:
        yield server


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[CoreHarness]:
    async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings={"email": {"listen": False, "inbound_secret": SECRET}}) as h:
        yield h


def poller(harness: CoreHarness, server: FakeImapServer, receive: FailingReceive) -> ImapPoller:
    box = ImapMailbox.from_mapping(settings_for(server)["email"]["imap"], "channels.email.imap")
    channel: Any = harness.core.channels["email"]
    return ImapPoller(box, receive, harness.data_dir / "email" / "imap", LOG,
                      on_set_aside=functools.partial(channel.context.record_event, "unprocessable_mail"))


def state(harness: CoreHarness) -> dict[str, Any]:
    [path] = (harness.data_dir / "email" / "imap").glob("*.json")
    return json.loads(path.read_text())


def set_aside(harness: CoreHarness) -> list[Path]:
    return sorted((harness.data_dir / "email" / "imap" / "unprocessable").glob("*.eml"))


async def stored(harness: CoreHarness, n: int) -> bool:
    return await harness.count("messages", "direction = 'in'") >= n


async def run_until_stored(p: ImapPoller, harness: CoreHarness, n: int, server: FakeImapServer) -> None:
    """Poll until ``n`` messages are stored and the mark is past the mailbox's last mail: the
    mark is written after the commit and the flag, so stopping at the commit would race them."""

    async def done() -> bool:
        if not await stored(harness, n):
            return False
        try:
            return state(harness).get("last_uid") == len(server.mails)
        except ValueError:  # no state file yet
            return False

    await run_until(p, done)


async def run_until(p: ImapPoller, condition: Callable[[], Awaitable[bool]]) -> None:
    """Run the poller until ``condition`` holds, then stop it."""
    task = asyncio.create_task(p.run())
    try:
        await eventually(condition)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_mail_that_always_fails_is_set_aside_after_three_attempts_and_the_next_is_imported(harness, imap, caplog):
    imap.add(poison())
    imap.add(mail(2))
    receive = FailingReceive(harness)
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        await run_until_stored(poller(harness, imap, receive), harness, 1, imap)

    assert receive.poisoned == 3
    assert receive.delivered == [mail(2)]
    assert await harness.count("messages", "json_extract(payload, '$.raw.message_id') = '<imap-2@example.net>'") == 1
    assert await harness.count("messages", "json_extract(payload, '$.raw.message_id') = '<imap-1@example.net>'") == 0
    [path] = set_aside(harness)
    assert path.read_bytes() == poison()
    assert path.name.startswith("127.0.0.1_postfach_INBOX_")
    assert path.name.endswith("_uidvalidity-1001_uid-1.eml")
    assert state(harness) == {"uidvalidity": 1001, "last_uid": 2}
    assert [IMPORTED_KEYWORD in m.flags for m in imap.mails] == [False, True]
    # Beyond the log: an event, which /metrics counts
    assert await harness.count("events", "kind = 'email:unprocessable_mail' AND data LIKE '%uid-1.eml%'") == 1
    assert harness.core.metrics.value("contact_router_channel_events_total", channel="email", kind="unprocessable_mail") == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert "postfach@127.0.0.1/INBOX" in message and "UID 1 " in message and "failed to import 3 times" in message
    assert "cannot digest this mail (attempt 3)" in message and str(path) in message


async def test_a_mail_that_fails_twice_then_succeeds_is_imported_once_and_not_set_aside(harness, imap):
    imap.add(poison())
    imap.add(mail(2))
    receive = FailingReceive(harness, failures=2)
    p = poller(harness, imap, receive)
    for attempt in (1, 2):
        with pytest.raises(ImportFailed, match=f"attempt {attempt} of 3"):
            await p.session()
        assert state(harness)["failed"] == {"1": attempt}
    await run_until_stored(p, harness, 2, imap)

    assert receive.poisoned == 3
    assert await harness.count("messages", "json_extract(payload, '$.raw.message_id') = '<imap-1@example.net>'") == 1
    assert await harness.count("outbox", "kind = 'ack'") == 2
    assert set_aside(harness) == []
    assert state(harness) == {"uidvalidity": 1001, "last_uid": 2}  # the count is gone with the mail
    assert all(IMPORTED_KEYWORD in m.flags for m in imap.mails)


async def test_the_count_survives_a_restart(harness, imap):
    imap.add(poison())
    imap.add(mail(2))
    receive = FailingReceive(harness)
    first = poller(harness, imap, receive)
    for attempt in (1, 2):
        with pytest.raises(ImportFailed, match=f"UID 1: import failed \\(attempt {attempt} of 3\\)"):
            await first.session()
        assert state(harness) == {"uidvalidity": 1001, "last_uid": 0, "failed": {"1": attempt}}

    # a new poller (the service restarted) gives the mail its third attempt, not a fresh three
    await run_until_stored(poller(harness, imap, receive), harness, 1, imap)
    assert receive.poisoned == 3
    assert len(set_aside(harness)) == 1
    assert state(harness) == {"uidvalidity": 1001, "last_uid": 2}


async def test_a_mail_that_cannot_be_set_aside_keeps_the_mark_and_is_tried_again(harness, imap):
    imap.add(poison())
    imap.add(mail(2))
    blocker = harness.data_dir / "email" / "imap" / "unprocessable"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"a file where the folder should be")
    receive = FailingReceive(harness)
    p = poller(harness, imap, receive)
    for _ in range(3):
        with pytest.raises(ImportFailed):
            await p.session()
    with pytest.raises(ImportFailed, match="could not be set aside"):
        await p.session()
    assert state(harness) == {"uidvalidity": 1001, "last_uid": 0, "failed": {"1": 4}}
    assert await harness.count("messages") == 0

    blocker.unlink()
    await run_until_stored(p, harness, 1, imap)
    [path] = set_aside(harness)
    assert path.read_bytes() == poison()
    assert receive.poisoned == 3  # after its three attempts it is only set aside, not tried again
    assert state(harness) == {"uidvalidity": 1001, "last_uid": 2}


class ProcessDies(BaseException):
    """What the poller sees of a process killed while it imports a mail: nothing after it."""


async def test_a_mail_during_which_the_process_dies_is_set_aside_after_three_starts(harness, imap):
    imap.add(poison())
    imap.add(mail(2))
    dying = FailingReceive(harness)

    async def receive(raw: bytes, envelope_to: list[str] | None) -> None:
        if b"GIFT" in raw:
            dying.poisoned += 1
            raise ProcessDies()
        await dying(raw, envelope_to)

    for start in (1, 2, 3):  # each start of the service dies on the same mail
        with pytest.raises(ProcessDies):
            await poller(harness, imap, receive).session()
        assert state(harness)["failed"] == {"1": start}
    await run_until_stored(poller(harness, imap, receive), harness, 1, imap)  # the fourth start
    assert dying.poisoned == 3
    [path] = set_aside(harness)
    assert path.read_bytes() == poison()
    assert dying.delivered == [mail(2)]


async def test_stopping_the_service_during_an_import_is_no_failed_attempt(harness, imap):
    imap.add(mail(1))
    started = asyncio.Event()

    async def slow(raw: bytes, envelope_to: list[str] | None) -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(poller(harness, imap, slow).session())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "failed" not in state(harness)


async def test_stopping_the_service_while_the_count_is_written_is_no_failed_attempt_either(harness, imap, monkeypatch):
    """The count is written before the attempt, in a thread. Stopped during that write, the
    attempt was counted although it never started."""
    imap.add(mail(1))
    loop = asyncio.get_running_loop()
    writing = asyncio.Event()
    real_write = files._write_durably

    def slow_write(path: Path, data: bytes) -> None:
        if b'"failed"' in data:  # the count before the attempt
            loop.call_soon_threadsafe(writing.set)
            time.sleep(0.2)
        real_write(path, data)

    monkeypatch.setattr(files, "_write_durably", slow_write)
    task = asyncio.create_task(poller(harness, imap, FailingReceive(harness, failures=0)).session())
    await writing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "failed" not in state(harness)


def test_max_attempts_is_a_mailbox_setting():
    base = {"host": "a", "user": "u", "password": "p"}
    assert ImapMailbox.from_mapping(base, "imap").max_attempts == 3
    assert ImapMailbox.from_mapping({**base, "max_attempts": "5"}, "imap").max_attempts == 5
    with pytest.raises(ValueError, match=r"imap\.max_attempts"):
        ImapMailbox.from_mapping({**base, "max_attempts": 2.5}, "imap")
    with pytest.raises(ValueError, match=r"imap\.max_attempts"):
        ImapMailbox.from_mapping({**base, "max_attempts": 0}, "imap")
    for bad in (float("inf"), float("nan"), "inf", True):
        with pytest.raises(ValueError, match=r"imap\.max_attempts"):
            ImapMailbox.from_mapping({**base, "max_attempts": bad}, "imap")


def test_the_name_of_a_set_aside_mail_fits_a_file_system_even_for_long_settings(tmp_path):
    """Host, user and mailbox may each be long; the name (and write_durably's temporary one
    beside it) must stay under 255 bytes, or the mail could never be set aside."""
    box = ImapMailbox.from_mapping({"host": "h" * 250, "user": "u" * 250, "password": "p", "mailbox": "m" * 250}, "imap")
    p = ImapPoller(box, FailingReceive.__call__, tmp_path, LOG)
    path = p._write_unprocessable(4294967295, 4294967295, b"Subject: x\r\n\r\nx")
    assert path.read_bytes() == b"Subject: x\r\n\r\nx"
    assert len(path.name.encode()) <= 200


async def test_a_set_aside_mail_can_be_fed_again_over_http_once_the_cause_is_fixed(harness, imap):
    """What docs/channels/email.md tells the operator to do."""
    imap.add(poison())
    await run_until_set_aside(poller(harness, imap, FailingReceive(harness)), harness)
    [path] = set_aside(harness)
    headers = {"Authorization": f"Bearer {SECRET}", "X-Envelope-To": "service@example.org",
               "Content-Type": "application/x-www-form-urlencoded"}  # what curl --data-binary sends
    response = await harness.client.post("/channels/email/inbound", data=path.read_bytes(), headers=headers)
    assert response.status == 202, await response.text()
    [row] = await harness.rows("SELECT conversation_id FROM messages WHERE json_extract(payload, '$.raw.message_id') = '<imap-1@example.net>'")
    status, detail = await harness.api("GET", f"/api/v1/conversations/{row['conversation_id']}")
    assert status == 200 and detail["unit"] == "kundenservice"
    assert [m["text"] for m in detail["messages"] if m["direction"] == "in"] == ["GIFT (1)"]
    assert await harness.count("outbox", "kind = 'ack'") == 1
    again = await harness.client.post("/channels/email/inbound", data=path.read_bytes(), headers=headers)
    assert again.status == 200 and (await again.json())["duplicate"] is True


async def run_until_set_aside(p: ImapPoller, harness: CoreHarness) -> None:
    async def found() -> bool:
        return bool(set_aside(harness)) and state(harness).get("failed") is None

    await run_until(p, found)


async def test_an_outage_of_the_database_sets_no_mail_aside_and_the_mail_is_imported_after_it(harness, imap, caplog):
    """Every import failed while the database refused writes, so each mail in turn was set
    aside after three tries: not stored, not acknowledged, a dead end for its sender. An
    outage is not the mail's fault: it is not counted, and the mail waits in the mailbox."""
    imap.add(mail(1))
    imap.add(mail(2))
    receive = FailingReceive(harness, failures=0)
    p = poller(harness, imap, receive)
    harness.refuse_writes()

    async def tried_often() -> bool:
        return receive.calls >= 3 * p.mailbox.max_attempts

    with caplog.at_level(logging.ERROR, logger=LOG.name):
        await run_until(p, tried_often)
    assert set_aside(harness) == [] and p.set_aside == 0
    assert state(harness).get("last_uid", 0) == 0 and state(harness).get("failed", {}) in ({}, {"1": 0})
    assert any("cannot store mail now" in r.getMessage() and "UID 1" in r.getMessage() for r in caplog.records)

    harness.refuse_writes(False)
    await run_until_stored(p, harness, 2, imap)
    assert receive.delivered == [mail(1), mail(2)] and set_aside(harness) == []
    assert await harness.count("outbox", "kind = 'ack'") == 2


async def test_a_full_disk_sets_no_mail_aside_either(harness, imap, monkeypatch):
    """The mail's original is written to disk before the commit; on a full disk that write
    failed with OSError, counted against the mail, which was then set aside."""
    imap.add(mail(1))
    receive = FailingReceive(harness, failures=0)
    real_write = files._write_durably

    def full(path: Path, data: bytes) -> None:
        if path.suffix != ".json":  # the mailbox's mark still fits; the mail's original does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    p = poller(harness, imap, receive)

    async def tried_often() -> bool:
        return receive.calls >= 2 * p.mailbox.max_attempts

    with monkeypatch.context() as patch:
        patch.setattr(files, "_write_durably", full)
        await run_until(p, tried_often)
    assert set_aside(harness) == [] and p.set_aside == 0 and await harness.count("messages") == 0
    await run_until_stored(p, harness, 1, imap)
    assert receive.delivered == [mail(1)] and set_aside(harness) == []
