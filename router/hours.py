"""Business hours: whether a unit is open, and when a deadline of N working hours falls; and
calendar days in a timezone (the same wall-clock time N dates later: the reopen window).

Deadlines count only the unit's opening hours in its timezone (Europe/Berlin by default), so a
message on Friday evening to a unit with four working hours is due on Monday morning, and
daylight-saving changes are handled by ``zoneinfo``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclasses.dataclass(frozen=True)
class BusinessHours:
    """Weekly opening intervals plus holidays, in one timezone. An empty week means always open."""

    timezone: ZoneInfo
    week: tuple[tuple[tuple[time, time | None], ...], ...]  # per weekday; None end = midnight
    holidays: frozenset[date] = frozenset()
    # Opening intervals per day in UTC, worked out once: deadlines are computed per message.
    # (A module-level lru_cache keyed by the instance hashed the whole week on every lookup.)
    _days: dict[date, list[tuple[datetime, datetime]]] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @classmethod
    def from_config(cls, spec: Mapping[str, Sequence[str]] | None, timezone: str) -> BusinessHours:
        """Build from ``{"mon": ["08:00-18:00"], ..., "holidays": ["2026-12-24"]}``."""
        spec = spec or {}
        week = []
        for day in DAYS:
            intervals = []
            for item in spec.get(day, ()):
                start_s, end_s = item.split("-")
                start = time.fromisoformat(start_s)
                end = None if end_s == "24:00" else time.fromisoformat(end_s)
                if end is not None and end <= start:
                    raise ValueError(f"{day}: interval {item!r} ends before it starts")
                intervals.append((start, end))
            intervals.sort(key=lambda i: i[0])
            for (_, end), (start, _) in itertools.pairwise(intervals):
                if end is None or start < end:  # counted twice, deadlines would come early
                    raise ValueError(f"{day}: intervals overlap ({', '.join(spec.get(day, ()))})")
            week.append(tuple(intervals))
        holidays = frozenset(date.fromisoformat(d) for d in spec.get("holidays", ()))
        if holidays and not any(week):
            # Holidays alone: open all day on every other day (an empty week is always open,
            # which took no notice of the holidays).
            week = [((time(0), None),)] * 7
        return cls(ZoneInfo(timezone), tuple(week), holidays)

    @functools.cached_property
    def weekly_hours(self) -> float:
        """Opening hours in a week without holidays (worked out once: deadlines use it per message)."""
        total = 0.0
        for intervals in self.week:
            for start, end in intervals:
                finish = 24.0 if end is None else end.hour + end.minute / 60
                total += finish - (start.hour + start.minute / 60)
        return total

    @property
    def always_open(self) -> bool:
        return not any(self.week)

    def _intervals_on(self, day: date) -> list[tuple[datetime, datetime]]:
        intervals = self._days.get(day)
        if intervals is None:
            if len(self._days) >= 4096:
                self._days.clear()
            intervals = self._days[day] = self._compute_intervals(day)
        return intervals

    def _compute_intervals(self, day: date) -> list[tuple[datetime, datetime]]:
        if day in self.holidays:
            return []
        result = []
        for start, end in self.week[day.weekday()]:
            begin = _moment(day, start, self.timezone)
            finish = _moment(day + timedelta(days=1), time(0), self.timezone) if end is None else _moment(day, end, self.timezone)
            if finish > begin:  # else wholly inside the hour the clocks skip
                result.append((begin, finish))
        return result

    def is_open(self, when: datetime) -> bool:
        """Whether ``when`` (aware) falls inside an opening interval."""
        if self.always_open:
            return True
        local = when.astimezone(self.timezone)
        return any(start <= when < end for start, end in self._intervals_on(local.date()))

    def add(self, start: datetime, hours: float) -> datetime:
        """The moment when ``hours`` working hours have passed after ``start`` (aware, UTC)."""
        start = start.astimezone(UTC)
        remaining = timedelta(hours=hours)
        if self.always_open:
            return start + remaining
        day = start.astimezone(self.timezone).date()
        # As many weeks as the hours need, two more (a daylight-saving change, the start in
        # mid-week) and a week per holiday (one on the only open day of its week costs the
        # week), and never less than the year and a bit it always was: a fixed 400 days failed,
        # at some start times only, for a response time the check at load had let through.
        days = max(400, 7 * (int(hours / self.weekly_hours) + 2 + len(self.holidays)))
        for _ in range(days):
            for begin, end in self._intervals_on(day):
                if end <= start:
                    continue
                begin = max(begin, start)
                available = end - begin
                if available >= remaining:
                    return begin + remaining
                remaining -= available
            day += timedelta(days=1)
        raise ValueError(f"business hours give no {hours:g} opening hours within {days} days")


def _moment(day: date, wall: time, zone: ZoneInfo) -> datetime:
    """The UTC moment of a wall-clock time; for one the clocks skip (02:30 on the night they go
    forward), the moment they jump. Taken as the hour after, an interval opening at 02:30 on
    that night closed before it opened, and counting its hours went backwards."""
    return at_wall_clock(datetime.combine(day, wall), zone)


def wall_clock(moment: datetime, zone: ZoneInfo) -> datetime:
    """What the clocks in ``zone`` show at ``moment`` (aware), as a naive datetime."""
    return moment.astimezone(zone).replace(tzinfo=None, fold=0)


def at_wall_clock(wall: datetime, zone: ZoneInfo, *, last: bool = False) -> datetime:
    """The moment (aware, UTC) the clocks in ``zone`` show ``wall`` (naive). Where they show it
    twice (the hour they go back), the first time, or with ``last`` the second; where they never
    show it (the hour they skip), the moment they jump past it."""
    moment = wall.replace(tzinfo=zone, fold=int(last)).astimezone(UTC)
    if wall_clock(moment, zone) == wall:
        return moment
    # Skipped: read with the offset before the jump it is a moment after it, with the one after
    # the jump a moment before it.
    return _change(wall.replace(tzinfo=zone, fold=1).astimezone(UTC), wall.replace(tzinfo=zone, fold=0).astimezone(UTC), zone)


def days_later(moment: datetime, days: float, zone: ZoneInfo) -> datetime:
    """``days`` calendar days after ``moment`` (aware), in UTC: the same wall-clock time in
    ``zone`` that many dates later, however the clocks changed in between (24-hour days end an
    hour early or late across a change). The span lasts while the clocks show no later time:
    where they show that time twice, until the second; where they skip it, until they jump past
    it. A fraction of a day is added after that as time that passes (0.5: twelve hours)."""
    whole = math.floor(days)
    end = moment.astimezone(UTC)
    if whole:
        end = at_wall_clock(wall_clock(moment, zone) + timedelta(days=whole), zone, last=True)
    return end + timedelta(days=days - whole)


def days_earlier(now: datetime, days: float, zone: ZoneInfo) -> datetime:
    """The earliest moment (UTC) whose ``days_later`` is not before ``now``: a moment before it
    is more than ``days`` calendar days before ``now``. Not every moment after it is within
    them: in the hour the clocks go back a later moment shows an earlier time. So it bounds a
    query over stored stamps, and ``days_later`` decides for each."""
    whole = math.floor(days)
    end = now.astimezone(UTC) - timedelta(days=days - whole)
    if not whole:
        return end
    return at_wall_clock(_lowest_wall_clock_from(end, zone) - timedelta(days=whole), zone)


def _lowest_wall_clock_from(moment: datetime, zone: ZoneInfo) -> datetime:
    """The earliest time the clocks in ``zone`` show from ``moment`` (UTC) on, or showed just
    before it: in the first pass of the hour they go back, the start of that hour; at the moment
    they jump forward, the time they jumped from. A span that ends at this time or later (by
    ``days_later``) reaches ``moment``."""
    wall = wall_clock(moment, zone)
    lowest = min(wall, wall_clock(moment - _MICROSECOND, zone) + _MICROSECOND)
    second = at_wall_clock(wall, zone, last=True)
    if second > moment:  # the clocks go back before they show this time again
        lowest = min(lowest, wall_clock(_change(moment, second, zone), zone))
    return lowest


def _change(before: datetime, after: datetime, zone: ZoneInfo) -> datetime:
    """The first moment in (``before``, ``after``] with the UTC offset of ``after``: when the
    clocks changed between the two (once), found to the microsecond by halving the interval."""
    offset = after.astimezone(zone).utcoffset()
    while after - before > _MICROSECOND:
        middle = before + (after - before) // 2
        if middle.astimezone(zone).utcoffset() == offset:
            after = middle
        else:
            before = middle
    return after


_MICROSECOND = timedelta(microseconds=1)
