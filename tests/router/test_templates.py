"""Texts sent to people (``router/templates.py``): dates in German and English in the
organisation's timezone, and a sentence whose link no page serves left out with its words."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from router.templates import Templates, format_deadline, without_sentences
from router.testing import load_raw_config

NO_LINK = frozenset({"status_url"})


def test_the_example_acknowledgement_without_a_status_page_ends_after_the_deadline():
    templates = Templates(load_raw_config()["templates"], "de")
    values = {"case_reference": "K-7F3QX2", "unit_name": "Bauhotline", "deadline": "Mo., 30.11.2026, 11:00 Uhr",
              "name_suffix": " Erika Müller", "status_url": None}
    assert templates.render("ack", "de", **values) == (
        "Guten Tag Erika Müller, vielen Dank für Ihre Nachricht. Ihre Fallnummer ist K-7F3QX2. Zuständig ist"
        " Bauhotline. Sie erhalten eine Antwort bis Mo., 30.11.2026, 11:00 Uhr."
    )
    assert templates.render("ack", "en", **values).endswith("is responsible and will answer by Mo., 30.11.2026, 11:00 Uhr.")
    sms = templates.render("callback_failed", "de", case_reference="K-7F3QX2", status_url=None)
    assert sms == "Wir haben Sie zu Ihrem Fall K-7F3QX2 telefonisch nicht erreicht."
    linked = templates.render("ack", "de", **{**values, "status_url": "https://example.org/s/abc"})
    assert linked.endswith("Den Stand sehen Sie hier: https://example.org/s/abc")


def test_a_sentence_ends_at_a_mark_before_a_blank_and_a_line_that_held_only_the_link_goes():
    assert without_sentences("Visit {status_url} to follow your case. Thanks!", NO_LINK) == "Thanks!"
    assert without_sentences("Status: {status_url}. Siehe z.B. www.example.de für mehr.", NO_LINK) == (
        "Siehe z.B. www.example.de für mehr.")
    assert without_sentences("Hallo,\n\nFall {case_reference}.\nStand: {status_url}\nGruß", NO_LINK) == (
        "Hallo,\n\nFall {case_reference}.\nGruß")
    assert without_sentences("Fall {case_reference}? Stand: {status_url}!", NO_LINK) == "Fall {case_reference}?"
    text = "Fall {case_reference}. Stand: {status_url}"
    assert without_sentences(text, frozenset({"deadline"})) == text


def test_a_sentence_with_the_case_reference_keeps_it_and_an_abbreviation_ends_no_sentence():
    """An operator's "Ihre Fallnummer: {case_reference}, Stand unter {status_url}" came out
    empty: an acknowledgement without its case reference. And "z. B." was taken for two
    sentence ends, so the link's sentence was cut in the middle."""
    assert without_sentences("Ihre Fallnummer: {case_reference}, Stand unter {status_url}", NO_LINK) == (
        "Ihre Fallnummer: {case_reference}")
    assert without_sentences("Fall {case_reference} (Stand: {status_url}). Gruß", NO_LINK) == "Fall {case_reference}. Gruß"
    assert without_sentences("Danke. Den Stand sehen Sie unter {status_url} (z. B. mit dem Handy). Bis bald.",
                             NO_LINK) == "Danke. Bis bald."
    assert without_sentences("Fall Nr. 5 ist {case_reference}. Mehr unter {status_url}, bzw. telefonisch. Gruß",
                             NO_LINK) == "Fall Nr. 5 ist {case_reference}. Gruß"
    assert without_sentences("Fall {case_reference} bei {unit_name} {status_url} heute.", NO_LINK) == (
        "Fall {case_reference} bei {unit_name} heute.")


def test_a_placeholder_with_a_comma_in_its_format_is_never_cut():
    """A fill character the configuration accepts ("{case_reference:,<10}") was cut at its
    comma as a clause's end: the acknowledgement raised, and its message answered 500."""
    templates = Templates({"ack": {"de": "Fall {case_reference:,<10}, Stand {status_url}. Gruß {{wörtlich}}"}}, "de")
    assert templates.render("ack", "de", case_reference="K-1", status_url=None) == "Fall K-1,,,,,,,. Gruß {wörtlich}"
    assert templates.render("ack", "de", case_reference="K-1", status_url="https://s") == (
        "Fall K-1,,,,,,,, Stand https://s. Gruß {wörtlich}")


def test_render_leaves_a_sentence_out_only_for_a_value_that_is_none():
    templates = Templates({"ack": {"de": "Fall {case_reference}. Mehr: {status_url}. Bis {deadline}."}}, "de")
    assert templates.render("ack", "de", case_reference="K-1", status_url=None, deadline="Mo.") == "Fall K-1. Bis Mo.."
    assert templates.render("ack", "de", case_reference="K-1", status_url="", deadline="Mo.") == (
        "Fall K-1. Mehr: . Bis Mo..")


def test_using_names_each_template_that_fills_a_placeholder():
    templates = Templates(load_raw_config()["templates"], "de")
    assert sorted(templates.using("status_url")) == ["ack.de", "ack.en", "callback_failed.de", "callback_failed.en"]
    assert list(templates.using("nothing")) == []


def test_a_deadline_is_written_in_local_time_to_the_minute():
    when = datetime(2026, 11, 30, 10, 0, 59, tzinfo=UTC)
    assert format_deadline(when, "de", "Europe/Berlin") == "Mo., 30.11.2026, 11:00 Uhr"
    assert format_deadline(when, "en", "Europe/Berlin") == "Mon 30 Nov 2026, 11:00"
    assert format_deadline(None, "de", "Europe/Berlin") == "-"


@pytest.mark.parametrize("language", ["de", "en"])
def test_the_two_times_of_the_hour_the_clocks_repeat_read_differently(language):
    # 25 October 2026: at 03:00 summer time the clocks go back to 02:00, so 02:30 comes twice.
    # Both deadlines read "02:30" and an hour lay between them: the offset tells them apart.
    first = format_deadline(datetime(2026, 10, 25, 0, 30, tzinfo=UTC), language, "Europe/Berlin")
    second = format_deadline(datetime(2026, 10, 25, 1, 30, tzinfo=UTC), language, "Europe/Berlin")
    assert first != second
    assert "02:30" in first and "UTC+2" in first
    assert "02:30" in second and "UTC+1" in second


def test_an_hour_that_comes_once_gets_no_offset():
    # The hours around the change, and the hour after the clocks went forward in March.
    for when in (datetime(2026, 10, 25, 2, 30, tzinfo=UTC), datetime(2026, 10, 24, 23, 30, tzinfo=UTC),
                 datetime(2026, 3, 29, 1, 0, tzinfo=UTC)):
        assert "UTC" not in format_deadline(when, "de", "Europe/Berlin")
    assert format_deadline(datetime(2026, 3, 29, 1, 0, tzinfo=UTC), "de", "Europe/Berlin") == "So., 29.03.2026, 03:00 Uhr"
