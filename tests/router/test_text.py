"""Identifiers made by router.text: secret tokens that sort by time."""

from __future__ import annotations

import re
import time

from router.text import sortable_token


def test_sortable_tokens_are_secret_unique_and_grow_with_time():
    tokens = []
    for _ in range(50):
        tokens.append(sortable_token(24))
        time.sleep(0.00002)
    assert len(set(tokens)) == 50
    assert tokens == sorted(tokens)  # the time prefix has a fixed width, so text order is time order
    for token in tokens:
        assert re.fullmatch(r"[0-9a-f]{13}[A-Za-z0-9_-]{32}", token)  # 24 random bytes after the time
    # two tokens of the same microsecond differ in their random part
    assert len({sortable_token(24)[13:] for _ in range(1000)}) == 1000


def test_hex_sortable_tokens_for_idempotency_keys():
    key = sortable_token(16, hex=True)
    assert re.fullmatch(r"[0-9a-f]{45}", key)
