"""Full-text search for the inbox: what is indexed for a message, and how a staff member's
search words become an FTS5 query.

Text is folded the same way routing folds it (``Straße`` = ``Strasse``, ``Müller`` = ``Mueller``,
``Sørensen`` = ``Soerensen``, ``Łódź`` = ``Lodz``), and a word with an umlaut or an ø is indexed
in its spelling without the dots or stroke too (``muller``, ``sorensen``), so a search finds
what the resident wrote however either of them spelt them.

Every search word matches as a word start (``strassensperr`` finds ``Straßensperrung``). FTS5
answers a prefix query by first merging the whole list of matching messages of every word that
begins with the prefix, whatever the query asks for next: for a word that occurs in a million
messages that alone takes about 25 ms, even to read the newest fifty. So the inbox first looks up,
in the index's own vocabulary, which indexed words begin with each search word
(``prefix_terms``) and, when they are few, asks for ``("gehweg" OR "gehwege")`` instead of
``"gehweg"*``: the same messages, read lazily, newest first, as far as the page needs."""

from __future__ import annotations

import json
import re
import sqlite3
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from .text import normalize, strip_accents

_WORD = re.compile(r"\w+")
# Words the FTS5 tokenizer (unicode61, remove_diacritics 2) indexes as exactly themselves:
# ASCII letters and digits, already lower case. Only these are looked up in the vocabulary;
# anything else (a non-Latin letter, an underscore that splits a word in two) stays a prefix query.
_PLAIN = re.compile(r"[a-z0-9]+")

# A word that begins more indexed words than this is searched as a prefix query: an OR of many
# terms costs a seek per term on every statement, and such words (one or two letters, a short
# stem) are rarely what anyone searches for.
MAX_TERMS = 32

Fetch = Callable[[str, tuple[Any, ...]], Awaitable[Sequence[Any]]]

_VOCABULARY = "temp.message_search_terms"
# One row per (term, message, column, offset): read with LIMIT 1 it costs one seek in the term
# index, whereas the 'row' vocabulary counts every message of a term before it answers.
_CREATE_VOCABULARY = f"CREATE VIRTUAL TABLE IF NOT EXISTS {_VOCABULARY} USING fts5vocab(main, message_search, instance)"
# For each word, the indexed terms in [lo, hi), one seek each: the next term after t is the first
# one >= t || char(1), since no term contains a character below "0". (``term > t`` would walk
# every occurrence of t first.) When some word begins no term at all, nothing can match and the
# other words are not listed further.
_PREFIX_TERMS = f"""
WITH RECURSIVE words(i, lo, hi) AS (
    SELECT key, json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?1)
), first(i, hi, term) AS (
    SELECT i, hi, (SELECT v.term FROM {_VOCABULARY} v WHERE v.term >= words.lo AND v.term < words.hi LIMIT 1)
    FROM words
), found(i, hi, term, n) AS (
    SELECT i, hi, term, 1 FROM first
    UNION ALL
    SELECT i, hi, (SELECT v.term FROM {_VOCABULARY} v WHERE v.term >= found.term || char(1) AND v.term < found.hi LIMIT 1),
           n + 1
    FROM found WHERE found.term IS NOT NULL AND found.n <= ?2 AND (?3 OR NOT EXISTS (SELECT 1 FROM first WHERE term IS NULL))
)
SELECT i, term FROM found WHERE term IS NOT NULL"""


def search_text(subject: str | None, text: str | None, name: str | None) -> str:
    """The indexed text of one inbound message: its subject, text and the sender's name, folded,
    then the other spellings of its words with umlauts (``other_spellings``).

    Defined through ``folded_search_text``, so the ingest path (which has subject and text
    folded already) indexes exactly this. Folded apart, a part that folds to nothing (a lone
    combining mark as a name) leaves no stray space, where folding the joined parts left one."""
    original = " ".join(filter(None, (subject, text)))
    return folded_search_text(normalize(original), name, original)


MAX_WORDS = 10
"""Words a search may have: each is a probe of the index; the inbox refuses more (400)."""


def search_words(q: str) -> list[str]:
    """The folded words of a search, each of which must occur as a word start."""
    return _WORD.findall(normalize(q))


def match_words(q: str) -> list[str]:
    """``search_words``, at most ``MAX_WORDS`` of them."""
    return search_words(q)[:MAX_WORDS]


def spelling_alternatives(q: str) -> dict[str, str]:
    """For each search word (``match_words``) written with an umlaut, the same word without the
    dots (``strip_accents``): "Müller" is searched as "mueller" or "muller", so it finds a
    resident who wrote "Mueller" as well as one who wrote "Muller". Empty for a search without
    umlauts."""
    if q.isascii():
        return {}
    folded = search_words(q)
    plain = _WORD.findall(strip_accents(q))
    if len(plain) != len(folded):  # never so, as both fold only letters to letters: but then no guess
        return {}
    return {word: other for word, other in zip(folded[:MAX_WORDS], plain, strict=False) if other != word}


MAX_INDEXED = 20000
"""Characters of a message's folded subject, text and name that are indexed."""


def folded_search_text(folded: str, name: str | None, original: str = "") -> str:
    """``search_text`` for a message whose subject and text were folded already (as routing
    folds them): the same result, without folding the text a second time. ``original`` is the
    subject and text as written (joined by a space), for ``other_spellings``."""
    indexed = " ".join(filter(None, (folded, normalize(name) if name else None)))[:MAX_INDEXED]
    others = other_spellings(f"{original[:MAX_INDEXED]} {name or ''}")
    return f"{indexed} {others}" if others else indexed


def other_spellings(text: str) -> str:
    """The words of ``text`` that hold an umlaut, written without its dots (``strip_accents``),
    each once: "Müller wartet auf Rückruf" -> "muller ruckruf". ``normalize`` writes umlauts as
    ae, oe, ue ("mueller"), the way a German without the key writes them; but staff without
    one on their keyboard (a contractor's crew, a phone), residents writing from abroad and
    names that are not German ("Öztürk", "Ozturk") drop the dots. Indexed beside the folded
    text, these words let such a search find the message; empty when there are none. The same
    for ø, written oe or o ("Sørensen": "soerensen", "sorensen"); the other letters Unicode does
    not decompose (æ, ł, ...) have one plain spelling, which ``normalize`` gives."""
    if text.isascii():
        return ""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    lowered = text.casefold()
    if "ä" not in lowered and "ö" not in lowered and "ü" not in lowered and "ø" not in lowered:
        return ""
    # Membership tests on the blank-separated words first, the pattern only inside those with an
    # umlaut: a pattern over the whole text and str.translate took 6 to 8 us for a sentence
    # with one or two such words (this, under 3), on every message that holds one.
    found: dict[str, None] = {}
    for chunk in lowered.split():
        if "ä" in chunk or "ö" in chunk or "ü" in chunk or "ø" in chunk:
            for word in _WORD.findall(chunk):
                if "ä" in word or "ö" in word or "ü" in word or "ø" in word:
                    word = word.replace("ä", "a").replace("ö", "o").replace("ü", "u").replace("ø", "o")
                    found[word if word.isascii() else strip_accents(word)] = None
    return " ".join(found)


def match_query(q: str) -> str | None:
    """Every word of ``q`` must occur (as a word start) in a message, a word with an umlaut in
    either of its spellings (``spelling_alternatives``); None when ``q`` has no words. A word
    of one character must occur as a whole word: as a word start it would match a tenth of
    everything (a house number ``4`` found every ``42``, ``4711`` and ``4b``), and reading that
    many matches took 48 ms at a million messages. Words are quoted, so no FTS5 syntax can be
    injected."""
    words = match_words(q)
    if not words:
        return None
    alternatives = spelling_alternatives(q)

    def term(w: str) -> str:
        return f'"{w}"' if len(w) == 1 else f'"{w}"*'

    if not alternatives:
        return " ".join(term(w) for w in words)
    # FTS5 takes no implicit AND after a parenthesis: the words are joined explicitly.
    return " AND ".join(f"({term(w)} OR {term(alternatives[w])})" if w in alternatives else term(w) for w in words)


def prefix_range(word: str) -> tuple[str, str] | None:
    """The range [lo, hi) of index terms that begin with ``word``, or None when ``word`` is not
    sure to be indexed as itself (then only FTS5's own prefix query is exact)."""
    if not _PLAIN.fullmatch(word):
        return None
    return word, word[:-1] + chr(ord(word[-1]) + 1)


def expanded_match(
    words: Sequence[str], terms: Mapping[str, Sequence[str] | None], alternatives: Mapping[str, str] | None = None
) -> str | None:
    """The FTS5 query for ``words`` that matches exactly what ``match_query`` matches: a word
    with its list of index terms becomes their OR, a word without one (None) stays ``"word"*``;
    a word with an alternative spelling (``spelling_alternatives``, whose terms are in
    ``terms`` too) matches either. None when some word begins no indexed term in either
    spelling, so that nothing can match."""

    def part(word: str) -> str | None:
        listed = terms.get(word)
        if listed is None:
            return f'"{word}"*'
        if not listed:
            return None
        return "(" + " OR ".join('"' + t.replace('"', '""') + '"' for t in listed) + ")"

    parts = []
    for word in words:
        found = part(word)
        other = (alternatives or {}).get(word)
        if other is not None:
            also = part(other)
            found = also if found is None else found if also is None else f"({found} OR {also})"
        if found is None:
            return None
        parts.append(found)
    return " AND ".join(parts) if parts else None


async def prefix_terms(fetch: Fetch, words: Sequence[str], *, complete: bool = False) -> dict[str, list[str] | None]:
    """For each word, the indexed terms that begin with it, or None when they are more than
    ``MAX_TERMS`` or the word cannot be looked up (see ``prefix_range``). When some word begins
    no indexed term (an empty list), nothing can match, and the other lists are cut short;
    unless ``complete``: where words are alternatives of each other (``spelling_alternatives``),
    one that begins nothing does not mean that nothing matches.

    ``fetch`` runs a read query (``SQLiteStore.fetchall``). The vocabulary is a TEMP virtual
    table of the reading connection, created on first use; it writes nothing to the database."""
    result: dict[str, list[str] | None] = {}
    ranges: list[tuple[str, str, str]] = []
    for word in dict.fromkeys(words):
        if len(word) == 1:  # a whole word, see ``match_query``
            result[word] = [word]
            continue
        bounds = prefix_range(word)
        if bounds is None:
            result[word] = None
        else:
            ranges.append((word, *bounds))
            result[word] = []
    if not ranges:
        return result
    params = (json.dumps([[lo, hi] for _, lo, hi in ranges]), MAX_TERMS, complete)
    try:
        rows = await fetch(_PREFIX_TERMS, params)
    except sqlite3.OperationalError as exc:
        if _VOCABULARY.split(".")[1] not in str(exc):
            raise
        await fetch(_CREATE_VOCABULARY, ())
        rows = await fetch(_PREFIX_TERMS, params)
    for i, term in rows:
        word = ranges[i][0]
        listed = result[word]
        if listed is not None and term.startswith(word):
            listed.append(term)
    for word, listed in result.items():
        if listed is not None and len(listed) > MAX_TERMS:
            result[word] = None
    return result
