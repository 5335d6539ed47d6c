"""The contract test kit: run a channel plugin against the real core in a few lines.

``CoreHarness`` starts the whole service (real SQLite file, real HTTP server on 127.0.0.1, a
frozen clock) with the plugins you name; ``check_channel_contract`` then drives your channel
through the promises every channel must keep::

    from router.testing import CoreHarness, check_channel_contract

    async def test_my_channel_keeps_the_contract(tmp_path):
        async def deliver(harness, key):
            # send one inbound message through your channel's real route; the same key means
            # the same provider message id (a redelivery)
            await harness.client.post("/channels/mychat/inbound", json={"id": key, "from": "+4915112345678", "text": "Hallo"})

        async with CoreHarness(tmp_path, plugins=[my_plugin_module], settings={"mychat": {...}}) as harness:
            await check_channel_contract(harness, "mychat", deliver, sender=("phone", "+4915112345678"))

It checks: the channel registers with capabilities and routes under ``/channels/<name>/``; an
inbound message is stored once (a redelivery changes nothing), gets a conversation with an owner
and a deadline, and an acknowledgement queued on the same channel to the sender; the outbox
delivers the acknowledgement through ``Channel.send``, which returns a ``SendResult`` or raises a
``DeliveryError``; a staff reply through the inbox API reaches ``send`` as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import select
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from . import keys
from .channel import Capabilities, Channel, DeliveryError, OutboundMessage, SendResult
from .clock import FrozenClock
from .config import DEFAULT_CONFIG, Config, build_config
from .core import Core
from .outbox import OutboxPolicy

# A Monday morning in Berlin, inside everybody's business hours.
DEFAULT_START = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)

TEST_ENV = {
    "CONTACT_ROUTER_TOKEN_ADMIN": "test-admin-token",
    "CONTACT_ROUTER_TOKEN_HOTLINE": "test-hotline-token",
    "CONTACT_ROUTER_TOKEN_CONTRACTOR": "test-contractor-token",
    "WEBFORM_SECRET": "test-webform-secret",
}


def load_raw_config(path: Path = DEFAULT_CONFIG) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text("utf-8"))


def example_config(raw: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, *,
                settings: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """The example organisation (or ``raw``), with test tokens and channel settings merged in."""
    data = copy.deepcopy(dict(raw) if raw is not None else load_raw_config())
    for name, section in (settings or {}).items():
        data.setdefault("channels", {}).setdefault(name, {}).update(section)
    return build_config(data, {**TEST_ENV, **(env or {})}, "test-config")


@contextlib.contextmanager
def unopened_connections() -> Iterator[str | None]:
    """A loopback base URL (``http://127.0.0.1:PORT``) whose connections never open, for testing
    that a channel's send tells "no connection: nothing was sent" from "no answer: the provider
    may have taken it" (only the second should wait for a status before sending again). Its
    listener's accept queue is full, and Linux then leaves a new connection unanswered. Yields
    None where this system completes such connections after all: the test should skip."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    sockets = [listener]
    try:
        for _ in range(5):  # the queue filled; the last one shows whether a further one opens
            waiting = socket.socket()
            waiting.setblocking(False)
            sockets.append(waiting)
            waiting.connect_ex(address)
        _, opened, _ = select.select([], [waiting], [], 0.3)
        yield None if opened else f"http://127.0.0.1:{address[1]}"
    finally:
        for each in sockets:
            each.close()


class CoreHarness:
    """The whole service on a real SQLite file and a real loopback HTTP server, with a frozen
    clock and the outbox and scheduler driven by the test (``run_outbox``, ``escalate``)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        plugins: Iterable[Any] = (),
        entrypoints: bool | Iterable[str] = ("webform",),
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        config: Config | None = None,
        env: Mapping[str, str] | None = None,
        start: datetime = DEFAULT_START,
        outbox_policy: OutboxPolicy | None = None,
        run_workers: bool = False,
    ) -> None:
        from .app import create_app

        self.data_dir = Path(data_dir)
        self.clock = FrozenClock(start)
        self.config = config or example_config(env=env, settings=settings)
        self.tokens = {m.name: m.token for m in self.config.staff}
        self.app: web.Application = create_app(
            self.config,
            data_dir=self.data_dir,
            clock=self.clock,
            entrypoints=entrypoints,
            extra_plugins=plugins,
            outbox_policy=outbox_policy or OutboxPolicy(base_delay=0.01, max_delay=0.05, poll_seconds=0.05, send_timeout=5,
                                                        retry_seconds=0),
            run_workers=run_workers,
            env={**TEST_ENV, **(env or {})},
        )
        self.server = TestServer(self.app, host="127.0.0.1")
        self.client: TestClient = TestClient(self.server)

    async def __aenter__(self) -> CoreHarness:
        await self.client.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    @property
    def core(self) -> Core:
        return self.app[keys.CORE]

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def run_outbox(self, rounds: int = 20) -> int:
        """Deliver everything due now by the harness's clock, in up to ``rounds`` batches.

        The clock stands still, so a send that failed is due again only once the test moves it
        past the retry (``harness.clock.advance(timedelta(seconds=1))`` with the harness's
        policy) and calls this again: a test sees each attempt and what it left."""
        total = 0
        assert self.core.outbox is not None
        for _ in range(rounds):
            sent = await self.core.outbox.run_once()
            total += sent
            if sent == 0:
                break
        return total

    async def escalate(self) -> list[dict[str, Any]]:
        return await self.core.escalate_due()

    async def events_done(self) -> None:
        """Wait for the event hooks (``message_received``, ``conversation_*``) called so far:
        the core calls them in the background after each commit, so a test that checks what
        a hook did waits for them first."""
        await self.core.drain_background()

    async def api(self, method: str, path: str, *, token: str | None = "admin", **kwargs: Any) -> tuple[int, Any]:
        """Call the inbox API as a staff member (by name from the config) or with a raw token."""
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {self.tokens.get(token, token)}"
        response = await self.client.request(method, path, headers=headers, **kwargs)
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body

    def refuse_writes(self, refuse: bool = True) -> None:
        """Make the database refuse every write (read-only, as a full or read-only disk makes
        it), or take it again: writes meanwhile raise ``StorageUnavailable``."""
        writer = self.core.store._writer
        assert writer is not None
        writer.execute(f"PRAGMA query_only = {'ON' if refuse else 'OFF'}")

    @contextlib.contextmanager
    def refusing_writes(self) -> Iterator[None]:
        """``refuse_writes`` for the block."""
        self.refuse_writes()
        try:
            yield
        finally:
            self.refuse_writes(False)

    async def stalled_request(
        self, path: str, part: bytes, *, declared: int, headers: Mapping[str, str] | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a connection and send a POST's headers with ``Content-Length: declared`` and only
        the first ``part`` of its body, then nothing more: a sender that trickles or stops.
        The caller reads the answer from the reader (408 ``body_timeout`` once the service's
        deadline has passed) and closes the writer. A raw socket, because an HTTP client
        sends the whole body at once."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {declared}"]
        lines += [f"{name}: {value}" for name, value in {"Content-Type": "application/json", **(headers or {})}.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + part)
        await writer.drain()
        return reader, writer

    async def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.core.store.fetchall(sql, params)]

    async def count(self, table: str, where: str = "1", params: tuple[Any, ...] = ()) -> int:
        row = await self.core.store.fetchone(f"SELECT COUNT(*) FROM {table} WHERE {where}", params)
        assert row is not None
        return int(row[0])


class _RecordingSend:
    """Wraps a channel's ``send`` to record what it was asked and what it answered."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.original = channel.send
        self.calls: list[tuple[OutboundMessage, SendResult | BaseException]] = []

    async def __call__(self, message: OutboundMessage) -> SendResult:
        try:
            result = await self.original(message)
        except BaseException as exc:
            self.calls.append((message, exc))
            raise
        self.calls.append((message, result))
        return result


async def check_channel_contract(
    harness: CoreHarness,
    channel_name: str,
    deliver: Callable[[CoreHarness, str], Awaitable[None]],
    *,
    sender: tuple[str, str],
    expect_ack: bool = True,
) -> dict[str, Any]:
    """Drive a channel through the core's promises; raises AssertionError naming what broke.

    ``deliver(harness, key)`` must push one inbound message through the channel's real entry
    point (HTTP route or service), with a provider message id derived from ``key``.
    ``sender`` is the (kind, normalised address) the message must resolve to.
    Returns the conversation as the inbox API shows it.
    """
    core = harness.core
    assert channel_name in core.channels, f"no channel named {channel_name!r} registered (have {sorted(core.channels)})"
    channel = core.channels[channel_name]
    assert isinstance(channel, Channel), "register_channels must return Channel instances"
    assert channel.name == channel_name
    assert isinstance(channel.capabilities, Capabilities), "capabilities must be a Capabilities instance"
    for route in harness.app.router.routes():
        info = route.resource.canonical if route.resource else ""
        if channel.routes() and info.startswith(f"/channels/{channel_name}"):
            break
    else:
        assert not channel.routes(), f"routes of {channel_name!r} are not mounted under /channels/{channel_name}/"

    before = await harness.count("messages", "channel = ? AND direction = 'in'", (channel_name,))
    await deliver(harness, "contract-1")
    after = await harness.count("messages", "channel = ? AND direction = 'in'", (channel_name,))
    assert after == before + 1, f"one inbound message should be stored, found {after - before}"
    await deliver(harness, "contract-1")
    again = await harness.count("messages", "channel = ? AND direction = 'in'", (channel_name,))
    assert again == after, "a redelivered message (same provider id) must not be stored twice"

    rows = await harness.rows(
        "SELECT m.conversation_id, i.kind, i.address FROM messages m JOIN identities i ON i.contact_id = m.contact_id"
        " WHERE m.channel = ? AND m.direction = 'in' ORDER BY m.id DESC LIMIT 20",
        (channel_name,),
    )
    assert any((r["kind"], r["address"]) == sender for r in rows), f"the sender should resolve to {sender}, found {[(r['kind'], r['address']) for r in rows]}"
    conversation_id = rows[0]["conversation_id"]
    assert conversation_id is not None, "an inbound message must belong to a conversation"
    status, conv = await harness.api("GET", f"/api/v1/conversations/{conversation_id}")
    assert status == 200, conv
    assert conv["unit"] in harness.config.units, "the conversation must have a responsible unit"
    assert conv["deadline"], "the conversation must have a deadline"

    recorder = _RecordingSend(channel)
    channel.send = recorder  # type: ignore[method-assign]
    try:
        if expect_ack:
            acks = await harness.rows(
                "SELECT * FROM outbox WHERE conversation_id = ? AND kind = 'ack'", (conversation_id,)
            )
            assert len(acks) == 1, f"exactly one acknowledgement should be queued, found {len(acks)}"
            assert acks[0]["channel"] == channel_name, "the acknowledgement must go out on the same channel"
            assert (acks[0]["to_kind"], acks[0]["to_address"]) == sender, "the acknowledgement must go to the sender"
            await harness.run_outbox()
            assert recorder.calls, "the outbox should have called send() for the acknowledgement"
            message, outcome = recorder.calls[0]
            assert message.case_reference == conv["case_reference"]
            assert isinstance(outcome, (SendResult, DeliveryError)), f"send() must return SendResult or raise DeliveryError, got {outcome!r}"
        if channel.capabilities.can_reply:
            count = len(recorder.calls)
            status, reply = await harness.api("POST", f"/api/v1/conversations/{conversation_id}/replies", json={"text": "Antwort vom Team"})
            assert status == 201, reply
            await harness.run_outbox()
            assert len(recorder.calls) > count, "a staff reply should reach send()"
            message, outcome = recorder.calls[-1]
            assert message.kind == "reply" and message.text == "Antwort vom Team"
            assert isinstance(outcome, (SendResult, DeliveryError)), f"send() must return SendResult or raise DeliveryError, got {outcome!r}"
    finally:
        with contextlib.suppress(AttributeError):
            del channel.send
    status, conv = await harness.api("GET", f"/api/v1/conversations/{conversation_id}")
    return conv
