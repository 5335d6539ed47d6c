"""Business hours: whether a unit is open, and when a deadline of N working hours falls.

Deadlines count only the unit's opening hours in its timezone (Europe/Berlin by default), so a
message on Friday evening to a unit with four working hours is due on Monday morning, and
daylight-saving changes are handled by ``zoneinfo``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
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
    moment = datetime.combine(day, wall, zone).astimezone(UTC)
    if moment.astimezone(zone).replace(tzinfo=None) == datetime.combine(day, wall):
        return moment
    offset = moment.astimezone(zone).utcoffset()
    while (moment - _MINUTE).astimezone(zone).utcoffset() == offset:
        moment -= _MINUTE
    return moment


_MINUTE = timedelta(minutes=1)
