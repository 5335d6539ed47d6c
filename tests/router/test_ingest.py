"""The inbound path (``router/ingest.py``): deduplication, and what a new message does to the
conversation it joins and to the messages it refers to."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from router.hookspecs import (
    Capabilities,
    Channel,
    OutboundMessage,
    PermanentDeliveryError,
    RetryableDeliveryError,
    SendResult,
    hookimpl,
)
from router.ingest import _no_word_from_us
from router.store.sqlite import _connect, apply_migrations
from router.testing import CoreHarness

from .helpers import vm_steps, webform_message


async def test_the_same_message_id_on_two_channels_is_two_messages(harness):
    """Deduplication is per channel: a provider's message id says nothing about another
    channel's. Taken for a retry, the e-mail was answered as a duplicate and never stored."""
    form = await harness.core.ingest(webform_message(channel_message_id="42"))
    mail = await harness.core.ingest(webform_message("Baustelle, Gehweg gesperrt", channel="email",
                                                     email="nachbar@example.net", channel_message_id="42"))
    assert not mail.duplicate and mail.conversation_id not in (None, form.conversation_id) and mail.acknowledged
    assert await harness.count("messages", "direction = 'in' AND channel_message_id = '42'") == 2


async def test_a_message_in_a_conversation_staff_wait_in_gets_a_deadline_again(harness):
    """Staff wait for the resident (no deadline); the resident's answer puts the conversation
    back to waiting for staff, with a deadline that escalates."""
    first = await harness.core.ingest(webform_message())
    await harness.run_outbox()  # the acknowledgement went out
    status, detail = await harness.api("POST", f"/api/v1/conversations/{first.conversation_id}/wait")
    assert status == 200 and detail["state"] == "waiting" and detail["deadline"] is None
    harness.clock.advance(timedelta(minutes=5))
    again = await harness.core.ingest(webform_message("Hier das Foto", thread={"status_token": first.status_token}))
    assert again.conversation_id == first.conversation_id and not again.acknowledged
    status, detail = await harness.api("GET", f"/api/v1/conversations/{first.conversation_id}")
    assert detail["state"] == "acknowledged" and detail["deadline"] is not None
    assert detail["events"][-1]["kind"] == "awaiting_answer"


def _chat(kind: str, message_id: str, sender: str = "+4915111111111", **extra):
    """A canonical WhatsApp message, reaction, edit or deletion."""
    return {"channel": "whatsapp", "channel_message_id": message_id, "kind": kind,
            "sender": {"kind": "phone", "address": sender}, **extra}


async def test_a_resident_cannot_edit_or_delete_a_staff_answer(harness):
    """An edit or deletion changes only an inbound message: the resident's own words, not the
    answer staff sent them (which the provider knows by its id, as it knows the resident's)."""
    case = await harness.core.ingest(_chat("message", "wamid.A1", text="Gehweg gesperrt seit Montag"))
    status, reply = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/replies",
                                      json={"text": "Ab Freitag wieder frei."})
    assert status == 201
    # The provider took the answer under this id.
    await harness.core.store.write(
        lambda conn: conn.execute("UPDATE messages SET provider_id = 'wamid.OUT1' WHERE id = ?", (reply["id"],)))
    await harness.core.ingest(_chat("edit", "wamid.A2", target_message_id="wamid.OUT1", text="Wir kommen nie."))
    await harness.core.ingest(_chat("deletion", "wamid.A3", target_message_id="wamid.OUT1"))
    (answer,) = await harness.rows("SELECT text, edited_at, deleted_at FROM messages WHERE id = ?", (reply["id"],))
    assert (answer["text"], answer["edited_at"], answer["deleted_at"]) == ("Ab Freitag wieder frei.", None, None)


async def test_a_chat_message_whose_sender_may_be_forged_is_not_taken_for_the_numbers_other_case(tmp_path):
    """An SMS from the number of an open WhatsApp case is linked to it and goes to its unit,
    because the number says who wrote. Not when the channel flags the message
    ``unverified_sender``: then the number proves nothing, and it is routed as any other."""
    from router.testing import CoreHarness

    env = {"WHATSAPP_APP_SECRET": "s", "WHATSAPP_VERIFY_TOKEN": "v", "WHATSAPP_ACCESS_TOKEN": "a",
           "WHATSAPP_PHONE_NUMBER_ID": "1122334455", "WHATSAPP_GRAPH_URL": "http://127.0.0.1:9",
           "TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456",
           "TWILIO_API_URL": "http://127.0.0.1:9"}
    async with CoreHarness(tmp_path / "data", entrypoints=("webform", "whatsapp", "phone"), env=env) as harness:
        case = await harness.core.ingest(_chat("message", "wamid.X1",
                                               text="Vor meinem Haus in der Musterstraße 5 ist der Gehweg aufgegraben."))
        assert case.unit == "tiefbau-muster"
        sms = await harness.core.ingest({"channel": "phone", "channel_message_id": "SM1", "kind": "message",
                                         "text": "Wann ist der Gehweg wieder frei?", "flags": ["unverified_sender"],
                                         "sender": {"kind": "phone", "address": "+4915111111111"}})
        (row,) = await harness.rows("SELECT linked_to, routing_rule FROM conversations WHERE id = ?", (sms.conversation_id,))
        assert sms.conversation_id != case.conversation_id
        assert (row["linked_to"], row["routing_rule"]) == (None, "construction-outside-area")


async def test_without_the_web_form_channel_no_text_or_view_links_to_a_status_page(tmp_path):
    """Status pages are the web form channel's: with it off, the acknowledgement sent a link
    that answered 404, and the inbox offered it to staff. The sentence is left out, the view
    says null; with the channel on, both carry the link."""
    from router.testing import CoreHarness

    async with CoreHarness(tmp_path / "off", entrypoints=("email",), settings={"email": {"listen": False}}) as harness:
        case = await harness.core.ingest(webform_message(channel="email"))
        assert case.status_url is None and case.ack_text.endswith(".") and "/status/" not in case.ack_text
        assert "Den Stand sehen Sie hier" not in case.ack_text and case.case_reference in case.ack_text
        (ack,) = await harness.rows("SELECT m.text FROM outbox o JOIN messages m ON m.id = o.message_id WHERE o.kind = 'ack'")
        assert ack["text"] == case.ack_text
        assert (await harness.client.get(f"/channels/webform/status/{case.status_token}")).status == 404
        status, detail = await harness.api("GET", f"/api/v1/conversations/{case.conversation_id}")
        assert status == 200 and detail["status_url"] is None
    async with CoreHarness(tmp_path / "on") as harness:
        case = await harness.core.ingest(webform_message(channel="email"))
        assert case.ack_text.endswith(f"Den Stand sehen Sie hier: {case.status_url}")
        assert (await harness.client.get(case.status_url.removeprefix(harness.config.public_base_url))).status == 200
        status, detail = await harness.api("GET", f"/api/v1/conversations/{case.conversation_id}")
        assert detail["status_url"] == case.status_url


class Mail(Channel):
    """An e-mail channel of the test: takes each mail, refuses it for good (it bounces), or gets
    no answer from its relay (``mode``); keeps what went."""

    name = "email"
    capabilities = Capabilities(identity_kinds=("email",))

    def __init__(self) -> None:
        self.mode = "take"
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        if self.mode == "refuse":
            raise PermanentDeliveryError("550 mailbox unavailable")
        if self.mode == "down":
            raise RetryableDeliveryError("relay not reachable")
        self.sent.append(message)
        return SendResult(provider_id=f"<out-{message.outbox_id}@example.org>")


class MailPlugin:
    def __init__(self) -> None:
        self.channel = Mail()

    @hookimpl
    def register_channels(self) -> list[Channel]:
        return [self.channel]


def _list_mail(message_id: str, text: str, **extra):
    return {"channel": "email", "channel_message_id": message_id, "text": text, "language": "de",
            "sender": {"kind": "email", "address": "verein@verein.example"}, **extra}


@pytest.mark.parametrize(
    ("staff", "acknowledged"),
    [
        pytest.param("answer delivered", False, id="answer-delivered"),
        pytest.param("answer bounced", True, id="answer-bounced"),
        pytest.param("answer still queued", True, id="answer-queued"),
        pytest.param("reopened, nothing sent", True, id="reopened"),
    ],
)
async def test_a_persons_first_message_where_a_machine_opened_the_case_is_acknowledged_unless_staff_reached_them(
    tmp_path, staff, acknowledged
):
    """A mailing list's mail opened the case (waiting, nothing sent); staff wrote into it, or
    reopened it. The person's own first message got a deadline, but an acknowledgement only
    while nothing had ever been sent: after an answer that bounced, or one still waiting for
    the relay, they had no word from us and no case reference. Staff's answer delivered by
    mail carries the case reference in its subject: then the message is a follow-up."""
    plugin = MailPlugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        listed = await harness.core.ingest(_list_mail("<list-1@verein.example>", "Mitteilung an alle Anlieger",
                                                      ack_suppressed="list"))
        case = listed.conversation_id
        base = f"/api/v1/conversations/{case}"
        if staff == "reopened, nothing sent":
            status, _ = await harness.api("POST", f"{base}/reopen")
        else:
            plugin.channel.mode = {"answer delivered": "take", "answer bounced": "refuse"}.get(staff, "down")
            status, _ = await harness.api("POST", f"{base}/replies", json={"text": "Bitte melden Sie sich bei uns."})
            await harness.run_outbox()
        assert status in (200, 201)
        plugin.channel.mode = "take"
        harness.clock.advance(timedelta(minutes=5))
        person = await harness.core.ingest(_list_mail("<p1@verein.example>", "Bei mir ist der Gehweg gesperrt.",
                                                      thread={"refs": ["<list-1@verein.example>"]}))
        assert person.conversation_id == case and person.deadline is not None
        assert person.acknowledged is acknowledged
        acks = await harness.rows("SELECT m.text, o.channel, o.to_address FROM messages m JOIN outbox o"
                                  " ON o.message_id = m.id WHERE m.kind = 'ack'")
        if acknowledged:
            (ack,) = acks
            assert (ack["channel"], ack["to_address"]) == ("email", "verein@verein.example")
            assert listed.case_reference in ack["text"]
            (row,) = await harness.rows("SELECT state, deadline FROM conversations WHERE id = ?", (case,))
            assert row["state"] == "open" and row["deadline"] is not None
        else:
            assert acks == []
            (row,) = await harness.rows("SELECT state FROM conversations WHERE id = ?", (case,))
            assert row["state"] == "acknowledged"


def _no_word_cost(tmp_path, sent: int) -> int:
    """SQLite VM steps of asking whether a person was told anything in a case a machine opened,
    with ``sent`` deliveries of other cases in the outbox."""
    conn = _connect(tmp_path / f"no-word-{sent}.sqlite3")
    apply_migrations(conn)
    stamp = "2026-01-01T00:00:00.000000Z"
    conn.execute("BEGIN")
    conn.execute("INSERT INTO contacts (id, created_at, updated_at) VALUES (1, ?, ?)", (stamp, stamp))
    conn.executemany(
        "INSERT INTO conversations (id, case_reference, status_token, contact_id, channel, unit, state, language,"
        " routing_rule, routing_reason, created_at, updated_at)"
        " VALUES (?, ?, ?, 1, 'email', 'kundenservice', 'waiting', 'de', 'r', 'r', ?, ?)",
        [(i, f"K-{i}", f"t-{i}", stamp, stamp) for i in (1, 2)],
    )
    conn.execute("INSERT INTO messages (id, conversation_id, contact_id, direction, kind, channel, payload, created_at)"
                 " VALUES (1, 1, 1, 'in', 'text', 'email', '{\"ack_suppressed\": \"list\"}', ?)", (stamp,))
    conn.execute("INSERT INTO messages (id, conversation_id, contact_id, direction, kind, channel, created_at)"
                 " VALUES (2, 2, 1, 'out', 'ack', 'email', ?)", (stamp,))
    conn.executemany(
        "INSERT INTO outbox (message_id, conversation_id, channel, kind, to_kind, to_address, state, next_attempt_at,"
        " idempotency_key, created_at, updated_at) VALUES (2, 2, 'email', 'ack', 'email', 'a@example.net', 'sent', ?, ?, ?, ?)",
        [(stamp, f"k{i}", stamp, stamp) for i in range(sent)],
    )
    conn.execute("COMMIT")
    steps, silent = vm_steps(conn, lambda: _no_word_from_us(conn, 1, "email"))
    conn.close()
    assert silent
    return steps


def test_whether_a_machines_case_told_the_person_anything_reads_its_own_messages_not_the_outbox(tmp_path):
    """Asked inside the ingest transaction for a person's first message in a case a machine
    opened: it read every delivery ever sent (200 ms at 200,000), holding up every message
    in the same group commit."""
    few = _no_word_cost(tmp_path, 10)
    history = _no_word_cost(tmp_path, 20_000)
    assert history < 2 * few, (few, history)


async def test_a_persons_first_message_in_a_machines_case_that_waits_already_keeps_its_deadline(tmp_path):
    """Staff reopened a case a mailing list opened: it waits for an answer, with a deadline.
    The person's first message there is acknowledged, but the deadline stays where it was (a
    new one would put off the answer already due, and start its escalation over)."""
    plugin = MailPlugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        listed = await harness.core.ingest(_list_mail("<list-1@verein.example>", "Mitteilung an alle Anlieger",
                                                      ack_suppressed="list"))
        status, _ = await harness.api("POST", f"/api/v1/conversations/{listed.conversation_id}/reopen")
        assert status == 200
        (before,) = await harness.rows("SELECT deadline FROM conversations WHERE id = ?", (listed.conversation_id,))
        assert before["deadline"] is not None
        harness.clock.advance(timedelta(hours=2))
        person = await harness.core.ingest(_list_mail("<p1@verein.example>", "Bei mir ist der Gehweg gesperrt.",
                                                      thread={"refs": ["<list-1@verein.example>"]}))
        assert person.conversation_id == listed.conversation_id and person.acknowledged
        (after,) = await harness.rows("SELECT state, deadline FROM conversations WHERE id = ?", (listed.conversation_id,))
        assert (after["state"], after["deadline"]) == ("open", before["deadline"])


class Chat(Channel):
    """A chat channel of the test (an SMS gateway): messages join the sender's open
    conversation; it takes every message it is given and keeps it."""

    name = "chat"
    capabilities = Capabilities(identity_kinds=("phone",), threads_by_sender=True)

    def __init__(self) -> None:
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        return SendResult(provider_id=f"chat-{message.outbox_id}")


class ChatPlugin:
    """The chat channel, and a copy by chat of each answer to a web-form case, to the contact's numbers."""

    def __init__(self) -> None:
        self.channel = Chat()

    @hookimpl
    def register_channels(self) -> list[Channel]:
        return [self.channel]

    @hookimpl
    def reply_copies(self, conversation, reply, identities):
        if conversation["channel"] != "webform":
            return None
        return [{"channel": "chat", "to_kind": "phone", "to": i["address"]} for i in identities
                if i["kind"] == "phone" and not i["failed"]]


def _text(message_id: str, text: str, sender: str = "+4915111111111", **extra):
    return {"channel": "chat", "channel_message_id": message_id, "kind": "message", "text": text,
            "sender": {"kind": "phone", "address": sender}, **extra}


async def _answered_chat_case(harness: CoreHarness) -> int:
    """A chat case whose staff answer went out: answered."""
    case = await harness.core.ingest(_text("c1", "Hallo, eine Frage zu meinem Anschluss"))
    status, _ = await harness.api("POST", f"/api/v1/conversations/{case.conversation_id}/replies",
                                  json={"text": "Gern, worum geht es?"})
    assert status == 201
    await harness.run_outbox()
    (row,) = await harness.rows("SELECT state FROM conversations")
    assert row["state"] == "answered"
    return case.conversation_id


async def test_a_machines_message_on_a_chat_long_after_the_case_was_answered_opens_no_case(tmp_path):
    """An auto-reply from the number of a case answered months ago is kept with that case, as
    it is however old by e-mail: no new case, no acknowledgement, nothing for a unit to answer."""
    async with CoreHarness(tmp_path / "d", plugins=[ChatPlugin()]) as harness:
        case = await _answered_chat_case(harness)
        harness.clock.advance(timedelta(days=harness.config.reopen_days + 30))
        away = await harness.core.ingest(_text("c2", "Ich bin im Urlaub.", ack_suppressed="auto-reply"))
        assert away.conversation_id == case and not away.acknowledged and not away.opened
        assert await harness.count("conversations") == 1
        (row,) = await harness.rows("SELECT state, deadline FROM conversations")
        assert (row["state"], row["deadline"]) == ("answered", None)


async def test_a_machines_message_does_not_keep_a_settled_case_open_for_a_new_matter(tmp_path):
    """An auto-reply counted as the resident's word: a case answered weeks before it took the
    resident's new matter after it, unacknowledged and with the old owner, as if the reopen
    window had started again."""
    async with CoreHarness(tmp_path / "d", plugins=[ChatPlugin()]) as harness:
        case = await _answered_chat_case(harness)
        harness.clock.advance(timedelta(days=harness.config.reopen_days - 1))
        away = await harness.core.ingest(_text("c2", "Ich bin im Urlaub.", ack_suppressed="auto-reply"))
        assert away.conversation_id == case
        harness.clock.advance(timedelta(days=2))
        person = await harness.core.ingest(_text("c3", "Neue Frage: wann kommt der Techniker?"))
        assert person.opened and person.acknowledged and person.conversation_id != case
        (row,) = await harness.rows("SELECT linked_to FROM conversations WHERE id = ?", (person.conversation_id,))
        assert row["linked_to"] == case


async def test_a_message_with_a_topic_finds_the_open_case_of_that_topic_behind_newer_ones_without_one(tmp_path):
    """A caller with an open fault case and several newer open cases without a topic (each for
    another unit) chose "fault" again: the lookup saw only the newest few and opened a second
    fault case, with a second acknowledgement and deadline."""
    async with CoreHarness(tmp_path / "d", plugins=[ChatPlugin()]) as harness:
        fault = await harness.core.ingest(_text("t1", "Kein Netz", topic="fault"))
        assert fault.unit == "stoerung"
        cases = [fault.conversation_id]
        for n in range(3):
            status, _ = await harness.api("POST", f"/api/v1/conversations/{cases[-1]}/close")
            assert status == 200
            other = await harness.core.ingest(_text(f"o{n}", "Hallo, eine Frage"))
            assert other.opened and other.unit != "stoerung"
            cases.append(other.conversation_id)
        for conversation_id in cases[:-1]:
            status, _ = await harness.api("POST", f"/api/v1/conversations/{conversation_id}/reopen")
            assert status == 200
        again = await harness.core.ingest(_text("t2", "Immer noch kein Netz", topic="fault"))
        assert again.conversation_id == fault.conversation_id and not again.opened


async def test_a_text_from_another_number_of_the_contact_is_no_answer_to_a_copy_sent_elsewhere(tmp_path):
    """Only a text back from the number a staff answer's copy went to joins that case: a text
    from the contact's other number answers nothing it was sent, and is a case of its own."""
    async with CoreHarness(tmp_path / "d", plugins=[ChatPlugin()]) as harness:
        def form(message_id: str, email: str, phone: str) -> dict:
            return webform_message(channel_message_id=message_id, email=email,
                                   sender={"kind": "email", "address": email,
                                           "other_identities": [{"kind": "phone", "address": phone}]})

        first = await harness.core.ingest(form("f1", "erna@example.net", "+4915111111111"))
        status, _ = await harness.api("POST", f"/api/v1/conversations/{first.conversation_id}/replies",
                                      json={"text": "Der Gehweg ist ab Freitag frei."})
        assert status == 201
        await harness.run_outbox()
        assert [m.to for m in harness.core.channels["chat"].sent] == ["+4915111111111"]
        second = await harness.core.ingest(form("f2", "erna.b@example.net", "+4915122222222"))
        contacts = [r["contact_id"] for r in await harness.rows(
            "SELECT contact_id FROM conversations WHERE id IN (?, ?) ORDER BY id", (first.conversation_id, second.conversation_id))]
        await harness.core.merge_contacts(contacts[0], contacts[1], "staff")
        back = await harness.core.ingest(_text("s1", "Danke! Und die Einfahrt?", sender="+4915111111111"))
        assert back.conversation_id == first.conversation_id
        other = await harness.core.ingest(_text("s2", "Wann kommt der Techniker?", sender="+4915122222222"))
        assert other.conversation_id not in (first.conversation_id, second.conversation_id) and other.opened


async def test_a_persons_first_mail_is_acknowledged_when_the_answer_reached_them_only_on_another_channel(tmp_path):
    """A mailing list's mail opened the case; staff's answer bounced and went by chat to the
    number beside the address instead. The person's first mail then had no word from us by
    mail, where they write: it is acknowledged, with the case reference."""
    mail, chat = MailPlugin(), ChatPlugin()
    async with CoreHarness(tmp_path / "d", plugins=[mail, chat]) as harness:
        listed = await harness.core.ingest(_list_mail(
            "<list-1@verein.example>", "Mitteilung an alle Anlieger", ack_suppressed="list",
            sender={"kind": "email", "address": "verein@verein.example",
                    "other_identities": [{"kind": "phone", "address": "+4915111111111"}]}))
        mail.channel.mode = "refuse"
        status, _ = await harness.api("POST", f"/api/v1/conversations/{listed.conversation_id}/replies",
                                      json={"text": "Bitte melden Sie sich bei uns."})
        assert status == 201
        await harness.run_outbox()
        assert [m.to for m in chat.channel.sent] == ["+4915111111111"]
        mail.channel.mode = "take"
        harness.clock.advance(timedelta(minutes=5))
        person = await harness.core.ingest(_list_mail("<p1@verein.example>", "Bei mir ist der Gehweg gesperrt.",
                                                      thread={"refs": ["<list-1@verein.example>"]}))
        assert person.conversation_id == listed.conversation_id and person.acknowledged


async def test_a_transcript_without_the_callers_number_still_goes_on_its_voicemail(harness):
    """A transcript names its call, but may come without the caller's number (then its sender
    is another, anonymous one): it is the voicemail's all the same, because the call it names
    is that voicemail's; arriving before the voicemail, it is kept in the call's conversation."""
    caller = {"kind": "phone", "address": "+4915111111111"}

    def transcript(call: str, text: str) -> dict:
        return {"channel": "phone", "channel_message_id": f"TR-{call}", "kind": "edit", "text": text,
                "sender": {"kind": "anonymous", "address": f"anonymous:{call}"}, "flags": ["no_number"],
                "target_message_id": f"{call}:voicemail", "thread": {"refs": [call]}}

    call = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA1", "kind": "call", "sender": caller})
    await harness.core.ingest({"channel": "phone", "channel_message_id": "CA1:voicemail", "kind": "voicemail",
                               "sender": caller, "thread": {"refs": ["CA1"]}})
    await harness.core.ingest(transcript("CA1", "Bitte rufen Sie mich zurück."))
    (voicemail,) = await harness.rows("SELECT conversation_id, text FROM messages WHERE channel_message_id = 'CA1:voicemail'")
    assert (voicemail["conversation_id"], voicemail["text"]) == (call.conversation_id, "Bitte rufen Sie mich zurück.")

    early = await harness.core.ingest({"channel": "phone", "channel_message_id": "CA2", "kind": "call", "sender": caller})
    await harness.core.ingest(transcript("CA2", "Es geht um den Anschluss."))
    (row,) = await harness.rows("SELECT conversation_id FROM messages WHERE channel_message_id = 'TR-CA2'")
    assert row["conversation_id"] == early.conversation_id


async def test_a_persons_first_message_in_a_machines_case_whose_deadline_passed_gets_a_new_one(tmp_path):
    """Staff reopened a case a mailing list opened, and its deadline went by: the person's
    first message is acknowledged with a deadline ahead, not with one already missed."""
    plugin = MailPlugin()
    async with CoreHarness(tmp_path / "d", plugins=[plugin]) as harness:
        listed = await harness.core.ingest(_list_mail("<list-1@verein.example>", "Mitteilung an alle Anlieger",
                                                      ack_suppressed="list"))
        status, _ = await harness.api("POST", f"/api/v1/conversations/{listed.conversation_id}/reopen")
        assert status == 200
        (before,) = await harness.rows("SELECT deadline FROM conversations WHERE id = ?", (listed.conversation_id,))
        harness.clock.set(datetime.fromisoformat(before["deadline"]) + timedelta(hours=1))
        person = await harness.core.ingest(_list_mail("<p1@verein.example>", "Bei mir ist der Gehweg gesperrt.",
                                                      thread={"refs": ["<list-1@verein.example>"]}))
        assert person.acknowledged and person.deadline > harness.clock.now()


async def test_a_follow_up_shows_when_the_resident_last_wrote(harness):
    """A message joining a conversation that waits for its answer moves the conversation's
    ``last_inbound_at`` (shown in the inbox) to it."""
    first = await harness.core.ingest(webform_message())
    harness.clock.advance(timedelta(hours=3))
    again = await harness.core.ingest(webform_message("Hier das Foto", thread={"status_token": first.status_token}))
    assert again.conversation_id == first.conversation_id and not again.acknowledged
    status, detail = await harness.api("GET", f"/api/v1/conversations/{first.conversation_id}")
    assert status == 200
    assert datetime.fromisoformat(detail["last_inbound_at"].replace("Z", "+00:00")) == harness.clock.now()
