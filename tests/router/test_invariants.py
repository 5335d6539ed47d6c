"""The product's promise, "no dead ends", as a stateful property of the whole service.

Hypothesis drives the real service (``CoreHarness``: a SQLite file, a loopback HTTP server, a
frozen clock) through sequences of what happens in a week of a municipality's contact centre:
new messages from new and returning senders on every channel, follow-ups, a provider's
retries of the same message, auto-replies, staff actions over the inbox API, outbox runs
against providers that take, refuse or fail for a while, provider status callbacks, the
clock moving over evenings and weekends, and escalation passes. After every step the
database is checked against what docs/architecture.md and docs/inbox.md promise:

- every conversation has an owner that is a configured unit;
- a conversation that waits for an answer (``open``, ``acknowledged``) has a deadline and a
  time to escalate (unless its escalations for this deadline are exhausted); one that does
  not wait (``waiting``, ``answered``, ``closed``) has neither;
- ``answered`` only after a staff answer was delivered or a call-back reached the person;
- a person's message that opens or reopens a conversation gets one acknowledgement, on its
  own channel, to its sender, in the same commit; so does a person's first message in a
  conversation a machine's message opened, unless something with the case reference reached
  them on that channel (a staff answer); a follow-up or a machine's message none;
- a message the provider delivers again changes nothing, anywhere;
- an answer that reaches nobody flags the conversation for a call-back; reported delivered
  after all (after the outbox gave up on it), it is not sent again, nor is its fallback, and
  the conversation is flagged ``undeliverable`` only while something else reached nobody;
- after an escalation pass nothing that waits is overdue and left where it was, the escalation
  level never passes the configured maximum, and every escalation told its new owner (an owner
  whose latest notification failed is shown as not notified);
- a missed call or voicemail stays a call-back to make until one reaches the person or the
  conversation is closed; failed call-backs escalate only after ``callback_attempts`` of them
  since the person was last reached, or at a wrong number;
- a delivered answer answers the conversation, unless the resident wrote after it;
- after an outbox run no row is left ``sending``.

The channels other than the web form are channels of this test (the names and capabilities
of the real ones), whose provider the test tells to take, refuse or fail each send.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from router.hookspecs import (
    Capabilities,
    Channel,
    DeliveryUpdate,
    OutboundMessage,
    PermanentDeliveryError,
    RetryableDeliveryError,
    SendResult,
    hookimpl,
)
from router.store.sqlite import iso, parse_iso
from router.testing import CoreHarness, example_config, load_raw_config
from router.tracking import ANNOTATIONS, AUTOMATED, deadline_for

MAX_ESCALATION_LEVEL = 3  # small, so that sequences reach the end of the chain and beyond
CALLBACK_ATTEMPTS = 3  # channels.phone.callback_attempts, its default
AWAITING = ("open", "acknowledged")
EMAILS = ("erika@example.net", "max.muster@example.org", "jana@example.net")
PHONES = ("+4915112345671", "+4915112345672", "+4917698765433")
TEXTS = (
    "Baustelle vor dem Haus, der Gehweg im Lindenweg ist gesperrt",
    "Ich möchte einen Vertrag für den Hausanschluss",
    "Kein Internet seit gestern Abend",
    "Hallo, wann kommt der Techniker?",
)
TOPICS = ("construction", "contract", "fault", "other")
PROVIDER_MODES = ("sent", "delivered", "delivered", "retry", "permanent")
TABLES = ("contacts", "identities", "conversations", "messages", "outbox", "events", "thread_keys", "escalations",
          "callback_attempts", "delivery_events", "request_keys")


class Provider(Channel):
    """A channel of the test whose provider takes (``sent``, ``delivered``), fails for a while
    (``retry``) or refuses for good (``permanent``) every send, as ``mode`` says."""

    def __init__(self, name: str, capabilities: Capabilities) -> None:
        self.name = name
        self.capabilities = capabilities
        self.mode = "sent"

    async def send(self, message: OutboundMessage) -> SendResult:
        if self.mode == "retry":
            raise RetryableDeliveryError("503 Service Unavailable")
        if self.mode == "permanent":
            raise PermanentDeliveryError("recipient refused")
        status = "delivered" if self.mode == "delivered" else "sent"
        return SendResult(provider_id=f"{self.name}-{message.outbox_id}-{message.attempt}", status=status)


class Providers:
    """E-mail, WhatsApp and phone (SMS) with the capabilities of the real plugins."""

    def __init__(self) -> None:
        self.channels = {
            "email": Provider("email", Capabilities(identity_kinds=("email",), push=True)),
            "whatsapp": Provider("whatsapp", Capabilities(
                identity_kinds=("phone", "whatsapp_user"), reply_window=timedelta(hours=24), delivery_receipts=True,
                threads_by_sender=True)),
            "phone": Provider("phone", Capabilities(identity_kinds=("phone",), delivery_receipts=True,
                                                    threads_by_sender=True)),
        }

    @hookimpl
    def register_channels(self) -> list[Channel]:
        return list(self.channels.values())


def _config() -> Any:
    raw = load_raw_config()
    raw["service"]["max_escalation_level"] = MAX_ESCALATION_LEVEL
    return example_config(raw)


class NoDeadEnds(RuleBasedStateMachine):
    """The service as a state machine; the database is the state, checked after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="invariants-"))
        self.providers = Providers()
        self.harness = self.run(self._start())
        self.config = self.harness.config
        self.counter = 0
        self.inbound: list[dict[str, Any]] = []  # every message ingested, for duplicates
        self.sender_of: dict[int, dict[str, Any]] = {}  # conversation id -> a message its contact sent
        self.taken: set[str] = set()  # calls answered live
        self.failed_calls: dict[int, list[str]] = {}  # conversation id -> failed call-backs since last reached

    async def _start(self) -> CoreHarness:
        harness = CoreHarness(self.folder / "data", plugins=[self.providers], config=_config())
        return await harness.__aenter__()

    def teardown(self) -> None:
        try:
            self.run(self.harness.__aexit__(None, None, None))
        finally:
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return self.run(self.harness.rows(sql, params))

    def now(self) -> Any:
        return self.harness.clock.now()

    def next_id(self) -> int:
        self.counter += 1
        return self.counter

    def conversations(self) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM conversations ORDER BY id")

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        return {table: sorted((tuple(r.values()) for r in self.rows(f"SELECT * FROM {table}")), key=repr)
                for table in TABLES}

    def pick(self, items: list[Any], index: int) -> Any:
        return items[index % len(items)]

    def message(self, channel: str, sender: int, text: int, *, kind: str = "message", topic: int = 0) -> dict[str, Any]:
        """A canonical inbound message as the channel's plugin would hand it over."""
        n = self.next_id()
        if channel == "webform":
            return {"channel": "webform", "channel_message_id": f"form:{n}",
                    "sender": {"kind": "email", "address": EMAILS[sender], "display_name": "Erika Mustermann"},
                    "text": TEXTS[text], "topic": TOPICS[topic], "language": "de",
                    "address": {"street": "Lindenweg 3", "postcode": "12345", "city": "Musterstadt"}}
        if channel == "email":
            mail_id = f"<{n}@mail.example.net>"
            return {"channel": "email", "channel_message_id": mail_id,
                    "sender": {"kind": "email", "address": EMAILS[sender]}, "recipient": "service@example.org",
                    "unit_hint": "kundenservice", "subject": "Anfrage", "text": TEXTS[text], "thread": {"refs": []},
                    "thread_keys": [mail_id]}
        if channel == "whatsapp":
            return {"channel": "whatsapp", "channel_message_id": f"wamid.{n}",
                    "sender": {"kind": "phone", "address": PHONES[sender], "display_name": "Max"},
                    "recipient": "109876543210", "text": TEXTS[text]}
        message: dict[str, Any] = {"channel": "phone", "channel_message_id": f"SM{n:032d}", "kind": kind,
                                   "sender": {"kind": "phone", "address": PHONES[sender]}, "recipient": "+4930123456"}
        if kind != "missed_call":
            message["text"] = TEXTS[text]
        return message

    def ingest(self, message: dict[str, Any]) -> None:
        """Ingest, and check what the message did against what its conversation was before."""
        before = {c["id"]: c for c in self.conversations()}
        # A person's message that is the first of a person in a conversation a machine's message
        # opened is acknowledged unless an acknowledgement, answer or call-back SMS (each with
        # the case reference) reached them on its channel.
        persons_before = {r["conversation_id"] for r in self.rows(
            "SELECT DISTINCT conversation_id FROM messages WHERE direction = 'in' AND kind NOT IN ('reaction', 'edit',"
            " 'deletion') AND (payload IS NULL OR COALESCE(json_extract(payload, '$.ack_suppressed'), '') NOT IN"
            f" ({', '.join(repr(a) for a in sorted(AUTOMATED))}))")}
        reached_before = {(r["conversation_id"], r["channel"]) for r in self.rows(
            "SELECT DISTINCT m.conversation_id, o.channel FROM messages m JOIN outbox o ON o.message_id = m.id"
            " WHERE m.direction = 'out' AND m.kind IN ('ack', 'reply', 'callback_sms') AND o.state = 'sent'")}
        acks_before = {r["id"] for r in self.rows("SELECT id FROM messages WHERE kind = 'ack'")}
        result = self.run(self.harness.core.ingest(message))
        self.inbound.append(message)
        assert not result.duplicate
        if message.get("kind") in ANNOTATIONS:
            assert not result.acknowledged and not result.opened
            assert {c["id"]: c for c in self.conversations()} == before, "a reaction or edit changes no conversation"
            return
        assert result.conversation_id is not None, "an inbound message must belong to a conversation"
        self.sender_of.setdefault(result.conversation_id, message)
        conv = self.rows("SELECT * FROM conversations WHERE id = ?", (result.conversation_id,))[0]
        prior = before.get(result.conversation_id)
        machine = bool(message.get("ack_suppressed"))
        reachable = message["sender"]["kind"] != "anonymous"
        new_acks = self.rows(
            "SELECT m.id, m.conversation_id, o.channel, o.to_kind, o.to_address FROM messages m"
            " JOIN outbox o ON o.message_id = m.id WHERE m.kind = 'ack' AND m.created_at = ?", (iso(self.now()),))
        new_acks = [a for a in new_acks if a["id"] not in acks_before]
        opens = prior is None or prior["state"] == "closed" or (
            prior["state"] in ("waiting", "answered", "acknowledged") and prior["id"] not in persons_before
            and (prior["id"], message["channel"]) not in reached_before)  # opened by a machine's message
        if opens and not machine and reachable:
            assert len(new_acks) == 1, f"a person's message that opens a conversation gets one acknowledgement: {new_acks}"
            (ack,) = new_acks
            assert ack["conversation_id"] == conv["id"] and ack["channel"] == message["channel"]
            assert (ack["to_kind"], ack["to_address"]) == (message["sender"]["kind"], message["sender"]["address"])
        else:
            assert new_acks == [], f"no acknowledgement for a follow-up, a machine's message or an unreachable sender: {new_acks}"
        if not machine:
            # A person's message: its conversation waits for an answer, with a new deadline unless
            # it waited already (a follow-up is covered by the deadline it had).
            assert conv["state"] in AWAITING, conv
            if prior is None or prior["state"] not in AWAITING:
                assert parse_iso(conv["deadline"]) >= self.now()
        elif prior is not None:
            # A machine's message changes nothing in the conversation it joins.
            for column in ("state", "deadline", "escalate_at", "escalation_level", "unit", "closed_at"):
                assert conv[column] == prior[column], (column, prior, conv)
        else:
            assert conv["state"] == "waiting" and conv["deadline"] is None

    # ------------------------------------------------------------------ inbound

    @rule(channel=st.sampled_from(("webform", "email", "whatsapp", "phone")), sender=st.integers(0, 2),
          text=st.integers(0, len(TEXTS) - 1), topic=st.integers(0, len(TOPICS) - 1))
    def new_message(self, channel: str, sender: int, text: int, topic: int) -> None:
        self.ingest(self.message(channel, sender, text, topic=topic))

    @rule(kind=st.sampled_from(("missed_call", "voicemail", "call")), sender=st.integers(0, 3), text=st.integers(0, 3),
          topic=st.sampled_from((None,) + TOPICS))
    def phone_call(self, kind: str, sender: int, text: int, topic: str | None) -> None:
        if sender == 3:  # a withheld number: nobody to acknowledge, still owned
            n = self.next_id()
            message = {"channel": "phone", "channel_message_id": f"CA{n:032d}", "kind": kind,
                       "sender": {"kind": "anonymous", "address": f"anonymous:CA{n}"}, "flags": ["no_number"]}
        else:
            message = self.message("phone", sender, text, kind=kind)
        if topic:  # chosen in the phone menu
            message["topic"] = topic
        self.ingest(message)

    @precondition(lambda self: self.sender_of)
    @rule(index=st.integers(0, 100), text=st.integers(0, len(TEXTS) - 1))
    def follow_up(self, index: int, text: int) -> None:
        """The contact of a conversation writes again, the way its channel ties it to the case."""
        conversation_id = self.pick(sorted(self.sender_of), index)
        first = self.sender_of[conversation_id]
        (conv,) = self.rows("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        n = self.next_id()
        if conv["channel"] == "webform":  # on the case's status page: a form session with its token
            message = {"channel": "webform", "channel_message_id": f"status:{n}", "kind": "message",
                       "sender": {"kind": "webform", "address": f"status:{conversation_id}"}, "text": TEXTS[text],
                       "thread": {"status_token": conv["status_token"]}}
        elif conv["channel"] == "email":  # an answer to our last mail, with the case in the subject
            refs = [r["key"] for r in self.rows(
                "SELECT COALESCE(provider_id, channel_message_id) AS key FROM messages WHERE conversation_id = ?"
                " AND channel = 'email' AND COALESCE(provider_id, channel_message_id) IS NOT NULL ORDER BY id",
                (conversation_id,))]
            mail_id = f"<{n}@mail.example.net>"
            message = {**first, "channel_message_id": mail_id, "thread_keys": [mail_id], "thread": {"refs": refs},
                       "subject": f"Re: [#{conv['case_reference']}] Anfrage", "text": TEXTS[text]}
            message.pop("ack_suppressed", None)
        else:  # a chat: the same number writes again
            prefix = "wamid." if conv["channel"] == "whatsapp" else "SM"
            message = {**first, "channel_message_id": f"{prefix}{n:032d}", "kind": "message", "text": TEXTS[text]}
            if message["sender"]["kind"] == "anonymous":
                return
            message.pop("flags", None)
        self.ingest(message)

    @precondition(lambda self: self.inbound)
    @rule(index=st.integers(0, 100), kind=st.sampled_from(("reaction", "edit", "deletion")))
    def annotation(self, index: int, kind: str) -> None:
        """A chat's reaction, edit or deletion of an earlier message of the sender."""
        chats = [m for m in self.inbound if m["channel"] == "whatsapp" and m.get("kind", "message") == "message"]
        if not chats:
            return
        target = self.pick(chats, index)
        message = {"channel": "whatsapp", "channel_message_id": f"wamid.{self.next_id()}", "kind": kind,
                   "sender": target["sender"], "target_message_id": target["channel_message_id"]}
        if kind == "reaction":
            message["meta"] = {"emoji": "\N{THUMBS UP SIGN}"}
        elif kind == "edit":
            message["text"] = "Korrektur: Lindenweg 5"
        self.ingest(message)

    @precondition(lambda self: self.inbound)
    @rule(index=st.integers(0, 100))
    def call_taken(self, index: int) -> None:
        """A call put through and picked up: the caller spoke with someone of ours."""
        calls = [m for m in self.inbound if m["channel"] == "phone" and m.get("kind") == "call"
                 and m["channel_message_id"] not in self.taken]
        if not calls:
            return
        call = self.pick(calls, index)
        self.taken.add(call["channel_message_id"])
        (stored,) = self.rows("SELECT conversation_id FROM messages WHERE channel = 'phone' AND channel_message_id = ?",
                              (call["channel_message_id"],))
        (before,) = self.rows("SELECT * FROM conversations WHERE id = ?", (stored["conversation_id"],))
        assert self.run(self.harness.core.record_live_answer("phone", call["channel_message_id"], "Rückruf: erreicht"))
        self.failed_calls.pop(stored["conversation_id"], None)
        (after,) = self.rows("SELECT * FROM conversations WHERE id = ?", (stored["conversation_id"],))
        if before["state"] in AWAITING:
            assert after["state"] == "answered"
        again = self.snapshot()
        self.run(self.harness.core.record_live_answer("phone", call["channel_message_id"], "Rückruf: erreicht"))
        assert self.snapshot() == again, "the provider's retry of a live answer changes nothing"

    @precondition(lambda self: self.inbound)
    @rule(index=st.integers(0, 100))
    def same_message_again(self, index: int) -> None:
        """A provider delivers a message again: answered as before, nothing changes."""
        message = self.pick(self.inbound, index)
        before = self.snapshot()
        result = self.run(self.harness.core.ingest(message))
        assert result.duplicate
        assert self.snapshot() == before, "a message delivered again must change nothing"

    @rule(sender=st.integers(0, 2), index=st.integers(0, 100), to_ours=st.booleans())
    def auto_reply(self, sender: int, index: int, to_ours: bool) -> None:
        """An out-of-office note: on its own, or in answer to a mail we sent."""
        message = self.message("email", sender, 3)
        message.update(ack_suppressed="auto-reply", subject="Abwesenheitsnotiz", text="Ich bin bis Montag nicht im Büro.")
        sent = self.rows("SELECT provider_id FROM outbox WHERE channel = 'email' AND provider_id IS NOT NULL"
                         " AND kind IN ('ack', 'reply') ORDER BY id")
        if to_ours and sent:
            message["thread"] = {"refs": [self.pick(sent, index)["provider_id"]]}
        self.ingest(message)

    # ------------------------------------------------------------------ staff

    def api(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        status, body = self.run(self.harness.api(method, path, **kwargs))
        assert status < 500, (path, status, body)
        return status, body

    @precondition(lambda self: self.sender_of)
    @rule(index=st.integers(0, 100))
    def staff_reply(self, index: int) -> None:
        self.staff_action(index, "reply")

    @precondition(lambda self: self.sender_of)
    @rule(index=st.integers(0, 100), outcome=st.sampled_from(("reached", "not_reached", "not_reached", "wrong_number")))
    def staff_calls_back(self, index: int, outcome: str) -> None:
        self.staff_action(index, outcome)

    @precondition(lambda self: self.sender_of)
    @rule(index=st.integers(0, 100), action=st.sampled_from(("note", "wait", "close", "reopen", "assign")))
    def staff_action_rule(self, index: int, action: str) -> None:
        self.staff_action(index, action)

    def staff_action(self, index: int, action: str) -> None:
        conversation_id = self.pick(sorted(self.sender_of), index)
        (before,) = self.rows("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        base = f"/api/v1/conversations/{conversation_id}"
        if action == "reply":
            status, _ = self.api("POST", f"{base}/replies", json={"text": "Wir kümmern uns darum."})
            assert status == 201
        elif action == "note":
            status, _ = self.api("POST", f"{base}/notes", json={"text": "Rückruf vereinbart"})
            assert status == 201
        elif action == "assign":
            status, _ = self.api("POST", f"{base}/assign", json={"assignee": "Frau Schmidt"})
            assert status == 200
        elif action in ("wait", "close", "reopen"):
            status, body = self.api("POST", f"{base}/{action}")
            refused = {"wait": before["state"] == "closed", "close": before["state"] == "closed",
                       "reopen": before["state"] not in ("closed", "waiting")}[action]
            assert status == (409 if refused else 200), (action, before["state"], status, body)
            (after,) = self.rows("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
            if action == "reopen" and not refused:
                assert after["state"] in AWAITING and after["escalation_level"] == 0
                assert after["deadline"] == iso(deadline_for(self.config, after["unit"], self.now()))
        else:
            status, body = self.api("POST", f"{base}/callbacks", json={"outcome": action, "note": None})
            assert status == 201, body
            (after,) = self.rows("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
            if action == "reached":
                self.failed_calls.pop(conversation_id, None)
                if before["state"] in AWAITING + ("answered",):
                    assert after["state"] == "answered", "a call-back that reached the person answers the conversation"
            else:
                # The duty escalates after callback_attempts failed attempts since the person
                # was last reached, or at a wrong number; not before.
                round_ = self.failed_calls.setdefault(conversation_id, [])
                round_.append(action)
                if body["escalated"]:
                    assert "wrong_number" in round_ or len(round_) >= CALLBACK_ATTEMPTS, (round_, body)

    @precondition(lambda self: self.sender_of)
    @rule(index=st.integers(0, 100), unit=st.sampled_from(("kundenservice", "vertrieb", "bauhotline", "stoerung",
                                                            "tiefbau-muster")))
    def transfer(self, index: int, unit: str) -> None:
        conversation_id = self.pick(sorted(self.sender_of), index)
        (before,) = self.rows("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        status, body = self.api("POST", f"/api/v1/conversations/{conversation_id}/transfer",
                                json={"unit": unit, "reason": "zuständig"})
        if before["unit"] == unit:
            assert status == 409, body
            return
        assert status == 200, body
        (after,) = self.rows("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        assert after["unit"] == unit and after["state"] == before["state"]
        if before["state"] in AWAITING:  # new owner, new deadline, escalations counted afresh
            assert after["deadline"] == iso(deadline_for(self.config, unit, self.now()))
            assert after["escalate_at"] == after["deadline"] and after["escalation_level"] == 0
        told = self.rows("SELECT o.to_address FROM outbox o WHERE o.conversation_id = ? AND o.kind = 'notification'"
                         " ORDER BY o.id DESC LIMIT 1", (conversation_id,))
        assert told and told[0]["to_address"] == self.config.units[unit].notify, "the new owner is told"

    # ------------------------------------------------------------------ outbox, providers, time

    @rule(channel=st.sampled_from(("email", "whatsapp", "phone")), mode=st.sampled_from(PROVIDER_MODES))
    def provider_behaves(self, channel: str, mode: str) -> None:
        self.providers.channels[channel].mode = mode

    @rule()
    def run_outbox(self) -> None:
        replies = {r["id"]: r for r in self.rows(
            "SELECT o.id, o.conversation_id, o.message_id, o.channel, c.state FROM outbox o"
            " JOIN conversations c ON c.id = o.conversation_id WHERE o.kind = 'reply' AND o.state = 'pending'"
            " AND o.primary_delivery = 1")}
        self.run(self.harness.run_outbox(rounds=50))
        assert self.rows("SELECT id FROM outbox WHERE state = 'sending'") == [], "no row is left sending after a run"
        # A reply that went out and counts as delivered answers a conversation that waited for it,
        # unless the resident wrote again after the latest answer that arrived (then it waits
        # again, with a deadline). A later answer that failed for good is left out: whether it
        # failed while the conversation counted as answered (which it then undoes) is a matter
        # of the order in which the outcomes came in.
        delivered: dict[int, int] = {}
        for row in self.rows("SELECT o.id, o.conversation_id, o.message_id, o.channel, o.delivery_status FROM outbox o"
                             " WHERE o.kind = 'reply' AND o.state = 'sent' ORDER BY o.message_id"):
            if row["delivery_status"] in ("delivered", "read") or not self.receipts(row["channel"]):
                delivered[row["conversation_id"]] = row["message_id"]
        for conversation_id in {r["conversation_id"] for r in replies.values() if r["state"] in AWAITING}:
            latest = delivered.get(conversation_id)
            if latest is None or not any(r["conversation_id"] == conversation_id and r["message_id"] <= latest
                                         for r in replies.values()):
                continue  # none of the answers that waited before this run arrived
            (conv,) = self.rows("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
            lost = self.rows("SELECT 1 FROM messages m WHERE m.conversation_id = ? AND m.kind = 'reply' AND m.id > ?"
                             " AND m.delivery_status = 'failed'", (conversation_id, latest))
            if lost:
                continue
            if self.person_wrote_after(conversation_id, latest):
                assert conv["state"] in AWAITING and conv["deadline"] is not None, conv
            else:
                assert conv["state"] == "answered", ("a delivered answer answers the conversation", conv)

    def receipts(self, channel: str) -> bool:
        return self.harness.core.channels[channel].capabilities.delivery_receipts

    def person_wrote_after(self, conversation_id: int, message_id: int) -> bool:
        return bool(self.rows(
            "SELECT 1 FROM messages WHERE conversation_id = ? AND id > ? AND direction = 'in'"
            " AND kind NOT IN ('reaction', 'edit', 'deletion') AND (payload IS NULL"
            " OR json_extract(payload, '$.ack_suppressed') IS NULL)", (conversation_id, message_id)))

    @precondition(lambda self: self.sender_of)
    @rule(index=st.integers(0, 100), status=st.sampled_from(("delivered", "read", "failed", "failed-temporary")))
    def provider_reports(self, index: int, status: str) -> None:
        """A provider's status callback for one of its sends."""
        sent = self.rows("SELECT id, channel, provider_id FROM outbox WHERE provider_id IS NOT NULL"
                         " AND channel != 'webform' ORDER BY id")
        if not sent:
            return
        row = self.pick(sent, index)
        update = DeliveryUpdate(provider_id=row["provider_id"], status=status.split("-")[0],
                                permanent=status != "failed-temporary", error_code="30003" if "failed" in status else None)
        self.run(self.harness.core.record_delivery(row["channel"], update))

    @precondition(lambda self: self.sender_of)
    @rule(index=st.integers(0, 100), status=st.sampled_from(("delivered", "read", "sent")), given_up=st.booleans())
    def provider_reports_a_send_it_took(self, index: int, status: str, given_up: bool) -> None:
        """A status naming a row's idempotency key with an id of its own: the provider took a
        send of it whose answer never came (WhatsApp and Twilio statuses carry the key), also
        one the outbox has given up on since (``given_up``: one of those), or one it refused later."""
        rows = self.rows("SELECT * FROM outbox WHERE channel != 'webform'" + (" AND state = 'failed'" if given_up else "")
                         + " ORDER BY id")
        if not rows:
            return
        row = self.pick(rows, index)
        update = DeliveryUpdate(provider_id=f"took-{self.next_id()}", status=status, idempotency_key=row["idempotency_key"])
        self.run(self.harness.core.record_delivery(row["channel"], update))
        (after,) = self.rows("SELECT * FROM outbox WHERE id = ?", (row["id"],))
        reached = status != "sent" or not self.receipts(row["channel"])
        if row["state"] == "failed" and reached:
            # It reached the person after all: recorded so, and nothing of it is sent again.
            assert (after["state"], after["provider_id"]) == ("sent", update.provider_id), after
            assert self.rows("SELECT id FROM outbox WHERE message_id = ? AND id > ? AND primary_delivery = ?"
                             " AND state = 'pending'", (row["message_id"], row["id"], row["primary_delivery"])) == []
            if row["conversation_id"] is not None and row["kind"] != "notification":
                (conv,) = self.rows("SELECT * FROM conversations WHERE id = ?", (row["conversation_id"],))
                if "undeliverable" in json.loads(conv["flags"]):
                    assert self.rows(
                        "SELECT 1 FROM messages m WHERE m.conversation_id = ? AND m.kind IN ('ack', 'reply', 'callback_sms')"
                        " AND m.delivery_status = 'failed' AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = m.id"
                        " AND o.state != 'failed') AND NOT EXISTS (SELECT 1 FROM messages c WHERE c.conversation_id ="
                        " m.conversation_id AND c.kind = 'callback' AND c.id > m.id)", (conv["id"],)), (
                        "flagged undeliverable, though everything reached the person", conv)
        elif row["state"] == "pending":
            assert after["state"] == "sent", "a send the provider took is not made again"

    @rule(minutes=st.sampled_from((1, 20, 90, 240, 60 * 17, 60 * 24, 60 * 24 * 3, 60 * 24 * 16)))
    def time_passes(self, minutes: int) -> None:
        self.harness.clock.advance(timedelta(minutes=minutes))

    @rule()
    def escalation_pass(self) -> None:
        self.run(self.harness.escalate())
        now = iso(self.now())
        left = self.rows(
            "SELECT * FROM conversations c WHERE state IN ('open', 'acknowledged') AND escalate_at <= ?"
            " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.conversation_id = c.id AND o.kind = 'reply'"
            " AND o.state IN ('pending', 'sending'))", (now,))
        assert left == [], "an owner who stays silent past the deadline is escalated, never left"

    # ------------------------------------------------------------------ invariants

    @invariant()
    def every_conversation_is_owned_and_timed(self) -> None:
        for conv in self.conversations():
            assert conv["unit"] in self.config.units, conv
            assert 0 <= conv["escalation_level"] <= MAX_ESCALATION_LEVEL, conv
            if conv["state"] in AWAITING:
                assert conv["deadline"] is not None, ("a conversation waiting for an answer has a deadline", conv)
                assert conv["escalate_at"] is not None or conv["escalation_level"] >= MAX_ESCALATION_LEVEL, conv
            else:
                assert conv["deadline"] is None and conv["escalate_at"] is None, (
                    "a conversation that waits for no answer has no deadline", conv)

    @invariant()
    def answered_means_a_human_answer_arrived(self) -> None:
        for conv in self.rows("SELECT * FROM conversations WHERE state = 'answered'"):
            assert conv["answered_at"] and conv["first_answered_at"]
            reached = self.rows("SELECT 1 FROM messages WHERE conversation_id = ? AND kind = 'callback'", (conv["id"],))
            # A reply that went out; one a provider reported failed for now is sent again, and
            # the conversation waits for an answer again only if that fails for good.
            delivered = [r for r in self.rows(
                "SELECT channel, state, delivery_status FROM outbox WHERE conversation_id = ? AND kind = 'reply'"
                " AND (state = 'sent' OR (state = 'pending' AND provider_id IS NOT NULL))", (conv["id"],))
                if r["state"] == "pending" or r["delivery_status"] in ("delivered", "read") or not self.receipts(r["channel"])]
            assert reached or delivered, ("answered without a delivered answer or a call-back that reached", conv)

    @invariant()
    def every_message_is_stored_once_and_filed(self) -> None:
        assert self.rows("SELECT channel, channel_message_id FROM messages WHERE channel_message_id IS NOT NULL"
                         " GROUP BY channel, channel_message_id HAVING COUNT(*) > 1") == []
        assert self.rows("SELECT id FROM messages WHERE direction = 'in' AND conversation_id IS NULL"
                         " AND kind NOT IN ('reaction', 'edit', 'deletion')") == []

    @invariant()
    def a_person_who_wrote_was_acknowledged(self) -> None:
        """A conversation a person's message opened has its acknowledgement (queued or gone)."""
        for conv in self.rows(
            "SELECT c.id, m.payload, i.kind FROM conversations c JOIN messages m ON m.id = (SELECT MIN(id) FROM messages"
            " WHERE conversation_id = c.id AND direction = 'in') JOIN identities i ON i.contact_id = m.contact_id"
            " WHERE NOT EXISTS (SELECT 1 FROM messages a WHERE a.conversation_id = c.id AND a.kind = 'ack')"
        ):
            payload = json.loads(conv["payload"] or "{}")
            assert payload.get("ack_suppressed") or conv["kind"] == "anonymous", ("nobody acknowledged", conv)

    @invariant()
    def an_answer_that_reached_nobody_is_flagged(self) -> None:
        """An acknowledgement or answer whose every delivery failed leaves a call-back to make
        (or the conversation was closed, or a call-back reached the person since)."""
        for row in self.rows(
            "SELECT m.id, m.conversation_id, m.kind FROM messages m WHERE m.kind IN ('ack', 'reply') AND EXISTS"
            " (SELECT 1 FROM outbox o WHERE o.message_id = m.id) AND NOT EXISTS (SELECT 1 FROM outbox o"
            " WHERE o.message_id = m.id AND o.state != 'failed')"
        ):
            (conv,) = self.rows("SELECT * FROM conversations WHERE id = ?", (row["conversation_id"],))
            reached = self.rows("SELECT 1 FROM messages WHERE conversation_id = ? AND kind = 'callback' AND id > ?",
                                (conv["id"], row["id"]))
            flags = set(json.loads(conv["flags"]))
            assert "undeliverable" in flags or reached or conv["state"] == "closed", (
                "nothing reached the person and nobody is told to call back", row, conv)


    @invariant()
    def open_means_the_acknowledgement_is_not_out_yet(self) -> None:
        for conv in self.rows(
            "SELECT c.* FROM conversations c WHERE c.state = 'open' AND EXISTS (SELECT 1 FROM outbox o WHERE o.message_id ="
            " (SELECT MAX(id) FROM messages WHERE conversation_id = c.id AND kind = 'ack') AND o.state = 'sent')"
        ):
            raise AssertionError(("its acknowledgement went out, yet the conversation is open", conv))

    @invariant()
    def a_call_back_to_make_stays_on_the_list(self) -> None:
        """A missed call or a voicemail is a call-back to make until one reaches the person or
        the conversation is closed."""
        for row in self.rows(
            "SELECT c.*, m.id AS message_id, m.created_at AS called_at FROM conversations c JOIN messages m"
            " ON m.id = (SELECT MAX(id) FROM messages WHERE conversation_id = c.id AND direction = 'in'"
            " AND kind IN ('missed_call', 'voicemail'))"
        ):
            reached = self.rows("SELECT 1 FROM messages WHERE conversation_id = ? AND kind = 'callback' AND id > ?",
                                (row["id"], row["message_id"]))
            closed = self.rows("SELECT 1 FROM events WHERE conversation_id = ? AND kind = 'closed' AND at >= ?",
                               (row["id"], row["called_at"]))
            if not reached and not closed:
                assert "callback_required" in json.loads(row["flags"]), ("a call-back to make is not listed", row)

    @invariant()
    def an_owner_not_told_is_shown(self) -> None:
        """The latest notification to a conversation's owner failed: flagged
        ``owner_not_notified``; it went: not (the owner was told)."""
        for row in self.rows(
            "SELECT c.id, c.flags, o.state FROM conversations c JOIN outbox o ON o.id = (SELECT MAX(id) FROM outbox"
            " WHERE conversation_id = c.id AND kind = 'notification')"
        ):
            flagged = "owner_not_notified" in json.loads(row["flags"])
            if row["state"] == "failed":
                assert flagged, row
            elif row["state"] == "sent":
                assert not flagged, row

    @invariant()
    def every_escalation_tells_the_new_owner(self) -> None:
        for escalation in self.rows("SELECT * FROM escalations"):
            assert escalation["to_unit"] in self.config.units
            assert escalation["level"] <= MAX_ESCALATION_LEVEL
            told = self.rows(
                "SELECT 1 FROM outbox WHERE conversation_id = ? AND kind = 'notification' AND to_address = ?"
                " AND created_at = ?", (escalation["conversation_id"], self.config.units[escalation["to_unit"]].notify,
                                        escalation["at"]))
            assert told, ("an escalation nobody was told of", escalation)


def test_no_dead_ends() -> None:
    """Fixed sequences (derandomized), each step checked; a failure prints its steps. Shrinking
    is left out: with a service behind each step it would outlast the suite's timeout."""
    run_state_machine_as_test(
        NoDeadEnds,
        settings=settings(max_examples=40, stateful_step_count=40, deadline=None, derandomize=True, database=None,
                          phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck)),
    )
