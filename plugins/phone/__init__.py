"""The phone channel plugin: Twilio voice and SMS, and missed calls reported by any PBX (CTI).

Switched on by ``channels.phone`` in the configuration (Twilio credentials may come from
``TWILIO_ACCOUNT_SID``, ``TWILIO_AUTH_TOKEN`` and ``TWILIO_PHONE_NUMBER``). Without Twilio
credentials the channel still runs for CTI events when ``cti_secret`` is set. Web-form residents
who left a mobile number and no e-mail address get each answer by SMS too (``reply_copies``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.hookspecs import Channel, hookimpl

from .channel import PhoneChannel
from .numbers import is_mobile
from .settings import PhoneSettings

__all__ = ["PhoneChannel", "PhoneSettings", "register_channels", "reply_copies"]


@hookimpl
def register_channels(settings: Mapping[str, Any], env: Mapping[str, str], units: Mapping[str, Any]) -> list[Channel] | None:
    """The phone channel, or None when neither Twilio nor CTI is configured."""
    section = settings.get("phone") if isinstance(settings, Mapping) else None
    phone = PhoneSettings.from_config(section if isinstance(section, Mapping) else {}, env, units=set(units))
    if not (phone.twilio_enabled or phone.cti_enabled):
        return None
    return [PhoneChannel(phone)]


@hookimpl
def reply_copies(
    conversation: Mapping[str, Any], reply: Mapping[str, Any], identities: Sequence[Mapping[str, str]]
) -> Sequence[Mapping[str, str]] | None:
    """A web-form resident who left a mobile number and no e-mail address gets each answer by SMS
    (shortened, with the status link): staff answers are only on the status page, and one who
    had closed it was never told; their case counted as answered. With an e-mail address the
    e-mail plugin's copy tells them, unless it was refused for good (a bounce). Without Twilio
    the core drops the copy (the channel sends to no ``phone``)."""
    if conversation.get("channel") != "webform" or any(i.get("kind") == "email" and not i.get("failed") for i in identities):
        return None
    for identity in identities:
        if identity.get("kind") == "phone" and not identity.get("failed") and is_mobile(identity.get("address")):
            return [{"channel": "phone", "to_kind": "phone", "to": identity["address"]}]
    return None
