"""The web form's pages as HTML: what a resident reads on the status page."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from plugins.webform import pages


def _status(deadline: datetime, language: str) -> str:
    view = {"case_reference": "K-7F3QX2", "state": "acknowledged", "unit_name": "Bau-Hotline", "deadline": deadline,
            "messages": []}
    return pages.status_page(language=language, view=view, token="t", timezone="Europe/Berlin", action="/s")


@pytest.mark.parametrize("language", ["de", "en"])
def test_the_deadline_in_the_hour_the_clocks_repeat_says_which_of_the_two_it_is(language):
    # 25 October 2026: 02:30 comes twice, an hour apart; the acknowledgement tells them apart by
    # their offset, and so does the status page.
    first = _status(datetime(2026, 10, 25, 0, 30, tzinfo=UTC), language)
    second = _status(datetime(2026, 10, 25, 1, 30, tzinfo=UTC), language)
    assert "02:30" in first and "UTC+2" in first
    assert "02:30" in second and "UTC+1" in second


def test_a_deadline_at_any_other_time_is_written_as_before():
    page = _status(datetime(2026, 11, 30, 10, 0, tzinfo=UTC), "de")
    assert "30.11.2026, 11:00 Uhr" in page and "UTC" not in page
