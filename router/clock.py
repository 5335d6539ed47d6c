"""Time as the core sees it: always timezone-aware UTC, replaceable in tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """The wall clock. Every ``now()`` in the core goes through an instance of this class."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class FrozenClock(Clock):
    """A clock that stands still until a test moves it."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FrozenClock needs an aware datetime")
        self._now = start.astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> datetime:
        self._now += delta
        return self._now

    def set(self, when: datetime) -> None:
        """Jump to ``when`` (aware: a naive time would be read in the zone of the machine)."""
        if when.tzinfo is None:
            raise ValueError("FrozenClock.set needs an aware datetime")
        self._now = when.astimezone(UTC)
