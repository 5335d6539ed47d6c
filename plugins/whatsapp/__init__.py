"""WhatsApp Business Cloud API channel: webhooks in, Graph API messages out.

Switched on by the ``channels.whatsapp`` table of the configuration once the app secret, verify
token, access token and every number's ``phone_number_id`` are set. See docs/channels/whatsapp.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.hookspecs import hookimpl

from .channel import WhatsAppChannel
from .settings import WhatsAppSettings

__all__ = ["WhatsAppChannel", "register_channels"]


@hookimpl
def register_channels(
    settings: Mapping[str, Any], env: Mapping[str, str], units: Mapping[str, Any]
) -> list[WhatsAppChannel] | None:
    """The WhatsApp channel, or None while its credentials are incomplete."""
    section = settings.get("whatsapp") if isinstance(settings, Mapping) else None
    config = WhatsAppSettings.from_mapping(section, units=set(units))
    return [WhatsAppChannel(config)] if config else None
