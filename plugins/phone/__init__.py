"""The phone channel plugin: Twilio voice and SMS, and missed calls reported by any PBX (CTI).

Switched on by ``channels.phone`` in the configuration (Twilio credentials may come from
``TWILIO_ACCOUNT_SID``, ``TWILIO_AUTH_TOKEN`` and ``TWILIO_PHONE_NUMBER``). Without Twilio
credentials the channel still runs for CTI events when ``cti_secret`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.hookspecs import Channel, hookimpl

from .channel import PhoneChannel
from .settings import PhoneSettings

__all__ = ["PhoneChannel", "PhoneSettings", "register_channels"]


@hookimpl
def register_channels(settings: Mapping[str, Any], env: Mapping[str, str], units: Mapping[str, Any]) -> list[Channel] | None:
    """The phone channel, or None when neither Twilio nor CTI is configured."""
    section = settings.get("phone") if isinstance(settings, Mapping) else None
    phone = PhoneSettings.from_config(section if isinstance(section, Mapping) else {}, env, units=set(units))
    if not (phone.twilio_enabled or phone.cti_enabled):
        return None
    return [PhoneChannel(phone)]
