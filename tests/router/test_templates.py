"""Texts sent to people (``router/templates.py``): a sentence whose link no page serves is
left out with its words."""

from __future__ import annotations

from router.templates import Templates, without_sentences
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


def test_render_leaves_a_sentence_out_only_for_a_value_that_is_none():
    templates = Templates({"ack": {"de": "Fall {case_reference}. Mehr: {status_url}. Bis {deadline}."}}, "de")
    assert templates.render("ack", "de", case_reference="K-1", status_url=None, deadline="Mo.") == "Fall K-1. Bis Mo.."
    assert templates.render("ack", "de", case_reference="K-1", status_url="", deadline="Mo.") == (
        "Fall K-1. Mehr: . Bis Mo..")


def test_using_names_each_template_that_fills_a_placeholder():
    templates = Templates(load_raw_config()["templates"], "de")
    assert sorted(templates.using("status_url")) == ["ack.de", "ack.en", "callback_failed.de", "callback_failed.en"]
    assert list(templates.using("nothing")) == []
