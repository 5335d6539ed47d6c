"""Routing rules over topic, keywords, area, entry point and fallback."""

from __future__ import annotations

import pytest

from router.config import load_config
from router.routing import decide

CONFIG = load_config(env={})


def route(text="", **extra):
    message = {"channel": extra.pop("channel", "webform"), "text": text, **extra}
    return decide(CONFIG, message, is_customer=False, language="de")


@pytest.mark.parametrize(
    ("kwargs", "unit", "rule"),
    [
        ({"text": "Baustelle, Gehweg gesperrt", "address": {"postcode": "12345"}}, "tiefbau-muster", "construction-in-area"),
        ({"text": "Bagger vor der Tür", "address": {"street": "Muster-Strasse 4"}}, "tiefbau-muster", "construction-in-area"),
        ({"text": "Die Baustelle in der Musterstrasse 12 ist laut"}, "tiefbau-muster", "construction-in-area"),
        # the street abbreviated in a chat message, as residents write it
        ({"text": "Baustelle in der Musterstr. 12 seit Tagen"}, "tiefbau-muster", "construction-in-area"),
        ({"text": "Bagger vor Muster-Str.4, Baustelle ohne Schild"}, "tiefbau-muster", "construction-in-area"),
        ({"text": "Baustelle MUSTER STR 7"}, "tiefbau-muster", "construction-in-area"),
        # a postcode named in the text places it, or puts a street of the same name elsewhere;
        # a year or a house number is no postcode
        ({"text": "Baustelle in 12345 Musterstadt, Gehweg gesperrt"}, "tiefbau-muster", "construction-in-area"),
        ({"text": "Baustelle im Lindenweg 3, 80331 München"}, "bauhotline", "construction-outside-area"),
        ({"text": "Seit 2024 Baustelle im Lindenweg 12 ohne Ende"}, "tiefbau-muster", "construction-in-area"),
        ({"text": "Baustelle Lindenweg 3 in 80331 München"}, "bauhotline", "construction-outside-area"),
        ({"text": "Baustelle Lindenweg 12-14, D-80331 München"}, "bauhotline", "construction-outside-area"),
        # a number as long as a postcode elsewhere in the text (an amount, a meter reading, a
        # customer number) is not the address of the street named
        ({"text": "Zählerstand 45678 kWh, Baustelle vor Musterstraße 5"}, "tiefbau-muster", "construction-in-area"),
        ({"text": "Kundennummer 54321 bei Ihnen, die Baustelle im Lindenweg 3 ist laut"}, "tiefbau-muster",
         "construction-in-area"),
        ({"text": "Baustelle Musterstr. 5, ich zahle 10000 Euro im Jahr und nun das"}, "tiefbau-muster",
         "construction-in-area"),
        ({"text": "Baustelle vor dem Haus", "address": {"postcode": "99999"}}, "bauhotline", "construction-outside-area"),
        ({"text": "the ROADWORKS block our driveway"}, "bauhotline", "construction-outside-area"),
        ({"text": "Seit gestern STÖRUNG, kein Internet"}, "stoerung", "fault"),
        ({"text": "Seit gestern Stoerung"}, "stoerung", "fault"),
        ({"text": "Ich möchte meinen Vertrag ändern"}, "vertrieb", "contract"),
        ({"text": "Hallo", "topic": "contract"}, "vertrieb", "contract"),
        ({"text": "", "location": {"lat": 52.5230, "lon": 13.4090}, "channel": "whatsapp"}, "tiefbau-muster", "location-in-area"),
        ({"text": "", "location": {"lat": 52.60, "lon": 13.40}, "channel": "whatsapp"}, "kundenservice", "fallback"),
        ({"text": "Guten Tag", "unit_hint": "bauhotline", "recipient": "bau@example.org", "channel": "email"}, "bauhotline", "entry-point"),
        ({"text": "Guten Tag"}, "kundenservice", "fallback"),
        # private matters from inside the contractor's area never go to the external contractor
        ({"text": "Meine Rechnung ist zu hoch", "topic": "other", "address": {"postcode": "12345"}}, "kundenservice", "fallback"),
        ({"text": "Ich wohne im Lindenweg 3, meine Rechnung ist falsch", "channel": "email", "unit_hint": "kundenservice"}, "kundenservice", "entry-point"),
        # a house number with a letter, "Str" without its dot
        ({"text": "Baustelle vor dem Haus", "address": {"street": "Lindenweg 3a"}}, "tiefbau-muster", "construction-in-area"),
        ({"text": "Baustelle vor dem Haus", "address": {"street": "Musterstr 5"}}, "tiefbau-muster", "construction-in-area"),
        # the area's street in another town is not the area's
        ({"text": "Baustelle vor dem Haus", "address": {"street": "Lindenweg 3", "postcode": "80331", "city": "München"}},
         "bauhotline", "construction-outside-area"),
        ({"text": "Baustelle im Lindenweg", "address": {"postcode": "80331"}}, "bauhotline", "construction-outside-area"),
        # the topic the sender chose decides over keywords in the text
        ({"text": "Seit der Bagger da war, kein Signal", "topic": "fault", "address": {"postcode": "12345"}}, "stoerung", "fault"),
    ],
)
def test_rules(kwargs, unit, rule):
    decision = route(**kwargs)
    assert (decision.unit, decision.rule) == (unit, rule), decision.reason
    assert decision.reason


def test_reason_names_what_matched():
    decision = route("Baustelle, Gehweg gesperrt", address={"postcode": "12345"})
    assert "Musterstadt Nord" in decision.reason and "postcode 12345" in decision.reason


def test_umlaut_and_case_insensitive_keywords_at_word_start():
    from router.text import normalize

    assert normalize("Straße") == normalize("STRASSE") == "strasse"
    assert route("Die STRASSENSPERRUNG nervt").rule == "construction-outside-area"
    assert route("Hauptarifa und Uebervertrag").rule == "fallback"  # keywords must start a word


def test_an_umlaut_written_as_letter_and_combining_mark_routes_as_the_one_character():
    """"Störung" typed on a Mac can arrive as o + U+0308: it went to the fallback unit."""
    import unicodedata

    from router.text import normalize

    decomposed = unicodedata.normalize("NFD", "Große Störung")
    assert decomposed != "Große Störung"
    assert normalize(decomposed) == normalize("Große Störung") == "grosse stoerung"
    assert route(decomposed).rule == route("Große Störung").rule != "fallback"


def test_a_rule_for_customers_routes_customers_only():
    """``customer = true``: the rule is for confirmed customers; anyone else goes on to the next."""
    config = _with_rules({"id": "customers", "description": "Customers go to customer care.", "customer": True,
                          "unit": "kundenservice"})
    message = {"channel": "webform", "text": "Ich möchte meinen Vertrag ändern"}
    assert decide(config, message, is_customer=True, language="de").rule == "customers"
    assert decide(config, message, is_customer=False, language="de").rule == "contract"


def _with_rules(*rules, areas=None):
    """The example configuration with ``rules`` tried first (and ``areas`` added)."""
    from router.testing import example_config, load_raw_config

    raw = load_raw_config()
    raw["areas"].update(areas or {})
    raw["rules"][:0] = list(rules)
    return example_config(raw)


def test_a_rule_for_some_channels_routes_only_their_messages():
    """``channels`` is a condition like any other: a rule for WhatsApp took every channel's."""
    config = _with_rules({"id": "chat-faults", "description": "Faults by chat go to customer care.",
                          "channels": ["whatsapp"], "keywords": ["Störung"], "unit": "kundenservice"})
    for channel, rule in (("whatsapp", "chat-faults"), ("webform", "fault")):
        message = {"channel": channel, "text": "Störung seit gestern"}
        assert decide(config, message, is_customer=False, language="de").rule == rule


def test_a_rule_for_one_area_routes_only_messages_from_that_area():
    """``area`` named by its id (not "*") is that area alone: it took every area's messages."""
    config = _with_rules({"id": "south", "description": "Musterstadt Süd is the hotline's.",
                          "area": "musterstadt-sued", "unit": "bauhotline"},
                         areas={"musterstadt-sued": {"name": "Musterstadt Süd", "unit": "bauhotline",
                                                     "postcodes": ["54321"]}})
    for postcode, rule in (("54321", "south"), ("12345", "construction-in-area")):
        message = {"channel": "webform", "text": "Baustelle vor dem Haus", "address": {"postcode": postcode}}
        assert decide(config, message, is_customer=False, language="de").rule == rule
