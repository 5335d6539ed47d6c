"""Free-text search in the inbox list: the fast ways to the newest matching conversations give
exactly what the plain query gives (``c.id IN (every match) ORDER BY c.id DESC``), on a small
database built to break the assumptions they lean on: messages of old conversations that arrive
late, messages older than their own conversation, search-index rows without a message, words in
every message, in a few, only in old conversations or only in late messages."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from router.clock import FrozenClock
from router.inbox.queries import (
    NewestMatches,
    _list_filters,
    decode_cursor,
    list_conversations,
)
from router.search import (
    MAX_TERMS,
    expanded_match,
    match_query,
    match_words,
    other_spellings,
    prefix_range,
    prefix_terms,
    search_text,
    spelling_alternatives,
)
from router.store.sqlite import SQLiteStore, iso

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
UNITS = ("east", "north", "south")
STATES = ("open", "acknowledged", "answered", "waiting", "closed")
CHANNELS = ("whatsapp", "webform", "email")
CONVERSATIONS = 260
# Words: alpha in every inbound message; beta in about a tenth; gamma in two; delta only in
# conversations below 60 (and one late message); epsilon only in late messages; zeta only in
# messages older than their conversation; z000..z049 round robin (the prefix "z0" begins 50
# indexed words, more than MAX_TERMS); bau, baustelle and bauhof as word starts of each other.
QUERIES = ("alpha", "Alpha beta", "beta", "gamma", "delta", "epsilon", "zeta", "alpha zeta", "z0", "z01", "z017",
           "bau", "baust", "Strassensperr", "STRASSE", "Straße alpha", "person 7", "nothing-here", "alp bet")


def _build(conn: Any) -> None:
    """Conversations 1..260 without every fifth id being used, their contacts and messages."""
    rng = random.Random(20260302)
    stamp = iso(NOW - timedelta(days=3))
    conversation_ids = [i for i in range(1, CONVERSATIONS + 1) if i % 5 != 3]
    next_message = [1000]
    word_counter = [0]

    def add_message(message_id: int | None, conversation_id: int | None, contact_id: int, words: list[str],
                    direction: str = "in") -> None:
        if message_id is None:
            message_id = next_message[0]
            next_message[0] += 1
        text = " ".join(words)
        conn.execute(
            "INSERT INTO messages (id, conversation_id, contact_id, direction, kind, channel, text, created_at)"
            " VALUES (?, ?, ?, ?, 'message', 'webform', ?, ?)",
            (message_id, conversation_id, contact_id, direction, text, stamp),
        )
        if direction == "in":
            conn.execute("INSERT INTO message_search (rowid, body) VALUES (?, ?)",
                         (message_id, search_text(None, text, f"Person {contact_id}")))

    def words_for(conversation_id: int) -> list[str]:
        words = ["alpha"]
        if rng.random() < 0.1:
            words.append("beta")
        if conversation_id < 60:
            words.append("delta")
        if rng.random() < 0.3:
            words.append(rng.choice(["bau", "baustelle", "bauhof", "Straßensperrung", "Musterstraße"]))
        word_counter[0] += 1
        words.append(f"z{word_counter[0] % 50:03d}")
        return words

    for cid in conversation_ids:
        contact = cid if cid % 7 else cid - 1  # some contacts have two conversations
        conn.execute("INSERT OR IGNORE INTO contacts (id, display_name, created_at, updated_at) VALUES (?, ?, ?, ?)",
                     (contact, f"Person {contact}", stamp, stamp))
        waiting = rng.random() < 0.5
        deadline = iso(NOW + timedelta(hours=rng.uniform(-24, 24))) if waiting else None
        state = rng.choice(STATES[:2]) if waiting else rng.choice(STATES[2:])
        conn.execute(
            "INSERT INTO conversations (id, case_reference, status_token, contact_id, channel, unit, state, language,"
            " routing_rule, routing_reason, deadline, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'de', 'r', 'seeded', ?, ?, ?)",
            (cid, f"K-T{cid:05d}", f"tok{cid}", contact, rng.choice(CHANNELS), rng.choice(UNITS), state, deadline,
             stamp, stamp),
        )
        add_message(None, cid, contact, words_for(cid))
        add_message(None, cid, contact, ["alpha", "reply"], direction="out")  # not indexed
    gamma = rng.sample(conversation_ids, 2)
    for cid in sorted(rng.sample(conversation_ids[:-10], 60) + gamma):
        # Late: a newer message of an older conversation.
        contact = conn.execute("SELECT contact_id FROM conversations WHERE id = ?", (cid,)).fetchone()[0]
        words = ["alpha", "epsilon"] + (["gamma"] if cid in gamma else []) + (["delta"] if cid == 17 else [])
        add_message(None, cid, contact, words)
    for n, cid in enumerate(rng.sample(conversation_ids[len(conversation_ids) // 2:], 15)):
        # Older than its conversation (an import, a moved message): an id below every other one.
        contact = conn.execute("SELECT contact_id FROM conversations WHERE id = ?", (cid,)).fetchone()[0]
        add_message(100 + n, cid, contact, ["alpha", "zeta"])
    add_message(500, None, 1, ["alpha", "beta", "zeta"])  # a message of no conversation
    conn.execute("INSERT INTO message_search (rowid, body) VALUES (999, 'alpha beta zeta orphan')")  # no message


@pytest.fixture
async def store(tmp_path):
    store = SQLiteStore(tmp_path / "search.sqlite3")
    await store.open()
    await store.write(_build)
    yield store
    await store.close()


async def _reference(store: SQLiteStore, q: str, units: tuple[str, ...], state: str | None = None,
                     channel: str | None = None, overdue: bool | None = None, contact_id: int | None = None,
                     before_id: int | None = None) -> list[int]:
    """Every matching conversation that passes the filters, newest first, the plain way."""
    match = match_query(q)
    if match is None:
        return []
    matching = {r[0] for r in await store.fetchall(
        "SELECT m.conversation_id FROM message_search s JOIN messages m ON m.id = s.rowid WHERE message_search MATCH ?",
        (match,),
    )}
    result = []
    for r in await store.fetchall("SELECT c.* FROM conversations c JOIN contacts k ON k.id = c.contact_id"):
        late = r["deadline"] is not None and r["deadline"] < iso(NOW) and r["state"] in ("open", "acknowledged")
        if (r["id"] in matching and r["unit"] in units and (not state or r["state"] == state)
                and (not channel or r["channel"] == channel) and (overdue is None or overdue == late)
                and (contact_id is None or r["contact_id"] == contact_id)
                and (before_id is None or r["id"] < before_id)):
            result.append(r["id"])
    return sorted(result, reverse=True)


FILTERS: list[dict[str, Any]] = [
    {"units": UNITS},
    {"units": ("north",)},
    {"units": ("east", "south")},
    {"units": UNITS, "state": "open"},
    {"units": ("south",), "channel": "email"},
    {"units": UNITS, "overdue": True},
    {"units": ("north",), "overdue": False},
    {"units": UNITS, "contact_id": 55},
    {"units": ()},
]


async def test_every_search_and_filter_pages_like_the_plain_query(store):
    core = SimpleNamespace(store=store, clock=FrozenClock(NOW))
    for q in QUERIES:
        for filters in FILTERS:
            expected = await _reference(store, q, **filters)
            for limit in (1, 4, 50):
                seen: list[int] = []
                before = None
                while True:
                    items, cursor = await list_conversations(core, q=q, before_id=before, limit=limit, **filters)
                    page = [i["id"] for i in items]
                    assert page == expected[len(seen):len(seen) + limit], (q, filters, limit, before)
                    seen += page
                    if cursor is None:
                        break
                    assert len(page) == limit
                    before = decode_cursor(cursor)
                assert seen == expected, (q, filters, limit)


@pytest.mark.parametrize("ways", [("walk",), ("walk", "verify"), ("scan",), ("walk", "verify", "scan")])
async def test_each_way_alone_gives_the_same_answer(store, ways):
    """With tiny chunks, so that every way needs several turns, and a verify that finds the
    messages older than their conversations and has to settle them a few at a time."""
    for q in QUERIES:
        words = match_words(q)
        terms = await prefix_terms(store.fetchall, words)
        match = expanded_match(words, terms)
        for filters in FILTERS[:-1]:
            where, params = _list_filters(filters["units"], filters.get("state"), filters.get("channel"),
                                          filters.get("overdue"), filters.get("contact_id"), NOW)
            for before_id in (None, 251, 120, 40):
                expected = await _reference(store, q, before_id=before_id, **filters)
                for want in (1, 3, 8):
                    if match is None:
                        assert expected == []
                        continue
                    got = await NewestMatches(store, match, where, params, before_id, want, ways=ways,
                                              walk_chunk=3, verify_slice=5, scan_chunk=2, suspects=2).run()
                    assert got == expected[:want], (q, filters, before_id, want, ways)


async def test_listed_terms_match_the_same_messages_as_the_prefix_query(store):
    for q in QUERIES:
        words = match_words(q)
        terms = await prefix_terms(store.fetchall, words)
        expanded = expanded_match(words, terms)
        plain = {r[0] for r in await store.fetchall("SELECT rowid FROM message_search WHERE message_search MATCH ?",
                                                    (match_query(q),))}
        if expanded is None:
            assert plain == set(), q
        else:
            found = await store.fetchall("SELECT rowid FROM message_search WHERE message_search MATCH ?", (expanded,))
            assert {r[0] for r in found} == plain, q


async def test_prefix_terms_lists_the_indexed_words_a_search_word_begins(store):
    terms = await prefix_terms(store.fetchall, ["bau", "z01", "z0", "straße", "strassen", "bau"])
    assert terms == {
        "bau": ["bau", "bauhof", "baustelle"],
        "z01": [f"z01{i}" for i in range(10)],
        "z0": None,  # 50 words: more than MAX_TERMS, left to FTS5's prefix query
        "straße": None,  # not plain ASCII: not looked up
        "strassen": ["strassensperrung"],
    }
    assert 50 > MAX_TERMS
    terms = await prefix_terms(store.fetchall, ["z01", "nothing"])
    assert terms["nothing"] == [] and expanded_match(["z01", "nothing"], terms) is None


def test_search_words_fold_as_before():
    assert match_query("Straße  MUELL") == '"strasse"* "muell"*'
    # a word with an umlaut in either spelling: "ue", or "u" as typed without the dots
    assert match_query("Straße  MÜLL") == '"strasse"* AND ("muell"* OR "mull"*)'
    assert match_query("ü 4") == '("ue"* OR "u") AND "4"'
    assert match_query('" OR * NEAR(') == '"or"* "near"*'
    assert match_query("!!!") is None
    assert match_words("Straßensperrung, Café") == ["strassensperrung", "cafe"]
    assert prefix_range("bau") == ("bau", "bav")
    assert prefix_range("z9") == ("z9", "z:")
    assert prefix_range("foo_bar") is None  # the tokenizer splits it: stays a prefix query
    assert expanded_match(["bau", "x"], {"bau": ["bau", "bauhof"], "x": None}) == '("bau" OR "bauhof") AND "x"*'
    assert expanded_match(["bau", "x"], {"bau": [], "x": None}) is None


def test_words_with_umlauts_are_indexed_in_their_spelling_without_dots_too():
    assert other_spellings("Straße gesperrt – Zufahrt für Müllabfuhr? 🚧 FÜR") == "fur mullabfuhr"
    assert other_spellings("Frau Mu\u0308ller") == "muller"  # typed on a Mac (NFD)
    assert other_spellings("Straße, Café") == other_spellings("plain ascii") == ""
    assert search_text("Öztürk", "Rückruf", "Jürgen") == "oeztuerk rueckruf juergen ozturk ruckruf jurgen"
    started = time.perf_counter()
    assert other_spellings("a" * 200_000 + " ä") == "a"  # linear, however long a word without one
    assert time.perf_counter() - started < 1


def test_words_with_a_letter_like_an_umlaut_are_indexed_in_their_plain_spelling_too():
    """ø is written oe or o, as ö is; æ, ł and the rest have one plain spelling, so ``normalize``
    alone finds them."""
    assert other_spellings("Søren Sørensen, Łódź") == "soren sorensen"
    assert search_text("Grøft", "Bjørn Løkken, Łódź", "Søren") == "groeft bjoern loekken, lodz soeren groft bjorn lokken soren"
    assert spelling_alternatives("Sørensen Łódź") == {"soerensen": "sorensen"}
    assert match_query("Sørensen") == '("soerensen"* OR "sorensen"*)'


def test_a_search_word_with_an_umlaut_has_its_spelling_without_dots_as_alternative():
    assert spelling_alternatives("Müller-Lüdenscheidt 4") == {"mueller": "muller", "luedenscheidt": "ludenscheidt"}
    assert spelling_alternatives("Mueller Straße") == {}
    assert expanded_match(["mueller", "x"], {"mueller": [], "muller": ["muller", "mullers"], "x": None},
                          {"mueller": "muller"}) == '("muller" OR "mullers") AND "x"*'
    assert expanded_match(["mueller"], {"mueller": [], "muller": []}, {"mueller": "muller"}) is None


async def test_complete_prefix_terms_are_not_cut_short_by_a_word_that_begins_nothing(store):
    """Where a word has an alternative spelling, one spelling that begins nothing does not mean
    that nothing matches: the other words' lists are needed whole."""
    assert (await prefix_terms(store.fetchall, ["nothing", "bau"]))["bau"] == ["bau"]  # cut short
    terms = await prefix_terms(store.fetchall, ["nothing", "bau"], complete=True)
    assert terms == {"nothing": [], "bau": ["bau", "bauhof", "baustelle"]}
