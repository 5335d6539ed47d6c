"""IMAP polling against a small fake IMAP server, inside the whole service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from plugins.email.imap import IMPORTED_KEYWORD, ImapMailbox, imap_mailboxes
from plugins.email.settings import EmailSettingsError
from router.testing import CoreHarness

from .fake_imap import FakeImapServer
from .test_integration import compose


def settings_for(server: FakeImapServer, **changes: Any) -> dict[str, Any]:
    imap = {"host": "127.0.0.1", "port": server.port, "tls": "none", "user": server.user, "password": server.password,
            "address": "service@example.org", "poll_seconds": 0.05, "retry_seconds": 0.05, "timeout": 5, **changes}
    return {"email": {"listen": False, "imap": imap}}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Wait until ``check`` holds. The poller runs in the background at its own pace, which a
    busy machine slows down: the bound is generous, and a check that holds ends the wait."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def mail(n: int, **kwargs: Any) -> bytes:
    return compose(sender=f"Bewohner {n} <bewohner{n}@example.net>", to="service@example.org",
                   subject=f"Frage {n}", text=f"Wer hilft mir? ({n})", message_id=f"<imap-{n}@example.net>", **kwargs)


def state_files(harness: CoreHarness) -> list[dict[str, int]]:
    return [json.loads(p.read_text()) for p in sorted((harness.data_dir / "email" / "imap").glob("*.json"))]


async def test_imap_imports_with_idle_and_a_restart_imports_nothing_twice(tmp_path):
    async with FakeImapServer(idle=True) as server:
        server.add(mail(1))
        server.add(mail(2))
        settings = settings_for(server, poll_seconds=3600)  # only IDLE can bring the third mail in time
        async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings=settings) as harness:
            await eventually(lambda: _count_in(harness, 2))
            detail = await _conversation(harness, "<imap-1@example.net>")
            assert detail["unit"] == "kundenservice" and detail["routing"]["rule"] == "entry-point"
            assert await harness.count("outbox", "kind = 'ack'") == 2
            await eventually(lambda: _idling(server))
            server.add(mail(3))
            await eventually(lambda: _count_in(harness, 3))
            # The poller flags a mail and then moves its mark after the commit: wait for the mark.
            await eventually(lambda: _has_state(harness, {"uidvalidity": 1001, "last_uid": 3}))
            assert all(IMPORTED_KEYWORD in m.flags for m in server.mails)
            assert all("\\Seen" not in m.flags for m in server.mails)
            assert state_files(harness) == [{"uidvalidity": 1001, "last_uid": 3}]
            assert server.fetched() == [1, 2, 3]

        fetched_before = len(server.fetched())
        logins_before = server.logins
        async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings=settings) as harness:
            await eventually(lambda: _logged_in_again(server, logins_before))
            await eventually(lambda: _idling(server))
            assert server.fetched()[fetched_before:] == []
            server.add(mail(4))
            await eventually(lambda: _count_in(harness, 4))
            assert server.fetched()[fetched_before:] == [4]
            assert await harness.count("messages", "direction = 'in'") == 4


async def test_imap_without_idle_polls_at_the_interval(tmp_path):
    async with FakeImapServer(idle=False) as server:
        async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings=settings_for(server)) as harness:
            await eventually(lambda: _logged_in_again(server, 0))
            server.add(mail(1))
            await eventually(lambda: _count_in(harness, 1))
            assert not any(c.upper().startswith("IDLE") for c in server.commands)
            assert sum(c.upper().startswith("UID SEARCH") for c in server.commands) >= 2


async def test_changed_uidvalidity_looks_again_but_stores_nothing_twice(tmp_path):
    async with FakeImapServer(idle=False) as server:
        server.add(mail(1))
        async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings=settings_for(server)) as harness:
            await eventually(lambda: _count_in(harness, 1))
        server.uidvalidity = 2002  # the mailbox was rebuilt: same mail, the UIDs mean something else now
        server.add(mail(2))
        async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings=settings_for(server)) as harness:
            await eventually(lambda: _count_in(harness, 2))
            await eventually(lambda: _has_state(harness, {"uidvalidity": 2002, "last_uid": 2}))
            assert await harness.count("messages", "json_extract(payload, '$.raw.message_id') = '<imap-1@example.net>'") == 1
            assert await harness.count("outbox", "kind = 'ack'") == 2


async def test_a_rebuilt_mailbox_imports_its_new_mail_below_the_old_mark(tmp_path):
    """A new UIDVALIDITY (the mailbox moved or was rebuilt) starts the UIDs again at 1: the old
    mark means nothing there, and a new mail under it is imported, not skipped for ever."""
    async with FakeImapServer(idle=False) as server:
        server.add(mail(1))
        server.add(mail(2))
        async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings=settings_for(server)) as harness:
            await eventually(lambda: _has_state(harness, {"uidvalidity": 1001, "last_uid": 2}))
        server.uidvalidity = 2002
        server.mails.clear()
        server._next_uid = 1
        server.add(mail(3))  # UID 1 of the new mailbox
        async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings=settings_for(server)) as harness:
            await eventually(lambda: _count_in(harness, 3))
            await eventually(lambda: _has_state(harness, {"uidvalidity": 2002, "last_uid": 1}))
            assert await harness.count("messages", "json_extract(payload, '$.raw.message_id') = '<imap-3@example.net>'") == 1


async def test_wrong_password_is_retried_without_importing(tmp_path):
    async with FakeImapServer(idle=False) as server:
        server.add(mail(1))
        settings = settings_for(server, password="falsch")
        async with CoreHarness(tmp_path / "data", entrypoints=("email",), settings=settings) as harness:
            await eventually(lambda: _login_attempts(server, 2))
            assert await harness.count("messages") == 0
            assert server.fetched() == []


def test_imap_settings_are_checked():
    assert imap_mailboxes(None) == []
    [box] = imap_mailboxes({"host": "imap.example.org", "user": "u", "password": "s3cr3t-pw"})
    assert (box.port, box.tls, box.mailbox, box.idle) == (993, "tls", "INBOX", True)
    assert "s3cr3t-pw" not in repr(box)
    two = imap_mailboxes([{"host": "a", "user": "u", "password": "p"}, {"host": "b", "user": "u", "password": "p", "tls": "none"}])
    assert [b.port for b in two] == [993, 143] and two[0].key != two[1].key
    with pytest.raises(EmailSettingsError, match=r"channels\.email\.imap\.password"):
        imap_mailboxes({"host": "a", "user": "u"})
    with pytest.raises(EmailSettingsError, match=r"channels\.email\.imap\[1\]\.tls"):
        imap_mailboxes([{"host": "a", "user": "u", "password": "p"}, {"host": "b", "user": "u", "password": "p", "tls": "starttls"}])
    # a port past 65535 failed every poll, with nothing but a log line
    with pytest.raises(EmailSettingsError, match=r"channels\.email\.imap\.port"):
        imap_mailboxes({"host": "a", "user": "u", "password": "p", "port": 70000})
    with pytest.raises(EmailSettingsError, match="poll_seconds"):
        ImapMailbox.from_mapping({"host": "a", "user": "u", "password": "p", "poll_seconds": "oft"}, "channels.email.imap")


async def _count_in(harness: CoreHarness, n: int) -> bool:
    return await harness.count("messages", "direction = 'in'") >= n


async def _idling(server: FakeImapServer) -> bool:
    return bool(server._idlers)


async def _logged_in_again(server: FakeImapServer, before: int) -> bool:
    return server.logins > before and any(c.upper().startswith("UID SEARCH") for c in server.commands[-3:])


async def _login_attempts(server: FakeImapServer, n: int) -> bool:
    return sum(c.upper().startswith("LOGIN") for c in server.commands) >= n


async def _has_state(harness: CoreHarness, state: dict[str, int]) -> bool:
    return state_files(harness) == [state]


async def _conversation(harness: CoreHarness, message_id: str) -> dict[str, Any]:
    [row] = await harness.rows("SELECT conversation_id FROM messages WHERE json_extract(payload, '$.raw.message_id') = ?", (message_id,))
    status, detail = await harness.api("GET", f"/api/v1/conversations/{row['conversation_id']}")
    assert status == 200
    return detail


def test_imap_switches_and_numbers_from_the_environment_are_read():
    """``{ "$env" = ... }`` hands over strings; an unknown word for ``idle`` meant on."""
    base = {"host": "imap.example.org", "user": "u", "password": "p"}
    [box] = imap_mailboxes({**base, "idle": "false", "port": "1143", "poll_seconds": "15", "max_attempts": "5",
                            "timeout": "", "retry_seconds": None})
    assert (box.idle, box.port, box.poll_seconds, box.max_attempts) == (False, 1143, 15.0, 5)
    assert (box.timeout, box.retry_seconds) == (30.0, 30.0)
    assert imap_mailboxes({**base, "idle": " On "})[0].idle is True
    for key, value in (("idle", "ja"), ("idle", 2), ("port", "imaps"), ("max_attempts", "2.5"), ("max_attempts", True),
                       ("poll_seconds", "inf"), ("timeout", "0")):
        with pytest.raises(EmailSettingsError) as caught:
            imap_mailboxes([base, {**base, key: value}])
        assert caught.value.path == f"channels.email.imap[1].{key}", (key, value)
