"""Shared fixtures: the whole service on a real SQLite file and a loopback HTTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from router.testing import CoreHarness


@pytest.fixture
async def harness(tmp_path) -> AsyncIterator[CoreHarness]:
    async with CoreHarness(tmp_path / "data") as h:
        yield h
