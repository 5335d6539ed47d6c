"""The core service: the one object channels and the inbox API act through.

It ties configuration, store, plugins and channels together: ``ingest`` for inbound messages,
``record_delivery`` for provider statuses, and the staff actions (reply, note, assign,
transfer, close, reopen, call-backs, merge). Each write is one unit of work in the store's
group commit; plugin event hooks run after the commit and never undo it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pluggy

from . import idempotency, identity, tracking
from .channel import ENDINGS, Channel, DeliveryUpdate, StorageUnavailable
from .clock import Clock
from .config import Config
from .context import IngestResult
from .hookspecs import hookimpl
from .ingest import ANNOTATIONS, Prepared, ingest_tx, prepare
from .metrics import Metrics
from .models import Customer, CustomerClaim, RoutingDecision
from .outbox import OutboxWorker, apply_delivery_update
from .plugins import call_all, call_first, has_implementations
from .settings import positive_int
from .store.sqlite import SQLiteStore, iso
from .templates import Templates

log = logging.getLogger("contact_router.core")

HOOK_SECONDS = 10.0
"""How long the core waits for each implementation of a plugin hook: a CRM or routing service
that hangs costs a message, a staff reply or the shutdown no more than this, and the other
implementations nothing."""

STATUS_PAGE_CHANNEL = "webform"
"""The channel whose plugin serves the residents' status pages (``/channels/webform/status/<token>``)."""

EVENT_FIELDS = {
    "conversation_routed": ("id", "case_reference", "unit", "channel", "deadline"),
    "conversation_escalated": ("id", "case_reference", "unit", "deadline"),
    "conversation_answered": ("id", "case_reference", "unit", "channel"),
}
"""The fields of the conversation each event hook gets, as its specification names them: never
the stored row, which holds the status page's secret token and the contact's internals."""


def event_conversation(hook: str, conversation: Mapping[str, Any]) -> dict[str, Any]:
    """The conversation as ``hook`` hands it to plugins (``EVENT_FIELDS``)."""
    return {field: conversation[field] for field in EVENT_FIELDS[hook]}


class ActionError(Exception):
    """A staff action that cannot be done in the conversation's current state (409/400)."""

    def __init__(self, code: str, message: str, status: int = 409, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.field = field


class DirectoryPlugin:
    """The built-in customer directory as a ``trylast`` ``lookup_customer`` implementation."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    @hookimpl(trylast=True)
    async def lookup_customer(self, claim: CustomerClaim) -> Customer | None:
        row = await self.store.fetchone(
            "SELECT * FROM customers WHERE customer_number = ?", (identity.directory_number(claim.customer_number),)
        )
        return identity.directory_match(row, claim) if row is not None else None


def _is_customer(value: Any) -> bool:
    """A ``Customer`` whose fields are what the store writes: text (or None where optional)."""
    return (
        isinstance(value, Customer)
        and isinstance(value.customer_number, str)
        and bool(value.customer_number.strip())
        and all(v is None or isinstance(v, str) for v in (value.name, value.email, value.phone, value.source))
    )


class Core:
    """Everything the service does, independent of HTTP."""

    def __init__(
        self,
        *,
        config: Config,
        store: SQLiteStore,
        pm: pluggy.PluginManager,
        clock: Clock,
        data_dir: Path,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.store = store
        self.pm = pm
        self.clock = clock
        self.data_dir = data_dir
        self.metrics = metrics
        self.templates = Templates(config.templates, config.default_language)
        self.channels: dict[str, Channel] = {}
        self.outbox: OutboxWorker | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._threads_by_sender: frozenset[str] = frozenset()
        self._other_chats: dict[str, tuple[str, ...]] = {}
        self._unverified_senders: frozenset[str] = frozenset()
        self._refresh_hook_flags()

    def _refresh_hook_flags(self) -> None:
        """Which optional hooks have implementations: the ingest path skips the others."""
        self._route_hook = has_implementations(self.pm, "route_message")
        self._received_hook = has_implementations(self.pm, "message_received")
        self._answered_hook = has_implementations(self.pm, "conversation_answered")
        self._escalated_hook = has_implementations(self.pm, "conversation_escalated")
        self._routed_hook = has_implementations(self.pm, "conversation_routed")

    def add_channels(self, channels: list[Channel]) -> None:
        """Serve ``channels`` (``plugins.collect_channels`` checked them: one of each name)."""
        for channel in channels:
            self.channels[channel.name] = channel
        self._threads_by_sender = frozenset(n for n, c in self.channels.items() if c.capabilities.threads_by_sender)
        self._other_chats = {n: tuple(sorted(self._threads_by_sender - {n})) for n in self._threads_by_sender}
        self._unverified_senders = frozenset(n for n, c in self.channels.items() if not c.capabilities.sender_verified)
        self._refresh_hook_flags()

    def status_url(self, token: str) -> str | None:
        """The resident's status page for a conversation's token; None while no web form channel
        is on to serve it (the link would answer 404: texts leave out the sentence that holds it)."""
        if STATUS_PAGE_CHANNEL not in self.channels:
            return None
        return f"{self.config.public_base_url}/channels/webform/status/{token}"

    def wake_outbox(self) -> None:
        if self.outbox is not None:
            self.outbox.wake.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _hook_failed(self, hook: str, plugin: str, exc: BaseException) -> None:
        """One implementation of a hook failed or ran out of time: logged and counted."""
        self.metrics.inc("contact_router_hook_errors_total", hook=hook)
        if isinstance(exc, TimeoutError):
            log.error("plugin %s: hook %s gave no answer within %g s", plugin, hook, HOOK_SECONDS)
        else:
            log.error("plugin %s: hook %s failed", plugin, hook, exc_info=exc)

    async def _fire(self, hook: str, **kwargs: Any) -> None:
        await call_all(self.pm, hook, timeout=HOOK_SECONDS, on_error=partial(self._hook_failed, hook), **kwargs)

    async def drain_background(self) -> None:
        """Wait for event hooks still running (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # ------------------------------------------------------------------ inbound

    async def ingest(self, message: dict[str, Any]) -> IngestResult:
        """Validate, store, route and acknowledge one inbound message in one commit."""
        now = self.clock.now()
        msg, identities, language, folded = prepare(message, config=self.config, now=now)
        customer = None
        if msg.get("customer_number"):
            customer = await self._lookup_customer(msg, identities)
        override = None
        if self._route_hook and msg["kind"] not in ANNOTATIONS:
            override = await self._route_override(msg, is_customer=customer is not None)
        channel = msg["channel"]
        # A channel vouches for its senders, unless this message says its sender may be forged
        # (an e-mail whose From domain failed DMARC at a mail server we trust).
        verified = channel not in self._unverified_senders and "unverified_sender" not in (msg.get("flags") or ())
        prep = Prepared(msg, identities, language, customer, override, channel in self._threads_by_sender, now, folded,
                        verified, self._other_chats.get(channel, ()))
        # The caller may go away (aiosmtpd cancels the handler of a client that hung up), but a
        # message queued is committed all the same: what follows the commit follows it then. The
        # provider's retry is a duplicate, which tells no plugin of the message.
        committed = self.store.submit(
            partial(ingest_tx, config=self.config, templates=self.templates, prep=prep, status_url=self.status_url),
            abandoned=partial(self._ingested, msg),
        )
        try:
            result = await committed
        except asyncio.CancelledError:
            if committed.done() and not committed.cancelled() and committed.exception() is None:
                self._ingested(msg, committed.result())  # committed, then cancelled before it resumed
            raise
        self._ingested(msg, result)
        return result

    def _ingested(self, msg: Mapping[str, Any], result: IngestResult) -> None:
        """What follows the commit of an inbound message: metrics, the outbox woken for its
        acknowledgement, and the event hooks (in the background)."""
        self.metrics.inc(
            "contact_router_messages_received_total", channel=msg["channel"], duplicate=str(result.duplicate).lower()
        )
        if result.acknowledged:
            self.metrics.inc("contact_router_acknowledgements_queued_total", channel=msg["channel"])
            self.wake_outbox()
        if not result.duplicate:
            if self._received_hook:
                self._spawn(self._fire("message_received", message=msg, result=result))
            if self._routed_hook and result.opened:
                conv = {"id": result.conversation_id, "case_reference": result.case_reference, "unit": result.unit,
                        "channel": msg["channel"], "deadline": iso(result.deadline)}
                self._spawn(self._fire("conversation_routed", conversation=conv, rule=result.rule, reason=result.reason))

    async def _route_override(self, msg: Mapping[str, Any], *, is_customer: bool) -> RoutingDecision | None:
        """A routing plugin's decision. One that fails, hangs or answers in the wrong shape is
        skipped and the next asked; when none decides, the configured rules route the message."""

        def accept(plugin: str, decision: Any) -> RoutingDecision | None:
            if not (isinstance(decision, RoutingDecision)
                    and all(isinstance(v, str) for v in dataclasses.astuple(decision))):
                raise TypeError(f"answered {decision!r:.200}, not a RoutingDecision with unit, rule and reason as text")
            if decision.unit not in self.config.units:
                log.warning("plugin %s: route_message returned unknown unit %r; ignored", plugin, decision.unit)
                return None
            return decision

        return await call_first(self.pm, "route_message", timeout=HOOK_SECONDS, accept=accept,
                                on_error=partial(self._hook_failed, "route_message"), message=msg, is_customer=is_customer)

    async def _lookup_customer(self, msg: Mapping[str, Any], identities: list[tuple[str, str]]) -> Customer | None:
        address = msg.get("address") or {}
        email = next((a for k, a in identities if k == "email"), None)
        phone = next((a for k, a in identities if k == "phone"), None)
        claim = CustomerClaim(
            customer_number=msg["customer_number"].strip(),
            name=msg["sender"].get("display_name"),
            email=email,
            phone=phone,
            street=address.get("street"),
            postcode=address.get("postcode"),
            city=address.get("city"),
        )

        def accept(plugin: str, customer: Any) -> Customer:
            if not _is_customer(customer):
                raise TypeError(f"answered {customer!r:.200}, not a Customer with its customer_number as text")
            return customer

        # A CRM that fails or hangs is skipped and the next asked (the built-in directory last);
        # when none confirms the number, it stays a claim.
        return await call_first(self.pm, "lookup_customer", timeout=HOOK_SECONDS, accept=accept,
                                on_error=partial(self._hook_failed, "lookup_customer"), claim=claim)

    async def _reply_copies(
        self, conversation: Mapping[str, Any], text: str, language: str | None, idents: list[Any]
    ) -> list[Mapping[str, str]]:
        """The further recipients the ``reply_copies`` plugins name (each ``{"channel", "to_kind",
        "to"}``). A plugin that fails, hangs or answers something else costs the reply only its
        own copies: the reply still goes out on the conversation's channel."""
        failed = partial(self._hook_failed, "reply_copies")
        answers = await call_all(
            self.pm, "reply_copies", timeout=HOOK_SECONDS, on_error=failed, conversation=conversation,
            reply={"text": text, "language": language, "kind": "reply"},
            identities=[{"kind": i["kind"], "address": i["address"], "failed": bool(i["failed_at"])} for i in idents],
        )
        copies = []
        for answer in answers:
            if isinstance(answer, Sequence) and not isinstance(answer, str) and all(
                isinstance(c, Mapping) and isinstance(c.get("channel"), str) and isinstance(c.get("to"), str)
                and isinstance(c.get("to_kind", ""), str) for c in answer
            ):
                copies.extend(answer)
            else:
                failed("a reply_copies plugin", TypeError(f"reply_copies must return a list of {{channel, to_kind, to}}, not {answer!r:.200}"))
        return copies

    async def record_delivery(self, channel: str, update: DeliveryUpdate) -> bool:
        """Apply a provider status callback; False when the provider id is not ours."""
        answered_on = self.outbox.answered_on_sent if self.outbox else frozenset()
        policy = self.outbox.policy if self.outbox else None
        known, answered = await self.store.write(
            lambda conn: apply_delivery_update(conn, channel, update, answered_on, self.channels, self.clock.now(), policy)
        )
        self.metrics.inc("contact_router_delivery_updates_total", channel=channel, status=update.status)
        if update.resend_hint or update.status == "failed":
            self.wake_outbox()
        if answered:
            await self.on_answered(answered)
        return known

    async def record_channel_event(self, channel: str, kind: str, data: Mapping[str, Any]) -> None:
        """A provider event outside any conversation (an error entry), kept in ``events``."""
        stamp = iso(self.clock.now())
        payload = json.loads(json.dumps(data, default=str))
        await self.store.write(lambda conn: tracking.record_event(conn, None, f"{channel}:{kind}", stamp, **{"data": payload}))
        self.metrics.inc("contact_router_channel_events_total", channel=channel, kind=kind)

    async def record_live_answer(self, channel: str, channel_message_id: str, note: str) -> bool:
        """Someone of ours spoke with the person live (a call put through and picked up): the
        conversation of the inbound message ``channel_message_id`` is answered, as after a
        call-back that reached them. False when no such message is stored. A provider's retry
        changes nothing: the answer is kept under the message's id and ``:answered``."""
        stamp = iso(self.clock.now())

        def work(conn: sqlite3.Connection) -> dict[str, Any] | None:
            inbound = conn.execute(
                "SELECT conversation_id, contact_id FROM messages WHERE channel = ? AND channel_message_id = ?",
                (channel, channel_message_id),
            ).fetchone()
            if inbound is None or inbound["conversation_id"] is None:
                return None
            return self._spoken_with(conn, inbound["conversation_id"], inbound["contact_id"], channel, note, stamp,
                                     key=f"{channel_message_id}:answered") or {}

        answered = await self.store.write(work)
        if answered:
            await self.on_answered(answered)
        return answered is not None

    def _spoken_with(
        self, conn: sqlite3.Connection, conversation_id: int, contact_id: int, channel: str, text: str, stamp: str,
        *, author: str | None = None, key: str | None = None,
    ) -> dict[str, Any] | None:
        """Someone of ours spoke with the person (a call-back that reached them, a call put
        through and taken): kept as a ``callback`` message, the call-back flags go (a later
        round of failed call-backs escalates again) and the conversation is answered. Returns
        what ``on_answered`` is told, or None when nothing changed: the conversation was
        answered already, or ``key`` (the message's id) was kept before, by a provider's retry."""
        cursor = conn.execute(
            "INSERT INTO messages (conversation_id, contact_id, direction, kind, channel, channel_message_id, author,"
            " text, delivery_status, created_at) VALUES (?, ?, 'out', 'callback', ?, ?, ?, ?, 'delivered', ?)"
            " ON CONFLICT DO NOTHING",
            (conversation_id, contact_id, channel, key, author, text, stamp),
        )
        if cursor.rowcount == 0:
            return None
        tracking.remove_flags(conn, conversation_id, ["callback_required", "undeliverable", "callback_failed"], stamp)
        if not tracking.mark_answered(conn, conversation_id, stamp):
            return None
        return {"conversation": dict(self._conversation(conn, conversation_id)),
                "message": {"id": cursor.lastrowid, "text": text, "channel": channel, "kind": "callback"}}

    async def on_answered(self, answered: dict[str, Any]) -> None:
        self.metrics.inc("contact_router_conversations_answered_total")
        if self._answered_hook:
            conversation = event_conversation("conversation_answered", answered["conversation"])
            self._spawn(self._fire("conversation_answered", conversation=conversation, message=answered["message"]))

    # ------------------------------------------------------------------ scheduler

    async def escalate_due(self) -> list[dict[str, Any]]:
        """One pass of the escalation scheduler."""
        now = self.clock.now()
        done = await self.store.write(lambda conn: tracking.escalate_due(conn, self.config, self.templates, now))
        if done:
            self.metrics.inc("contact_router_escalations_total", value=len(done))
            self.wake_outbox()
            if self._escalated_hook:
                for e in done:
                    self._spawn(self._fire("conversation_escalated",
                                           conversation=event_conversation("conversation_escalated", e["conversation"]),
                                           from_unit=e["from_unit"], to_unit=e["to_unit"], level=e["level"]))
        return done

    async def run_scheduler(self) -> None:
        while True:
            try:
                await self.escalate_due()
            except asyncio.CancelledError:
                raise
            except StorageUnavailable as exc:  # the store logged the cause; tried again next pass
                log.warning("escalation pass skipped: %s", exc)
            except ENDINGS:
                raise
            except BaseException:  # also one that is no Exception: a pass that fails stops no other
                log.exception("escalation pass failed")
            await asyncio.sleep(self.config.escalation_check_seconds)

    # ------------------------------------------------------------------ staff actions

    def _conversation(
        self, conn: sqlite3.Connection, conversation_id: int, units: Collection[str] | None = None
    ) -> sqlite3.Row:
        """The conversation as the write sees it; not found when it is not in ``units`` (the
        acting staff member's), checked here, in the write, since a transfer or an escalation
        may have moved it after the API looked."""
        row = conn.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None or (units is not None and row["unit"] not in units):
            raise ActionError("not_found", "conversation not found", 404)
        return row

    def _once(
        self, work: Callable[[sqlite3.Connection], dict[str, Any]], staff: str, key: str | None, fingerprint: str,
        now: datetime, kept: Callable[[dict[str, Any]], dict[str, Any]] = dict,
    ) -> Callable[[sqlite3.Connection], dict[str, Any]]:
        """``work`` as an action done once for its idempotency ``key``: the key's first answer
        (``kept`` of the result: what the caller is shown), recorded in the same transaction as
        what the action wrote, is given again (with ``idempotency.REPLAYED``) instead of doing
        it twice; ``fingerprint`` (``idempotency.fingerprint``) tells the same request from
        another. Without a key, ``work`` itself."""
        if key is None:
            return work

        def once(conn: sqlite3.Connection) -> dict[str, Any]:
            prior = self._replayed(conn, staff, key, fingerprint, now)
            if prior is not None:
                return prior
            result = work(conn)
            idempotency.remember(conn, staff, key, fingerprint, kept(result), now)
            return result

        return once

    @staticmethod
    def _replayed(conn: sqlite3.Connection, staff: str, key: str, fingerprint: str, now: datetime) -> dict[str, Any] | None:
        try:
            return idempotency.replayed(conn, staff, key, fingerprint, now)
        except idempotency.KeyReused as exc:
            raise ActionError("idempotency_key_reused", str(exc), 422, field=idempotency.HEADER) from None

    async def reply(
        self, conversation_id: int, text: str, staff: str, *, units: Collection[str] | None = None, key: str | None = None
    ) -> dict[str, Any]:
        """Queue a staff reply on the conversation's channel (and any ``reply_copies``); ``units``,
        as for every staff action: the units the staff member acts for (None: any); ``key``, the
        request's idempotency key (see ``_once``)."""
        now = self.clock.now()
        stamp = iso(now)

        fingerprint = idempotency.fingerprint("reply", conversation_id, {"text": text}) if key else ""
        if key is not None:  # a request sent again: answered before the reply_copies hooks run again
            prior = await self.store.write(lambda conn: self._replayed(conn, staff, key, fingerprint, now))
            if prior is not None:
                return prior

        def target(conn: sqlite3.Connection) -> tuple[sqlite3.Row, list[dict[str, str]]]:
            conv = self._conversation(conn, conversation_id, units)
            idents = [dict(r) for r in conn.execute(
                "SELECT kind, address, failed_at, last_inbound_at FROM identities WHERE contact_id = ? AND claimed <= ?"
                " ORDER BY last_inbound_at DESC",
                (conv["contact_id"], identity.claims_usable(self.channels.get(conv["channel"]))))]
            return conv, idents

        conv, idents = await self.store.write(target)
        channel = self.channels.get(conv["channel"])
        kinds = channel.capabilities.identity_kinds if channel else ()
        to = next((i for i in idents if i["kind"] in kinds and not i["failed_at"]), None) or next(
            (i for i in idents if i["kind"] in kinds), None
        )
        copies: list[Mapping[str, str]] = []
        if has_implementations(self.pm, "reply_copies"):
            conv_view = {"id": conv["id"], "case_reference": conv["case_reference"], "channel": conv["channel"],
                         "unit": conv["unit"], "status_url": self.status_url(conv["status_token"])}
            # A copy goes only where its channel can send to that kind of address (the phone
            # channel without Twilio, for a PBX's missed calls alone, sends no SMS), and never to
            # an address a provider refused for good (a number that answered STOP).
            refused = {(i["kind"], i["address"]) for i in idents if i["failed_at"]}
            copies = [c for c in await self._reply_copies(conv_view, text, conv["language"], idents)
                      if c["channel"] in self.channels and c["channel"] != conv["channel"]
                      and c.get("to_kind", c["channel"]) in self.channels[c["channel"]].capabilities.identity_kinds
                      and (c.get("to_kind", c["channel"]), c["to"]) not in refused]

        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            current = self._conversation(conn, conversation_id, units)
            message_id = conn.execute(
                "INSERT INTO messages (conversation_id, contact_id, direction, kind, channel, author, subject, text,"
                " language, delivery_status, created_at) VALUES (?, ?, 'out', 'reply', ?, ?, ?, ?, ?, 'queued', ?)",
                (conversation_id, current["contact_id"], current["channel"], staff,
                 f"[#{current['case_reference']}] {current['subject'] or ''}".strip(), text, current["language"], stamp),
            ).lastrowid
            if to is not None:
                tracking.add_outbox_row(conn, message_id=message_id, conversation_id=conversation_id, kind="reply",
                                        channel=current["channel"], to_kind=to["kind"], to=to["address"], now=stamp)
            else:
                conn.execute("UPDATE messages SET delivery_status = 'failed' WHERE id = ?", (message_id,))
                tracking.add_flags(conn, conversation_id, ["undeliverable", "callback_required"], stamp)
                tracking.record_event(conn, conversation_id, "undeliverable", stamp, reason="no address to reply to on this channel")
            for copy in copies:
                tracking.add_outbox_row(conn, message_id=message_id, conversation_id=conversation_id, kind="reply",
                                        channel=copy["channel"], to_kind=copy.get("to_kind", copy["channel"]),
                                        to=copy["to"], now=stamp, primary=False)
            tracking.record_event(conn, conversation_id, "reply_queued", stamp, actor=staff, message_id=message_id)
            return {"id": message_id, "conversation_id": conversation_id, "direction": "out", "kind": "reply",
                    "channel": current["channel"], "text": text, "author": staff, "created_at": stamp,
                    "delivery_status": "queued" if to is not None else "failed"}

        result = await self.store.write(self._once(work, staff, key, fingerprint, now))
        if not result.get(idempotency.REPLAYED):
            self.wake_outbox()
        return result

    async def note(
        self, conversation_id: int, text: str, staff: str, *, units: Collection[str] | None = None, key: str | None = None
    ) -> dict[str, Any]:
        now = self.clock.now()
        stamp = iso(now)

        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            current = self._conversation(conn, conversation_id, units)
            message_id = conn.execute(
                "INSERT INTO messages (conversation_id, contact_id, direction, kind, channel, author, text, created_at)"
                " VALUES (?, ?, 'internal', 'note', 'internal', ?, ?, ?)",
                (conversation_id, current["contact_id"], staff, text, stamp),
            ).lastrowid
            return {"id": message_id, "conversation_id": conversation_id, "direction": "internal", "kind": "note",
                    "channel": "internal", "text": text, "author": staff, "created_at": stamp, "delivery_status": None}

        fingerprint = idempotency.fingerprint("note", conversation_id, {"text": text}) if key else ""
        return await self.store.write(self._once(work, staff, key, fingerprint, now))

    async def assign(
        self, conversation_id: int, assignee: str | None, staff: str, *, units: Collection[str] | None = None
    ) -> None:
        stamp = iso(self.clock.now())

        def work(conn: sqlite3.Connection) -> None:
            self._conversation(conn, conversation_id, units)
            conn.execute("UPDATE conversations SET assignee = ?, updated_at = ? WHERE id = ?", (assignee, stamp, conversation_id))
            tracking.record_event(conn, conversation_id, "assigned", stamp, actor=staff, assignee=assignee)

        await self.store.write(work)

    async def transfer(
        self, conversation_id: int, unit: str, reason: str, staff: str, *, units: Collection[str] | None = None
    ) -> None:
        """Give the conversation to another unit: new deadline, new owner notified, history kept."""
        if unit not in self.config.units:
            raise ActionError("unknown_unit", f"unknown unit {unit!r}", 400)
        now = self.clock.now()
        stamp = iso(now)
        why = reason or f"Transferred by {staff}."

        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            conv = self._conversation(conn, conversation_id, units)
            if conv["unit"] == unit:
                raise ActionError("same_unit", "the conversation already belongs to that unit")
            waiting = conv["state"] in tracking.AWAITING_ANSWER
            deadline = iso(tracking.deadline_for(self.config, unit, now)) if waiting else None
            conn.execute(
                "UPDATE conversations SET unit = ?, routing_rule = 'transfer', routing_reason = ?, assignee = NULL,"
                " deadline = COALESCE(?, deadline), escalate_at = COALESCE(?, escalate_at),"
                " escalation_level = CASE WHEN ? IS NULL THEN escalation_level ELSE 0 END, updated_at = ? WHERE id = ?",
                (unit, why, deadline, deadline, deadline, stamp, conversation_id),
            )
            tracking.record_event(conn, conversation_id, "transferred", stamp, actor=staff, from_unit=conv["unit"], to_unit=unit, reason=why)
            updated = self._conversation(conn, conversation_id)
            # A case that waits for no answer (answered, waiting for the resident, closed) has no
            # deadline: its new owner was asked to answer "by -".
            template = self.templates.first_configured(*(("new_owner",) if waiting else ("new_owner_nothing_due", "new_owner")))
            tracking.queue_unit_notification(conn, self.config, self.templates, conversation=updated, unit_id=unit,
                                             template=template, now=now)
            return dict(updated)

        updated = await self.store.write(work)
        self.wake_outbox()
        if self._routed_hook:
            self._spawn(self._fire("conversation_routed", conversation=event_conversation("conversation_routed", updated),
                                   rule="transfer", reason=why))

    async def set_state(
        self, conversation_id: int, action: str, staff: str, *, units: Collection[str] | None = None
    ) -> None:
        """close, reopen, or wait (for the resident: no deadline while waiting)."""
        now = self.clock.now()
        stamp = iso(now)

        def work(conn: sqlite3.Connection) -> None:
            conv = self._conversation(conn, conversation_id, units)
            if action == "close":
                if conv["state"] == "closed":
                    raise ActionError("already_closed", "the conversation is closed already")
                conn.execute(
                    "UPDATE conversations SET state = 'closed', closed_at = ?, deadline = NULL, escalate_at = NULL,"
                    " updated_at = ? WHERE id = ?", (stamp, stamp, conversation_id))
                # Closed, nobody is to call back any more: off the list of call-backs to make.
                tracking.remove_flags(conn, conversation_id, ["callback_required"], stamp)
            elif action == "reopen":
                # A waiting conversation too: staff stop waiting for the resident, the deadline runs again.
                if conv["state"] not in ("closed", "waiting"):
                    raise ActionError("not_closed", "only a closed or waiting conversation can be reopened")
                tracking.renew_deadline(conn, self.config, conv, now)
            elif action == "wait":
                if conv["state"] == "closed":
                    raise ActionError("closed", "reopen the conversation first")
                conn.execute(
                    "UPDATE conversations SET state = 'waiting', deadline = NULL, escalate_at = NULL, updated_at = ?"
                    " WHERE id = ?", (stamp, conversation_id))
            tracking.record_event(conn, conversation_id, {"close": "closed", "reopen": "reopened", "wait": "waiting"}[action], stamp, actor=staff)

        await self.store.write(work)

    async def log_callback(
        self, conversation_id: int, outcome: str, note: str | None, staff: str, *, units: Collection[str] | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """A call-back attempt. ``reached`` answers the conversation; after too many failed
        attempts the duty escalates."""
        now = self.clock.now()
        stamp = iso(now)
        # Checked by the phone channel at start; it may be a string from the environment ("5").
        limit = positive_int(self.config.channels.get("phone") or {}, "callback_attempts", 3, "channels.phone")

        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            conv = self._conversation(conn, conversation_id, units)
            conn.execute(
                "INSERT INTO callback_attempts (conversation_id, outcome, note, staff, at) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, outcome, note, staff, stamp),
            )
            tracking.record_event(conn, conversation_id, "callback", stamp, actor=staff, outcome=outcome, note=note)
            answered = None
            escalated = None
            sms_queued = False
            if outcome == "reached":
                answered = self._spoken_with(conn, conversation_id, conv["contact_id"], "phone", note or "Call-back: reached",
                                             stamp, author=staff)
            else:
                # The failed attempts of this round: since someone of ours last spoke with the
                # person (after the last call-back that reached them, and not before a call
                # taken live). Counted over the conversation's life, a later round escalated at
                # its first failed attempt and its SMS never went. A wrong number counts
                # whenever staff found it.
                failed, wrong = conn.execute(
                    "SELECT COUNT(*) FILTER (WHERE id > COALESCE((SELECT MAX(id) FROM callback_attempts"
                    " WHERE conversation_id = ?1 AND outcome = 'reached'), 0) AND at >= COALESCE((SELECT MAX(created_at)"
                    " FROM messages WHERE conversation_id = ?1 AND kind = 'callback'), '')),"
                    " COUNT(*) FILTER (WHERE outcome = 'wrong_number') FROM callback_attempts"
                    " WHERE conversation_id = ?1 AND outcome != 'reached'",
                    (conversation_id,),
                ).fetchone()
                if outcome == "wrong_number" or failed >= limit:
                    already = "callback_failed" in json.loads(conv["flags"] or "[]")
                    tracking.add_flags(conn, conversation_id, ["callback_failed"], stamp)
                    # Once, when the call-backs have failed: each further failed attempt escalated
                    # again (six in a minute, past max_escalation_level).
                    if (not already and conv["state"] in tracking.AWAITING_ANSWER
                            and conv["escalation_level"] < self.config.max_escalation_level):
                        escalated = tracking.escalate(conn, self.config, self.templates, conv, now, cause="callbacks")
                # Never to a number staff found wrong, in this attempt or an earlier one: the
                # SMS carries the case's status link.
                if not wrong and failed == limit:
                    sms_queued = self._queue_callback_sms(conn, conv, stamp)
            return {"attempt": {"outcome": outcome, "note": note, "staff": staff, "at": stamp},
                    "answered": answered, "escalated": escalated, "sms_queued": sms_queued}

        def shown(result: dict[str, Any]) -> dict[str, Any]:
            return {"attempt": result["attempt"], "answered": bool(result["answered"]),
                    "escalated": bool(result["escalated"]), "sms_queued": result["sms_queued"]}

        fingerprint = idempotency.fingerprint("callback", conversation_id, {"outcome": outcome, "note": note}) if key else ""
        result = await self.store.write(self._once(work, staff, key, fingerprint, now, shown))
        if result.get(idempotency.REPLAYED):
            return result
        if result["answered"]:
            await self.on_answered(result["answered"])
        if result["escalated"] or result["sms_queued"]:
            self.wake_outbox()
        return result

    def _queue_callback_sms(self, conn: sqlite3.Connection, conv: sqlite3.Row, stamp: str) -> bool:
        """After the last failed call-back attempt, tell the person by SMS how to reach us."""
        if "phone" not in self.channels or not self.templates.has("callback_failed"):
            return False
        # A number merely named on a form serves form conversations only: the SMS carries the
        # status link.
        phone = conn.execute(
            "SELECT address FROM identities WHERE contact_id = ? AND kind = 'phone' AND claimed <= ?"
            " ORDER BY last_inbound_at DESC LIMIT 1",
            (conv["contact_id"], identity.claims_usable(self.channels.get(conv["channel"]))),
        ).fetchone()
        if phone is None:
            return False
        language = self.templates.language_for("callback_failed", conv["language"])
        text = self.templates.render(
            "callback_failed", language, case_reference=conv["case_reference"], status_url=self.status_url(conv["status_token"])
        )
        tracking.queue_outbound(
            conn, conversation_id=conv["id"], contact_id=conv["contact_id"], kind="callback_sms", channel="phone",
            to_kind="phone", to=phone["address"], text=text, language=language, now=stamp,
        )
        return True

    async def merge_contacts(
        self, survivor: int, other: int, staff: str, *, units: Collection[str] | None = None
    ) -> None:
        """Merge ``other`` into ``survivor``; with ``units``, only when every conversation of
        both is in them (checked in the write: a transfer may have moved one meanwhile)."""
        stamp = iso(self.clock.now())
        if survivor == other:
            raise ActionError("same_contact", "a contact cannot be merged with itself", 409)

        def work(conn: sqlite3.Connection) -> None:
            for cid in (survivor, other):
                row = conn.execute("SELECT merged_into FROM contacts WHERE id = ?", (cid,)).fetchone()
                seen = {r[0] for r in conn.execute("SELECT DISTINCT unit FROM conversations WHERE contact_id = ?", (cid,))}
                if row is None or (units is not None and not (seen and seen <= set(units))):
                    raise ActionError("not_found", f"contact {cid} not found", 404)
                if row[0] is not None:
                    raise ActionError("merged", f"contact {cid} was merged into {row[0]} already")
            identity.merge_contacts(conn, survivor, other, stamp)
            tracking.record_event(conn, None, "contacts_merged", stamp, actor=staff, survivor=survivor, merged=other)

        await self.store.write(work)

    async def import_customers(self, read_rows: Callable[[], Iterable[Mapping[str, str]]]) -> identity.CustomerImport:
        """Fill the customer directory in one transaction: all rows or, when reading them fails
        part-way (a file that is not UTF-8 further down), none. ``read_rows`` gives the rows
        from the start each time it is called, since a unit of work must be repeatable."""
        stamp = iso(self.clock.now())
        return await self.store.write(lambda conn: identity.import_customers(conn, read_rows(), stamp))
