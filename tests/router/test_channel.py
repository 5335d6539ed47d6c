"""The helpers ``router.channel`` gives channel handlers: size-limited body reading, tried
against a real aiohttp server on 127.0.0.1 (also with raw HTTP, for bodies a client library
would not send), ``Retry-After`` parsing, and size-limited reading of a provider's JSON answer
from a real server that answers too much."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from router.hookspecs import BodyTooLarge, parse_retry_after, read_limited_body, read_provider_json

LIMIT = 100_000  # above the 64 KiB a single read hands over, so the count runs across chunks


async def _echo(request: web.Request) -> web.Response:
    """What ``read_limited_body`` made of the request: the size and hash read, or the refusal."""
    try:
        body = await read_limited_body(request, LIMIT)
    except BodyTooLarge as exc:
        return web.json_response({"limit": exc.limit, "size": exc.size}, status=413)
    return web.json_response({"read": len(body), "sha256": hashlib.sha256(body).hexdigest()})


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_post("/", _echo)
    async with TestServer(app, host="127.0.0.1") as running:
        yield running


async def _post(server: TestServer, data: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url("/"), data=data, headers=headers) as response,
    ):
        return response.status, await response.json()


async def _raw(server: TestServer, head: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Send a request as bytes and read the answer; the connection stays open meanwhile, so an
    answer that only comes once the body is complete never comes (and the test fails)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(5):
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            return status, json.loads(await reader.readexactly(length))
    finally:
        writer.close()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


CHUNKED_HEAD = "POST / HTTP/1.1\nHost: 127.0.0.1\nTransfer-Encoding: chunked\n"


async def test_a_body_at_the_limit_is_read_whole(server: TestServer) -> None:
    body = bytes(range(256)) * (LIMIT // 256) + b"x" * (LIMIT % 256)
    assert len(body) == LIMIT
    status, answer = await _post(server, body)
    assert status == 200
    assert answer == {"read": LIMIT, "sha256": hashlib.sha256(body).hexdigest()}


async def test_one_byte_over_the_limit_is_refused(server: TestServer) -> None:
    status, answer = await _post(server, b"x" * (LIMIT + 1))
    assert (status, answer) == (413, {"limit": LIMIT, "size": LIMIT + 1})


async def test_a_declared_length_over_the_limit_is_refused_before_any_body_arrives(server: TestServer) -> None:
    head = f"POST / HTTP/1.1\nHost: 127.0.0.1\nContent-Length: {LIMIT + 1}\n"
    status, answer = await _raw(server, head)  # the body is never sent
    assert (status, answer) == (413, {"limit": LIMIT, "size": LIMIT + 1})


async def test_a_chunked_body_without_length_at_the_limit_is_read(server: TestServer) -> None:
    body = b"y" * LIMIT
    chunks = _chunk(body[:30_000]) + _chunk(body[30_000:]) + b"0\r\n\r\n"
    status, answer = await _raw(server, CHUNKED_HEAD, chunks)
    assert (status, answer["read"]) == (200, LIMIT)


async def test_a_chunked_body_without_length_is_refused_while_it_is_read(server: TestServer) -> None:
    # Over the limit across two chunks, and the body never ends: only counting while reading
    # can answer.
    status, answer = await _raw(server, CHUNKED_HEAD, _chunk(b"z" * 60_000) + _chunk(b"z" * (LIMIT - 59_999)))
    assert status == 413
    assert answer["limit"] == LIMIT and answer["size"] > LIMIT


async def test_a_compressed_body_is_limited_by_its_inflated_size(server: TestServer) -> None:
    packed = gzip.compress(b"a" * (LIMIT + 1))
    assert len(packed) < LIMIT  # the Content-Length the client declares is within the limit
    status, answer = await _post(server, packed, headers={"Content-Encoding": "gzip"})
    assert status == 413 and answer["size"] > LIMIT


async def test_a_compressed_body_at_the_limit_is_read_inflated(server: TestServer) -> None:
    body = b"b" * LIMIT
    status, answer = await _post(server, gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert status == 200 and answer["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7", 7.0), ("0", 0.0), ("1.5", 1.5), (" 30 ", 30.0), ("86400", 86400.0)],
)
def test_retry_after_in_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


@pytest.mark.parametrize(
    "value",
    [None, "", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", "-1", "-0.5", "nan", "inf", "86401", "1e400"],
)
def test_retry_after_that_cannot_be_used_is_none(value: str | None) -> None:
    assert parse_retry_after(value) is None


# --- read_provider_json: a provider's answer is read only so far ------------------------------


async def _endless(request: web.Request) -> web.StreamResponse:
    """An answer that never ends: JSON white space, chunked, for as long as it is read."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    while True:
        await response.write(b" " * 65536)


async def _declared(request: web.Request) -> web.Response:
    """An answer whose Content-Length says 2 MB (its body is never waited for)."""
    return web.Response(body=b"[" + b" " * (2_000_000 - 2) + b"]", content_type="application/json")


async def _answer(request: web.Request) -> web.Response:
    return web.Response(body=request.query["body"].encode("utf-8"), content_type="text/plain")


@pytest.fixture
async def provider() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_get("/endless", _endless)
    app.router.add_get("/declared", _declared)
    app.router.add_get("/answer", _answer)
    async with TestServer(app, host="127.0.0.1") as running:
        yield running


async def _read(provider: TestServer, path: str, **params: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(provider.make_url(path), params=params, timeout=aiohttp.ClientTimeout(total=30)) as response,
    ):
        return await read_provider_json(response, limit=100_000)


async def test_a_provider_answer_that_never_ends_is_given_up_at_the_limit(provider: TestServer) -> None:
    # response.json() would read until the call's timeout, holding all of it in memory.
    async with asyncio.timeout(5):
        assert await _read(provider, "/endless") is None


async def test_a_provider_answer_declared_too_long_is_not_read(provider: TestServer) -> None:
    assert await _read(provider, "/declared") is None


@pytest.mark.parametrize(
    ("body", "parsed"),
    [('{"sid": "SM1", "name": "Müller"}', {"sid": "SM1", "name": "Müller"}), ("[1, 2]", [1, 2]), ("null", None)],
)
async def test_a_provider_answer_within_the_limit_is_json_whatever_its_content_type(
    provider: TestServer, body: str, parsed: Any
) -> None:
    assert await _read(provider, "/answer", body=body) == parsed


@pytest.mark.parametrize("body", ["<html>Bad Gateway</html>", "", "{"])
async def test_a_provider_answer_that_is_not_json_is_none(provider: TestServer, body: str) -> None:
    assert await _read(provider, "/answer", body=body) is None
