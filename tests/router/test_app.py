"""The application's middleware against a real loopback server: the body deadline.

A request whose body does not arrive in time is answered 408 with the JSON error body and its
connection closed, whatever way the handler reads the body, and nothing is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from router import keys
from router.app import StartFailed
from router.channel import BodyDeadline, Channel
from router.hookspecs import hookimpl
from router.testing import CoreHarness

DEADLINE = 0.3
MIN_RATE = 500.0


class SlowRouting:
    """A routing plugin that thinks for twice the body deadline (and then leaves the choice to
    the rules): the handler outlives the deadline after its body has arrived."""

    @hookimpl
    async def route_message(self, message: Any, is_customer: bool) -> None:
        await asyncio.sleep(DEADLINE * 2)


@pytest.fixture
async def slow_harness(tmp_path: Path) -> AsyncIterator[CoreHarness]:
    harness = CoreHarness(tmp_path / "data", plugins=[SlowRouting()])
    harness.app[keys.BODY_DEADLINE] = BodyDeadline(DEADLINE, MIN_RATE)
    async with harness:
        yield harness


async def form_body(harness: CoreHarness, message: str = "Gehweg gesperrt, seit Tagen kommt niemand.") -> bytes:
    """A valid JSON submission of the web form, with a fresh form token."""
    response = await harness.client.get("/channels/webform/token")
    form_token = (await response.json())["form_token"]
    harness.clock.advance(timedelta(seconds=5))
    return json.dumps({
        "name": "Erika Mustermann", "street": "Lindenweg 3", "postcode": "12345", "city": "Musterstadt",
        "topic": "construction", "message": message, "form_token": form_token,
    }).encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of one HTTP/1.1 response, and proof that the server then
    closed the connection (the read to EOF returns)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    return status, headers, body


def test_a_body_earns_time_by_arriving() -> None:
    # Apache's mod_reqtimeout counts so: a second more for every min_rate bytes received.
    deadline = BodyDeadline(30, 500)
    assert deadline.allowed(0) == 30
    assert deadline.allowed(5_000) == 40
    assert BodyDeadline().allowed(25 * 1024 * 1024) > 25 * 1024 * 1024 / 1_000  # a 25 MiB mail at 1 kB/s


async def test_a_web_form_body_that_stops_halfway_is_answered_408_and_nothing_is_stored(slow_harness: CoreHarness) -> None:
    body = json.dumps({"name": "Erika", "message": "Baustelle vor dem Haus"}).encode()
    started = time.monotonic()
    reader, writer = await slow_harness.stalled_request("/channels/webform/", body[:10], declared=len(body))
    try:
        status, headers, answer = await read_answer(reader)
    finally:
        writer.close()
    assert status == 408
    assert headers["content-type"].startswith("application/json")
    assert json.loads(answer)["error"]["code"] == "body_timeout"
    assert DEADLINE <= time.monotonic() - started < DEADLINE + 3
    assert await slow_harness.count("messages") == 0
    assert await slow_harness.count("conversations") == 0


async def test_an_api_body_read_whole_by_the_handler_has_the_same_deadline(slow_harness: CoreHarness) -> None:
    # The inbox API reads with request.read(), not read_limited_body: the deadline holds there too.
    response = await slow_harness.client.post("/channels/webform/", data=await form_body(slow_harness),
                                              headers={"Content-Type": "application/json"})
    assert response.status == 201
    (conversation,) = await slow_harness.rows("SELECT id FROM conversations")
    token = slow_harness.tokens["admin"]
    reader, writer = await slow_harness.stalled_request(
        f"/api/v1/conversations/{conversation['id']}/notes", b'{"text": "Rufe morgen', declared=400,
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        status, _, answer = await read_answer(reader)
    finally:
        writer.close()
    assert status == 408 and json.loads(answer)["error"]["code"] == "body_timeout"
    assert await slow_harness.count("messages", "kind = 'note'") == 0


async def test_a_body_that_arrives_in_pieces_within_the_deadline_is_taken(slow_harness: CoreHarness) -> None:
    body = await form_body(slow_harness)
    reader, writer = await slow_harness.stalled_request("/channels/webform/", body[:20], declared=len(body))
    try:
        await asyncio.sleep(DEADLINE / 3)
        writer.write(body[20:])
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 201")
    assert await slow_harness.count("conversations") == 1


async def test_a_handler_that_outlives_the_deadline_after_its_body_arrived_is_answered(slow_harness: CoreHarness) -> None:
    # The routing plugin takes twice the deadline; the body was whole long before.
    started = time.monotonic()
    response = await slow_harness.client.post("/channels/webform/", data=await form_body(slow_harness),
                                              headers={"Content-Type": "application/json"})
    assert response.status == 201
    assert time.monotonic() - started >= DEADLINE * 2
    assert await slow_harness.count("conversations") == 1


async def test_a_body_that_trickles_faster_than_the_minimum_rate_is_taken_after_the_first_deadline(
    slow_harness: CoreHarness,
) -> None:
    body = await form_body(slow_harness, "Gehweg gesperrt, seit Tagen kommt niemand. " * 40)
    assert len(body) > 1_500  # so it takes longer than the deadline at this rate
    step = 100  # bytes every 0.05 s: 2,000 bytes/s, four times the minimum
    reader, writer = await slow_harness.stalled_request("/channels/webform/", body[:step], declared=len(body))
    started = time.monotonic()
    try:
        for at in range(step, len(body), step):
            await asyncio.sleep(0.05)
            writer.write(body[at:at + step])
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert time.monotonic() - started > DEADLINE  # longer than the time allowed for nothing
    assert head.startswith(b"HTTP/1.1 201")
    assert await slow_harness.count("conversations") == 1


async def test_a_body_that_trickles_slower_than_the_minimum_rate_is_cut(slow_harness: CoreHarness) -> None:
    body = await form_body(slow_harness)
    reader, writer = await slow_harness.stalled_request("/channels/webform/", body[:5], declared=len(body))
    started = time.monotonic()

    async def trickle() -> None:  # 5 bytes every 0.05 s: 100 bytes/s, a fifth of the minimum
        for at in range(5, len(body), 5):
            await asyncio.sleep(0.05)
            writer.write(body[at:at + 5])
            await writer.drain()

    sending = asyncio.create_task(trickle())
    try:
        status, _, answer = await read_answer(reader)
    finally:
        sending.cancel()
        writer.close()
    assert status == 408 and json.loads(answer)["error"]["code"] == "body_timeout"
    # 0.3 s, plus 0.2 s a second for 100 bytes/s: cut after about 0.375 s
    assert DEADLINE <= time.monotonic() - started < 2
    assert await slow_harness.count("conversations") == 0


async def test_a_browser_whose_form_stalls_gets_a_page(slow_harness: CoreHarness) -> None:
    reader, writer = await slow_harness.stalled_request(
        "/channels/webform/", b"name=Erika&message=Geh", declared=300,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        status, headers, answer = await read_answer(reader)
    finally:
        writer.close()
    assert status == 408 and headers["content-type"].startswith("text/html")
    assert b"send the form again" in answer


async def test_a_read_the_database_cannot_serve_is_a_503_not_a_500(tmp_path) -> None:
    """The database's files gone under the running service (a disk failing, an operator's
    mistake): a write was a 503, a read a 500 "internal error"."""
    import shutil

    from .helpers import webform_message

    async with CoreHarness(tmp_path / "data") as harness:
        await harness.core.ingest(webform_message())
        shutil.rmtree(tmp_path / "data")
        status, body = await harness.api("GET", "/api/v1/conversations")
        assert status == 503 and body["error"]["code"] == "unavailable", body
        response = await harness.client.get("/api/v1/conversations", headers={"Authorization": f"Bearer {harness.tokens['admin']}"})
        assert response.status == 503 and response.headers.get("Retry-After") == "5"


async def test_the_log_names_the_route_not_a_path_that_holds_a_secret(tmp_path, caplog) -> None:
    """The error middleware wrote ``request.path`` into the log: the PBX's credential (the CTI
    path) and a resident's status token, whenever the database refused a write."""
    import logging

    from .helpers import webform_message

    secret = "cti-very-secret-path-credential"
    env = {"TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456",
           "TWILIO_API_URL": "http://127.0.0.1:9", "PHONE_CTI_SECRET": secret}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "phone"), env=env) as harness:
        first = await harness.core.ingest(webform_message())
        page = await (await harness.client.get(f"/channels/webform/status/{first.status_token}")).text()
        form_token = page.split('name="form_token" value="', 1)[1].split('"', 1)[0]
        harness.clock.advance(timedelta(seconds=5))
        caplog.set_level(logging.INFO, logger="contact_router")
        with harness.refusing_writes():
            cti = await harness.client.post(f"/channels/phone/cti/{secret}", json={
                "event": "hangup", "cause": "noAnswer", "from": "030 12345678", "to": "030 999999",
                "direction": "in", "callId": "c1"})
            reply = await harness.client.post(f"/channels/webform/status/{first.status_token}",
                                              json={"message": "Noch eine Frage", "form_token": form_token})
        assert (cti.status, reply.status) == (503, 503)
        assert cti.headers.get("Retry-After") == reply.headers.get("Retry-After") == "5"  # the sender tries again
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("contact_router"))
    assert "POST /channels/phone/cti/{secret}" in logged and "POST /channels/webform/status/{token}" in logged
    assert secret not in logged and first.status_token not in logged


async def test_health_fails_when_a_worker_has_ended(tmp_path) -> None:
    """The outbox's task could end (an exception that was no Exception, from a plugin) while
    /healthz said ok: webhooks were answered and stored, and nothing was sent until a restart."""
    async with CoreHarness(tmp_path / "data", run_workers=True) as harness:
        response = await harness.client.get("/healthz")
        assert response.status == 200
        [outbox] = [task for task in harness.app[keys.WORKERS] if task.get_name() == "outbox"]
        outbox.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await outbox
        response = await harness.client.get("/healthz")
        body = await response.json()
        assert response.status == 503 and "outbox" in body["detail"]


class _ProbeChannel(Channel):
    """A channel whose services record when they start and stop, whether the HTTP session was
    open then, and (``fail_second``) one that cannot start, as a port in use."""

    name = "probe"

    def __init__(self, events: list[str], *, fail_second: bool = False) -> None:
        self.events, self.fail_second = events, fail_second

    def services(self) -> list[Any]:
        async def first() -> AsyncIterator[None]:
            self.events.append(f"first started, session closed={self.context.http.closed}")
            try:  # as docs/plugins.md asks, so that it stops when a later part fails to start
                yield
            finally:
                self.events.append(f"first stopped, session closed={self.context.http.closed}")

        async def second() -> AsyncIterator[None]:
            if self.fail_second:
                raise OSError("address already in use")
            yield

        return [first, second]


class _ProbePlugin:
    def __init__(self, channel: _ProbeChannel) -> None:
        self.channel = channel

    @hookimpl
    def register_channels(self) -> list[Channel]:
        return [self.channel]


async def test_channel_services_run_inside_the_http_session_s_lifetime(tmp_path: Path) -> None:
    """Services start after the HTTP session and stop before it: a service that announces
    itself to its provider at start, or says goodbye at stop, needs an open session."""
    events: list[str] = []
    async with CoreHarness(tmp_path / "data", plugins=[_ProbePlugin(_ProbeChannel(events))]):
        assert events == ["first started, session closed=False"]
    assert events[-1] == "first stopped, session closed=False"


async def test_a_service_that_cannot_start_stops_the_services_started_before_it(tmp_path: Path) -> None:
    """A channel's second service failing (a port in use) must stop its first, which was
    running, and the error names the channel; nothing keeps running behind the failed start."""
    events: list[str] = []
    harness = CoreHarness(tmp_path / "data", plugins=[_ProbePlugin(_ProbeChannel(events, fail_second=True))])
    with pytest.raises(StartFailed) as raised:
        await harness.__aenter__()
    await harness.client.close()
    assert "'probe'" in str(raised.value) and "address already in use" in str(raised.value)
    assert events == ["first started, session closed=False", "first stopped, session closed=False"]
