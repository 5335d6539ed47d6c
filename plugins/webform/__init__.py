"""The web form channel: a public contact form anyone can use, and a private status page per
case where the resident reads answers and writes back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.hookspecs import hookimpl
from router.settings import flag

from .channel import WHERE, WebFormChannel

__all__ = ["WebFormChannel", "register_channels"]


@hookimpl
def register_channels(
    settings: Mapping[str, Any], topics: Mapping[str, Mapping[str, str]]
) -> list[WebFormChannel] | None:
    section = settings.get("webform")
    # ``enabled`` may come from the environment as "false": only ``is False`` left the form on.
    if section is None or not flag(section, "enabled", True, WHERE):
        return None
    return [WebFormChannel(section, topics=topics or None)]
