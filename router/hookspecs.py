"""The plugin contract: every hook contact-router calls, documented for plugin authors.

A plugin is a module (or object) with functions marked ``@hookimpl`` and named like the specs
below, registered through the entry-point group ``contact_router``::

    [project.entry-points.contact_router]
    my_channel = "my_package.my_channel"

Hooks are called with keyword arguments only; an implementation may accept fewer arguments
than the spec names, so a spec can grow without breaking old plugins. Any hook may return an
awaitable instead of a value: the host awaits it. "First result wins" hooks are resolved by
the host awaiting implementations in order (pluggy's own ``firstresult`` would stop at the
first coroutine, answered or not).

Each implementation gets its own copy of a message, conversation or other dict or list it is
passed: change it as you like, it changes nothing for the core or the other plugins. Each
implementation is waited for at most 10 s; at the limit its coroutine is cancelled and left
behind. One that raises (a ``CancelledError`` nobody asked for included), runs out of time or
answers in the wrong shape is logged, counted in ``contact_router_hook_errors_total`` and
skipped: a "first result wins" hook then asks the next implementation.

The public helpers a plugin may use are re-exported here: ``Channel``, ``Capabilities``,
``OutboundMessage``, ``SendResult``, ``DeliveryUpdate``, the ``DeliveryError`` family,
``InvalidMessage``, ``SettingsError``, ``ChannelContext``, ``IngestResult``, ``CustomerClaim``, ``Customer``,
``RoutingDecision``, ``json_error`` (an HTTP error with the service's JSON error body),
``read_limited_body`` with its ``BodyTooLarge`` (a request body of at most so many bytes),
``BodyTimeout`` (a body that did not keep to the service's ``BodyDeadline``; the service
answers it with 408), ``parse_retry_after`` (a provider's ``Retry-After`` in seconds),
``read_provider_json`` (a provider's JSON answer of at most so many bytes) and the readers of
settings that may come from the environment as text (``flag``, ``given``, ``positive_int``,
``whole_number``, ``positive_float``, ``non_negative_float``). The full guide is
``docs/plugins.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pluggy

from .channel import (
    NOT_CONFIGURED,
    BodyDeadline,
    BodyTimeout,
    BodyTooLarge,
    Capabilities,
    Channel,
    DeliveryError,
    DeliveryUpdate,
    InvalidMessage,
    OutboundMessage,
    PermanentDeliveryError,
    ResendAsDeliveryError,
    RetryableDeliveryError,
    SendResult,
    Service,
    SettingsError,
    StorageUnavailable,
    json_error,
    parse_retry_after,
    read_limited_body,
    read_provider_json,
)
from .context import ChannelContext, IngestResult
from .models import Customer, CustomerClaim, RoutingDecision
from .settings import flag, given, non_negative_float, positive_float, positive_int, whole_number

PROJECT = "contact_router"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "NOT_CONFIGURED",
    "PROJECT",
    "BodyDeadline",
    "BodyTimeout",
    "BodyTooLarge",
    "Capabilities",
    "Channel",
    "ChannelContext",
    "Customer",
    "CustomerClaim",
    "DeliveryError",
    "DeliveryUpdate",
    "IngestResult",
    "InvalidMessage",
    "OutboundMessage",
    "PermanentDeliveryError",
    "ResendAsDeliveryError",
    "RetryableDeliveryError",
    "RoutingDecision",
    "SendResult",
    "Service",
    "SettingsError",
    "StorageUnavailable",
    "flag",
    "given",
    "hookimpl",
    "hookspec",
    "json_error",
    "non_negative_float",
    "positive_float",
    "positive_int",
    "whole_number",
    "parse_retry_after",
    "read_limited_body",
    "read_provider_json",
]


# -------------------------------------------------------------------------------------------
# Channels
# -------------------------------------------------------------------------------------------


@hookspec
def register_channels(
    settings: Mapping[str, Any],
    env: Mapping[str, str],
    topics: Mapping[str, Mapping[str, str]],
    units: Mapping[str, Mapping[str, Any]],
) -> Sequence[Channel] | None:
    """Return the channels this plugin provides.

    :param settings: The ``channels`` table of the configuration, every ``{"$env": NAME}``
        already resolved. A plugin reads its own section (``settings.get("whatsapp", {})``).
    :param env: The process environment, for credentials the configuration does not name.
    :param topics: The configured topics, ``{topic id: {language: name}}``, for channels
        that let the sender choose one (a form's select, a phone menu).
    :param units: The configured units, ``{unit id: public info}`` (``id``, ``name``, ``kind``,
        ``languages``, ``first_response_hours``, ``escalate_to``, ``email``, ...; the same as
        ``ChannelContext.units``), so that a channel can check that a unit its settings name
        exists: raise ``SettingsError`` naming the key when it does not.

    :return: A list of ``Channel`` instances, or ``None`` (or an empty list) when the channel
        is switched off, for example because its credentials are not set. Each channel's
        ``name`` must be unique and match ``[a-z][a-z0-9_-]{0,31}`` (the inbound message's
        ``channel``); its ``capabilities`` a ``Capabilities``; its ``routes()`` aiohttp
        ``RouteDef``s (``web.get``, ``web.post``), mounted under ``/channels/<name>/``.

    Called once at start, by ``serve`` and by ``check-config`` alike. Both check every answer
    in the same way and print each error as one line with the configuration file and the
    plugin's name: a ``SettingsError`` under its key path; anything else raised, an answer of
    another shape, a channel name taken or a route that is not a ``RouteDef`` under
    ``channels (<plugin>)``. Either command then fails, and ``serve`` does not start. All
    results are collected. May be ``async def``: it is then awaited (within 10 s) on an event
    loop of its own before the service's runs, so create nothing there that belongs to a loop
    (a ``ClientSession``, a task); use ``context.http`` and ``Channel.services()``.

    Implemented by channel plugins.
    """


# -------------------------------------------------------------------------------------------
# Sender resolution and routing
# -------------------------------------------------------------------------------------------


@hookspec
def lookup_customer(claim: CustomerClaim) -> Customer | None:
    """Find the customer record that a sender's stated customer number belongs to.

    :param claim: What the sender stated: ``customer_number`` and whatever they gave beside it
        (``name``, ``email``, ``phone``, ``street``, ``postcode``, ``city``).

    :return: A ``Customer`` when the number exists **and** matches the sender by name, e-mail,
        phone or address; otherwise ``None``. A number alone is never proof: return ``None``
        and the core keeps it as an unverified claim.

    Called before the message is stored, for every inbound message that states a customer
    number: one that opens a conversation, a follow-up (a confirmed number makes its contact a
    customer), and also a provider's retry of a message stored already, whose answer is then
    not used (which message is a retry is known only in the transaction that stores it).
    The first non-None result wins; implementations are asked one after another, each within
    its own time limit, and one that fails or hangs is skipped. The built-in customer directory
    (filled by ``contact-router import-customers``) is a ``trylast`` implementation, so a CRM
    plugin goes first. May return an awaitable (an HTTP lookup); give it a timeout.

    Implemented by CRM integrations.
    """


@hookspec
def route_message(message: Mapping[str, Any], is_customer: bool) -> RoutingDecision | None:
    """Choose the responsible unit for a message, should it open a new conversation.

    :param message: The canonical inbound message (``router/schemas/inbound_message.schema.json``),
        a copy of your own.
    :param is_customer: Whether ``lookup_customer`` confirmed this message's customer number
        (a known customer who writes without one is False here).

    :return: A ``RoutingDecision`` (``unit``, ``rule``, ``reason``) to override the configured
        rules, or ``None`` to let them decide. An unknown unit id is ignored with a warning
        (the next implementation is asked).

    Called only when a plugin implements it, before the message is stored, for every inbound
    message but a reaction or an edit: whether it opens a conversation is decided only in the
    transaction that stores it, so a follow-up and a provider's retry of a stored message are
    asked too. The decision is used when the message opens a conversation (also one linked to
    a case the message names but may not join, which would otherwise go to that case's unit),
    and for a message with a ``topic`` on a chat channel (``threads_by_sender``): it joins the
    sender's open conversation without a topic only when that one belongs to the unit decided.
    Otherwise it is not used. The first non-None result wins; implementations are asked one
    after another, each within its own time limit, and one that fails or hangs is skipped.

    Implemented by routing-policy plugins.
    """


# -------------------------------------------------------------------------------------------
# Replies
# -------------------------------------------------------------------------------------------


@hookspec
def reply_copies(
    conversation: Mapping[str, Any], reply: Mapping[str, Any], identities: Sequence[Mapping[str, str]]
) -> Sequence[Mapping[str, str]] | None:
    """Name further recipients of a staff reply, beside the conversation's own channel.

    :param conversation: ``id``, ``case_reference``, ``channel``, ``unit``, ``status_url`` (None
        while no web form channel is on to serve status pages).
    :param reply: ``text``, ``language``, ``kind`` of the reply being queued.
    :param identities: The contact's identities, each ``{"kind": ..., "address": ...,
        "failed": ...}``; ``failed`` once a provider refused the address for good (a copy to it is
        dropped: name another).

    :return: A list of ``{"channel": ..., "to_kind": ..., "to": ...}``; each becomes an
        outbox row of its own. Ignored: a channel that is not running, the conversation's own
        channel (its reply goes there anyway), and a ``to_kind`` not among the channel's
        ``Capabilities.identity_kinds`` (the phone channel without Twilio sends no SMS).

    Called when a staff reply is queued (not per inbound message). All results are collected.

    Implemented by the e-mail plugin (a resident who used the web form and left an e-mail
    address also gets each answer by mail, with the status link) and the phone plugin (one who
    left a mobile number and no e-mail address that works gets it by SMS, with the link).
    """


# -------------------------------------------------------------------------------------------
# Events (after commit)
# -------------------------------------------------------------------------------------------


@hookspec
def message_received(message: Mapping[str, Any], result: IngestResult) -> None:
    """An inbound message was committed (and acknowledged to its provider).

    :param message: The canonical inbound message.
    :param result: Where it went: conversation, case reference, unit, whether it was a duplicate.

    Called after the commit, only when a plugin implements it. Errors are logged and counted
    in ``/metrics``; they never undo the message. Use it for audit logs and CRM sync.
    """


@hookspec
def conversation_routed(conversation: Mapping[str, Any], rule: str, reason: str) -> None:
    """A conversation got a responsible unit: on opening or by a staff transfer.

    :param conversation: ``id``, ``case_reference``, ``unit``, ``channel``, ``deadline``.
    :param rule: The rule id (``transfer`` for a staff transfer).
    :param reason: The readable reason stored with the decision.

    Called after the commit, only when a plugin implements it. Errors are logged.
    """


@hookspec
def conversation_escalated(conversation: Mapping[str, Any], from_unit: str, to_unit: str, level: int) -> None:
    """An overdue conversation moved up its unit's escalation chain.

    :param conversation: ``id``, ``case_reference``, ``unit`` (the new one), ``deadline``.
    :param from_unit: The unit that missed its deadline.
    :param to_unit: The new owner.
    :param level: How many escalations the conversation has had, this one included.

    Called after the commit, only when a plugin implements it. Errors are logged.
    """


@hookspec
def conversation_answered(conversation: Mapping[str, Any], message: Mapping[str, Any]) -> None:
    """A human answer reached the person: a staff reply was delivered, or a logged call-back
    reached them.

    :param conversation: ``id``, ``case_reference``, ``unit``, ``channel``.
    :param message: ``id``, ``text``, ``channel``, ``kind`` of the answer; ``text`` as stored
        (for a call-back logged without a note, ``Call-back: reached``).

    Called after the commit, only when a plugin implements it. Errors are logged.
    """
