from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins.whatsapp.parse import _fallback_message, normalise_wa_id, parse_message, parse_status, parse_webhook

from .conftest import FIXTURES, SKIP_REASON, fixture_cases, schema_errors

SENDER = {
    "kind": "phone",
    "address": "+972987654321",
    "display_name": "Test Name",
    "other_identities": [{"kind": "whatsapp_user", "address": "US.13491208655302741918"}],
}

# What each recorded case must be stored as. Every key is checked exactly: "flags" and "refs"
# default to none, "kind" to "message", "sender" to SENDER; "meta" and attachments are subsets.
EXPECTED: dict[tuple[str, str], dict[str, Any]] = {
    ("callback_button", "button"): {
        "text": "title",
        "refs": ["wamid.xyzxyz"],
        "meta": {"interactive": {"type": "button_reply", "id": "callback_data", "title": "title"}},
    },
    ("callback_button", "quick_reply"): {
        "text": "title",
        "refs": ["wamid.xyzxyz=="],
        "meta": {"button": {"payload": "callback_data", "text": "title"}},
    },
    ("callback_button", "quick_reply_without_context"): {
        "text": "title",
        "meta": {"button": {"payload": "callback_data", "text": "title"}},
    },
    ("callback_selection", "callback"): {
        "text": "title",
        "refs": ["wamid.xyzxyz"],
        "meta": {"interactive": {"type": "list_reply", "id": "callback_data", "title": "title"}},
    },
    ("callback_selection", "description"): {
        "text": "title\ndescription",
        "refs": ["wamid.xyzxyz"],
        "meta": {"interactive": {"type": "list_reply", "id": "callback_data", "description": "description"}},
    },
    ("deleted_message", "revoke"): {
        "kind": "deletion",
        "target": "<ORIGINAL_WHATSAPP_MESSAGE_ID>",
        "text": None,
    },
    ("edited_message", "image"): {
        "kind": "edit",
        "target": "wamid.HBgLMTQxMjU1NTA4MjkVAgASGBQzQUNCNjk5RDUwNUZGMUZEM0VBRAA=",
        "text": "Updated image caption",
        "sender": {"kind": "phone", "address": "+16505551234"},
        "attachments": [{"media_id": "1234567890", "content_type": "image/jpeg", "caption": "Updated image caption"}],
        "meta": {"edited_type": "image"},
    },
    ("message", "text"): {"text": "Body Text"},
    ("message", "image"): {
        "text": None,
        "attachments": [{"media_id": "65463453", "content_type": "image/jpeg", "sha256": "4654+8g="}],
        "meta": {"media": {"type": "image"}},
    },
    ("message", "media_with_url"): {
        "text": None,
        "attachments": [
            {
                "media_id": "65463453",
                "content_type": "image/jpeg",
                "url": "https://lookaside.fbsbx.com/whatsapp_business/attachments/"
                "?mid=65463453&source=webhook&ext=487r9re&hash=heiwchueowbcew-dnedcw",
            }
        ],
    },
    ("message", "video"): {
        "text": "caption",
        "flags": ["forwarded"],
        "attachments": [{"media_id": "765756756", "content_type": "video/mp4", "caption": "caption"}],
        "meta": {"media": {"type": "video"}},
    },
    ("message", "document"): {
        "text": "caption",
        "flags": ["forwarded"],
        "attachments": [
            {"media_id": "1234567890987654321", "content_type": "application/pdf", "name": "filename.pdf"}
        ],
        "meta": {"media": {"type": "document"}},
    },
    ("message", "audio"): {
        "text": None,
        "flags": ["forwarded"],
        "attachments": [{"media_id": "1234567890987654321", "content_type": "audio/ogg; codecs=opus"}],
        "meta": {"media": {"type": "audio"}},
    },
    ("message", "voice"): {
        "text": None,
        "attachments": [{"media_id": "1234567890987654321", "content_type": "audio/ogg; codecs=opus"}],
        "meta": {"media": {"type": "audio", "voice": True}},
    },
    ("message", "static_sticker"): {
        "attachments": [{"content_type": "image/webp"}],
        "meta": {"media": {"type": "sticker", "animated": False}},
    },
    ("message", "animated_sticker"): {
        "attachments": [{"content_type": "image/webp"}],
        "meta": {"media": {"type": "sticker", "animated": True}},
    },
    ("message", "reaction"): {
        "kind": "reaction",
        "target": "wamid.yzxyzx=",
        "meta": {"emoji": "\U0001f62e", "removed": False},
    },
    ("message", "unreaction_empty"): {
        "kind": "reaction",
        "target": "wamid.yzxyzx=",
        "meta": {"emoji": None, "removed": True},
    },
    ("message", "unreaction_no_emoji"): {
        "kind": "reaction",
        "target": "wamid.yzxyzx=",
        "meta": {"emoji": None, "removed": True},
    },
    ("message", "current_location"): {
        "flags": ["forwarded"],
        "location": {"lat": 12.25089, "lon": 43.90539},
        "text_contains": ["12.25089", "43.90539"],
    },
    ("message", "chosen_location"): {
        "flags": ["forwarded"],
        "location": {
            "lat": 37.4611978,
            "lon": -122.2164385,
            "name": "Facebook HQ",
            "address": "1 Hacker Way, Menlo Park, CA 94025",
        },
        "text_contains": ["Facebook HQ", "1 Hacker Way"],
    },
    ("message", "contacts"): {
        "text_contains": ["Chandler Bing", "+1 555-555-5555", "Monica", "Rachel Green"],
        "meta_len": {"contacts": 3},
    },
    ("message", "order"): {
        "text_contains": ["3 x HAMBURGER", "2 x SODA"],
        "meta": {"order": {"catalog_id": "354160437058781"}},
    },
    ("message", "unsupported"): {
        "flags": ["unsupported", "provider_error"],
        "meta": {"unsupported_type": "unsupported", "errors": [{"code": 131051}]},
    },
    ("message", "unsupported_with_type"): {
        "flags": ["unsupported", "provider_error"],
        "meta": {"unsupported_type": "pool", "errors": [{"code": 131051}]},
    },
    ("message", "reply"): {"text": "replied text", "refs": ["wamid.xyzxyz=="]},
    ("message", "forwarded"): {"text": "forwarded text", "flags": ["forwarded"]},
    ("message", "forwarded_many_times"): {
        "text": "text forwarded many times",
        "flags": ["forwarded", "frequently_forwarded"],
    },
    ("message", "interactive_message_with_err"): {
        "text": None,
        "refs": ["wamid.gvwegfretge=="],
        "flags": ["unsupported", "provider_error"],
        "meta": {"errors": [{"code": 131000, "details": "Unsupported webhook payload"}]},
        "change_errors": [131000],
    },
    ("message", "referral"): {
        "text": "BODY",
        "meta": {"referral": {"source_id": "ADID", "ctwa_clid": "CTWA_CLID"}},
    },
}

EXPECTED_STATUSES: dict[tuple[str, str], dict[str, Any]] = {
    ("message_status", "sent"): {"status": "sent", "provider_id": "wamid.xyzxyz"},
    ("message_status", "delivered"): {"status": "delivered", "provider_id": "wamid.xyzxyz"},
    ("message_status", "read"): {"status": "read", "provider_id": "wamid.xyzxyz"},
    ("message_status", "played"): {"status": "read", "provider_id": "wamid.xyzxyz"},
    ("message_status", "failed"): {
        "status": "failed",
        "error_code": "130472",
        "error_title": "User's number is part of an experiment",
        "error_detail": "Failed to send message because this user's phone number is part of an experiment",
        "permanent": True,
        "resend_hint": None,
        "address_failed": False,  # 130472, a marketing experiment: says nothing against the number
    },
    ("message_status", "with_tracker"): {"status": "sent", "raw_callback": "some data", "idempotency_key": "some data"},
    ("message_status", "group"): {"status": "read", "provider_id": "<WHATSAPP_MESSAGE_ID>"},
}


def _contains(actual: Any, expected: Any) -> bool:
    """``expected`` is a subset of ``actual`` (dicts by key, lists item by item, same length)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _contains(actual[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(_contains(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return actual == expected


def _raw_messages(body: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (change["value"], message)
        for entry in body["entry"]
        for change in entry["changes"]
        for message in change["value"].get("messages", [])
    ]


def test_every_recorded_case_has_an_expectation() -> None:
    if not FIXTURES.is_dir():
        pytest.skip(SKIP_REASON)
    cases = {(p.values[0], p.values[1]) for p in fixture_cases()}
    assert cases - EXPECTED.keys() - EXPECTED_STATUSES.keys() == set()


@pytest.mark.parametrize("file, case, body", fixture_cases())
def test_recorded_case_is_parsed_validated_and_stored_as_what_it_is(file: str, case: str, body: dict) -> None:
    original = copy.deepcopy(body)
    result = parse_webhook(body)
    assert body == original, "parsing must not change its input"
    raw = _raw_messages(body)
    assert len(result.messages) == len(raw)

    for message, (value, raw_message) in zip(result.messages, raw, strict=True):
        assert schema_errors(message) == []
        assert message["channel"] == "whatsapp"
        assert message["channel_message_id"] == raw_message["id"]
        assert message["recipient"] == value["metadata"]["phone_number_id"]
        assert message["raw"] == raw_message
        sent_at = datetime.fromisoformat(message["sent_at"])
        assert sent_at == datetime.fromtimestamp(int(raw_message["timestamp"]), UTC)

    if (file, case) in EXPECTED:
        expected = EXPECTED[file, case]
        (message,) = result.messages
        assert result.statuses == []
        assert message.get("kind", "message") == expected.get("kind", "message")
        assert message["sender"] == expected.get("sender", SENDER)
        assert sorted(message.get("flags", [])) == sorted(expected.get("flags", []))
        assert message.get("thread", {}).get("refs", []) == expected.get("refs", [])
        assert message.get("target_message_id") == expected.get("target")
        if "text" in expected:
            assert message.get("text") == expected["text"]
        for fragment in expected.get("text_contains", []):
            assert fragment in message["text"]
        assert _contains(message.get("attachments", []), expected.get("attachments", []))
        assert _contains(message.get("location"), expected.get("location"))
        assert _contains(message.get("meta", {}), expected.get("meta", {}))
        for key, length in expected.get("meta_len", {}).items():
            assert len(message["meta"][key]) == length
        assert [e["code"] for e in result.errors] == expected.get("change_errors", [])
    else:
        expected = EXPECTED_STATUSES[file, case]
        assert result.messages == []
        (update,) = result.statuses
        for key, value in expected.items():
            if key == "raw_callback":
                assert update.raw is not None and update.raw["biz_opaque_callback_data"] == value
            else:
                assert getattr(update, key) == value
        assert update.at is not None and update.at.tzinfo is not None


# -------------------------------------------------------------------------------------------
# Synthetic bodies: batching, statuses, identities, malformed input
# -------------------------------------------------------------------------------------------


def _body(*values: dict[str, Any], field: str = "messages") -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": field, "value": value}]} for value in values],
    }


def _value(messages=(), statuses=(), contacts=None, phone_number_id="111") -> dict[str, Any]:
    value: dict[str, Any] = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": phone_number_id}}
    if contacts is not None:
        value["contacts"] = contacts
    if messages:
        value["messages"] = list(messages)
    if statuses:
        value["statuses"] = list(statuses)
    return value


def _text(message_id: str, sender: str = "491701234567", body: str = "Hallo") -> dict[str, Any]:
    return {"from": sender, "id": message_id, "timestamp": "1700000000", "type": "text", "text": {"body": body}}


def test_every_entry_change_message_and_status_of_a_batch_is_read_in_order() -> None:
    body = _body(
        _value(messages=[_text("m1"), _text("m2")], phone_number_id="111"),
        _value(
            messages=[_text("m3")],
            statuses=[{"id": "out1", "status": "delivered", "timestamp": "1700000001"}],
            phone_number_id="222",
        ),
    )
    body["entry"][0]["changes"].append({"field": "messages", "value": _value(messages=[_text("m4")])})
    result = parse_webhook(body)
    assert [m["channel_message_id"] for m in result.messages] == ["m1", "m2", "m4", "m3"]
    assert [m["recipient"] for m in result.messages] == ["111", "111", "111", "222"]
    assert [(s.provider_id, s.status) for s in result.statuses] == [("out1", "delivered")]


def test_display_name_comes_from_the_contact_with_the_same_wa_id() -> None:
    contacts = [
        {"wa_id": "491701111111", "profile": {"name": "Anna"}},
        {"wa_id": "491702222222", "profile": {"name": "Ben"}, "user_id": "DE.42"},
    ]
    body = _body(_value(messages=[_text("a", "491702222222"), _text("b", "491701111111")], contacts=contacts))
    first, second = parse_webhook(body).messages
    assert first["sender"] == {
        "kind": "phone",
        "address": "+491702222222",
        "display_name": "Ben",
        "other_identities": [{"kind": "whatsapp_user", "address": "DE.42"}],
    }
    assert second["sender"] == {"kind": "phone", "address": "+491701111111", "display_name": "Anna"}


def test_sender_without_a_phone_number_is_kept_under_the_user_id() -> None:
    raw = {"from_user_id": "DE.777", "id": "u1", "timestamp": "1700000000", "type": "text", "text": {"body": "x"}}
    message = parse_message(raw, contacts=[], recipient="111")
    assert message["sender"] == {"kind": "whatsapp_user", "address": "DE.777"}
    assert schema_errors(message) == []


def test_sender_without_any_address_is_anonymous_and_flagged() -> None:
    raw = {"id": "u2", "type": "text", "text": {"body": "x"}}
    message = parse_message(raw, contacts=[], recipient=None)
    assert message["sender"] == {"kind": "anonymous", "address": "unknown"}
    assert message["flags"] == ["no_number"]
    assert schema_errors(message) == []


def test_a_message_without_a_number_among_several_contacts_is_nobodys() -> None:
    """Only a change's single contact stands in for a missing ``from``: among several, the first
    one need not be the person who wrote, and the message would be filed under and acknowledged
    to someone else."""
    contacts = [{"wa_id": "491701111111", "profile": {"name": "Anna"}}, {"wa_id": "491702222222", "profile": {"name": "Ben"}}]
    raw = {"id": "u3", "timestamp": "1700000000", "type": "text", "text": {"body": "x"}}
    message = parse_message(raw, contacts=contacts, recipient="111")
    assert message["sender"] == {"kind": "anonymous", "address": "unknown"}
    assert message["flags"] == ["no_number"]
    assert parse_message(raw, contacts=contacts[1:], recipient="111")["sender"] == {
        "kind": "phone", "address": "+491702222222", "display_name": "Ben"}


def test_a_system_notice_is_kept_for_staff_but_never_acknowledged() -> None:
    """"User A changed from number X to Y": WhatsApp wrote it, not the person, so it gets no
    acknowledgement (the core acknowledges whatever is not ``ack_suppressed``)."""
    raw = {"from": "491701234567", "id": "wamid.SYS", "timestamp": "1700000000", "type": "system",
           "system": {"body": "User A changed from 491701234567 to 491707654321", "new_wa_id": "491707654321",
                      "type": "user_changed_number"}}
    message = parse_message(raw, contacts=[], recipient="111")
    assert message["ack_suppressed"] == "system notice"
    assert message["flags"] == ["system"]
    assert message["text"] == "User A changed from 491701234567 to 491707654321"
    assert message["meta"]["system"]["new_wa_id"] == "491707654321"
    assert schema_errors(message) == []


@pytest.mark.parametrize(
    "wa_id, expected",
    [
        ("491701234567", ("+491701234567", True)),
        ("+491701234567", ("+491701234567", True)),
        (491701234567, ("+491701234567", True)),
        ("5215512345678", ("+525512345678", True)),  # Mexican ids keep the old mobile 1
        ("972987654321", ("+972987654321", True)),
        ("999999999999999", ("+999999999999999", False)),
        ("12345", (None, False)),
        ("0491701234567", (None, False)),
        ("49 170 1234567", (None, False)),
        ("<WHATSAPP_USER_PHONE_NUMBER>", (None, False)),
        ("٤٩١٧٠١٢٣٤٥٦٧", (None, False)),
        (None, (None, False)),
        (True, (None, False)),
    ],
)
def test_wa_id_is_normalised_to_e164(wa_id: Any, expected: tuple[str | None, bool]) -> None:
    assert normalise_wa_id(wa_id) == expected


def test_a_number_phonenumbers_does_not_know_is_kept_and_flagged() -> None:
    message = parse_message(_text("x", "999999999999999"), contacts=[], recipient="1")
    assert message["sender"]["address"] == "+999999999999999"
    assert message["flags"] == ["unverified_number"]



def test_a_voice_message_of_the_older_type_is_audio_marked_as_voice() -> None:
    """WhatsApp first sent voice notes as type ``voice``, now as ``audio`` with ``voice: true``:
    both are stored alike, as an audio attachment that is a voice message."""
    older = {"from": "491701234567", "id": "v1", "timestamp": "1700000000", "type": "voice",
             "voice": {"id": "4711", "mime_type": "audio/ogg; codecs=opus", "sha256": "abc"}}
    message = parse_message(older, contacts=[], recipient="1")
    assert message["meta"]["media"] == {"type": "audio", "voice": True}
    assert message["attachments"] == [{"media_id": "4711", "content_type": "audio/ogg; codecs=opus", "sha256": "abc"}]
    assert schema_errors(message) == []


@pytest.mark.parametrize("lat, lon", [(90, 180), (-90, -180), (90.0, 0.0)])
def test_a_location_at_the_edge_of_the_map_is_a_location(lat: float, lon: float) -> None:
    raw = {"from": "491701234567", "id": "l1", "timestamp": "1700000000", "type": "location",
           "location": {"latitude": lat, "longitude": lon}}
    message = parse_message(raw, contacts=[], recipient="1")
    assert (message["location"]["lat"], message["location"]["lon"]) == (lat, lon)
    assert "flags" not in message


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "reaction", "reaction": {"message_id": "wamid.TARGET", "emoji": "\U0001f44d"}},
        {"type": "revoke", "revoke": {"original_message_id": "wamid.TARGET"}},
        {"type": "edit", "edit": {"original_message_id": "wamid.TARGET", "message": {"type": "text", "text": {"body": "neu"}}}},
    ],
    ids=["reaction", "revoke", "edit"],
)
def test_a_reaction_edit_or_deletion_with_a_context_refers_only_to_its_target(raw: dict[str, Any]) -> None:
    """A quoted message in the context of a reaction, edit or deletion names no thread: these
    refer to their target, and must not be taken for a reply in a conversation."""
    message = parse_message(
        {"from": "491701234567", "id": "x1", "timestamp": "1700000000", "context": {"id": "wamid.OTHER"}, **raw},
        contacts=[], recipient="1",
    )
    assert message["target_message_id"] == "wamid.TARGET"
    assert "thread" not in message


@pytest.mark.parametrize(
    "code, permanent, hint",
    [(131047, False, "template"), ("131047", False, "template"), (131056, False, None), (131026, True, None)],
)
def test_failed_status_is_classified(code: Any, permanent: bool, hint: str | None) -> None:
    update = parse_status(
        {"id": "o1", "status": "failed", "timestamp": "1700000000", "errors": [{"code": code, "title": "t"}]}
    )
    assert update is not None
    assert (update.status, update.error_code, update.permanent, update.resend_hint) == (
        "failed",
        str(code),
        permanent,
        hint,
    )


@pytest.mark.parametrize(
    "code, permanent, address_failed",
    [
        (131042, False, False),  # our unpaid account: retried, never the resident's fault
        (131031, False, False),  # our account locked
        (190, False, False),  # our access token
        (368, False, False),  # our account blocked for a policy violation
        (133010, False, False),  # our number not registered
        (131026, True, True),  # undeliverable to the resident's number
        (131030, True, True),
        (131021, True, True),
        (131049, True, False),  # Meta chose not to deliver (marketing limits): not the address
        (132001, True, False),  # our template
        (None, True, False),  # no code at all
    ],
)
def test_a_failed_status_fails_the_address_only_for_a_recipient_code(
    code: Any, permanent: bool, address_failed: bool
) -> None:
    """A failed status for our own account's fault (131042, unpaid: Meta reports it in the
    status, not in the answer to the send) marked the resident's number failed."""
    errors = [{"code": code, "title": "t"}] if code is not None else []
    update = parse_status({"id": "o1", "status": "failed", "timestamp": "1700000000", "errors": errors})
    assert update is not None
    assert (update.permanent, update.address_failed, update.resend_hint) == (permanent, address_failed, None)


def test_request_welcome_is_no_message_but_an_event() -> None:
    """Meta's welcome-message webhook (Conversational Components), as its documentation shows
    it: a person opened a chat with the number for the first time and has written nothing yet.
    It became an ``unsupported`` message, which opened a case and was acknowledged."""
    welcome = {"from": "491701234567", "id": "wamid.WELCOME", "timestamp": "1700000000", "type": "request_welcome"}
    contacts = [{"profile": {"name": "Erika"}, "wa_id": "491701234567"}]
    result = parse_webhook(_body(_value(messages=[welcome, _text("wamid.T1")], contacts=contacts)))
    assert [m["channel_message_id"] for m in result.messages] == ["wamid.T1"]  # only what was written
    assert result.events == [("request_welcome", {"phone_number_id": "111", "id": "wamid.WELCOME",
                                                  "sent_at": "2023-11-14T22:13:20Z"})]
    assert len(result.notes) == 1 and "request_welcome" in result.notes[0]


def test_a_failure_only_for_sending_to_a_user_id_does_not_fail_the_address() -> None:
    """131062: this message cannot go to a user id. The user id itself stays good."""
    def failed(code: int) -> Any:
        return parse_status({"id": "o1", "status": "failed", "timestamp": "1700000000", "errors": [{"code": code}]})

    assert (failed(131062).permanent, failed(131062).address_failed) == (True, False)
    assert (failed(131026).permanent, failed(131026).address_failed) == (True, True)


def test_a_message_the_parser_fails_on_keeps_a_senders_user_id() -> None:
    """A parser bug must not make a person with a username unanswerable: without a number, the
    kept message is theirs by user id, not the shared anonymous sender."""
    message = _fallback_message({"id": "u1", "from_user_id": "DE.9", "type": "text"}, "1", "boom")
    assert message["sender"] == {"kind": "whatsapp_user", "address": "DE.9"}
    assert message["flags"] == ["provider_error"]
    assert schema_errors(message) == []


@pytest.mark.parametrize(
    "raw", [None, "x", {}, {"id": "o1"}, {"id": "o1", "status": "deleted"}, {"id": "", "status": "sent"}]
)
def test_unusable_statuses_are_skipped_with_a_note(raw: Any) -> None:
    assert parse_status(raw) is None
    result = parse_webhook(_body(_value(statuses=[raw])))
    assert result.statuses == [] and len(result.notes) == 1


def test_other_webhook_fields_are_ignored_with_a_note() -> None:
    result = parse_webhook(_body({"event": "APPROVED"}, field="message_template_status_update"))
    assert (result.messages, result.statuses) == ([], [])
    assert "message_template_status_update" in result.notes[0]


def test_a_message_without_id_gets_a_stable_one() -> None:
    raw = {"from": "491701234567", "timestamp": "1700000000", "type": "text", "text": {"body": "x"}}
    first = parse_message(raw, recipient="1")["channel_message_id"]
    assert first.startswith("noid:")
    assert parse_message(dict(raw), recipient="1")["channel_message_id"] == first
    assert parse_message({**raw, "text": {"body": "y"}}, recipient="1")["channel_message_id"] != first


def test_over_long_fields_are_clipped_to_the_schema() -> None:
    raw = _text("x" * 600, body="a" * 300_000)
    raw["context"] = {"id": "c" * 2000}
    message = parse_message(raw, contacts=[{"wa_id": "491701234567", "profile": {"name": "n" * 500}}])
    assert schema_errors(message) == []
    assert len(message["text"]) == 200_000
    assert len(message["sender"]["display_name"]) == 200


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "text",
        {},
        {"object": "page"},
        {"object": "whatsapp_business_account"},
        {"object": "whatsapp_business_account", "entry": "x"},
        {"object": "whatsapp_business_account", "entry": [None, 1, {"changes": {"a": 1}}]},
        {"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages", "value": []}]}]},
        _body({"metadata": "x", "contacts": "y", "messages": "z", "statuses": 5, "errors": [1]}),
    ],
)
def test_malformed_bodies_never_raise(body: Any) -> None:
    result = parse_webhook(body)
    assert result.messages == [] and result.statuses == []


def test_malformed_messages_are_kept_flagged_and_valid() -> None:
    messages = [
        "not an object",
        {"id": 42, "from": 491701234567, "timestamp": "soon", "type": "text", "text": "flat"},
        {"id": "l", "from": "491701234567", "type": "location", "location": {"latitude": "north", "longitude": 1}},
        {"id": "l2", "from": "491701234567", "type": "location", "location": {"latitude": 91, "longitude": 1}},
        {"id": "i", "from": "491701234567", "type": "interactive", "interactive": {"type": "carousel"}},
        {"id": "r", "from": "491701234567", "type": "reaction", "reaction": "x"},
        {"id": "e", "from": "491701234567", "type": "edit", "edit": {"message": "x"}},
        {"id": "n", "from": "491701234567", "type": None},
    ]
    result = parse_webhook(_body(_value(messages=messages)))
    assert len(result.messages) == len(messages)
    for message in result.messages:
        assert schema_errors(message) == []
    flags = [m.get("flags", []) for m in result.messages]
    assert "provider_error" in flags[0]
    assert result.messages[1]["channel_message_id"] == "42"
    assert "provider_error" in flags[2] and "provider_error" in flags[3]
    assert "unsupported" in flags[4] and "unsupported" in flags[7]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)
_message_keys = st.sampled_from(
    [
        "id", "from", "from_user_id", "timestamp", "type", "text", "image", "audio", "document",
        "location", "contacts", "interactive", "button", "reaction", "edit", "revoke", "order",
        "system", "context", "referral", "errors", "unsupported",
    ]
)  # fmt: skip


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    message=st.dictionaries(_message_keys, _json, max_size=8),
    message_type=st.sampled_from(
        ["text", "image", "voice", "location", "contacts", "interactive", "button", "reaction", "edit", "revoke",
         "order", "system", "unsupported", "unknown"]
    ),  # fmt: skip
    contacts=_json,
)
def test_any_message_shape_parses_to_a_valid_message(message: dict, message_type: str, contacts: Any) -> None:
    message.setdefault("type", message_type)
    result = parse_webhook(_body({"metadata": {"phone_number_id": "1"}, "contacts": contacts, "messages": [message]}))
    (parsed,) = result.messages
    assert schema_errors(parsed) == []
