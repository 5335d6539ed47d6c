"""Business hours arithmetic in Europe/Berlin, across weekends, holidays and DST changes."""

from __future__ import annotations

from datetime import UTC, datetime

from router.hours import BusinessHours

OFFICE = BusinessHours.from_config(
    {d: ["08:00-18:00"] for d in ("mon", "tue", "wed", "thu", "fri")} | {"holidays": ["2026-12-24"]}, "Europe/Berlin"
)


def test_inside_hours():
    assert OFFICE.add(datetime(2026, 11, 30, 8, 0, tzinfo=UTC), 4) == datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_carries_over_night_and_weekend():
    friday_evening = datetime(2026, 11, 27, 16, 0, tzinfo=UTC)  # 17:00 Berlin
    assert OFFICE.add(friday_evening, 2) == datetime(2026, 11, 30, 8, 0, tzinfo=UTC)  # Mon 09:00 Berlin


def test_skips_holidays():
    assert OFFICE.add(datetime(2026, 12, 23, 16, 0, tzinfo=UTC), 2) == datetime(2026, 12, 25, 8, 0, tzinfo=UTC)


def test_daylight_saving_change():
    # Friday 2026-03-27 17:00 CET; Monday 2026-03-30 is CEST (UTC+2): 08:00 Berlin = 06:00 UTC
    assert OFFICE.add(datetime(2026, 3, 27, 16, 0, tzinfo=UTC), 1.5) == datetime(2026, 3, 30, 6, 30, tzinfo=UTC)


def test_is_open_and_always_open():
    assert OFFICE.is_open(datetime(2026, 11, 30, 10, 0, tzinfo=UTC))
    assert not OFFICE.is_open(datetime(2026, 11, 29, 10, 0, tzinfo=UTC))
    always = BusinessHours.from_config({}, "Europe/Berlin")
    assert always.is_open(datetime(2026, 11, 29, 3, 0, tzinfo=UTC))
    assert always.add(datetime(2026, 11, 29, 3, 0, tzinfo=UTC), 2) == datetime(2026, 11, 29, 5, 0, tzinfo=UTC)
