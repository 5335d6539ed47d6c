"""The core's staff actions: close, reopen, wait, transfer and call-backs, through the inbox API."""

from __future__ import annotations

from .helpers import webform_message


async def test_an_answered_conversation_is_not_reopened_by_staff(harness):
    """``reopen`` is for a closed or waiting conversation: an answered one that nobody asked
    anything of since keeps its answer and gets no deadline."""
    case = (await harness.core.ingest(webform_message())).conversation_id
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": "reached"})
    assert status == 201
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/reopen")
    assert status == 409 and body["error"]["code"] == "not_closed"
    (row,) = await harness.rows("SELECT state, deadline, escalate_at FROM conversations WHERE id = ?", (case,))
    assert (row["state"], row["deadline"], row["escalate_at"]) == ("answered", None, None)


async def test_closing_a_conversation_takes_it_off_the_list_of_call_backs_to_make(harness):
    """``flag=callback_required`` lists the call-backs to make until one reaches the person
    or the conversation is closed: closed, nobody is to call back any more."""
    case = (await harness.core.ingest(webform_message(flags=["callback_required"]))).conversation_id
    status, listing = await harness.api("GET", "/api/v1/conversations?flag=callback_required")
    assert status == 200 and [i["id"] for i in listing["items"]] == [case]
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case}/close")
    assert status == 200
    status, listing = await harness.api("GET", "/api/v1/conversations?flag=callback_required")
    assert status == 200 and listing["items"] == []
