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
