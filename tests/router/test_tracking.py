"""Deadlines, escalation along the chain, and what counts as answered."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from router import tracking
from router.store.sqlite import iso

from .helpers import webform_message


async def test_unanswered_case_escalates_contractor_to_hotline_to_customer_care(harness):
    result = await harness.core.ingest(webform_message())
    assert result.unit == "tiefbau-muster"
    assert await harness.escalate() == []  # nothing overdue yet
    # Monday 09:00 Berlin + 4 site hours: due 13:00 Berlin. One minute later it escalates.
    assert result.deadline.isoformat() == "2026-11-30T12:00:00+00:00"
    harness.clock.set(result.deadline + timedelta(minutes=1))
    done = await harness.escalate()
    assert [(e["from_unit"], e["to_unit"], e["level"]) for e in done] == [("tiefbau-muster", "bauhotline", 1)]
    status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}", token="hotline")
    assert detail["unit"] == "bauhotline" and detail["escalation_level"] == 1
    assert detail["escalations"][0]["to_unit"] == "bauhotline"
    notes = await harness.rows("SELECT to_address, text FROM outbox o JOIN messages m ON m.id = o.message_id WHERE o.kind = 'notification'")
    assert notes[0]["to_address"] == "bau@example.org" and result.case_reference in notes[0]["text"]
    status, listing = await harness.api("GET", "/api/v1/conversations?overdue=false", token="hotline")
    assert result.conversation_id in [i["id"] for i in listing["items"]]
    # The contractor no longer owns it.
    status, _ = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}", token="contractor")
    assert status == 404
    # Still no answer: on to customer care, the end of the chain.
    harness.clock.advance(timedelta(days=1))
    done = await harness.escalate()
    assert [(e["from_unit"], e["to_unit"], e["level"]) for e in done] == [("bauhotline", "kundenservice", 2)]
    # At the end of the chain the owner stays, is reminded, and the case stays overdue.
    harness.clock.advance(timedelta(days=2))
    done = await harness.escalate()
    assert [(e["from_unit"], e["to_unit"]) for e in done] == [("kundenservice", "kundenservice")]
    status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
    assert detail["unit"] == "kundenservice" and detail["overdue"] is True and detail["escalation_level"] == 3
    assert await harness.count("outbox", "kind = 'notification'") == 3


async def test_answered_case_does_not_escalate(harness):
    result = await harness.core.ingest(webform_message())
    await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": "Erledigt."})
    await harness.run_outbox()
    harness.clock.advance(timedelta(days=5))
    assert await harness.escalate() == []


async def test_acknowledgement_is_not_an_answer(harness):
    result = await harness.core.ingest(webform_message())
    await harness.run_outbox()
    status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
    assert detail["state"] == "acknowledged" and detail["first_answered_at"] is None


async def test_deadline_follows_business_hours_over_the_weekend(tmp_path):
    from datetime import UTC, datetime

    from router.testing import CoreHarness

    # Friday 2026-11-27 15:00 Berlin: the contractor's site closes at 14:00 on Fridays.
    async with CoreHarness(tmp_path / "d", start=datetime(2026, 11, 27, 14, 0, tzinfo=UTC)) as harness:
        result = await harness.core.ingest(webform_message())
        # Monday 07:00 + 4 hours = 11:00 Berlin = 10:00 UTC
        assert result.deadline == datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


async def test_acknowledgement_language_follows_the_message(harness):
    english = await harness.core.ingest(webform_message("The pavement in front of our house is blocked by construction", language="en"))
    assert english.ack_text.startswith("Hello Erika Mustermann, thank you")
    german = await harness.core.ingest(webform_message("Baustelle", email="x@example.net"))
    assert german.ack_text.startswith("Guten Tag Erika Mustermann") and "Mo., 30.11.2026" in german.ack_text


async def test_follow_up_joins_and_is_not_acknowledged_twice(harness):
    # by e-mail: a channel that answers the address the message came from
    first = await harness.core.ingest(webform_message(channel="email"))
    second = await harness.core.ingest(webform_message(f"Nachtrag zu {first.case_reference}", channel="email"))
    assert second.conversation_id == first.conversation_id and not second.acknowledged
    assert await harness.count("outbox", "kind = 'ack'") == 1


async def test_a_case_reference_from_a_sender_nobody_vouches_for_links_but_never_joins(harness):
    """The web form answers whoever submits it, with the status page of the conversation the
    message joined. With the e-mail address of a resident and their case reference, anyone
    joined that resident's conversation and got its status page: the messages, the staff's
    replies, and a form to write as the resident. It now opens a conversation of its own,
    linked to the one it names and owned by the same unit."""
    first = await harness.core.ingest(webform_message())
    second = await harness.core.ingest(webform_message(f"Frage zu {first.case_reference}"))
    assert second.conversation_id != first.conversation_id
    assert second.status_url != first.status_url and second.acknowledged
    assert second.unit == first.unit and second.rule == "case-reference"
    (row,) = await harness.rows("SELECT linked_to FROM conversations WHERE id = ?", (second.conversation_id,))
    assert row["linked_to"] == first.conversation_id
    assert await harness.count("messages", "conversation_id = ? AND direction = 'in'", (first.conversation_id,)) == 1


async def test_conversations_of_a_unit_removed_from_the_configuration_go_to_the_fallback(tmp_path):
    """A unit renamed or removed in the TOML: its conversations get the fallback unit at the
    next start, with an event, instead of failing on the next message or escalation."""
    import sqlite3

    from router.testing import CoreHarness

    async with CoreHarness(tmp_path / "d") as first:
        case = (await first.core.ingest(webform_message())).conversation_id
    # as if the conversation's unit had been removed from the configuration since
    with sqlite3.connect(tmp_path / "d" / "contact-router.sqlite3") as conn:
        conn.execute("UPDATE conversations SET unit = 'alte-baufirma', assignee = 'Polier Schmidt',"
                     " escalate_at = '2000-01-01T00:00:00.000000Z'")
    async with CoreHarness(tmp_path / "d") as second:
        status, detail = await second.api("GET", f"/api/v1/conversations/{case}")
        assert status == 200 and detail["unit"] == second.config.fallback_unit
        assert detail["assignee"] is None  # someone of the old unit: the fallback unit takes it up
        assert any(e["kind"] == "transferred" and e["data"]["from_unit"] == "alte-baufirma" for e in detail["events"])
        token = (await second.core.store.fetchone("SELECT status_token FROM conversations WHERE id = ?", (case,)))[0]
        again = await second.core.ingest(webform_message("Noch eine Frage", thread={"status_token": token}))
        assert again.conversation_id == case
        await second.escalate()  # the overdue scan meets no unknown unit


async def test_a_new_deadline_counts_its_escalations_afresh(harness):
    """The escalation level was kept for the conversation's whole life: once it reached
    max_escalation_level (10 in the example), a conversation was never escalated or reminded
    again, however often the resident wrote later."""
    result = await harness.core.ingest(webform_message())
    for _ in range(4 * harness.config.max_escalation_level):  # up the chain, then reminders, then the cap
        harness.clock.advance(timedelta(days=3))
        await harness.escalate()
        (conv,) = await harness.rows("SELECT escalation_level, escalate_at FROM conversations")
        if conv["escalate_at"] is None:
            break
    assert conv["escalation_level"] == harness.config.max_escalation_level and conv["escalate_at"] is None
    # the last reminder was the last: said so in the history, not silence
    exhausted = await harness.rows("SELECT data FROM events WHERE kind = 'escalations_exhausted'")
    assert len(exhausted) == 1 and '"level": 10' in exhausted[0]["data"]

    await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": "Wir kümmern uns."})
    await harness.run_outbox()
    again = await harness.core.ingest(webform_message("Es hat sich nichts getan.", thread={"status_token": result.status_token}))
    assert again.conversation_id == result.conversation_id
    (conv,) = await harness.rows("SELECT escalation_level, escalate_at FROM conversations")
    assert conv["escalation_level"] == 0 and conv["escalate_at"] is not None
    harness.clock.advance(timedelta(days=3))
    assert [e["level"] for e in await harness.escalate()] == [1]


async def test_failed_call_backs_escalate_once(harness):
    """Every failed call-back after the limit escalated again: six in a minute, past the cap."""
    result = await harness.core.ingest(webform_message())
    case = result.conversation_id
    for outcome in ["not_reached"] * 6 + ["wrong_number"] * 2:
        status, _ = await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": outcome})
        assert status in (200, 201)
    assert await harness.count("escalations", "conversation_id = ?", (case,)) == 1



async def test_a_later_round_of_failed_call_backs_escalates_again(harness):
    """The flag of the first round stayed after the call-back reached the person, and every
    later failed call-back took it for the same round: never escalated again."""
    result = await harness.core.ingest(webform_message())
    case = result.conversation_id
    for _ in range(3):
        await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": "not_reached"})
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": "reached"})
    assert status in (200, 201)
    await harness.core.ingest(webform_message("Es ist wieder gesperrt.", thread={"status_token": result.status_token}))
    for _ in range(3):
        await harness.api("POST", f"/api/v1/conversations/{case}/callbacks", json={"outcome": "not_reached"})
    assert await harness.count("escalations", "conversation_id = ?", (case,)) == 2


@pytest.mark.parametrize("spoken", ["call-back", "call taken"])
async def test_a_later_round_of_call_backs_counts_only_its_own_failed_attempts(tmp_path, spoken):
    """Once the person was reached, the failed attempts before no longer count: the next
    round's first failed call-back escalated the case at once (the unit lost it after one
    try), and the SMS after its last one never went (it went only at the limit's count)."""
    from router.testing import CoreHarness

    env = {"TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456",
           "TWILIO_API_URL": "http://127.0.0.1:9"}
    caller = {"kind": "phone", "address": "+4915111111111"}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "phone"), env=env) as harness:
        first = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA1", "kind": "missed_call",
                                           "sender": caller})
        path = f"/api/v1/conversations/{first.conversation_id}/callbacks"
        for _ in range(3):
            await harness.api("POST", path, json={"outcome": "not_reached"})
        assert await harness.count("escalations") == 1 and await harness.count("outbox", "kind = 'callback_sms'") == 1
        harness.clock.advance(timedelta(hours=2))
        if spoken == "call-back":
            status, body = await harness.api("POST", path, json={"outcome": "reached"})
            assert status == 201 and body["answered"]
        else:
            call = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA2", "kind": "call",
                                              "sender": caller})
            assert call.conversation_id == first.conversation_id
            assert await harness.core.record_live_answer("phone", "CA2", "Anruf angenommen")
        harness.clock.advance(timedelta(days=1))
        again = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA3", "kind": "missed_call",
                                           "sender": caller})
        assert again.conversation_id == first.conversation_id
        round_two = []
        for _ in range(3):
            status, body = await harness.api("POST", path, json={"outcome": "not_reached"})
            assert status == 201, body
            round_two.append((body["escalated"], await harness.count("outbox", "kind = 'callback_sms'")))
        assert round_two == [(False, 1), (False, 1), (True, 2)]


def _mail(text: str, message_id: str, **extra):
    """A canonical e-mail in the conversation its refs name."""
    return {"channel": "email", "channel_message_id": message_id, "text": text, "language": "de",
            "sender": {"kind": "email", "address": extra.pop("sender", "anwohner@example.net")}, **extra}


async def test_an_out_of_office_note_changes_nothing_in_the_conversation_it_answers(harness):
    """An auto-reply to the staff's answer put the conversation back under a deadline, and it
    escalated; to a closed one, it reopened it."""
    first = await harness.core.ingest(_mail("Baustelle vor dem Haus, Gehweg gesperrt", "<m1@example.net>"))
    case = first.conversation_id
    stamp = iso(harness.clock.now())  # answered, as a delivered staff reply marks it
    await harness.core.store.write(lambda conn: tracking.mark_answered(conn, case, stamp))
    before = (await harness.rows("SELECT state, deadline, unit FROM conversations WHERE id = ?", (case,)))[0]
    assert before["state"] == "answered" and before["deadline"] is None
    away = await harness.core.ingest(_mail("Ich bin bis 3.1. nicht im Büro.", "<ooo1@example.net>",
                                           ack_suppressed="auto-reply", thread={"refs": ["<m1@example.net>"]}))
    assert away.conversation_id == case and not away.acknowledged
    assert dict((await harness.rows("SELECT state, deadline, unit FROM conversations WHERE id = ?", (case,)))[0]) == dict(before)
    harness.clock.advance(timedelta(days=5))
    assert await harness.escalate() == []

    await harness.api("POST", f"/api/v1/conversations/{case}/close")
    await harness.core.ingest(_mail("Automatische Antwort: nicht im Büro", "<ooo2@example.net>",
                                    ack_suppressed="auto-reply", thread={"refs": ["<m1@example.net>"]}))
    assert (await harness.rows("SELECT state FROM conversations WHERE id = ?", (case,)))[0]["state"] == "closed"
    assert await harness.count("outbox", "kind = 'ack'") == 1
    # a bounce of our mail, from the mail system, closed longer than the reopen window: still
    # kept with it, no new case opened
    await harness.core.store.write(lambda conn: conn.execute(
        "UPDATE messages SET provider_id = '<ack-1@example.org>' WHERE kind = 'ack'"))
    harness.clock.advance(timedelta(days=365))
    late = await harness.core.ingest(_mail("Undelivered Mail Returned to Sender", "<bounce@mx.example.net>",
                                           sender="mailer-daemon@mx.example.net", ack_suppressed="bounce",
                                           thread={"refs": ["<ack-1@example.org>"]}))
    assert late.conversation_id == case and await harness.count("conversations") == 1
    # an "auto-reply" from someone else naming the resident's own mail (a neighbour in Cc) is
    # not put into the resident's conversation, where the status page would show it
    forged = await harness.core.ingest(_mail("Schicken Sie die Unterlagen an mich", "<ooo3@nachbar.example>",
                                             sender="nachbar@example.org", ack_suppressed="auto-reply",
                                             thread={"refs": ["<m1@example.net>"]}))
    assert forged.conversation_id != case


async def test_a_person_writing_in_a_conversation_a_mailing_list_opened_is_acknowledged(harness):
    """The list's mail opened it without a deadline; a resident's reply in its thread got a
    deadline but never an acknowledgement, and a second list mail got a deadline."""
    listed = await harness.core.ingest(_mail("Mitteilung an alle Anlieger", "<list-1@verein.example>",
                                             sender="verein@verein.example", ack_suppressed="list"))
    case = listed.conversation_id
    again = await harness.core.ingest(_mail("Mitteilung 2", "<list-2@verein.example>", sender="verein@verein.example",
                                            ack_suppressed="list", thread={"refs": ["<list-1@verein.example>"]}))
    assert again.conversation_id == case
    row = (await harness.rows("SELECT state, deadline FROM conversations WHERE id = ?", (case,)))[0]
    assert (row["state"], row["deadline"]) == ("waiting", None)
    person = await harness.core.ingest(_mail("Bei mir ist der Gehweg seit zwei Wochen gesperrt.", "<p1@example.net>",
                                             sender="verein@verein.example", thread={"refs": ["<list-1@verein.example>"]}))
    assert person.conversation_id == case and person.acknowledged and person.deadline is not None
    row = (await harness.rows("SELECT state, deadline FROM conversations WHERE id = ?", (case,)))[0]
    assert row["state"] == "open" and row["deadline"] is not None
    assert await harness.count("outbox", "kind = 'ack'") == 1


async def test_a_third_party_answering_someone_elses_thread_gets_a_case_of_their_own(harness):
    """A neighbour in Cc answered the resident's mail: the answer joined the resident's closed
    conversation, reopened it, and sent the neighbour an acknowledgement with the resident's
    status link; the staff's answer would then have gone to the resident, not to them."""
    mine = await harness.core.ingest(_mail("Baustelle vor meinem Haus, Lindenweg 3", "<a1@anwohner.example>",
                                           sender="anwohner@example.net"))
    await harness.api("POST", f"/api/v1/conversations/{mine.conversation_id}/close")
    theirs = await harness.core.ingest(_mail("Bei uns auch!", "<b1@nachbar.example>", sender="nachbar@example.org",
                                             thread={"refs": ["<a1@anwohner.example>"]}))
    assert theirs.conversation_id != mine.conversation_id and theirs.acknowledged
    assert theirs.unit == mine.unit and theirs.rule == "case-reference"
    assert (await harness.rows("SELECT state FROM conversations WHERE id = ?", (mine.conversation_id,)))[0]["state"] == "closed"
    linked = await harness.rows("SELECT linked_to FROM conversations WHERE id = ?", (theirs.conversation_id,))
    assert linked[0]["linked_to"] == mine.conversation_id
    acks = await harness.rows("SELECT o.to_address, m.text FROM outbox o JOIN messages m ON m.id = o.message_id"
                              " WHERE o.kind = 'ack' AND o.to_address = 'nachbar@example.org'")
    assert len(acks) == 1 and mine.status_token not in acks[0]["text"] and theirs.status_token in acks[0]["text"]
    # the resident's own answer in the thread still joins
    again = await harness.core.ingest(_mail("Und jetzt?", "<a2@anwohner.example>", sender="anwohner@example.net",
                                            thread={"refs": ["<a1@anwohner.example>"]}))
    assert again.conversation_id == mine.conversation_id


def _chat(kind: str, message_id: str, sender: str, **extra):
    """A canonical WhatsApp message, reaction, edit or deletion."""
    return {"channel": "whatsapp", "channel_message_id": message_id, "kind": kind,
            "sender": {"kind": "phone", "address": sender}, **extra}


async def test_an_edit_or_deletion_changes_only_the_senders_own_message(harness):
    """Another sender's edit rewrote a resident's words, and a deletion hid them: a channel that
    does not sign its requests (a third-party plugin) would let anyone do so."""
    await harness.core.ingest(_chat("message", "wamid.A1", "+4915111111111", text="Gehweg gesperrt seit Montag"))
    await harness.core.ingest(_chat("edit", "wamid.B1", "+4915122222222", target_message_id="wamid.A1", text="alles gut"))
    await harness.core.ingest(_chat("deletion", "wamid.B2", "+4915122222222", target_message_id="wamid.A1"))
    await harness.core.ingest(_chat("reaction", "wamid.B3", "+4915122222222", target_message_id="wamid.A1",
                                    meta={"emoji": "👎"}))
    original = (await harness.rows("SELECT text, edited_at, deleted_at FROM messages WHERE channel_message_id = 'wamid.A1'"))[0]
    assert (original["text"], original["edited_at"], original["deleted_at"]) == ("Gehweg gesperrt seit Montag", None, None)
    foreign = await harness.rows("SELECT target_message_id, conversation_id FROM messages WHERE channel_message_id LIKE 'wamid.B%'")
    assert all(r["target_message_id"] is None and r["conversation_id"] is None for r in foreign)
    # the resident's own edit still takes effect
    await harness.core.ingest(_chat("edit", "wamid.A2", "+4915111111111", target_message_id="wamid.A1",
                                    text="Gehweg gesperrt seit Dienstag"))
    assert (await harness.rows("SELECT text FROM messages WHERE channel_message_id = 'wamid.A1'"))[0]["text"] == \
        "Gehweg gesperrt seit Dienstag"


async def test_an_escalation_whose_notification_fails_is_shown_on_the_conversation(tmp_path):
    """The notification to the new owner failed (no relay, a refused address) and nothing said
    so: the case changed owner on paper, and the owner never heard of it."""
    from router.testing import CoreHarness

    async with CoreHarness(tmp_path / "data") as harness:  # no e-mail channel: notifications cannot go out
        result = await harness.core.ingest(webform_message())
        harness.clock.set(result.deadline + timedelta(minutes=1))
        assert [e["to_unit"] for e in await harness.escalate()] == ["bauhotline"]
        await harness.run_outbox()  # the notification's channel is not there: given up (retry_seconds=0 here)
        for _ in range(10):
            harness.clock.advance(timedelta(minutes=20))
            await harness.run_outbox()
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}", token="hotline")
        assert "owner_not_notified" in detail["flags"]
        assert any(e["kind"] == "owner_not_notified" and e["data"]["to"] == "bau@example.org" for e in detail["events"])


async def test_a_chat_message_months_after_the_answer_opens_a_new_case(tmp_path):
    """A sender's chat messages join their open conversation: a new matter 200 days after the
    answer joined the old one, unacknowledged, with the old owner and no routing."""
    from router.testing import CoreHarness

    env = {"WHATSAPP_APP_SECRET": "s", "WHATSAPP_VERIFY_TOKEN": "v", "WHATSAPP_ACCESS_TOKEN": "a",
           "WHATSAPP_PHONE_NUMBER_ID": "1122334455", "WHATSAPP_GRAPH_URL": "http://127.0.0.1:9"}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "whatsapp"), env=env) as harness:
        await _months_later(harness)


async def _months_later(harness) -> None:
    first = await harness.core.ingest(_chat("message", "wamid.C1", "+4915111111111", text="Gehweg gesperrt"))
    stamp = iso(harness.clock.now())
    await harness.core.store.write(lambda conn: tracking.mark_answered(conn, first.conversation_id, stamp))
    harness.clock.advance(timedelta(days=3))
    soon = await harness.core.ingest(_chat("message", "wamid.C2", "+4915111111111", text="Danke!"))
    assert soon.conversation_id == first.conversation_id and not soon.acknowledged
    stamp = iso(harness.clock.now())
    await harness.core.store.write(lambda conn: tracking.mark_answered(conn, first.conversation_id, stamp))
    harness.clock.advance(timedelta(days=200))
    later = await harness.core.ingest(_chat("message", "wamid.C3", "+4915111111111", text="Störung: kein Internet"))
    assert later.conversation_id != first.conversation_id and later.acknowledged and later.opened
    linked = await harness.rows("SELECT linked_to FROM conversations WHERE id = ?", (later.conversation_id,))
    assert linked[0]["linked_to"] == first.conversation_id


async def test_a_reply_to_a_recent_staff_message_joins_however_old_the_first_answer(harness):
    """Whether nothing happened for reopen_days was read from the conversation's row, which a
    staff reply does not touch: answering a question staff asked five days ago opened a new
    case because the first answer was fifteen days old."""
    first = await harness.core.ingest(webform_message())
    stamp = iso(harness.clock.now())
    await harness.core.store.write(lambda conn: tracking.mark_answered(conn, first.conversation_id, stamp))
    harness.clock.advance(timedelta(days=10))
    await harness.api("POST", f"/api/v1/conversations/{first.conversation_id}/replies",
                      json={"text": "Können Sie uns noch ein Foto schicken?"})
    harness.clock.advance(timedelta(days=5))
    answer = await harness.core.ingest(webform_message("Hier das Foto.", thread={"status_token": first.status_token}))
    assert answer.conversation_id == first.conversation_id


async def test_an_internal_note_is_no_activity_the_resident_saw(harness):
    """A staff note on an old answered case kept it open for a new matter of the resident."""
    first = await harness.core.ingest(webform_message())
    stamp = iso(harness.clock.now())
    await harness.core.store.write(lambda conn: tracking.mark_answered(conn, first.conversation_id, stamp))
    harness.clock.advance(timedelta(days=60))
    await harness.api("POST", f"/api/v1/conversations/{first.conversation_id}/notes", json={"text": "Akte geprüft"})
    harness.clock.advance(timedelta(days=1))
    later = await harness.core.ingest(webform_message("Neues Anliegen", thread={"status_token": first.status_token}))
    assert later.conversation_id != first.conversation_id and later.acknowledged


def test_every_flag_a_message_can_give_its_conversation_is_a_known_flag():
    """The inbox lists conversations by the flags of tracking.FLAGS, each with its own index:
    a flag that a message passes on but that list lacks could be set and never found."""
    from router.ingest import CONVERSATION_FLAGS
    from router.tracking import FLAGS

    assert CONVERSATION_FLAGS <= FLAGS


async def test_a_message_on_another_topic_opens_a_conversation_of_its_own(tmp_path):
    """A caller with an open sales case who chose "fault" in the menu joined the sales case:
    the fault desk never saw it, and the caller heard the sales case's deadline."""
    from router.testing import CoreHarness

    env = {"WHATSAPP_APP_SECRET": "s", "WHATSAPP_VERIFY_TOKEN": "v", "WHATSAPP_ACCESS_TOKEN": "a",
           "WHATSAPP_PHONE_NUMBER_ID": "1122334455", "WHATSAPP_GRAPH_URL": "http://127.0.0.1:9"}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "whatsapp"), env=env) as harness:
        sales = await harness.core.ingest(_chat("message", "wamid.T1", "+4915111111111", text="Vertrag", topic="contract"))
        fault = await harness.core.ingest(_chat("message", "wamid.T2", "+4915111111111", text="Kein Netz", topic="fault"))
        assert fault.conversation_id != sales.conversation_id and fault.opened and fault.acknowledged
        assert (fault.unit, sales.unit) == ("stoerung", "vertrieb")
        again = await harness.core.ingest(_chat("message", "wamid.T3", "+4915111111111", text="Noch zum Vertrag",
                                                topic="contract"))
        assert again.conversation_id == sales.conversation_id and not again.acknowledged
        # without a topic: the sender's latest open conversation, as before
        plain = await harness.core.ingest(_chat("message", "wamid.T4", "+4915111111111", text="Und noch was"))
        assert plain.conversation_id == fault.conversation_id


@pytest.mark.parametrize("outcomes", [["wrong_number", "not_reached", "not_reached"], ["not_reached", "wrong_number", "not_reached"]])
async def test_the_call_back_sms_never_goes_to_a_number_staff_found_wrong(tmp_path, outcomes):
    """The SMS after the last failed call-back went out unless that last attempt itself was a
    wrong number: a stranger got the case reference and its status link."""
    from router.testing import CoreHarness

    env = {"TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456",
           "TWILIO_API_URL": "http://127.0.0.1:9"}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "phone"), env=env) as harness:
        result = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA1", "kind": "missed_call",
                                            "sender": {"kind": "phone", "address": "+4915111111111"}})
        for outcome in outcomes:
            status, body = await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/callbacks",
                                             json={"outcome": outcome})
            assert status == 201, body
        assert await harness.count("outbox", "kind = 'callback_sms'") == 0
        # as many attempts, none of them at a wrong number: the SMS goes after the last
        other = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA2", "kind": "missed_call",
                                           "sender": {"kind": "phone", "address": "+4915122222222"}})
        queued = []
        for _ in outcomes:
            await harness.api("POST", f"/api/v1/conversations/{other.conversation_id}/callbacks", json={"outcome": "not_reached"})
            queued.append(await harness.count("outbox", "kind = 'callback_sms'"))
        assert queued == [0, 0, 1]


async def test_an_escalation_notice_writes_the_missed_deadline_in_its_own_language(tmp_path):
    """The notice was English for an English-speaking unit, the missed deadline in it German."""
    from router.testing import CoreHarness, example_config, load_raw_config

    raw = load_raw_config()
    raw["units"]["bauhotline"]["languages"] = ["en"]
    async with CoreHarness(tmp_path / "data", config=example_config(raw)) as harness:
        result = await harness.core.ingest(webform_message())
        harness.clock.set(result.deadline + timedelta(minutes=1))
        assert [e["to_unit"] for e in await harness.escalate()] == ["bauhotline"]
        (note,) = await harness.rows("SELECT text, language FROM messages WHERE kind = 'notification'")
        assert note["language"] == "en"
        assert "was not answered by Mon 30 Nov 2026, 13:00 and" in note["text"], note["text"]


async def test_the_end_of_the_chain_is_reminded_with_the_reminder_text(harness):
    """It was asked to "answer by" the deadline gone by, in the text of an escalation."""
    result = await harness.core.ingest(webform_message())
    for days in (0, 1, 2):
        harness.clock.set(result.deadline + timedelta(days=days, minutes=1))
        await harness.escalate()
    (conv,) = await harness.rows("SELECT unit, escalation_level FROM conversations")
    assert (conv["unit"], conv["escalation_level"]) == ("kundenservice", 3)
    notes = await harness.rows("SELECT text FROM messages WHERE kind = 'notification' ORDER BY id")
    assert [n["text"].startswith("Erinnerung:") for n in notes] == [False, False, True]


async def test_failed_call_backs_at_the_end_of_the_chain_still_remind_at_the_deadline(harness):
    """They escalate before the deadline; at the end of the chain the next reminder was set a
    response time later, past the deadline, which then passed without one."""
    result = await harness.core.ingest(webform_message("Hallo, eine Frage", topic="other",
                                                          address={"street": "Weg 1", "postcode": "99999", "city": "X"}))
    assert result.unit == "kundenservice"
    harness.clock.advance(timedelta(hours=1))
    for _ in range(3):
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/callbacks", json={"outcome": "not_reached"})
    (conv,) = await harness.rows("SELECT deadline, escalate_at, escalation_level FROM conversations")
    assert conv["escalation_level"] == 1 and conv["escalate_at"] == conv["deadline"]
    harness.clock.set(result.deadline + timedelta(minutes=1))
    assert [e["level"] for e in await harness.escalate()] == [2]


async def test_a_call_put_through_and_picked_up_answers_its_conversation(tmp_path):
    """The call's conversation stayed open and escalated as unanswered, though staff had
    spoken with the caller."""
    from router.testing import CoreHarness

    env = {"TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456",
           "TWILIO_API_URL": "http://127.0.0.1:9"}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "phone"), env=env) as harness:
        call = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA1", "kind": "call",
                                          "flags": ["callback_required"],
                                          "sender": {"kind": "phone", "address": "+4915111111111"}})
        answered = []
        harness.core.on_answered = lambda a: answered.append(a) or asyncio.sleep(0)
        assert await harness.core.record_live_answer("phone", "CA1", "Call put through and answered")
        assert await harness.core.record_live_answer("phone", "CA1", "Call put through and answered")  # a retry
        assert not await harness.core.record_live_answer("phone", "CA-unknown", "-")
        (conv,) = await harness.rows("SELECT state, deadline, flags FROM conversations WHERE id = ?", (call.conversation_id,))
        assert (conv["state"], conv["deadline"], conv["flags"]) == ("answered", None, "[]")
        assert len(answered) == 1
        assert await harness.count("messages", "kind = 'callback' AND conversation_id = ?", (call.conversation_id,)) == 1
        harness.clock.set(call.deadline + timedelta(hours=1))
        assert await harness.escalate() == []


async def test_failed_call_backs_escalate_with_a_notice_that_says_so(harness):
    """The notice said the case "was not answered by" a deadline still hours ahead."""
    result = await harness.core.ingest(webform_message())
    for _ in range(3):
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/callbacks", json={"outcome": "not_reached"})
    (note,) = await harness.rows("SELECT text FROM messages WHERE kind = 'notification'")
    assert note["text"].startswith(f"Fall {result.case_reference}: Wir haben die Person telefonisch nicht erreicht."), note
    (escalation,) = await harness.rows("SELECT reason FROM escalations")
    assert "could not reach the person by phone" in escalation["reason"]


@pytest.mark.parametrize("action", ["close", "wait"])
async def test_a_transfer_of_a_case_no_answer_is_due_for_does_not_ask_for_one(harness, action):
    """The new owner was asked to answer "bis -"."""
    case = (await harness.core.ingest(webform_message())).conversation_id
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case}/{action}")
    assert status == 200
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case}/transfer", json={"unit": "bauhotline"})
    assert status == 200
    (note,) = await harness.rows("SELECT text FROM messages WHERE kind = 'notification' AND conversation_id = ?", (case,))
    assert note["text"].endswith("Eine Antwort ist derzeit nicht fällig.") and " bis " not in note["text"], note["text"]


async def test_a_message_with_a_topic_joins_an_open_conversation_without_one_when_the_topic_goes_to_its_unit(tmp_path):
    """Only a conversation of the same topic was joined: a resident who wrote "Störung" by SMS
    and then chose "fault" in the menu got a second case and a second acknowledgement."""
    from router.testing import CoreHarness

    env = {"WHATSAPP_APP_SECRET": "s", "WHATSAPP_VERIFY_TOKEN": "v", "WHATSAPP_ACCESS_TOKEN": "a",
           "WHATSAPP_PHONE_NUMBER_ID": "1122334455", "WHATSAPP_GRAPH_URL": "http://127.0.0.1:9"}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "whatsapp"), env=env) as harness:
        fault = await harness.core.ingest(_chat("message", "wamid.N1", "+4915111111111", text="Störung: kein Internet"))
        assert fault.unit == "stoerung"
        same = await harness.core.ingest(_chat("message", "wamid.N2", "+4915111111111", text="Hallo", topic="fault"))
        assert same.conversation_id == fault.conversation_id and not same.acknowledged
        other = await harness.core.ingest(_chat("message", "wamid.N3", "+4915111111111", text="Hallo", topic="contract"))
        assert other.conversation_id != fault.conversation_id and other.unit == "vertrieb"


async def test_an_sms_from_the_number_of_an_open_whatsapp_case_is_linked_to_it_and_goes_to_its_unit(tmp_path):
    """Same number, an hour later, by SMS: a second case, routed afresh to another unit (the
    hotline, as the SMS named no address), with another reference and deadline, linked to
    nothing. It stays a case of its own on its channel (the answer goes where the person
    wrote), linked to the open one and owned by its unit."""
    from router.testing import CoreHarness

    env = {"WHATSAPP_APP_SECRET": "s", "WHATSAPP_VERIFY_TOKEN": "v", "WHATSAPP_ACCESS_TOKEN": "a",
           "WHATSAPP_PHONE_NUMBER_ID": "1122334455", "WHATSAPP_GRAPH_URL": "http://127.0.0.1:9",
           "TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456",
           "TWILIO_API_URL": "http://127.0.0.1:9"}
    number = "+4915111111111"

    def sms(message_id: str, text: str, sender: str = number, **extra):
        return {"channel": "phone", "channel_message_id": message_id, "kind": "message", "text": text,
                "sender": {"kind": "phone", "address": sender}, **extra}

    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "whatsapp", "phone"), env=env) as harness:
        case = await harness.core.ingest(_chat("message", "wamid.X1", number,
                                               text="Vor meinem Haus in der Musterstraße 5 ist der Gehweg aufgegraben."))
        assert case.unit == "tiefbau-muster"
        harness.clock.advance(timedelta(hours=1))
        follow = await harness.core.ingest(sms("SM1", "Hallo nochmal, wann ist der Gehweg wieder frei?"))
        assert follow.conversation_id != case.conversation_id and follow.unit == "tiefbau-muster"
        (row,) = await harness.rows("SELECT channel, linked_to, routing_rule FROM conversations WHERE id = ?",
                                    (follow.conversation_id,))
        assert (row["channel"], row["linked_to"], row["routing_rule"]) == ("phone", case.conversation_id, "open-case")
        # the next SMS joins the SMS case, as before
        again = await harness.core.ingest(sms("SM2", "Danke"))
        assert again.conversation_id == follow.conversation_id

        # Not: another number; a topic that goes to another unit; a case that was closed.
        other = await harness.core.ingest(sms("SM3", "Wann ist der Gehweg wieder frei?", sender="+4915122222222"))
        assert (await harness.rows("SELECT linked_to FROM conversations WHERE id = ?", (other.conversation_id,)))[0]["linked_to"] is None
        third = "+4915133333333"
        await harness.core.ingest(_chat("message", "wamid.X2", third, text="Vor meinem Haus in der Musterstraße 5 ist eine Baustelle."))
        fault = await harness.core.ingest(sms("SM4", "Hallo", sender=third, topic="fault"))
        assert fault.unit == "stoerung"
        closed = await harness.core.ingest(_chat("message", "wamid.X3", "+4915144444444",
                                                 text="Vor meinem Haus in der Musterstraße 5 ist eine Baustelle."))
        status, _ = await harness.api("POST", f"/api/v1/conversations/{closed.conversation_id}/close")
        assert status == 200
        later = await harness.core.ingest(sms("SM5", "Wann ist der Gehweg wieder frei?", sender="+4915144444444"))
        (row,) = await harness.rows("SELECT linked_to FROM conversations WHERE id = ?", (later.conversation_id,))
        assert row["linked_to"] is None
        # nor a case answered already: a fault reported months later went to the contractor
        answered = await harness.core.ingest(_chat("message", "wamid.X4", "+4915155555555",
                                                   text="Vor meinem Haus in der Musterstraße 5 ist eine Baustelle."))
        status, _ = await harness.api("POST", f"/api/v1/conversations/{answered.conversation_id}/callbacks",
                                      json={"outcome": "reached"})
        assert status == 201
        harness.clock.advance(timedelta(hours=1))  # an hour after the answer: still the same matter
        soon = await harness.core.ingest(sms("SM7", "Danke, und wann ist der Gehweg frei?", sender="+4915155555555"))
        (row,) = await harness.rows("SELECT unit, linked_to FROM conversations WHERE id = ?", (soon.conversation_id,))
        assert (row["unit"], row["linked_to"]) == ("tiefbau-muster", answered.conversation_id)
        status, _ = await harness.api("POST", f"/api/v1/conversations/{soon.conversation_id}/close")
        assert status == 200
        harness.clock.advance(timedelta(days=200))
        fault = await harness.core.ingest(sms("SM6", "Störung: seit heute kein Internet", sender="+4915155555555"))
        (row,) = await harness.rows("SELECT unit, linked_to FROM conversations WHERE id = ?", (fault.conversation_id,))
        assert (row["unit"], row["linked_to"]) == ("stoerung", None)


async def test_the_call_back_limit_may_come_from_the_environment_as_text(tmp_path):
    """``callback_attempts`` from the environment is a string: the phone channel read it, the
    core's count of failed call-backs did not (``int("2.0")``: a 500 on logging an attempt)."""
    from router.testing import CoreHarness

    env = {"TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456",
           "TWILIO_API_URL": "http://127.0.0.1:9"}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "phone"), env=env,
                           settings={"phone": {"callback_attempts": "2.0"}}) as harness:
        result = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA1", "kind": "missed_call",
                                            "sender": {"kind": "phone", "address": "+4915111111111"}})
        queued = []
        for _ in range(2):
            status, body = await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/callbacks",
                                             json={"outcome": "not_reached"})
            assert status == 201, body
            queued.append(await harness.count("outbox", "kind = 'callback_sms'"))
        assert queued == [0, 1]


async def test_a_blank_or_padded_name_gives_no_stray_spaces(harness):
    """WhatsApp profile names come as typed: "Guten Tag   , vielen Dank" and "Guten Tag  Erika ,"."""
    expected = {"a@example.net": ("Guten Tag, ", None), "b@example.net": ("Guten Tag Erika Muster, ", "Erika Muster")}
    for address, name in (("a@example.net", "  "), ("b@example.net", " Erika \t Muster ")):
        message = webform_message(email=address)
        message["sender"]["display_name"] = name
        result = await harness.core.ingest(message)
        assert result.ack_text.startswith(expected[address][0]), result.ack_text
        (row,) = await harness.rows("SELECT display_name FROM contacts c JOIN conversations v ON v.contact_id = c.id"
                                    " WHERE v.id = ?", (result.conversation_id,))
        assert row["display_name"] == expected[address][1]


async def test_a_unit_is_told_in_words_of_its_own_where_the_configuration_has_only_the_ack(tmp_path):
    """Only ``ack`` is required: without the other texts a unit was sent the resident's
    acknowledgement, "Guten Tag{name_suffix}, ... {status_url}" as written."""
    from router.testing import CoreHarness, example_config, load_raw_config

    raw = load_raw_config()
    raw["templates"] = {"ack": raw["templates"]["ack"]}
    async with CoreHarness(tmp_path / "data", config=example_config(raw)) as harness:
        result = await harness.core.ingest(webform_message())
        harness.clock.set(result.deadline + timedelta(minutes=1))
        assert [e["to_unit"] for e in await harness.escalate()] == ["bauhotline"]
        await harness.core.transfer(result.conversation_id, "kundenservice", "", "admin")
        await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/wait")
        await harness.core.transfer(result.conversation_id, "bauhotline", "", "admin")
        notes = [n["text"] for n in await harness.rows("SELECT text FROM messages WHERE kind = 'notification' ORDER BY id")]
        assert len(notes) == 3 and not any("{" in n or "status" in n for n in notes), notes
        assert notes[0].startswith(f"Fall {result.case_reference} wurde nicht bis ")
        assert notes[1].startswith(f"Fall {result.case_reference} wurde Kundenservice übertragen. Bitte antworten")
        assert notes[2] == f"Fall {result.case_reference} wurde Bau-Hotline übertragen. Eine Antwort ist derzeit nicht fällig."


async def test_an_old_answered_case_on_the_chat_itself_does_not_hide_a_fresh_one_on_another(tmp_path):
    """The sender's conversation on the channel itself was taken first, however long ago it was
    answered: an SMS an hour after a WhatsApp message went to that old case's unit, "referring"
    to it, instead of being linked to the WhatsApp case."""
    from router.testing import CoreHarness

    env = {"WHATSAPP_APP_SECRET": "s", "WHATSAPP_VERIFY_TOKEN": "v", "WHATSAPP_ACCESS_TOKEN": "a",
           "WHATSAPP_PHONE_NUMBER_ID": "1122334455", "WHATSAPP_GRAPH_URL": "http://127.0.0.1:9",
           "TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456",
           "TWILIO_API_URL": "http://127.0.0.1:9"}
    number = "+4915111111111"
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "whatsapp", "phone"), env=env) as harness:
        old = await harness.core.ingest({"channel": "phone", "channel_message_id": "SM0", "kind": "message",
                                         "text": "Störung: kein Internet", "sender": {"kind": "phone", "address": number}})
        assert old.unit == "stoerung"
        status, _ = await harness.api("POST", f"/api/v1/conversations/{old.conversation_id}/callbacks", json={"outcome": "reached"})
        assert status == 201
        harness.clock.advance(timedelta(days=200))  # answered long ago, never closed
        case = await harness.core.ingest(_chat("message", "wamid.Y1", number,
                                               text="Vor meinem Haus in der Musterstraße 5 ist der Gehweg aufgegraben."))
        harness.clock.advance(timedelta(hours=1))
        follow = await harness.core.ingest({"channel": "phone", "channel_message_id": "SM1", "kind": "message",
                                            "text": "Wann ist der Gehweg wieder frei?", "sender": {"kind": "phone", "address": number}})
        (row,) = await harness.rows("SELECT unit, linked_to, routing_rule FROM conversations WHERE id = ?", (follow.conversation_id,))
        assert (row["unit"], row["linked_to"], row["routing_rule"]) == ("tiefbau-muster", case.conversation_id, "open-case")


class TestASettledConversationOnTheChat:
    """The sender's conversation on the chat itself, settled longer ago than the reopen window."""

    ENV = {"WHATSAPP_APP_SECRET": "s", "WHATSAPP_VERIFY_TOKEN": "v", "WHATSAPP_ACCESS_TOKEN": "a",
           "WHATSAPP_PHONE_NUMBER_ID": "1122334455", "WHATSAPP_GRAPH_URL": "http://127.0.0.1:9",
           "TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456",
           "TWILIO_API_URL": "http://127.0.0.1:9"}
    NUMBER = "+4915111111111"

    def sms(self, message_id: str, text: str) -> dict:
        return {"channel": "phone", "channel_message_id": message_id, "kind": "message", "text": text,
                "sender": {"kind": "phone", "address": self.NUMBER}}

    async def test_a_new_matter_after_it_is_routed_as_any_and_linked(self, tmp_path):
        """It went to the old case's unit, "referring" to it: a fault reported months after a
        construction case went to the contractor."""
        from router.testing import CoreHarness

        async with CoreHarness(tmp_path / "d", entrypoints=("webform", "whatsapp", "phone"), env=self.ENV) as harness:
            first = await harness.core.ingest(_chat("message", "wamid.C1", self.NUMBER,
                                                    text="Vor meinem Haus in der Musterstraße 5 ist der Gehweg aufgegraben."))
            stamp = iso(harness.clock.now())
            await harness.core.store.write(lambda conn: tracking.mark_answered(conn, first.conversation_id, stamp))
            harness.clock.advance(timedelta(days=200))
            later = await harness.core.ingest(_chat("message", "wamid.C3", self.NUMBER, text="Störung: seit heute kein Internet"))
            (row,) = await harness.rows("SELECT unit, linked_to, routing_rule FROM conversations WHERE id = ?",
                                        (later.conversation_id,))
            assert (row["unit"], row["linked_to"], row["routing_rule"]) == ("stoerung", first.conversation_id, "fault")
            assert later.acknowledged

    async def test_it_does_not_hide_an_older_one_that_is_fresh(self, tmp_path):
        """Only the newest conversation was looked at: a staff follow-up in an older case, and
        the resident's answer to it opened a third case, owned by the settled one's unit."""
        from router.testing import CoreHarness

        async with CoreHarness(tmp_path / "d", entrypoints=("webform", "whatsapp", "phone"), env=self.ENV) as harness:
            fault = await harness.core.ingest(self.sms("SM1", "Störung: kein Internet"))
            call = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA1", "kind": "call",
                                              "topic": "construction", "sender": {"kind": "phone", "address": self.NUMBER}})
            assert call.conversation_id != fault.conversation_id
            for case in (fault, call):
                status, _ = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/callbacks",
                                              json={"outcome": "reached"})
                assert status == 201
            harness.clock.advance(timedelta(days=200))
            status, _ = await harness.api("POST", f"/api/v1/conversations/{fault.conversation_id}/replies",
                                          json={"text": "Ist die Störung behoben?"})
            assert status == 201
            harness.clock.advance(timedelta(hours=1))
            back = await harness.core.ingest(self.sms("SM2", "Nein, immer noch kein Internet"))
            assert back.conversation_id == fault.conversation_id


async def test_a_reference_to_ones_own_settled_case_on_another_chat_says_so(tmp_path):
    """It was labelled open-case, "is open", for a case answered 200 days ago that the SMS named."""
    from router.testing import CoreHarness

    async with CoreHarness(tmp_path / "d", entrypoints=("webform", "whatsapp", "phone"),
                           env=TestASettledConversationOnTheChat.ENV) as harness:
        number = TestASettledConversationOnTheChat.NUMBER
        case = await harness.core.ingest(_chat("message", "wamid.R1", number,
                                               text="Vor meinem Haus in der Musterstraße 5 ist der Gehweg aufgegraben."))
        stamp = iso(harness.clock.now())
        await harness.core.store.write(lambda conn: tracking.mark_answered(conn, case.conversation_id, stamp))
        harness.clock.advance(timedelta(days=200))
        named = await harness.core.ingest({"channel": "phone", "channel_message_id": "SM9", "kind": "message",
                                           "text": f"Zu {case.case_reference}: schon wieder gesperrt",
                                           "sender": {"kind": "phone", "address": number}})
        (row,) = await harness.rows("SELECT unit, linked_to, routing_rule FROM conversations WHERE id = ?", (named.conversation_id,))
        assert (row["unit"], row["linked_to"], row["routing_rule"]) == ("tiefbau-muster", case.conversation_id, "case-reference")


async def test_an_escalation_takes_the_case_from_the_old_units_assignee(harness):
    """The new owner's case still named someone of the unit that let the deadline pass: it looked
    taken care of, by someone who no longer sees it."""
    result = await harness.core.ingest(webform_message())
    status, detail = await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/assign",
                                       token="contractor", json={"assignee": "Kolonne 3"})
    assert status == 200 and detail["assignee"] == "Kolonne 3"
    harness.clock.set(result.deadline + timedelta(minutes=1))
    assert [e["to_unit"] for e in await harness.escalate()] == ["bauhotline"]
    status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}", token="hotline")
    assert (detail["unit"], detail["assignee"]) == ("bauhotline", None)


async def test_the_call_back_sms_of_a_mail_case_never_goes_to_a_number_a_form_only_named(tmp_path):
    """A stranger's form named the resident's (still unknown) e-mail address and the stranger's
    phone; the resident's own mail landed on that contact. After the failed call-backs, the
    SMS with the mail case's status link went to the stranger's phone."""
    from router.testing import CoreHarness

    env = {"TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456",
           "TWILIO_API_URL": "http://127.0.0.1:9"}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "phone"), env=env) as harness:
        await harness.core.ingest({"channel": "webform", "channel_message_id": "f1", "text": "Frage",
                                   "sender": {"kind": "email", "address": "erika@example.net",
                                              "other_identities": [{"kind": "phone", "address": "+4915199999999"}]}})
        mail = await harness.core.ingest(_mail("Meine Vertragsnummer ist 998877", "<m1@example.net>",
                                               sender="erika@example.net"))
        for _ in range(3):
            status, body = await harness.api("POST", f"/api/v1/conversations/{mail.conversation_id}/callbacks",
                                             json={"outcome": "not_reached"})
            assert status == 201, body
        assert await harness.count("outbox", "to_address = '+4915199999999'") == 0


async def test_a_transfer_counts_the_new_owners_escalations_afresh(harness):
    """A transfer gives the new unit a deadline of its own: its escalations count from nought,
    not on from the old owner's, which had used up the reminders before the new one was due."""
    result = await harness.core.ingest(webform_message())
    harness.clock.set(result.deadline + timedelta(minutes=1))
    assert [e["level"] for e in await harness.escalate()] == [1]
    status, detail = await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/transfer",
                                       json={"unit": "vertrieb", "reason": "Vertragsfrage"})
    assert status == 200 and (detail["unit"], detail["escalation_level"]) == ("vertrieb", 0)


async def test_an_answer_on_its_way_at_the_deadline_is_no_reason_to_escalate(harness):
    """The contractor answered a minute before the deadline and the outbox had not sent it yet:
    the scheduler took the case from them (a 404 on the case they had just answered) and told
    the hotline that they did not answer. It escalates only if the answer is lost."""
    case = await harness.core.ingest(webform_message())
    await harness.run_outbox()  # the acknowledgement
    harness.clock.set(case.deadline - timedelta(minutes=1))
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/replies", token="contractor",
                                  json={"text": "Die Baugrube wird am Freitag geschlossen."})
    assert status == 201
    harness.clock.set(case.deadline + timedelta(minutes=5))
    assert await harness.escalate() == []
    status, detail = await harness.api("GET", f"/api/v1/conversations/{case.conversation_id}", token="contractor")
    assert status == 200 and detail["unit"] == "tiefbau-muster" and detail["escalation_level"] == 0
    await harness.run_outbox()
    assert await harness.escalate() == []
    (row,) = await harness.rows("SELECT state FROM conversations WHERE id = ?", (case.conversation_id,))
    assert row["state"] == "answered"

    lost = await harness.core.ingest(webform_message("Gehweg seit Wochen gesperrt", email="zweite@example.net"))
    await harness.run_outbox()
    harness.clock.set(lost.deadline - timedelta(minutes=1))
    status, reply = await harness.api("POST", f"/api/v1/conversations/{lost.conversation_id}/replies",
                                      token="contractor", json={"text": "Wir melden uns."})
    harness.clock.set(lost.deadline + timedelta(minutes=5))
    assert await harness.escalate() == []
    await harness.core.store.write(lambda conn: conn.execute(  # the answer was given up
        "UPDATE outbox SET state = 'failed' WHERE message_id = ?", (reply["id"],)))
    assert [(e["from_unit"], e["to_unit"]) for e in await harness.escalate()] == [("tiefbau-muster", "bauhotline")]


async def test_a_copy_of_an_answer_that_was_delivered_does_not_hold_back_a_later_question(harness):
    """The answer reached the resident on the conversation's channel, its copy by mail waits for
    a relay that is down, and the resident asks again: that question's deadline passes
    unanswered. The pending copy of the earlier answer is no answer to it, and it escalates."""
    case = await harness.core.ingest(webform_message())
    await harness.run_outbox()  # the acknowledgement
    status, reply = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/replies", token="contractor",
                                      json={"text": "Die Baugrube wird am Freitag geschlossen."})
    assert status == 201
    await harness.core.store.write(lambda conn: conn.execute(  # its copy by mail, retried later
        "INSERT INTO outbox (message_id, conversation_id, channel, kind, to_kind, to_address, primary_delivery, state,"
        " attempts, next_attempt_at, created_at, updated_at, idempotency_key) SELECT message_id, conversation_id, 'email', kind,"
        " 'email', 'anwohner@example.net', 0, 'pending', 3, '2999-01-01T00:00:00.000Z', created_at, created_at,"
        " idempotency_key || '-copy'"
        " FROM outbox WHERE message_id = ?",
        (reply["id"],)))
    await harness.run_outbox()
    (row,) = await harness.rows("SELECT state FROM conversations WHERE id = ?", (case.conversation_id,))
    assert row["state"] == "answered"

    again = await harness.core.ingest(webform_message("Und der Gehweg?", thread={"status_token": case.status_token}))
    assert again.conversation_id == case.conversation_id
    (row,) = await harness.rows("SELECT state, deadline FROM conversations WHERE id = ?", (case.conversation_id,))
    assert row["state"] == "acknowledged"
    harness.clock.set(datetime.fromisoformat(row["deadline"].replace("Z", "+00:00")) + timedelta(minutes=5))
    assert [(e["from_unit"], e["to_unit"]) for e in await harness.escalate()] == [("tiefbau-muster", "bauhotline")]


BERLIN = ZoneInfo("Europe/Berlin")


def _berlin(year: int, month: int, day: int, hour: int, minute: int = 0, *, fold: int = 0) -> datetime:
    """A wall-clock time in Berlin (``fold`` 1: the second of a time the clocks show twice)."""
    return datetime(year, month, day, hour, minute, fold=fold, tzinfo=BERLIN)


@pytest.mark.parametrize(
    ("closed", "written", "reopens"),
    [
        # Closed at noon two weeks before the clocks go forward: the window ends at noon, an
        # hour sooner than 14 x 24 hours (which reopened it at 12:30).
        (_berlin(2026, 3, 15, 12), _berlin(2026, 3, 29, 11, 59), True),
        (_berlin(2026, 3, 15, 12), _berlin(2026, 3, 29, 12, 30), False),
        # ... and before they go back: an hour later than 14 x 24 hours (which opened a new case at 11:30).
        (_berlin(2026, 10, 11, 12), _berlin(2026, 10, 25, 11, 30), True),
        (_berlin(2026, 10, 11, 12), _berlin(2026, 10, 25, 12, 1), False),
        # 02:30 comes twice on the last night: the window lasts until the second one.
        (_berlin(2026, 10, 11, 2, 30), _berlin(2026, 10, 25, 2, 45), True),
        (_berlin(2026, 10, 11, 2, 30), _berlin(2026, 10, 25, 2, 15, fold=1), True),
        (_berlin(2026, 10, 11, 2, 30), _berlin(2026, 10, 25, 2, 30, fold=1), True),
        (_berlin(2026, 10, 11, 2, 45), _berlin(2026, 10, 25, 2, 50, fold=1), False),
        # 02:30 never comes on the last night: the window lasts until the clocks jump past it.
        (_berlin(2026, 3, 15, 2, 30), _berlin(2026, 3, 29, 3, 0), True),
        (_berlin(2026, 3, 15, 2, 30), _berlin(2026, 3, 29, 3, 15), False),
    ],
    ids=["march-before-noon", "march-after-noon", "october-before-noon", "october-after-noon",
         "repeated-first-pass", "repeated-second-pass", "repeated-at-the-end", "repeated-after-the-end",
         "skipped-at-the-jump", "skipped-after-the-jump"],
)
async def test_the_reopen_window_ends_at_the_same_wall_clock_time_across_a_clock_change(tmp_path, closed, written, reopens):
    """``reopen_days`` counted 24-hour days: across a change of the clocks the window ended an
    hour before or after the time of day the case was closed at, which is what staff and
    residents count by."""
    from router.testing import CoreHarness

    async with CoreHarness(tmp_path / "data", start=closed) as harness:
        assert harness.config.reopen_days == 14 and harness.config.timezone == "Europe/Berlin"
        case = await harness.core.ingest(webform_message())
        status, _ = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/close")
        assert status == 200
        harness.clock.set(written)
        later = await harness.core.ingest(webform_message("Noch eine Frage", thread={"status_token": case.status_token}))
        if reopens:
            assert later.conversation_id == case.conversation_id and not later.opened
        else:
            assert later.conversation_id != case.conversation_id and later.opened
            linked = await harness.rows("SELECT linked_to FROM conversations WHERE id = ?", (later.conversation_id,))
            assert linked[0]["linked_to"] == case.conversation_id


@pytest.mark.parametrize("days", [14, 1, 7.25, 0.5, 0])
def test_the_reopen_window_and_its_bound_for_stored_stamps_agree_around_both_clock_changes(days):
    """``reopen_earliest`` is what stored stamps are compared with in SQL: every moment whose
    window (``reopen_until``) still holds ``now`` is at or after it, and none before it is,
    checked every few minutes over both nights the clocks change, for a ``now`` on that night
    and for one ``reopen_days`` after it; ``reopen_passed``, which spares the wall clock away
    from the window's end, answers as ``reopen_until`` does."""
    import dataclasses

    from router.testing import example_config

    config = dataclasses.replace(example_config(), reopen_days=days)
    for night in (datetime(2026, 3, 28, 22, 0, tzinfo=UTC), datetime(2026, 10, 24, 22, 0, tzinfo=UTC)):
        for step in range(0, 6 * 60, 5):  # on the minute the clocks change as well
            for now in (night + timedelta(minutes=step), night + timedelta(minutes=step, days=days)):
                bound = tracking.reopen_earliest(config, now)
                assert tracking.reopen_until(config, bound) >= now, (days, now)
                for before in (timedelta(microseconds=1), timedelta(minutes=1), timedelta(minutes=59), timedelta(hours=1)):
                    assert tracking.reopen_until(config, bound - before) < now, (days, now, before)
                # What a message asks of each conversation, near the end of the window and far from it.
                for shift in (timedelta(0), timedelta(minutes=-30), timedelta(hours=1), timedelta(days=-3), timedelta(days=3)):
                    since = bound + shift
                    assert tracking.reopen_passed(config, since, now) == (now > tracking.reopen_until(config, since))


async def test_an_answer_the_outbox_is_handing_to_the_provider_at_the_deadline_is_no_reason_to_escalate(harness):
    """Claimed by the outbox (``sending``), the answer is as much on its way as one still
    queued: the scheduler must not take the case from the unit that just answered it."""
    from router.outbox import claim_due

    case = await harness.core.ingest(webform_message())
    await harness.run_outbox()  # the acknowledgement
    harness.clock.set(case.deadline - timedelta(minutes=1))
    status, reply = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/replies", token="contractor",
                                      json={"text": "Die Baugrube wird am Freitag geschlossen."})
    assert status == 201
    now = harness.clock.now()
    claimed = await harness.core.store.write(lambda conn: claim_due(conn, now, harness.core.outbox.policy))
    assert [row["message_id"] for row in claimed] == [reply["id"]]
    harness.clock.set(case.deadline + timedelta(seconds=30))
    assert await harness.escalate() == []
    (row,) = await harness.rows("SELECT unit, escalation_level FROM conversations WHERE id = ?", (case.conversation_id,))
    assert (row["unit"], row["escalation_level"]) == ("tiefbau-muster", 0)


async def test_an_escalated_case_is_due_in_the_new_owners_response_time_and_business_hours(harness):
    """The new owner is given its own first response time, counted in its own business hours
    from the escalation: the hotline's four hours are not customer care's eight."""
    from router.store.sqlite import parse_iso

    result = await harness.core.ingest(webform_message())
    harness.clock.set(result.deadline + timedelta(minutes=1))  # Monday 13:01 Berlin
    assert [e["to_unit"] for e in await harness.escalate()] == ["bauhotline"]
    (conv,) = await harness.rows("SELECT deadline, escalate_at FROM conversations")
    # four office hours: Monday 17:01 Berlin
    assert parse_iso(conv["deadline"]) == parse_iso(conv["escalate_at"]) == datetime(2026, 11, 30, 16, 1, tzinfo=UTC)
    harness.clock.set(datetime(2026, 11, 30, 16, 2, tzinfo=UTC))  # Monday 17:02 Berlin
    assert [e["to_unit"] for e in await harness.escalate()] == ["kundenservice"]
    (conv,) = await harness.rows("SELECT deadline, escalate_at FROM conversations")
    # eight office hours: 58 minutes on Monday, the rest from 08:00 on Tuesday: 15:02 Berlin
    assert parse_iso(conv["deadline"]) == parse_iso(conv["escalate_at"]) == datetime(2026, 12, 1, 14, 2, tzinfo=UTC)


async def test_the_scheduler_escalates_or_reminds_a_case_once_per_missed_deadline(harness):
    """Passes run every ``escalation_check_seconds``: one that comes again before the new
    deadline (or the next reminder) is due moves nothing and tells nobody again."""
    result = await harness.core.ingest(webform_message())
    expected = [("tiefbau-muster", "bauhotline"), ("bauhotline", "kundenservice"), ("kundenservice", "kundenservice")]
    for step, moved in enumerate(expected, start=1):
        (conv,) = await harness.rows("SELECT escalate_at FROM conversations")
        harness.clock.set(datetime.fromisoformat(conv["escalate_at"].replace("Z", "+00:00")) + timedelta(minutes=1))
        assert [(e["from_unit"], e["to_unit"]) for e in await harness.escalate()] == [moved]
        for _ in range(2):  # the next passes, a scheduler interval later
            harness.clock.advance(timedelta(seconds=harness.config.escalation_check_seconds))
            assert await harness.escalate() == []
        assert await harness.count("escalations", "conversation_id = ?", (result.conversation_id,)) == step
        assert await harness.count("messages", "kind = 'notification'") == step


async def test_a_question_delivered_while_staff_wait_for_the_resident_leaves_the_case_waiting(harness):
    """Staff ask for a photo and wait for the resident: their question, once delivered, is
    counted as a first answer but does not turn the case to ``answered``: staff still wait."""
    case = await harness.core.ingest(webform_message())
    await harness.run_outbox()  # the acknowledgement
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/replies",
                                  json={"text": "Können Sie uns ein Foto schicken?"})
    assert status == 201
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/wait")
    assert status == 200
    await harness.run_outbox()
    (row,) = await harness.rows("SELECT state, deadline, first_answered_at FROM conversations WHERE id = ?",
                                (case.conversation_id,))
    assert (row["state"], row["deadline"]) == ("waiting", None) and row["first_answered_at"] is not None
    assert await harness.count("events", "conversation_id = ? AND kind = 'answered'", (case.conversation_id,)) == 0


async def test_a_new_owner_without_a_notify_address_is_not_mailed_and_the_history_says_so(tmp_path):
    """A unit that watches the inbox instead of a mailbox gets no notification; its event
    tells staff why nobody was mailed about the case."""
    from router.testing import CoreHarness, example_config, load_raw_config

    raw = load_raw_config()
    del raw["units"]["bauhotline"]["notify"]
    async with CoreHarness(tmp_path / "data", config=example_config(raw)) as harness:
        result = await harness.core.ingest(webform_message())
        harness.clock.set(result.deadline + timedelta(minutes=1))
        assert [e["to_unit"] for e in await harness.escalate()] == ["bauhotline"]
        assert await harness.count("messages", "kind = 'notification'") == 0
        status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
        assert status == 200
        (event,) = [e for e in detail["events"] if e["kind"] == "owner_not_notified"]
        assert event["data"] == {"unit": "bauhotline", "reason": "the unit has no notify address"}
