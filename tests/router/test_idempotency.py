"""Staff actions with an Idempotency-Key: sent again, they change nothing and get the first answer."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from router.hookspecs import hookimpl
from router.testing import CoreHarness

from .helpers import webform_message


async def _case(harness) -> int:
    return (await harness.core.ingest(webform_message())).conversation_id


async def _post(harness, path: str, body: dict[str, Any], key: str | None, token: str = "admin") -> tuple[int, Any, str | None]:
    headers = {"Authorization": f"Bearer {harness.tokens[token]}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    response = await harness.client.post(path, json=body, headers=headers)
    return response.status, await response.json(), response.headers.get("Idempotent-Replayed")


async def test_a_reply_sent_again_with_its_key_is_queued_once_and_answered_the_same(harness):
    case = await _case(harness)
    path = f"/api/v1/conversations/{case}/replies"
    first = await _post(harness, path, {"text": "Die Sperrung endet am Freitag."}, "reply-1")
    again = await _post(harness, path, {"text": "Die Sperrung endet am Freitag."}, "reply-1")
    assert first[0] == again[0] == 201
    assert again[1] == first[1] and first[2] is None and again[2] == "true"
    assert await harness.count("messages", "kind = 'reply'") == 1
    assert await harness.count("outbox", "kind = 'reply'") == 1
    # Without a key, the same text is another reply
    assert (await _post(harness, path, {"text": "Die Sperrung endet am Freitag."}, None))[0] == 201
    assert await harness.count("messages", "kind = 'reply'") == 2


async def test_two_requests_with_one_key_at_the_same_time_reply_once(harness):
    case = await _case(harness)
    path = f"/api/v1/conversations/{case}/replies"
    answers = await asyncio.gather(*(_post(harness, path, {"text": "Morgen um acht."}, "double-click") for _ in range(5)))
    assert {a[0] for a in answers} == {201}
    assert len({a[1]["id"] for a in answers}) == 1
    assert sorted(a[2] or "" for a in answers) == ["", "true", "true", "true", "true"]
    assert await harness.count("outbox", "kind = 'reply'") == 1


async def test_a_key_used_for_another_request_is_refused_and_changes_nothing(harness):
    case = await _case(harness)
    other = await _case(harness)
    assert (await _post(harness, f"/api/v1/conversations/{case}/replies", {"text": "Erste Antwort"}, "k"))[0] == 201
    for path, body in ((f"/api/v1/conversations/{case}/replies", {"text": "Andere Antwort"}),
                       (f"/api/v1/conversations/{other}/replies", {"text": "Erste Antwort"}),
                       (f"/api/v1/conversations/{case}/notes", {"text": "Erste Antwort"})):
        status, body, _ = await _post(harness, path, body, "k")
        assert status == 422 and body["error"]["code"] == "idempotency_key_reused", body
        assert body["error"]["field"] == "Idempotency-Key"
    assert await harness.count("messages", "kind IN ('reply', 'note')") == 1


async def test_keys_belong_to_the_staff_member_and_are_kept_a_day(harness):
    case = await _case(harness)
    path = f"/api/v1/conversations/{case}/notes"
    await _post(harness, path, {"text": "Rückruf vereinbart"}, "note-1", token="admin")
    status, _, replayed = await _post(harness, path, {"text": "Rückruf vereinbart"}, "note-1", token="hotline")
    assert status == 201 and replayed is None  # another member's key of the same name
    assert await harness.count("messages", "kind = 'note'") == 2
    harness.clock.advance(timedelta(hours=25))
    status, _, replayed = await _post(harness, path, {"text": "Rückruf vereinbart"}, "note-1", token="admin")
    assert status == 201 and replayed is None  # kept for 24 hours: later, a new request
    assert await harness.count("messages", "kind = 'note'") == 3
    assert await harness.count("request_keys") == 1  # the expired ones forgotten, the new one kept


async def test_a_call_back_logged_again_with_its_key_counts_once(harness):
    case = await _case(harness)
    path = f"/api/v1/conversations/{case}/callbacks"
    first = await _post(harness, path, {"outcome": "not_reached", "note": "Mailbox"}, "cb-1")
    again = await _post(harness, path, {"outcome": "not_reached", "note": "Mailbox"}, "cb-1")
    assert first[0] == again[0] == 201 and first[1] == again[1] and again[2] == "true"
    assert await harness.count("callback_attempts") == 1


async def test_a_reached_call_back_sent_again_answers_once_and_keeps_only_what_was_shown(harness):
    case = await _case(harness)
    path = f"/api/v1/conversations/{case}/callbacks"
    first = await _post(harness, path, {"outcome": "reached"}, "cb-2")
    again = await _post(harness, path, {"outcome": "reached"}, "cb-2")
    assert first[1]["answered"] is True and again[1] == first[1] and again[2] == "true"
    assert await harness.count("events", "kind = 'callback'") == 1
    assert await harness.count("messages", "kind = 'callback'") == 1
    (kept,) = await harness.rows("SELECT response FROM request_keys")
    assert "status_token" not in kept["response"]  # the conversation behind it is not kept with the key


async def test_a_reply_sent_again_does_not_ask_the_reply_copies_plugins_again(tmp_path):
    """The hook is told of a reply being queued: a request sent again queues nothing."""
    calls = []

    class Copies:
        @hookimpl
        async def reply_copies(self, conversation, reply, identities):
            calls.append(reply["text"])
            return []

    async with CoreHarness(tmp_path / "d", plugins=[Copies()]) as harness:
        case = await _case(harness)
        for _ in range(3):
            assert (await _post(harness, f"/api/v1/conversations/{case}/replies", {"text": "Morgen."}, "r"))[0] == 201
    assert calls == ["Morgen."]


@pytest.mark.parametrize(("action", "body"), [("replies", {"text": "Wir kommen morgen."}), ("notes", {"text": "Rückruf vereinbart"}),
                                              ("callbacks", {"outcome": "not_reached"})])
async def test_an_action_sent_again_after_its_conversation_moved_away_is_answered_as_the_first_time(harness, action, body):
    """The contractor's answer was lost on the way and the hotline transferred the case: the
    retry got a 404, and staff took the reply for one never sent."""
    case = await _case(harness)
    path = f"/api/v1/conversations/{case}/{action}"
    first = await _post(harness, path, body, "k-1", token="contractor")
    assert first[0] == 201
    status, _, _ = await _post(harness, f"/api/v1/conversations/{case}/transfer", {"unit": "kundenservice"}, None, token="hotline")
    assert status == 200
    again = await _post(harness, path, body, "k-1", token="contractor")
    assert again[0] == 201 and again[1] == first[1] and again[2] == "true"
    # a new key, or none, is an action on a conversation the contractor no longer sees
    assert (await _post(harness, path, body, "k-2", token="contractor"))[0] == 404
    assert (await _post(harness, path, body, None, token="contractor"))[0] == 404
    # and a key never used, on another unit's conversation, reveals nothing either
    other = await harness.core.ingest(webform_message("Meine Rechnung ist falsch", topic="other", address=None))
    status, error, _ = await _post(harness, f"/api/v1/conversations/{other.conversation_id}/{action}", body, "k-3",
                                   token="contractor")
    assert (status, error["error"]["code"]) == (404, "not_found")
