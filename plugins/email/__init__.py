"""The e-mail channel plugin: SMTP in (aiosmtpd), raw mail over HTTP, a relay out (aiosmtplib),
and copies of staff answers by mail for web-form residents who left an address.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.hookspecs import Channel, hookimpl
from router.settings import flag

from .channel import EmailChannel
from .settings import EmailSettings, EmailSettingsError

__all__ = ["EmailChannel", "EmailSettings", "EmailSettingsError", "register_channels", "reply_copies"]


@hookimpl
def register_channels(
    settings: Mapping[str, Any], env: Mapping[str, str], units: Mapping[str, Any]
) -> Sequence[Channel] | None:
    """The e-mail channel, when ``channels.email`` names at least one address (of the ``units``)."""
    section = settings.get("email") or {}
    if not isinstance(section, Mapping) or not section.get("addresses"):
        return None
    if not flag(section, "enabled", True, "channels.email", error=EmailSettingsError):  # "false" from the environment too
        return None
    return [EmailChannel(EmailSettings.from_mapping(section, units=set(units)))]


@hookimpl
def reply_copies(
    conversation: Mapping[str, Any], reply: Mapping[str, Any], identities: Sequence[Mapping[str, str]]
) -> Sequence[Mapping[str, str]] | None:
    """A web-form resident who left an e-mail address gets each answer by mail too."""
    if conversation.get("channel") != "webform":
        return None
    for identity in identities:
        if identity.get("kind") == "email" and identity.get("address") and not identity.get("failed"):
            return [{"channel": "email", "to_kind": "email", "to": identity["address"]}]
    return None
