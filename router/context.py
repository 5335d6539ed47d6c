"""The core's side of the channel contract: what a channel may call (``ChannelContext``) and
what it gets back for an inbound message (``IngestResult``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from .channel import DeliveryUpdate
from .clock import Clock


@dataclasses.dataclass(frozen=True, slots=True)
class IngestResult:
    """Where an inbound message went. ``duplicate`` is True when the same (channel,
    channel_message_id) was stored before; the fields then describe the first delivery.
    ``conversation_id`` is None for a reaction or edit whose target is unknown. ``opened`` is
    True when this message opened the conversation; ``rule`` and ``reason`` are its routing."""

    message_id: int
    conversation_id: int | None
    case_reference: str | None
    status_token: str | None
    status_url: str | None
    unit: str | None
    unit_name: str | None
    deadline: datetime | None
    language: str
    acknowledged: bool
    duplicate: bool = False
    ack_text: str | None = None
    opened: bool = False
    rule: str | None = None
    reason: str | None = None


class ChannelContext:
    """The core as a channel sees it. One per channel, handed to ``Channel.setup``.

    ``settings`` is the channel's own configuration section; ``http`` is the app's one
    ``ClientSession`` (use it with a timeout); ``timezone`` the service's; ``ingest`` validates
    and commits one inbound message and returns only after the commit, so a handler can answer
    its provider after it.
    """

    def __init__(
        self,
        *,
        name: str,
        settings: Mapping[str, Any],
        data_dir: Path,
        public_base_url: str,
        clock: Clock,
        ingest: Callable[[dict[str, Any]], Awaitable[IngestResult]],
        record_delivery: Callable[[str, DeliveryUpdate], Awaitable[bool]],
        conversation_view: Callable[..., Awaitable[dict[str, Any] | None]],
        http: Callable[[], aiohttp.ClientSession],
        render: Callable[..., str],
        units: Mapping[str, Mapping[str, Any]],
        is_open: Callable[[str, datetime], bool] | None = None,
        record_event: Callable[[str, str, Mapping[str, Any]], Awaitable[None]] | None = None,
        timezone: str = "Europe/Berlin",
        record_live_answer: Callable[[str, str, str], Awaitable[bool]] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.data_dir = data_dir
        self.public_base_url = public_base_url.rstrip("/")
        self.clock = clock
        self._ingest = ingest
        self._record_delivery = record_delivery
        self._conversation_view = conversation_view
        self._http = http
        self._render = render
        self.units = units
        self._is_open = is_open
        self._record_event = record_event
        self._record_live_answer = record_live_answer
        self.timezone = timezone
        """The service's timezone (``service.timezone``): a time a channel shows or speaks to a
        person is in it, as the acknowledgement's deadline is."""
        self.log = logging.getLogger(f"contact_router.channel.{name}")

    @property
    def http(self) -> aiohttp.ClientSession:
        """The app's shared HTTP client session (available while the app runs)."""
        return self._http()

    async def ingest(self, message: dict[str, Any]) -> IngestResult:
        """Validate, store, route and acknowledge one inbound message, in one commit.

        Raises ``InvalidMessage`` (naming the failing field) when the message does not match
        the canonical schema; nothing is stored then.
        """
        return await self._ingest(message)

    async def record_delivery(self, update: DeliveryUpdate) -> bool:
        """Record a provider status for one of this channel's outbound messages.

        Returns False when no outbound message has that provider id (the status is still
        recorded, for staff).
        """
        return await self._record_delivery(self.name, update)

    async def record_event(self, kind: str, data: Mapping[str, Any]) -> None:
        """Keep a provider event that belongs to no message (a webhook-level error entry), for
        staff and ``/metrics``; it is stored as ``<channel>:<kind>``."""
        if self._record_event is not None:
            await self._record_event(self.name, kind, data)

    async def record_live_answer(self, channel_message_id: str, note: str) -> bool:
        """Someone of ours spoke with the person live about the inbound message
        ``channel_message_id`` (a call put through and picked up): its conversation counts as
        answered, as after a call-back that reached them, and does not escalate. ``note`` is
        what staff see. False when no such message is stored. Raises ``StorageUnavailable``
        when the database refuses writes."""
        if self._record_live_answer is None:
            return False
        return await self._record_live_answer(self.name, channel_message_id, note)

    async def conversation_by_status_token(self, token: str) -> dict[str, Any] | None:
        """The resident's view of a conversation (messages without internal notes), found by
        the secret status token, or None."""
        return await self._conversation_view(status_token=token)

    def status_url(self, token: str) -> str:
        """The public status page link for a conversation's status token."""
        return f"{self.public_base_url}/channels/webform/status/{token}"

    def is_open(self, unit_id: str, when: datetime | None = None) -> bool:
        """Whether the unit is inside its business hours at ``when`` (default: now)."""
        if self._is_open is None:
            return True
        return self._is_open(unit_id, when or self.clock.now())

    def render(self, template: str, language: str, /, **values: Any) -> str:
        """Render a text template from the configuration (``templates.<name>.<language>``)."""
        return self._render(template, language, **values)
