"""Business hours arithmetic in Europe/Berlin, across weekends, holidays and DST changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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


def test_holidays_alone_are_closed_days_of_an_otherwise_open_week():
    """A calendar of holidays without hours was always open, holidays included."""
    hours = BusinessHours.from_config({"holidays": ["2026-12-24"]}, "Europe/Berlin")
    assert not hours.is_open(datetime(2026, 12, 24, 10, tzinfo=UTC))
    assert hours.is_open(datetime(2026, 12, 23, 10, tzinfo=UTC))
    # 10:00 Berlin on the 23rd plus 20 hours: the 24th does not count
    assert hours.add(datetime(2026, 12, 23, 9, tzinfo=UTC), 20) == datetime(2026, 12, 25, 5, tzinfo=UTC)


def test_a_response_time_of_more_than_a_year_of_hours_is_found_from_any_start():
    """A fixed search of 400 days failed, at some start times only, for a response time the
    check at load had accepted from its one start time: the message was a 500, not stored."""
    hours = BusinessHours.from_config({"mon": ["08:00-18:00"], "tue": ["08:00-18:00"]}, "Europe/Berlin")
    for day in range(1, 8):  # each weekday as the start
        start = datetime(2026, 1, day, 18, tzinfo=UTC)
        deadline = hours.add(start, 1300)  # 65 weeks of 20 hours
        assert deadline - start > timedelta(days=440)


def test_holidays_on_the_only_open_day_cost_a_week_each():
    """Counted as a day each, three Monday holidays of a Monday-only calendar made the search
    give up: every message to such a unit failed."""
    hours = BusinessHours.from_config({"mon": ["08:00-16:00"], "holidays": ["2026-04-06", "2026-04-13", "2026-04-20"]},
                                      "Europe/Berlin")
    assert hours.add(datetime(2026, 4, 1, 10, tzinfo=UTC), 8) == datetime(2026, 4, 27, 14, tzinfo=UTC)


def test_hours_that_begin_or_end_in_the_hour_the_clocks_skip_begin_or_end_when_they_jump():
    """02:30 does not exist on the night the clocks go forward; taken as 03:30, an interval of
    02:30-03:15 closed before it opened, and counting its hours went backwards."""
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")
    night = BusinessHours.from_config({"sun": ["02:30-03:15"]}, "Europe/Berlin")
    assert night.is_open(datetime(2026, 3, 29, 3, 5, tzinfo=berlin))
    assert not night.is_open(datetime(2026, 3, 29, 3, 20, tzinfo=berlin))
    # 15 minutes on the night of the change, 15 the Sunday after
    assert night.add(datetime(2026, 3, 28, 12, tzinfo=berlin), 0.5) == datetime(2026, 4, 5, 2, 45, tzinfo=berlin)
    closing = BusinessHours.from_config({"sun": ["01:00-02:30"]}, "Europe/Berlin")  # closes at the jump
    assert closing.add(datetime(2026, 3, 29, 0, 0, tzinfo=berlin), 1) == datetime(2026, 3, 29, 3, 0, tzinfo=berlin)
    gone = BusinessHours.from_config({"sun": ["02:10-02:50"]}, "Europe/Berlin")  # wholly skipped that night
    assert gone.add(datetime(2026, 3, 28, 12, tzinfo=berlin), 0.5) == datetime(2026, 4, 5, 2, 40, tzinfo=berlin)


def test_an_opening_interval_includes_its_start_and_not_its_end():
    """At 18:00 sharp the office has closed (a call then is not put through to it)."""
    monday = datetime(2026, 11, 30, tzinfo=UTC)
    assert OFFICE.is_open(monday.replace(hour=7))  # 08:00 Berlin
    assert OFFICE.is_open(monday.replace(hour=16, minute=59, second=59))
    assert not OFFICE.is_open(monday.replace(hour=17))  # 18:00 Berlin


def test_a_wall_clock_time_the_clocks_show_twice_or_skip_has_one_moment_chosen():
    """The first or (``last``) second of a time shown twice; the jump for one skipped."""
    from zoneinfo import ZoneInfo

    from router.hours import at_wall_clock

    berlin = ZoneInfo("Europe/Berlin")
    assert at_wall_clock(datetime(2026, 10, 25, 2, 30), berlin) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert at_wall_clock(datetime(2026, 10, 25, 2, 30), berlin, last=True) == datetime(2026, 10, 25, 1, 30, tzinfo=UTC)
    for last in (False, True):
        assert at_wall_clock(datetime(2026, 3, 29, 2, 30), berlin, last=last) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
        assert at_wall_clock(datetime(2026, 3, 29, 12, 0), berlin, last=last) == datetime(2026, 3, 29, 10, 0, tzinfo=UTC)


def test_calendar_days_end_at_the_same_wall_clock_time_whatever_the_clocks_did():
    """``days_later`` is the last moment the clocks show no later time than the start's, that
    many dates on: checked against that definition, read off the clocks minute by minute, for
    starts every quarter of an hour around both changes of 2026 in Berlin."""
    from zoneinfo import ZoneInfo

    from router.hours import days_later, wall_clock

    berlin = ZoneInfo("Europe/Berlin")
    for change in (datetime(2026, 3, 29, 1, 0, tzinfo=UTC), datetime(2026, 10, 25, 1, 0, tzinfo=UTC)):
        for days in (1, 7):
            for quarter in range(-12, 12):
                start = change - timedelta(days=days, minutes=15 * quarter)
                target = wall_clock(start, berlin) + timedelta(days=days)
                minutes = [start + timedelta(days=days, minutes=m) for m in range(-180, 181)]
                expected = max(m for m in minutes if wall_clock(m, berlin) <= target)
                end = days_later(start, days, berlin)
                if any(wall_clock(m, berlin) == target for m in minutes):
                    assert end == expected, (start, end, expected)
                else:  # skipped: the minute after the last that shows an earlier time, when they jump
                    assert end == expected + timedelta(minutes=1), (start, end, expected)
    assert days_later(datetime(2026, 3, 28, 11, 0, tzinfo=UTC), 1.5, berlin) == datetime(2026, 3, 29, 22, 0, tzinfo=UTC)
    assert days_later(datetime(2026, 3, 28, 11, 0, tzinfo=UTC), 0, berlin) == datetime(2026, 3, 28, 11, 0, tzinfo=UTC)
