"""Idempotency keys of staff actions: a request sent again with the same ``Idempotency-Key``
(a retry after a timeout, a double click) changes nothing and gets the first answer.

The key is looked up and recorded inside the action's own write transaction, so an action is
done together with its key or not at all, and two requests with one key at the same time run
one after the other: the second finds the first's answer. Keys belong to the token that sent
them (``scoped``) and are kept for ``KEEP``; the same key with another request is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from .store.sqlite import iso

KEEP = timedelta(hours=24)
"""How long an answer is kept for its key: a retry later than this is a new request."""

HEADER = "Idempotency-Key"
_VALID_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII without spaces, as a header carries it

REPLAYED = "replayed"
"""Set (True) in an action's result when it is the first request's answer, given again."""


class KeyReused(Exception):
    """The key came with another request before: 422, nothing done."""


def scoped(token: str, key: str) -> str:
    """The key as stored: a key belongs to the token that sent it (names of staff members need
    not be unique), by a digest, since the token itself is a secret."""
    return f"{hashlib.sha256(token.encode()).hexdigest()[:16]}/{key}"


def valid_key(key: str) -> bool:
    """Whether ``key`` can be an idempotency key: 1 to 255 printable ASCII characters."""
    return _VALID_KEY.fullmatch(key) is not None


def fingerprint(action: str, conversation_id: int, request: Mapping[str, Any]) -> str:
    """What identifies a request beside its key: the action, its conversation and its fields."""
    canonical = json.dumps([action, conversation_id, request], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def replayed(conn: sqlite3.Connection, staff: str, key: str, request: str, now: datetime) -> dict[str, Any] | None:
    """The answer given to this key's first request (with ``REPLAYED`` set), or None when the key
    is new or older than ``KEEP``; ``KeyReused`` when it came with another request."""
    row = conn.execute(
        "SELECT request, response FROM request_keys WHERE staff = ? AND key = ? AND created_at >= ?",
        (staff, key, iso(now - KEEP)),
    ).fetchone()
    if row is None:
        return None
    if row[0] != request:
        raise KeyReused(f"this {HEADER} was used for another request")
    return {**json.loads(row[1]), REPLAYED: True}


def remember(
    conn: sqlite3.Connection, staff: str, key: str, request: str, response: Mapping[str, Any], now: datetime
) -> None:
    """Record the answer to a key's first request, in the action's transaction, and forget the
    keys older than ``KEEP``."""
    stamp = iso(now)
    conn.execute("DELETE FROM request_keys WHERE created_at < ?", (iso(now - KEEP),))
    conn.execute(
        "INSERT OR REPLACE INTO request_keys (staff, key, request, response, created_at) VALUES (?, ?, ?, ?, ?)",
        (staff, key, request, json.dumps(response, ensure_ascii=False), stamp),
    )
