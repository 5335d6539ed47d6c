from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from plugins.whatsapp.graph import (
    MAX_TEXT_LENGTH,
    classify_error,
    is_earlier_part,
    part_key,
    provider_message_id,
    split_text,
    template_parameter,
    template_payload,
    text_payloads,
    within_window,
)
from router.hookspecs import PermanentDeliveryError, ResendAsDeliveryError, RetryableDeliveryError

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _graph_error(code: int, message: str = "error", details: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "A1"}
    if details:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    return {"error": error}


def test_text_payload_has_the_cloud_api_shape() -> None:
    assert text_payloads("+491701234567", "Hallo") == [
        {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": "491701234567",
            "type": "text",
            "text": {"body": "Hallo", "preview_url": False},
        }
    ]


def test_a_business_scoped_user_id_is_addressed_as_recipient_exactly_as_given() -> None:
    """A person with a WhatsApp username may come with no number: Meta's ``recipient`` field
    takes their BSUID, and ``to`` (which would win) must be absent."""
    (text,) = text_payloads("US.13491208655302741918", "Hallo", to_kind="whatsapp_user")
    template = template_payload("US.ENT.11815799212886844830", to_kind="whatsapp_user", name="t", language_code="de",
                                case_reference="K-7F3QX2", answer="Fertig.", prompt="Bitte antworten.")
    assert text["recipient"] == "US.13491208655302741918" and "to" not in text
    assert template["recipient"] == "US.ENT.11815799212886844830" and "to" not in template
    assert "recipient" not in text_payloads("+491701234567", "Hallo")[0]


def test_long_text_is_split_at_word_breaks_within_the_limit() -> None:
    words = [f"wort{i}" for i in range(2000)]
    text = " ".join(words)
    payloads = text_payloads("+491701234567", text)
    bodies = [p["text"]["body"] for p in payloads]
    assert len(bodies) == 5  # 16,889 characters
    assert all(len(b) <= MAX_TEXT_LENGTH for b in bodies)
    assert " ".join(bodies).split() == words


def test_split_prefers_paragraphs_and_cuts_words_only_when_it_must() -> None:
    assert split_text("a" * 8 + "\n\n" + "b" * 8, limit=12) == ["a" * 8, "b" * 8]
    assert split_text("x" * 25, limit=10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_text("   ", limit=10) == []
    assert split_text("kurz", limit=10) == ["kurz"]


def test_a_break_near_the_start_of_a_part_is_no_place_to_cut() -> None:
    """Only a break in the second half of the limit is near the end: cut at the first space,
    a long answer went out as a message of one word and then the rest."""
    assert split_text("Hi " + "x" * 20, limit=10) == ["Hi xxxxxxx", "x" * 10, "x" * 3]


FLAG = "\U0001f1e9\U0001f1ea"  # DE: two regional indicators
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # man, ZWJ, woman, ZWJ, girl
WAVE = "\U0001f44b\U0001f3fd"  # waving hand, medium skin tone
HEART = "\u2764\ufe0f"  # heart, emoji presentation selector
KEYCAP = "1\ufe0f\u20e3"  # digit one, selector, combining enclosing keycap
UMLAUT = "u\u0308"  # "ü" decomposed: u and a combining diaeresis


@pytest.mark.parametrize("unit", [FLAG, FAMILY, WAVE, HEART, KEYCAP, UMLAUT, "\u1100\u1161\u11a8"])
@pytest.mark.parametrize("lead", ["", "a", "ab"])
def test_a_hard_cut_never_splits_what_a_reader_sees_as_one_character(unit: str, lead: str) -> None:
    """Without a space or line break to cut at, the cut fell at the limit, wherever that was: a
    flag became two letters in boxes, an umlaut lost its dots to the next message."""
    text = lead + unit * 50
    for limit in range(len(unit) + 1, 3 * len(unit) + 3):
        parts = split_text(text, limit=limit)
        assert "".join(parts) == text  # no white space to drop: nothing lost, nothing added
        assert all(len(part) <= limit for part in parts)
        for part in parts[1:]:
            assert part.startswith(unit), (limit, parts)  # each part after the first begins a unit


def test_a_cluster_longer_than_the_limit_is_cut_hard_rather_than_not_at_all() -> None:
    text = "a" + "\u0301" * 30  # one letter under thirty accents: no boundary within it
    assert split_text(text, limit=10) == [text[:10], text[10:20], text[20:30], text[30:]]


def test_a_flag_run_is_cut_between_pairs() -> None:
    """The reviewer's case: one letter, then 3,000 German flags, cut at 4,096 characters."""
    parts = split_text("a" + FLAG * 3000)
    assert len(parts[0]) == 4095 and parts[0].endswith(FLAG)
    assert all(part.startswith(FLAG) for part in parts[1:])


def test_a_clipped_template_parameter_keeps_its_last_character_whole() -> None:
    assert template_parameter("Danke " + WAVE * 10, 9) == "Danke " + WAVE + "…"
    assert template_parameter("Gru" + UMLAUT + "e", 5) == "Gru…"


def test_only_the_last_part_of_a_long_text_carries_the_messages_key() -> None:
    assert [part_key("k1", n, 3) for n in (1, 2, 3)] == ["k1.part-1", "k1.part-2", "k1"]
    assert is_earlier_part("k1.part-2") and not is_earlier_part("k1") and not is_earlier_part(None)
    assert not is_earlier_part("k1.part-x")


def test_template_payload_carries_case_reference_and_answer() -> None:
    payload = template_payload(
        "+491701234567",
        name="case_update",
        language_code="de",
        case_reference="K-7F3QX2",
        answer="Die Baustelle ist\nam Freitag\tfertig.",
        prompt="Bitte antworten.",
    )
    assert payload["to"] == "491701234567"
    assert payload["type"] == "template"
    template = payload["template"]
    assert template["name"] == "case_update"
    assert template["language"] == {"code": "de"}
    (body,) = template["components"]
    assert body["type"] == "body"
    assert body["parameters"] == [
        {"type": "text", "text": "K-7F3QX2"},
        {"type": "text", "text": "Die Baustelle ist am Freitag fertig."},  # no new lines or tabs
    ]


def test_template_answer_too_long_becomes_a_preview_and_the_prompt() -> None:
    answer = "Lange Antwort. " * 100
    payload = template_payload(
        "+491701234567",
        name="case_update",
        language_code="de",
        case_reference="K-7F3QX2",
        answer=answer,
        prompt="Antworten Sie, um alles zu lesen.",
        max_parameter_chars=200,
    )
    text = payload["template"]["components"][0]["parameters"][1]["text"]
    assert len(text) <= 200
    assert text.startswith("Lange Antwort.")
    assert text.endswith("Antworten Sie, um alles zu lesen.")
    assert "\n" not in text and "     " not in text


def test_an_answer_of_exactly_the_budget_goes_whole_into_the_template() -> None:
    answer = ("Die Grube vor Ihrem Haus wird am Freitag geschlossen. " * 4)[:199] + "."
    assert len(answer) == 200
    payload = template_payload(
        "+491701234567", name="t", language_code="de", case_reference="K-7F3QX2", answer=answer,
        prompt="Antworten Sie, um alles zu lesen.", max_parameter_chars=200,
    )
    assert payload["template"]["components"][0]["parameters"][1]["text"] == answer


def test_template_parameters_are_never_empty() -> None:
    payload = template_payload(
        "+491701234567", name="t", language_code="en_US", case_reference=None, answer="", prompt="Reply."
    )
    assert [p["text"] for p in payload["template"]["components"][0]["parameters"]] == ["-", "Reply."]


@pytest.mark.parametrize(
    "status, body, expected, code",
    [
        (400, _graph_error(131047, "Re-engagement message"), ResendAsDeliveryError, "131047"),
        (400, _graph_error(130429, "Rate limit hit"), RetryableDeliveryError, "130429"),
        (400, _graph_error(131056, "pair rate limit hit"), RetryableDeliveryError, "131056"),
        (400, _graph_error(131048, "Spam rate limit hit"), RetryableDeliveryError, "131048"),
        (400, _graph_error(131057, "Account in maintenance mode"), RetryableDeliveryError, "131057"),
        (400, _graph_error(80007, "Rate limit issues"), RetryableDeliveryError, "80007"),
        (400, _graph_error(133004, "Server temporarily unavailable"), RetryableDeliveryError, "133004"),
        (400, _graph_error(2, "Service temporarily unavailable"), RetryableDeliveryError, "2"),
        (429, _graph_error(4, "Too many calls"), RetryableDeliveryError, "4"),
        (500, _graph_error(131000, "Something went wrong"), RetryableDeliveryError, "131000"),
        (400, _graph_error(131000, "Something went wrong"), RetryableDeliveryError, "131000"),
        (429, None, RetryableDeliveryError, "429"),
        (429, _graph_error(613, "Calls to this api have exceeded the rate limit"), RetryableDeliveryError, "613"),
        (503, _graph_error(131016, "Service unavailable"), RetryableDeliveryError, "131016"),
        (502, None, RetryableDeliveryError, "502"),
        (0, None, RetryableDeliveryError, "0"),
        (400, _graph_error(131026, "Message undeliverable"), PermanentDeliveryError, "131026"),
        (400, _graph_error(131030, "Recipient phone number not in allowed list"), PermanentDeliveryError, "131030"),
        (400, _graph_error(100, "Invalid parameter"), PermanentDeliveryError, "100"),
        (400, _graph_error(132001, "Template name does not exist"), PermanentDeliveryError, "132001"),
        (401, _graph_error(190, "Access token has expired"), RetryableDeliveryError, "not_configured"),
        (404, {"unexpected": True}, PermanentDeliveryError, "404"),
        (200, {"messaging_product": "whatsapp"}, PermanentDeliveryError, "200"),
    ],
)
def test_graph_errors_are_classified(status: int, body: Any, expected: type, code: str) -> None:
    error = classify_error(status, body)
    assert type(error) is expected
    assert error.code == code
    if expected is ResendAsDeliveryError:
        assert error.hint == "template"


@pytest.mark.parametrize(
    "status, code",
    [(401, 190), (400, 0), (403, 10), (403, 200), (403, 299), (400, 131005), (400, 131031), (400, 131042),
     (400, 368), (400, 133010), (400, 131037), (401, None), (403, None)],
)
def test_a_refusal_of_our_own_account_keeps_the_message_queued(status: int, code: int | None) -> None:
    """An expired token (190), missing permissions (10, 200-299), a locked or unpaid account
    (131031, 131042), a policy block (368), our number not registered (133010): every message
    fails alike until we fix it, and then every one can go. Given up as permanent, each marked
    the resident's number failed and flagged the conversation for a call-back."""
    body = _graph_error(code, "Error validating access token: Session has expired") if code is not None else None
    error = classify_error(status, body)
    assert type(error) is RetryableDeliveryError
    assert error.code == "not_configured"
    assert f"Meta error {code if code is not None else f'HTTP {status}'}" in error.message


@pytest.mark.parametrize(
    "code, address_failed",
    [
        (131026, True),  # undeliverable: not on WhatsApp
        (131030, True),  # not in the allowed list
        (131021, True),  # the recipient is our own number
        (100, False),  # our parameter
        (131008, False),
        (131009, False),
        (131051, False),  # our message type
        (132001, False),  # our template
        (130472, False),  # a marketing experiment
        (131049, False),
        (131062, False),  # not to a user id
        (999999, False),  # a code we do not know
    ],
)
def test_only_a_recipient_code_fails_the_address(code: int, address_failed: bool) -> None:
    error = classify_error(400, _graph_error(code))
    assert isinstance(error, PermanentDeliveryError)
    assert error.address_failed is address_failed


def test_a_refusal_to_send_to_a_user_id_is_permanent_but_does_not_fail_the_address() -> None:
    """131062: this kind of message cannot go to a BSUID. The contact's other identities are
    tried, and the BSUID stays good for the next message."""
    refused = classify_error(400, _graph_error(131062, "Business-scoped User ID recipients are not supported"))
    undeliverable = classify_error(400, _graph_error(131026, "Message undeliverable"))
    assert isinstance(refused, PermanentDeliveryError) and refused.code == "131062"
    assert refused.address_failed is False
    assert isinstance(undeliverable, PermanentDeliveryError) and undeliverable.address_failed is True


def test_classified_error_keeps_the_details_and_retry_after() -> None:
    error = classify_error(400, _graph_error(130429, "Rate limit hit", "Cloud API throughput reached"), retry_after=30)
    assert isinstance(error, RetryableDeliveryError)
    assert error.retry_after == 30
    assert "Rate limit hit" in error.message and "throughput" in error.message


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"messaging_product": "whatsapp", "messages": [{"id": "wamid.A"}]}, "wamid.A"),
        ({"messages": []}, None),
        ({"messages": [{"id": ""}]}, None),
        ({"messages": "x"}, None),
        (None, None),
    ],
)
def test_provider_message_id(body: Any, expected: str | None) -> None:
    assert provider_message_id(body) == expected


@pytest.mark.parametrize(
    "last, inside",
    [
        (NOW - timedelta(hours=23, minutes=59), True),
        (NOW - timedelta(minutes=1), True),
        (NOW - timedelta(hours=24), False),
        (NOW - timedelta(hours=25), False),
        (None, False),
        ((NOW - timedelta(hours=1)).replace(tzinfo=None), True),
    ],
)
def test_within_window(last: datetime | None, inside: bool) -> None:
    assert within_window(last, NOW) is inside


def test_a_naive_now_is_taken_as_utc() -> None:
    assert within_window(NOW - timedelta(hours=1), NOW.replace(tzinfo=None)) is True
    assert within_window(NOW - timedelta(hours=25), NOW.replace(tzinfo=None)) is False


def test_window_length_can_be_changed() -> None:
    assert within_window(NOW - timedelta(hours=2), NOW, hours=1) is False
