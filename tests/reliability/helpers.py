"""Building blocks for the reliability tests: the service as a real child process, a fake
WhatsApp Graph API whose behaviour a test switches at will, and signed webhook bodies.

Everything listens on 127.0.0.1 on free ports; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from plugins.whatsapp.signature import sign as whatsapp_signature

ROOT = Path(__file__).resolve().parents[2]
APP_SECRET = "reliability-app-secret"
PHONE_NUMBER_ID = "100200300400500"
ADMIN_TOKEN = "reliability-admin-token"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sign(body: bytes, secret: str = APP_SECRET) -> str:
    return whatsapp_signature(body, secret)


def whatsapp_body(message_id: str, wa_id: str, text: str = "Baustelle vor dem Haus, Gehweg gesperrt") -> bytes:
    """A webhook body with one text message, as the Cloud API sends it."""
    return json.dumps({
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA-1", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "4930123456", "phone_number_id": PHONE_NUMBER_ID},
            "contacts": [{"profile": {"name": "Anwohnerin"}, "wa_id": wa_id}],
            "messages": [{"from": wa_id, "id": message_id, "timestamp": str(int(time.time())), "type": "text",
                          "text": {"body": text}}],
        }}]}],
    }).encode()


def whatsapp_status_body(provider_id: str, status: str, wa_id: str, callback_data: str | None = None) -> bytes:
    """A webhook body with one status of one of our messages, echoing its
    ``biz_opaque_callback_data`` as the Cloud API does."""
    entry: dict[str, Any] = {"id": provider_id, "status": status, "timestamp": str(int(time.time())), "recipient_id": wa_id}
    if callback_data is not None:
        entry["biz_opaque_callback_data"] = callback_data
    return json.dumps({
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA-1", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "4930123456", "phone_number_id": PHONE_NUMBER_ID},
            "statuses": [entry],
        }}]}],
    }).encode()


def wa_number(index: int) -> str:
    return f"49151{index:08d}"


class FakeGraph:
    """A Graph API on loopback. ``mode``: ``ok`` answers with a provider id, ``503`` answers
    Service Unavailable, ``timeout`` holds the request far longer than the channel waits,
    ``hang`` holds it until the test ends, ``gate`` holds it until the test sets ``gate`` and
    then answers as ``ok``. Every request is recorded with its outcome."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.port = free_port()
        self.gate = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._counter = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _send(self, request: web.Request) -> web.Response:
        payload = await request.json()
        record = {"mode": self.mode, "payload": payload, "key": payload.get("biz_opaque_callback_data"),
                  "to": payload.get("to"), "outcome": None}
        self.requests.append(record)
        if self.mode == "503":
            record["outcome"] = 503
            return web.json_response({"error": {"message": "Service Unavailable", "code": 2}}, status=503)
        if self.mode in ("timeout", "hang"):
            record["outcome"] = "held"
            await asyncio.sleep(3600 if self.mode == "hang" else 5)
            return web.json_response({"error": {"message": "late"}}, status=503)
        if self.mode == "gate":
            record["outcome"] = "held"
            await self.gate.wait()
        self._counter += 1
        record["outcome"] = 200
        return web.json_response({"messaging_product": "whatsapp", "messages": [{"id": f"wamid.OUT{self._counter}"}]})

    def delivered_keys(self) -> list[str]:
        """Idempotency keys of the requests answered 200 (what the provider really sent)."""
        return [r["key"] for r in self.requests if r["outcome"] == 200]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{version}/{number}/messages", self._send)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def write_config(folder: Path, whatsapp_timeout: float = 1.0, status_wait: float = 2.0) -> Path:
    """The example configuration with a short Graph API timeout, and a short wait for the status
    of a send that timed out, for tests."""
    text = (ROOT / "config" / "contact-router.toml").read_text(encoding="utf-8")
    text = text.replace(
        'api_version = "v21.0"', f'api_version = "v21.0"\ntimeout = {whatsapp_timeout}\nstatus_wait = {status_wait}'
    )
    path = folder / "reliability.toml"
    path.write_text(text, encoding="utf-8")
    return path


class ServiceProcess:
    """``contact-router serve`` as a real child process with the WhatsApp channel on."""

    def __init__(self, folder: Path, graph_url: str) -> None:
        self.folder = folder
        self.data_dir = folder / "data"
        self.port = free_port()
        self.config = write_config(folder)
        self.log = folder / "service.log"
        self.env = dict(os.environ)
        self.env.update({
            "WHATSAPP_APP_SECRET": APP_SECRET, "WHATSAPP_VERIFY_TOKEN": "verify", "WHATSAPP_ACCESS_TOKEN": "access",
            "WHATSAPP_PHONE_NUMBER_ID": PHONE_NUMBER_ID, "WHATSAPP_GRAPH_URL": graph_url,
            "SMTP_LISTEN_HOST": "127.0.0.1", "SMTP_LISTEN_PORT": str(free_port()),
            "CONTACT_ROUTER_TOKEN_ADMIN": ADMIN_TOKEN, "CONTACT_ROUTER_TOKEN_HOTLINE": "reliability-hotline",
            "CONTACT_ROUTER_TOKEN_CONTRACTOR": "reliability-contractor",
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{self.port}", "CONTACT_ROUTER_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        })
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "contact-router.sqlite3"

    def command(self) -> list[str]:
        """The command line that starts the service."""
        return [sys.executable, "-m", "router.cli", "serve", "--config", str(self.config), "--host", "127.0.0.1",
                "--port", str(self.port), "--data-dir", str(self.data_dir)]

    async def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as out:  # noqa: ASYNC230 - opening a local log file does not wait
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - Popen starts the process and returns
                self.command(), env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT),
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited early:\n{self.log.read_text(errors='replace')[-3000:]}")
                try:
                    async with session.get(f"{self.url}/healthz", timeout=aiohttp.ClientTimeout(total=1)) as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError("service did not become healthy")

    def kill9(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a power cut for the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Read the database file directly (WAL lets a reader in beside the running service)."""
        conn = sqlite3.connect(self.db_path, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


async def post_webhook(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    """POST a signed webhook; the status, or 0 when the connection broke."""
    try:
        async with session.post(
            f"{url}/channels/whatsapp/webhook", data=body,
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(body)},
            timeout=aiohttp.ClientTimeout(total=15),
        ) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return 0


async def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` (sync or async) until true or ``timeout``; returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value or time.monotonic() >= deadline:
            return bool(value)
        await asyncio.sleep(interval)


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
