"""Small helpers for core tests: canonical messages without going through a channel."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

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


def vm_steps(conn: Any, work: Callable[[], T], every: int = 10) -> tuple[int, T]:
    """SQLite VM steps (in units of ``every``) that ``work()`` takes on ``conn``, and its result:
    a count that does not depend on the machine's speed, for tests that a query reads what it
    should and not a whole table."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    conn.set_progress_handler(count, every)
    try:
        result = work()
    finally:
        conn.set_progress_handler(None, 0)
    return steps[0], result
