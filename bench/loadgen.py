"""The load generator: one process of its own (so it never shares the server's core), against
127.0.0.1 only, bounded in time and count.

Webhooks go through a minimal keep-alive HTTP/1.1 client on asyncio protocols: on a 2-core
machine the aiohttp client itself saturates its core at about 4k requests/s, far below what the
baseline serves, and would hide the difference being measured. The web form goes through
aiohttp's client (two requests per submission), SMTP through aiosmtplib.

Run by ``bench/ingest.py``; on its own:
``python bench/loadgen.py '{"scenario": "whatsapp", "url": "http://127.0.0.1:8080", "seconds": 5,
"concurrency": 50, "prefix": "r1"}'``; prints one JSON object with the figures.

Modes: closed loop (``concurrency`` requests always in flight) or open loop (``rate`` requests
per second started on a fixed schedule whatever the answers do, so a slow server shows in the
latency instead of slowing the generator down: no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TEXTS, sign, wa_number, whatsapp_body  # noqa: E402

MAX_OUTSTANDING = 5000
FOLLOW_UP_SHARE = 0.10


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (sorted in place), 0 when empty."""
    if not values:
        return 0.0
    values.sort()
    index = min(len(values) - 1, max(0, int(round(fraction * len(values) + 0.5)) - 1))
    return values[index]


class WhatsAppTraffic:
    """Signed webhook bodies: distinct message ids; mostly new senders, ~10 % follow-ups
    from a sender already seen in this run (they join that sender's open conversation)."""

    def __init__(self, prefix: str, seed: int, sender_base: int) -> None:
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.count = 0
        self.senders: list[str] = []
        self.sender_base = sender_base

    def next(self) -> tuple[bytes, dict[str, str]]:
        self.count += 1
        if self.senders and self.rng.random() < FOLLOW_UP_SHARE:
            wa_id = self.rng.choice(self.senders)
        else:
            wa_id = wa_number(self.sender_base + len(self.senders))
            self.senders.append(wa_id)
        body = whatsapp_body(
            f"wamid.{self.prefix}.{self.count}", wa_id, f"Person {wa_id[-4:]}", self.rng.choice(TEXTS)
        )
        return body, {"Content-Type": "application/json", "X-Hub-Signature-256": sign(body)}


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buffer[:end]).lower()
        match = re.search(rb"content-length:\s*(\d+)", head)
        length = int(match.group(1)) if match else 0
        if len(self.buffer) < end + 4 + length:
            return
        status = int(head[9:12])
        del self.buffer[: end + 4 + length]
        self.waiter.set_result(status)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    async def request(self, raw: bytes) -> int:
        assert self.transport is not None
        if self.lost is not None:
            raise self.lost
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


class RawClient:
    """A pool of ``_Connection``s to one host: a connection is taken per request, given back
    after it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Connection] = []

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        conn = self.idle.pop() if self.idle else None
        if conn is None or conn.lost is not None:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        raw = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{head}Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        status = await conn.request(raw)
        self.idle.append(conn)
        return status

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    scenario = spec["scenario"]
    base = spec["url"].rstrip("/")
    seconds = float(spec["seconds"])
    concurrency = int(spec.get("concurrency") or 0)
    rate = float(spec.get("rate") or 0)
    max_requests = int(spec.get("max_requests") or 10_000_000)
    traffic = WhatsAppTraffic(spec["prefix"], spec.get("seed", 1), int(spec.get("sender_base", 0)))
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    counter = {"n": 0, "form": 0}

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))

    def note(status: str, elapsed: float) -> None:
        statuses[status] = statuses.get(status, 0) + 1
        if status.startswith("2"):
            latencies.append(elapsed)

    host_port = base.split("://", 1)[1].split("/", 1)[0]
    raw_client = RawClient(host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1]))

    async def whatsapp_once() -> None:
        body, headers = traffic.next()
        started = time.perf_counter()
        status = await raw_client.post("/channels/whatsapp/webhook", body, headers)
        note(str(status), time.perf_counter() - started)

    async def webform_once() -> None:
        counter["form"] += 1
        n = counter["form"]
        async with session.get(f"{base}/channels/webform/token") as resp:
            token = (await resp.json())["form_token"]
        payload = {
            "name": f"Anwohner {n}", "email": f"resident{spec['prefix']}.{n}@example.net", "phone": "",
            "street": "Musterstraße 1", "postcode": "12345", "city": "Musterstadt", "customer_number": "",
            "topic": "construction", "message": TEXTS[n % len(TEXTS)], "form_token": token, "website": "",
        }
        started = time.perf_counter()
        async with session.post(f"{base}/channels/webform/", json=payload) as resp:
            await resp.read()
            note(str(resp.status), time.perf_counter() - started)

    smtp_port = int(spec.get("smtp_port") or 0)

    async def smtp_worker(worker: int, deadline: float) -> None:
        import aiosmtplib

        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, timeout=60, start_tls=False)
        await client.connect()
        try:
            while time.perf_counter() < deadline and counter["n"] < max_requests:
                counter["n"] += 1
                n = counter["n"]
                mail = EmailMessage()
                mail["From"] = f"Anwohner {n} <resident{spec['prefix']}.{worker}.{n}@example.net>"
                mail["To"] = "bau@example.org"
                mail["Subject"] = "Baustelle vor dem Haus"
                mail["Message-ID"] = f"<{spec['prefix']}.{worker}.{n}@bench.example.net>"
                mail.set_content(TEXTS[n % len(TEXTS)])
                started = time.perf_counter()
                try:
                    await client.send_message(mail)
                    note("250", time.perf_counter() - started)
                except aiosmtplib.SMTPException as exc:
                    note("smtp-error", 0.0)
                    if len(errors) < 5:
                        errors.append(repr(exc))
        finally:
            try:
                await client.quit()
            except Exception:  # noqa: BLE001 - closing after the measurement only
                client.close()

    once = {"whatsapp": whatsapp_once, "webform": webform_once}.get(scenario)

    async def guarded() -> None:
        assert once is not None
        try:
            await once()
        except (aiohttp.ClientError, OSError, TimeoutError, KeyError, ValueError) as exc:
            note("client-error", 0.0)
            if len(errors) < 5:
                errors.append(repr(exc))

    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    deadline = started + seconds
    if scenario == "smtp":
        await asyncio.gather(*(smtp_worker(i, deadline) for i in range(max(1, concurrency))))
    elif rate > 0:
        pending: set[asyncio.Task[None]] = set()
        i = 0
        while i < max_requests:
            due = started + i / rate
            if due >= deadline:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= MAX_OUTSTANDING:
                note("skipped-overload", 0.0)
            else:
                task = asyncio.create_task(guarded())
                pending.add(task)
                task.add_done_callback(pending.discard)
            i += 1
        if pending:
            await asyncio.wait(pending, timeout=60)
    else:
        async def worker() -> None:
            while time.perf_counter() < deadline and counter["n"] < max_requests:
                counter["n"] += 1
                await guarded()

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    elapsed = time.perf_counter() - started
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    await session.close()
    raw_client.close()
    client_cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    ok = len(latencies)
    result = {
        "scenario": scenario,
        "mode": "rate" if rate > 0 else "concurrency",
        "concurrency": concurrency,
        "rate": rate,
        "seconds": round(elapsed, 3),
        "ok": ok,
        "statuses": statuses,
        "errors": errors,
        "msgs_per_s": round(ok / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "max_ms": round(max(latencies) * 1000, 3) if latencies else 0.0,
        "client_cpu_share": round(client_cpu / elapsed, 3) if elapsed > 0 else 0.0,
        "senders": len(traffic.senders),
    }
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(spec))))


if __name__ == "__main__":
    main()
