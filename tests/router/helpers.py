"""Small helpers for core tests: canonical messages without going through a channel."""

from __future__ import annotations

import itertools
from typing import Any

_ids = itertools.count(1)


def webform_message(text: str = "Baustelle vor dem Haus, Gehweg gesperrt", **extra: Any) -> dict[str, Any]:
    """A canonical web-form message from a resident with an e-mail address."""
    message: dict[str, Any] = {
        "channel": "webform",
        "channel_message_id": f"test:{next(_ids)}",
        "sender": {"kind": "email", "address": extra.pop("email", "anwohner@example.net"), "display_name": "Erika Mustermann"},
        "text": text,
        "topic": extra.pop("topic", "construction"),
        "language": "de",
        "address": {"street": "Lindenweg 3", "postcode": extra.pop("postcode", "12345"), "city": "Musterstadt"},
    }
    message.update(extra)
    return message
