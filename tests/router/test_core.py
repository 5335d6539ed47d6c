"""The core's staff actions: close, reopen, wait, transfer and call-backs, through the inbox API."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from router.outbox import OutboxPolicy
from router.testing import CoreHarness, example_config, load_raw_config

from ..reliability.helpers import wait_until
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


async def test_a_transfer_takes_the_case_from_the_old_units_assignee(harness):
    """The new unit's case still named someone of the unit that gave it away: it looked taken
    care of, by someone who no longer sees it."""
    case = (await harness.core.ingest(webform_message())).conversation_id
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/assign", token="contractor",
                                       json={"assignee": "Kolonne 3"})
    assert status == 200 and detail["assignee"] == "Kolonne 3"
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/transfer", json={"unit": "vertrieb"})
    assert status == 200 and (detail["unit"], detail["assignee"]) == ("vertrieb", None)


async def test_failed_call_backs_on_an_answered_case_do_not_escalate_it(harness):
    """The unit answered; a follow-up call that does not get through is no missed deadline:
    the case stays with its unit and nobody is told it failed to answer."""
    case = (await harness.core.ingest(webform_message())).conversation_id
    await harness.run_outbox()  # the acknowledgement
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case}/replies", json={"text": "Erledigt."})
    assert status == 201
    await harness.run_outbox()
    for _ in range(3):
        status, body = await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": "not_reached"})
        assert status == 201 and body["escalated"] is False
    (row,) = await harness.rows("SELECT state, unit, flags FROM conversations WHERE id = ?", (case,))
    assert (row["state"], row["unit"]) == ("answered", "tiefbau-muster") and "callback_failed" in row["flags"]
    assert await harness.count("escalations") == 0 and await harness.count("messages", "kind = 'notification'") == 0


async def test_failed_call_backs_do_not_escalate_past_the_configured_level(tmp_path):
    """``max_escalation_level`` bounds the escalations of a deadline, those of failed
    call-backs as well."""
    raw = load_raw_config()
    raw["service"]["max_escalation_level"] = 1
    async with CoreHarness(tmp_path / "data", config=example_config(raw)) as harness:
        result = await harness.core.ingest(webform_message())
        harness.clock.set(result.deadline + timedelta(minutes=1))
        assert [e["level"] for e in await harness.escalate()] == [1]
        for _ in range(3):
            status, body = await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/callbacks",
                                             json={"outcome": "not_reached"})
            assert status == 201 and body["escalated"] is False
        (row,) = await harness.rows("SELECT unit, escalation_level FROM conversations")
        assert (row["unit"], row["escalation_level"]) == ("bauhotline", 1)
        assert await harness.count("escalations") == 1


PHONE_ENV = {"TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456",
             "TWILIO_API_URL": "http://127.0.0.1:9"}


async def test_the_call_back_sms_goes_once_however_many_call_backs_fail_after_the_limit(tmp_path):
    """The SMS with the status link follows the attempt that reaches the limit; staff who try
    again afterwards do not send the person the same SMS after each further attempt."""
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "phone"), env=PHONE_ENV) as harness:
        result = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA1", "kind": "missed_call",
                                            "sender": {"kind": "phone", "address": "+4915111111111"}})
        queued = []
        for _ in range(5):
            status, body = await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/callbacks",
                                             json={"outcome": "not_reached"})
            assert status == 201, body
            queued.append(await harness.count("outbox", "kind = 'callback_sms'"))
        assert queued == [0, 0, 1, 1, 1]


async def test_a_call_back_that_reaches_the_person_of_an_answered_case_answers_nothing_again(harness):
    """The case was answered already: the call-back is kept, but it is no new answer (nor told
    to ``on_answered``, which counts answers and calls the ``conversation_answered`` hooks)."""
    case = (await harness.core.ingest(webform_message())).conversation_id
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": "reached"})
    assert status == 201 and body["answered"] is True
    status, body = await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": "reached"})
    assert status == 201 and body["answered"] is False
    assert harness.core.metrics.value("contact_router_conversations_answered_total") == 1
    assert await harness.count("messages", "kind = 'callback' AND conversation_id = ?", (case,)) == 2


async def test_an_escalation_wakes_the_outbox_for_the_new_owners_notification(tmp_path):
    """The outbox worker sleeps until something is queued (or its poll, 30 s here): the
    notification of an escalation is handled at once, not at the next poll."""
    policy = OutboxPolicy(poll_seconds=30, send_timeout=5, retry_seconds=0)
    async with CoreHarness(tmp_path / "d", outbox_policy=policy) as harness:
        result = await harness.core.ingest(webform_message())
        await harness.run_outbox()  # the acknowledgement
        commits = harness.core.store.commits
        worker = asyncio.create_task(harness.core.outbox.run())
        try:
            await wait_until(lambda: harness.core.store.commits > commits, 10, 0.005)  # its first, empty claim
            await asyncio.sleep(0.01)  # from that claim into its wait
            harness.clock.set(result.deadline + timedelta(minutes=1))
            assert [e["to_unit"] for e in await harness.escalate()] == ["bauhotline"]
            # tried at once (with no e-mail channel here it is retried later: tried is what counts)
            assert await wait_until(lambda: harness.count("outbox", "kind = 'notification' AND attempts > 0"), 10, 0.01)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker


async def test_a_transfer_of_an_answered_case_sets_no_deadline_and_keeps_its_escalation_level(harness):
    """Nothing is due on an answered case: its new owner gets no deadline, and the level of the
    escalations before the answer stays as it was (only a new deadline counts from nought)."""
    result = await harness.core.ingest(webform_message())
    case = result.conversation_id
    harness.clock.set(result.deadline + timedelta(minutes=1))
    assert [e["level"] for e in await harness.escalate()] == [1]
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": "reached"})
    assert status == 201
    status, detail = await harness.api("POST", f"/api/v1/conversations/{case}/transfer", json={"unit": "vertrieb"})
    assert status == 200
    assert (detail["unit"], detail["state"], detail["deadline"], detail["escalation_level"]) == ("vertrieb", "answered", None, 1)


async def test_a_live_answer_to_a_message_outside_any_conversation_is_not_recorded(harness):
    """A reaction to a message we do not have is kept outside any conversation: a live answer
    said to follow it answers nothing and leaves no call-back without a conversation."""
    await harness.core.ingest({"channel": "whatsapp", "channel_message_id": "wamid.R1", "kind": "reaction",
                               "sender": {"kind": "phone", "address": "+4915111111111"},
                               "target_message_id": "wamid.unknown", "meta": {"emoji": "👍"}})
    (row,) = await harness.rows("SELECT conversation_id FROM messages WHERE channel_message_id = 'wamid.R1'")
    assert row["conversation_id"] is None
    assert await harness.core.record_live_answer("whatsapp", "wamid.R1", "Call put through and answered") is False
    assert await harness.count("messages", "kind = 'callback'") == 0


async def test_staff_of_some_units_cannot_merge_a_contact_they_see_no_conversation_of(harness):
    """A contact without conversations (a reaction to a message we do not have) is seen by no
    unit's staff: merging it into a contact of theirs answers 404, as for any contact out of sight."""
    case = await harness.core.ingest(webform_message("Hallo, eine Frage", topic="other",
                                                     address={"street": "Weg 1", "postcode": "99999", "city": "X"}))
    assert case.unit == "kundenservice"
    await harness.core.ingest({"channel": "whatsapp", "channel_message_id": "wamid.R1", "kind": "reaction",
                               "sender": {"kind": "phone", "address": "+4915111111111"},
                               "target_message_id": "wamid.unknown", "meta": {"emoji": "👍"}})
    (seen,) = await harness.rows("SELECT contact_id FROM conversations WHERE id = ?", (case.conversation_id,))
    (unseen,) = await harness.rows("SELECT contact_id FROM messages WHERE channel_message_id = 'wamid.R1'")
    assert unseen["contact_id"] != seen["contact_id"]
    status, body = await harness.api("POST", f"/api/v1/contacts/{seen['contact_id']}/merge", token="hotline",
                                     json={"other_contact_id": unseen["contact_id"]})
    assert status == 404 and body["error"]["code"] == "not_found"
    assert await harness.count("contacts", "merged_into IS NOT NULL") == 0
