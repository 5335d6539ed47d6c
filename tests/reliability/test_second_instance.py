"""Two ``contact-router serve`` on one data folder: the second is refused before it binds a
port, while the first keeps serving; once the first is killed with SIGKILL, a new one starts.

Two would both run the outbox and the escalation scheduler on the same SQLite file: an
acknowledgement sent twice, a case escalated twice."""

from __future__ import annotations

import subprocess
from pathlib import Path

import aiohttp
import pytest

from .helpers import ROOT, FakeGraph, ServiceProcess, post_webhook, wa_number, wait_until, whatsapp_body


async def test_a_second_serve_on_the_same_data_folder_is_refused_and_a_killed_ones_lock_blocks_nothing(tmp_path: Path) -> None:
    graph = FakeGraph()
    await graph.start()
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = ServiceProcess(tmp_path / "first", graph.url)
    second = ServiceProcess(tmp_path / "second", graph.url)
    second.data_dir = first.data_dir
    try:
        await first.start()
        # On the first's ports: a second that bound its ports before it looked at the folder
        # would fail on "address already in use", not on the folder.
        command = second.command()
        command[command.index("--port") + 1] = str(first.port)
        env = {**second.env, "SMTP_LISTEN_PORT": first.env["SMTP_LISTEN_PORT"]}
        try:
            refused = subprocess.run(command, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=30)  # noqa: ASYNC221 - the test waits for it
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"a second serve on the same data folder was still running after 30 s:\n{exc.stderr}")
        assert refused.returncode == 1, refused.stderr[-2000:]
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr[-2000:]
        assert "address already in use" not in lines[0], lines[0]
        assert str(first.data_dir) in lines[0] and f"PID {first.proc.pid}" in lines[0] and "in use" in lines[0], lines[0]

        # The first serves on, and its outbox sends.
        async with aiohttp.ClientSession() as session:
            assert await post_webhook(session, first.url, whatsapp_body("wamid.lock.1", wa_number(1))) == 200
        assert await wait_until(lambda: len(graph.delivered_keys()) == 1, timeout=30)

        # SIGKILL runs no code of the first: the OS drops its lock, and the next one starts.
        first.kill9()
        await second.start()
        async with aiohttp.ClientSession() as session:
            assert await post_webhook(session, second.url, whatsapp_body("wamid.lock.2", wa_number(2))) == 200
        assert await wait_until(lambda: len(graph.delivered_keys()) == 2, timeout=30)
        assert second.rows("SELECT COUNT(*) AS n FROM conversations")[0]["n"] == 2  # one folder, both cases
    finally:
        first.stop()
        second.stop()
        await graph.stop()
