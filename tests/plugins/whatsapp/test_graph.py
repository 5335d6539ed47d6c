from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from plugins.whatsapp.graph import (
    MAX_TEXT_LENGTH,
    classify_error,
    provider_message_id,
    split_text,
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
        (429, _graph_error(4, "Too many calls"), RetryableDeliveryError, "4"),
        (500, _graph_error(131000, "Something went wrong"), RetryableDeliveryError, "131000"),
        (503, _graph_error(131016, "Service unavailable"), RetryableDeliveryError, "131016"),
        (502, None, RetryableDeliveryError, "502"),
        (0, None, RetryableDeliveryError, "0"),
        (400, _graph_error(131026, "Message undeliverable"), PermanentDeliveryError, "131026"),
        (400, _graph_error(131030, "Recipient phone number not in allowed list"), PermanentDeliveryError, "131030"),
        (400, _graph_error(100, "Invalid parameter"), PermanentDeliveryError, "100"),
        (400, _graph_error(132001, "Template name does not exist"), PermanentDeliveryError, "132001"),
        (401, _graph_error(190, "Access token has expired"), PermanentDeliveryError, "190"),
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


def test_window_length_can_be_changed() -> None:
    assert within_window(NOW - timedelta(hours=2), NOW, hours=1) is False
