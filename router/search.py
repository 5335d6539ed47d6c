"""Full-text search for the inbox: what is indexed for a message, and how a staff member's
search words become an FTS5 query.

Text is folded the same way routing folds it (``Straße`` = ``Strasse``), so a search finds what
the resident wrote however either of them spelt the umlauts."""

from __future__ import annotations

import re

from .text import normalize

_WORD = re.compile(r"\w+")


def search_text(subject: str | None, text: str | None, name: str | None) -> str:
    """The indexed text of one inbound message: its subject, text and the sender's name."""
    return normalize(" ".join(filter(None, (subject, text, name))))[:20000]


def match_query(q: str) -> str | None:
    """Every word of ``q`` must occur (as a word start) in a message; None when ``q`` has no
    words. Words are quoted, so no FTS5 syntax can be injected."""
    words = _WORD.findall(normalize(q))[:10]
    if not words:
        return None
    return " ".join(f'"{w}"*' for w in words)
