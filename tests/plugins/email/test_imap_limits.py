"""IMAP import within limits, against the fake IMAP server: a mail over ``max_message_bytes`` is
set aside without being downloaded, and a server that answers a byte at a time cannot hold the
mailbox for ever."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from pathlib import Path
from typing import Any

import pytest

from plugins.email.imap import IMPORTED_KEYWORD, ImapError, ImapMailbox, ImapPoller
from router.testing import CoreHarness

from .fake_imap import FakeImapServer
from .test_imap import eventually, mail, settings_for
from .test_imap_unprocessable import FailingReceive, state

LIMIT = 50_000


def big_mail(n: int) -> bytes:
    return mail(n).replace(b"Wer hilft mir?", b"Wer hilft mir? " + b"x" * (2 * LIMIT))


def set_aside_files(harness: CoreHarness) -> list[Path]:
    return sorted((harness.data_dir / "email" / "imap" / "unprocessable").glob("*"))


@pytest.mark.parametrize("report_size", [True, False], ids=["size told", "size not told"])
async def test_a_mail_over_max_message_bytes_is_set_aside_and_the_next_imported(tmp_path, caplog, report_size):
    """It was downloaded and stored whatever its size (the audit: 8 MB under a 1 MB limit)."""
    async with FakeImapServer(idle=False) as server:
        server.report_size = report_size
        server.add(big_mail(1))
        server.add(mail(2))
        settings = settings_for(server)
        settings["email"]["max_message_bytes"] = LIMIT
        async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings=settings) as harness:
            with caplog.at_level(logging.ERROR):
                await eventually(lambda: _stored(harness, "<imap-2@example.net>"))
                await eventually(lambda: _mark_at(harness, 2))
            assert await harness.count("messages", "direction = 'in'") == 1
            assert await harness.count("events", "kind = 'email:unprocessable_mail' AND data LIKE '%max_message_bytes%'") == 1
            assert harness.core.metrics.value("contact_router_channel_events_total", channel="email",
                                              kind="unprocessable_mail") == 1
            # left in the mailbox, standing out there: no keyword; nothing written to disk
            assert [IMPORTED_KEYWORD in m.flags for m in server.mails] == [False, True]
            assert set_aside_files(harness) == []
            assert server.sized()[:2] == [1, 2]
            assert server.fetched()[:1] == ([2] if report_size else [1])  # told the size, it is not downloaded
            assert any("UID 1 " in r.getMessage() and "larger than max_message_bytes" in r.getMessage() for r in caplog.records)


async def test_a_mail_of_exactly_max_message_bytes_is_imported(tmp_path):
    small = mail(1)
    exact = small.replace(b"Wer hilft mir?", b"Wer hilft mir? " + b"x" * (LIMIT - len(small) - 1))
    assert len(exact) == LIMIT
    async with FakeImapServer(idle=False) as server:
        server.add(exact)
        settings = settings_for(server)
        settings["email"]["max_message_bytes"] = LIMIT
        async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings=settings) as harness:
            await eventually(lambda: _stored(harness, "<imap-1@example.net>"))
            assert server.fetched() == [1]


def poller(server: FakeImapServer, harness: CoreHarness, **changes: Any) -> ImapPoller:
    box = ImapMailbox.from_mapping(settings_for(server, **changes)["email"]["imap"], "channels.email.imap")
    return ImapPoller(box, FailingReceive(harness), harness.data_dir / "email" / "imap", logging.getLogger("tests.imap"),
                      max_message_bytes=LIMIT)


@pytest.fixture
async def harness(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings={"email": {"listen": False}}) as h:
        yield h


async def test_a_body_sent_a_byte_at_a_time_ends_the_session_after_the_timeout(harness):
    """aioimaplib's timeout starts again with every byte: one byte a second held the mailbox
    for ever. Now the whole download has a deadline, and the poller reconnects."""
    async with FakeImapServer(idle=False) as server:
        server.trickle = 0.05  # well inside the per-byte timeout, and 300 bytes take 15 s
        server.add(mail(1))
        started = asyncio.get_running_loop().time()
        with pytest.raises(ImapError, match="UID FETCH: no complete answer within"):
            await asyncio.wait_for(poller(server, harness, timeout=1.0).session(), 10)
        assert asyncio.get_running_loop().time() - started < 5
        assert await harness.count("messages") == 0
        assert state(harness) == {"uidvalidity": 1001, "last_uid": 0, "failed": {"1": 1}}  # an attempt: tried again

        # and the connection is closed: aioimaplib left it open after the cancelled command, one
        # more at each reconnect, until the server refused further logins
        async def closed() -> bool:
            return server.open_sessions == 0

        await eventually(closed)


async def test_a_store_answered_without_end_keeps_the_import_and_reconnects(harness):
    async with FakeImapServer(idle=False) as server:
        server.trickle_store = 0.05
        server.add(mail(1))
        server.add(mail(2))
        with pytest.raises(ImapError, match="UID STORE: no complete answer within"):
            await asyncio.wait_for(poller(server, harness, timeout=1.0).session(), 10)
        # the first mail is imported and the mark past it: a new session goes on with the second
        assert await harness.count("messages", "json_extract(payload, '$.raw.message_id') = '<imap-1@example.net>'") == 1
        assert state(harness) == {"uidvalidity": 1001, "last_uid": 1}
        assert server.fetched() == [1]


async def _stored(harness: CoreHarness, message_id: str) -> bool:
    return await harness.count("messages", "json_extract(payload, '$.raw.message_id') = ?", (message_id,)) == 1


async def _mark_at(harness: CoreHarness, uid: int) -> bool:
    try:
        return state(harness).get("last_uid") == uid
    except ValueError:
        return False


async def test_a_mail_whose_body_never_comes_in_time_is_set_aside_after_its_attempts(harness):
    """A server slower than the download allows for one mail held the whole mailbox: every
    session fetched that mail again, and no later mail was ever imported."""
    async with FakeImapServer(idle=False) as server:
        server.trickle = 0.05
        server.add(mail(1))
        server.add(mail(2))
        box = poller(server, harness, timeout=0.5)
        for attempt in (1, 2, 3):
            with pytest.raises(ImapError):
                await asyncio.wait_for(box.session(), 30)
            if attempt < 3:
                assert state(harness)["failed"] == {"1": attempt}
        assert state(harness) == {"uidvalidity": 1001, "last_uid": 1}
        assert box.set_aside == 1
        server.trickle = None
        session = asyncio.create_task(box.session())
        try:
            await eventually(lambda: _stored(harness, "<imap-2@example.net>"))
            await eventually(lambda: _mark_at(harness, 2))  # flagged in the mailbox, then marked
        finally:
            session.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session
        assert [IMPORTED_KEYWORD in m.flags for m in server.mails] == [False, True]  # left there, standing out
    # aioimaplib leaves a task per timed-out command whose exception nobody retrieves; collected
    # later, its log's traceback (Python 3.11 parses the line for its carets) could run inside
    # another parse, such as an import's, which 3.11's ast module takes as a SystemError.
    gc.collect()


async def test_a_body_that_stops_coming_is_a_failed_attempt_of_that_mail(harness):
    """aioimaplib ends a command itself when nothing comes for ``timeout`` seconds, before the
    download's own deadline (which allows for the size as well). Its CommandTimeout was no
    failed attempt of the mail: a server that stopped sending one body had that mail fetched
    again at every session, and no later mail was ever imported."""
    async with FakeImapServer(idle=False) as server:
        server.report_size = False  # the deadline allows for max_message_bytes: well after aioimaplib's
        server.trickle = 3600  # the body's first line, then nothing
        server.add(mail(1))
        server.add(mail(2))
        box = poller(server, harness, timeout=2.0)
        with pytest.raises(ImapError, match="UID FETCH"):
            await asyncio.wait_for(box.session(), 30)
        assert state(harness) == {"uidvalidity": 1001, "last_uid": 0, "failed": {"1": 1}}
    gc.collect()  # see test_a_mail_whose_body_never_comes_in_time_is_set_aside_after_its_attempts


class RefusesTheFirstBody(FakeImapServer):
    """A server that answers NO to the body of UID 1 (a corrupt mail file on its side)."""

    def _uid(self, tag: str, command: str, args: list[str]) -> bytes:
        if command == "FETCH" and args[0] == "1" and "BODY" in " ".join(args[1:]).upper():
            return f"{tag} NO [SERVERBUG] Internal error occurred\r\n".encode()
        return super()._uid(tag, command, args)


async def test_a_mail_the_server_refuses_to_send_is_set_aside_after_its_attempts(harness):
    """Counted only when it timed out, a refused download was tried again at every session,
    and no later mail was imported."""
    async with RefusesTheFirstBody(idle=False) as server:
        server.add(mail(1))
        server.add(mail(2))
        box = poller(server, harness, timeout=0.5)
        for _ in range(2):
            with pytest.raises(ImapError, match="NO"):
                await asyncio.wait_for(box.session(), 30)
        session = asyncio.create_task(box.session())  # the third refusal sets it aside, and goes on
        try:
            await eventually(lambda: _stored(harness, "<imap-2@example.net>"))
            await eventually(lambda: _mark_at(harness, 2))  # flagged in the mailbox, then marked
            assert box.set_aside == 1 and [IMPORTED_KEYWORD in m.flags for m in server.mails] == [False, True]
        finally:
            session.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session
    gc.collect()  # see test_a_mail_whose_body_never_comes_in_time_is_set_aside_after_its_attempts


class LosesOneCancellation(ImapPoller):
    """A poller whose first cancellation is lost, as Python 3.11's asyncio.wait_for loses one
    that arrives as the IMAP call it bounds completes: it then polls on."""

    async def run(self) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
        await asyncio.Event().wait()  # polling on, until cancelled again


async def test_a_poller_that_lost_a_cancellation_still_stops(harness, tmp_path):
    """The channel's stop cancelled the poller once and waited for it: a lost cancellation held
    the service's stop for ever (a test hung until its timeout). It is cancelled again until it ends."""
    box = ImapMailbox.from_mapping({"host": "127.0.0.1", "user": "u", "password": "p"}, "channels.email.imap")
    lossy = LosesOneCancellation(box, FailingReceive(harness), tmp_path, logging.getLogger("tests.imap"))

    async def run_and_stop() -> None:
        async with contextlib.asynccontextmanager(lossy.service)():
            await asyncio.sleep(0.05)

    stop = asyncio.create_task(run_and_stop())
    done, _ = await asyncio.wait((stop,), timeout=10)
    if not done:
        stop.cancel()
    assert done == {stop} and stop.exception() is None
