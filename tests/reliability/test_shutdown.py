"""SIGTERM, as systemd or a container runtime sends it, while the outbox is sending to a
provider that hangs: the process ends within a bounded time, and after a restart right away
the rows the shutdown interrupted are sent again without waiting out the lease, no key twice."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp

from .helpers import FakeGraph, ServiceProcess, post_webhook, sign, wa_number, wait_until, whatsapp_body, write_config

MESSAGES = 40  # more than the outbox sends at once (16): the rest of the batch is claimed, not sent


async def test_sigterm_while_the_provider_hangs_then_restart_sends_what_was_held(tmp_path: Path) -> None:
    graph = FakeGraph()
    await graph.start()
    service = ServiceProcess(tmp_path, graph.url)
    service.config = write_config(tmp_path, whatsapp_timeout=60.0)  # the provider holds the sends
    try:
        await service.start()
        # The outbox claims what is due when a commit wakes it, so webhooks arriving together
        # may be claimed in several batches, and only the first would be sent. One message
        # first, held at the provider: its batch keeps the outbox from claiming the others
        # until they are all in, then they go as one batch to a provider that hangs.
        graph.mode = "gate"
        async with aiohttp.ClientSession() as session:
            assert await post_webhook(session, service.url, whatsapp_body("wamid.term.0", wa_number(0))) == 200
            assert await wait_until(lambda: len(graph.requests) == 1, timeout=30), "the first send is at the provider"
            statuses = await asyncio.gather(*(
                post_webhook(session, service.url, whatsapp_body(f"wamid.term.{i}", wa_number(i))) for i in range(1, MESSAGES)
            ))
        assert set(statuses) == {200}
        graph.mode = "hang"
        graph.gate.set()
        assert await wait_until(lambda: len(graph.requests) >= 1 + 16, timeout=30), "sends in flight"
        held = service.rows("SELECT COUNT(*) AS n FROM outbox WHERE kind = 'ack' AND state = 'sending'")[0]["n"]
        assert held == MESSAGES - 1, "one batch claimed: 16 at the provider, the rest waiting for a slot"

        code, took = await stop_with_sigterm(service)
        assert code == 0 and took < 30, f"exit {code} after {took:.1f} s"
        never_sent = {r["idempotency_key"] for r in service.rows("SELECT idempotency_key FROM outbox WHERE kind = 'ack'")}
        never_sent -= {r["key"] for r in graph.requests}
        assert len(never_sent) == MESSAGES - 1 - 16

        # Restart at once, the provider healthy again. The rows the provider never saw went
        # nowhere; the ones it held are sent again once the channel's status_wait (2 s) is over.
        graph.mode = "ok"
        await service.start()
        sent_soon = await wait_until(
            lambda: service.rows("SELECT COUNT(*) AS n FROM outbox WHERE kind = 'ack' AND state = 'sent'")[0]["n"] == MESSAGES,
            timeout=45,  # far below the lease (two minutes), which the rows must not wait for
        )
        rows = service.rows("SELECT state, claimed_until, attempts FROM outbox WHERE kind = 'ack'")
        states = Counter(r["state"] for r in rows)
        assert sent_soon, (f"45 s after the restart: {dict(states)}; {len(never_sent)} of them never reached the provider,"
                           f" yet wait for the lease the stopped process took (until {max(r['claimed_until'] or '' for r in rows)})")
        delivered = Counter(graph.delivered_keys())
        assert all(n == 1 for n in delivered.values()), "no acknowledgement accepted twice"
        # A row handed back before it reached its channel does not count the attempt the stop cut.
        attempts = {r["idempotency_key"]: r["attempts"] for r in service.rows("SELECT idempotency_key, attempts FROM outbox")}
        assert {attempts[key] for key in never_sent} == {1}
    finally:
        service.stop()
        await graph.stop()


async def stop_with_sigterm(service: ServiceProcess) -> tuple[int, float]:
    """SIGTERM, as systemd or Docker sends it: the exit code and the seconds until the exit."""
    assert service.proc is not None
    started = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(service.proc.wait, 60)
    return code, time.monotonic() - started


async def stalled_webhook(service: ServiceProcess, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A signed webhook whose sender stops after its first 20 bytes of body, once the service's
    handler waits for the rest."""
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(
        f"POST /channels/whatsapp/webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-Hub-Signature-256: {sign(body)}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:20]
    )
    await writer.drain()
    await asyncio.sleep(0.5)  # the handler is waiting for the rest of the body
    return reader, writer


async def test_a_second_signal_during_shutdown_ends_the_process_without_tracebacks(tmp_path: Path) -> None:
    """systemd's stop after a ``kill -INT``, or Ctrl-C pressed twice: a second signal while the
    shutdown waits for a request in work (a body still arriving). The process ended with code 1
    and some sixty lines of tracebacks ("generator didn't stop after athrow()", "asynchronous
    generator is already running") from the app's cleanup contexts, which the second
    GracefulExit interrupted."""
    graph = FakeGraph()
    await graph.start()
    service = ServiceProcess(tmp_path, graph.url)
    service.env["CONTACT_ROUTER_LOG_LEVEL"] = "INFO"
    try:
        await service.start()
        _, writer = await stalled_webhook(service, whatsapp_body("wamid.slow.1", wa_number(1)))
        assert service.proc is not None
        service.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        service.proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(service.proc.wait, 40)
        writer.close()
        log = service.log.read_text(errors="replace")
        assert "Traceback" not in log and "RuntimeError" not in log, f"exit {code}:\n{log[-1500:]}"
    finally:
        service.stop()
        await graph.stop()


async def test_sigterm_ends_within_dockers_ten_seconds_though_a_body_is_still_arriving(tmp_path: Path) -> None:
    """A sender that stalls mid-body is allowed 30 s; a stop waited that long for it, so that
    Docker's SIGKILL (10 s after its SIGTERM) ended every stop while such a request was open.
    The stop now cuts it off after a short grace: its sender got no 2xx and sends again, and
    the message is stored once."""
    graph = FakeGraph()
    await graph.start()
    service = ServiceProcess(tmp_path, graph.url)
    try:
        await service.start()
        body = whatsapp_body("wamid.stalled.1", wa_number(1))
        reader, writer = await stalled_webhook(service, body)
        code, took = await stop_with_sigterm(service)
        assert code == 0 and took < 10, f"exit {code} after {took:.1f} s"
        assert not (await reader.read()).startswith(b"HTTP/1.1 200"), "no 2xx for a body that never arrived"
        writer.close()
        assert service.rows("SELECT COUNT(*) AS n FROM messages WHERE channel_message_id = 'wamid.stalled.1'")[0]["n"] == 0

        await service.start()
        async with aiohttp.ClientSession() as session:  # the provider's retry, twice
            assert [await post_webhook(session, service.url, body) for _ in range(2)] == [200, 200]
        assert service.rows("SELECT COUNT(*) AS n FROM messages WHERE channel_message_id = 'wamid.stalled.1'")[0]["n"] == 1
    finally:
        service.stop()
        await graph.stop()
