"""The clock the core reads, and the frozen one tests move."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from router.clock import FrozenClock


def test_a_frozen_clock_stands_still_until_moved_and_keeps_utc():
    clock = FrozenClock(datetime(2026, 3, 29, 3, 0, tzinfo=timezone(timedelta(hours=2))))
    assert clock.now() == datetime(2026, 3, 29, 1, 0, tzinfo=UTC) and clock.now().tzinfo is UTC
    assert clock.advance(timedelta(minutes=30)) == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    clock.set(datetime(2026, 10, 25, 2, 30, tzinfo=timezone(timedelta(hours=1))))
    assert clock.now() == datetime(2026, 10, 25, 1, 30, tzinfo=UTC) and clock.now().tzinfo is UTC


def test_a_time_without_a_zone_is_refused_when_set_as_when_started():
    # A naive time was read in the zone of the machine running the tests: the same test set
    # another moment on a laptop in Berlin than on a CI machine in UTC.
    with pytest.raises(ValueError, match="aware"):
        FrozenClock(datetime(2026, 3, 29, 1, 0))
    clock = FrozenClock(datetime(2026, 3, 29, 1, 0, tzinfo=UTC))
    with pytest.raises(ValueError, match="aware"):
        clock.set(datetime(2026, 3, 29, 2, 30))
    assert clock.now() == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
