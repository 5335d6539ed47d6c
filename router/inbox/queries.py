"""Read queries for the shared inbox and the resident's status page, on the reader connection.

Every list query filters on indexed columns and pages by id (a keyset cursor), so it costs the
same on the millionth conversation as on the first."""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..search import expanded_match, match_words, prefix_terms, spelling_alternatives
from ..store.sqlite import iso, parse_iso
from ..tracking import FLAGS
from .openapi import MAX_ID

if TYPE_CHECKING:
    from ..core import Core
    from ..store.sqlite import SQLiteStore

WAITING_STATES = ("open", "acknowledged")


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"c:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Raises ValueError for a cursor we did not make."""
    padded = cursor + "=" * (-len(cursor) % 4)
    text = base64.urlsafe_b64decode(padded.encode()).decode()
    if not text.startswith("c:"):
        raise ValueError("bad cursor")
    value = int(text[2:])
    if not 0 < value <= MAX_ID:
        raise ValueError("bad cursor")
    return value


def _conversation_item(row: Any, now: datetime) -> dict[str, Any]:
    deadline = row["deadline"]
    return {
        "id": row["id"],
        "case_reference": row["case_reference"],
        "channel": row["channel"],
        "unit": row["unit"],
        "state": row["state"],
        "topic": row["topic"],
        "language": row["language"],
        "subject": row["subject"],
        "area": row["area"],
        "assignee": row["assignee"],
        "flags": json.loads(row["flags"] or "[]"),
        "contact": {
            "id": row["contact_id"],
            "display_name": row["display_name"],
            "is_customer": bool(row["is_customer"]),
            "customer_number": row["customer_number"],
            "customer_claim": row["customer_claim"],
        },
        "deadline": rfc3339(deadline),
        "overdue": bool(deadline and row["state"] in WAITING_STATES and deadline < iso(now)),
        "escalation_level": row["escalation_level"],
        "linked_to": row["linked_to"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "last_inbound_at": rfc3339(row["last_inbound_at"]),
        "first_answered_at": rfc3339(row["first_answered_at"]),
    }


def rfc3339(value: str | None) -> str | None:
    """A stored timestamp as the API writes it (``2026-11-30T08:00:00Z``)."""
    dt = parse_iso(value)
    return dt.isoformat().replace("+00:00", "Z") if dt else None


CONVERSATION_SELECT = (
    "SELECT c.*, k.display_name, k.is_customer, k.customer_number, k.customer_claim"
    " FROM conversations c JOIN contacts k ON k.id = c.contact_id"
)


# States whose conversations are the current workload: their number does not grow with history.
WORKLOAD_STATES = ("open", "acknowledged", "waiting")


def _list_filters(
    units: Iterable[str],
    state: str | None,
    channel: str | None,
    overdue: bool | None,
    contact_id: int | None,
    now: datetime,
    *,
    flag: str | None = None,
    by_id: bool = False,
    by_unit: bool = False,
) -> tuple[list[str], list[Any]]:
    """The WHERE terms (on ``conversations c``) and parameters of the inbox list filters.

    One index walks the list, the others are only checked ("+" keeps SQLite off them): the
    first of these that applies, because its rows stay few however long the service runs: a
    contact's conversations; the open and acknowledged ones when only the overdue are asked
    for; the conversations in a state of the current workload (open, acknowledged, waiting);
    those with a flag (``flag``: the flag's partial index; some flags stay for good, so they
    grow with history, and the workload comes first).
    Otherwise one unit's (unit, id) index, the channel's, or the primary key, newest first, as
    SQLite picks. Left to itself SQLite chose the unit or channel index for a contact or a rare
    state and read a whole unit or channel (up to 280 ms at a million conversations).

    ``by_id``: the query walks a given list of conversation ids, so keep SQLite on the primary
    key instead of an index on unit, state or channel (which would make it sort them all).
    ``by_unit``: the query walks the one unit's (unit, id) index, whatever else is filtered."""
    where = []
    params: list[Any] = []
    unit_list = sorted(set(units))
    if by_id:
        driver = "id"
    elif by_unit:
        driver = "unit"
    elif contact_id is not None:
        driver = "contact"
    elif overdue is True:
        driver = "overdue"
    elif state in WORKLOAD_STATES:
        driver = "state"
    elif flag is not None:
        driver = "flag"
    else:
        driver = None

    def column(name: str, *walked_by: str | None) -> str:
        """The column as a term an index may walk, or ("+") only check."""
        return f"c.{name}" if driver in walked_by else f"+c.{name}"

    # One unit: walk its (unit, id) index. Several: walk the primary key newest first and
    # filter; "+" keeps SQLite from choosing the unit index and sorting everything (2 s at 1M).
    unit = column("unit", None, "unit") if len(unit_list) == 1 else "+c.unit"
    where.append(f"{unit} IN ({','.join('?' * len(unit_list))})")
    params.extend(unit_list)
    if state:
        where.append(f"{column('state', None, 'state')} = ?")
        params.append(state)
    if channel:
        # Part of the contact index (contact_id, channel, id).
        where.append(f"{column('channel', None, 'contact')} = ?")
        params.append(channel)
    if overdue is True:
        # The open and acknowledged rows by the state index, sorted: the workload, not history.
        where.append(f"+c.deadline IS NOT NULL AND +c.deadline < ? AND {column('state', 'overdue')} IN ('open', 'acknowledged')")
        params.append(iso(now))
    elif overdue is False:
        where.append("NOT (c.deadline IS NOT NULL AND c.deadline < ? AND c.state IN ('open', 'acknowledged'))")
        params.append(iso(now))
    if contact_id is not None:
        where.append("c.contact_id = ?")
        params.append(contact_id)
    if flag is not None:
        # flags is a JSON list of names: the name in quotes is one whole flag. Written out, not
        # bound, as the flag's partial index is written (``conversations_flag_<name>``, both of
        # its terms), so that SQLite can walk it; a name of FLAGS only.
        if flag not in FLAGS:
            raise ValueError(f"unknown flag {flag!r}")
        quoted = json.dumps(flag)
        where.append(f"c.flags != '[]' AND instr(c.flags, '{quoted}') > 0" if driver == "flag"
                     else f"instr(+c.flags, '{quoted}') > 0")
    return where, params


async def list_conversations(
    core: Core,
    *,
    units: Iterable[str],
    state: str | None = None,
    channel: str | None = None,
    overdue: bool | None = None,
    q: str | None = None,
    contact_id: int | None = None,
    flag: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> tuple[list[dict[str, Any]], str | None]:
    """Conversations of the given units, newest first, filtered; returns (items, next cursor).

    ``q`` without a case reference or any search word (empty, blanks, punctuation: ``-``, a
    ``+`` a URL made a space) is no search, as an empty one is: it listed nothing, while ``q=``
    listed everything."""
    now = core.clock.now()
    units = sorted(set(units))
    reference = None
    if q:
        from ..text import find_case_reference

        reference = find_case_reference(q)
        if not reference and match_words(q):
            return await _search_page(core, q, units, state, channel, overdue, contact_id, flag, before_id, limit, now)
    sql, params = list_query(
        units, state, channel, overdue, contact_id, now, flag=flag, reference=reference, before_id=before_id,
        limit=limit, all_units=core.config.units,
    )
    rows = await core.store.fetchall(sql, params)
    return _page(rows, limit, now)


def list_query(
    units: Iterable[str],
    state: str | None,
    channel: str | None,
    overdue: bool | None,
    contact_id: int | None,
    now: datetime,
    *,
    flag: str | None = None,
    reference: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
    all_units: Iterable[str] = (),
) -> tuple[str, tuple[Any, ...]]:
    """The statement of one list page (``limit + 1`` rows, for the cursor) and its parameters.

    Several units, but not all, with no filter that walks an index of its own (contact, overdue,
    a state of the workload, a channel): each unit's newest by its (unit, id) index, then the
    newest of those. Walking the primary key and checking the unit read the whole table when
    those units had few conversations among many (a hotline's five among 300,000: 104 ms, and
    209 ms for its closed ones)."""
    unit_list = sorted(set(units))
    walks_each_unit = (
        len(unit_list) > 1
        and set(unit_list) != set(all_units)
        and channel is None  # else the channel's index: rarer than a unit's rows (phone among web forms)
        and contact_id is None
        and flag is None
        and overdue is not True
        and state not in WORKLOAD_STATES
        and reference is None
    )
    extra: list[str] = []
    extra_params: list[Any] = []
    if reference is not None:
        extra.append("c.case_reference = ?")
        extra_params.append(reference)
    if before_id is not None:
        extra.append("c.id < ?")
        extra_params.append(before_id)
    if walks_each_unit:
        parts = []
        params: list[Any] = []
        for unit in unit_list:
            where, unit_params = _list_filters([unit], state, channel, overdue, contact_id, now, flag=flag, by_unit=True)
            parts.append(
                f"SELECT id FROM (SELECT c.id FROM conversations c WHERE {' AND '.join(where + extra)}"
                " ORDER BY c.id DESC LIMIT ?)"
            )
            params += [*unit_params, *extra_params, limit + 1]
        sql = f"{CONVERSATION_SELECT} WHERE c.id IN ({' UNION ALL '.join(parts)}) ORDER BY c.id DESC LIMIT ?"
        return sql, (*params, limit + 1)
    where, params = _list_filters(unit_list, state, channel, overdue, contact_id, now, flag=flag)
    sql = f"{CONVERSATION_SELECT} WHERE {' AND '.join(where + extra)} ORDER BY c.id DESC LIMIT ?"
    return sql, (*params, *extra_params, limit + 1)


async def _search_page(
    core: Core,
    q: str,
    units: list[str],
    state: str | None,
    channel: str | None,
    overdue: bool | None,
    contact_id: int | None,
    flag: str | None,
    before_id: int | None,
    limit: int,
    now: datetime,
) -> tuple[list[dict[str, Any]], str | None]:
    """The list filtered by free text: conversations with a message that has every word of
    ``q`` as a word start (see ``router.search``), newest first, a page of them."""
    words = match_words(q)
    if not words:  # list_conversations lists everything for a q without words: never here
        raise ValueError("a search needs a word")
    alternatives = spelling_alternatives(q)
    terms = await prefix_terms(core.store.fetchall, [*words, *alternatives.values()], complete=bool(alternatives))
    match = expanded_match(words, terms, alternatives)
    if match is None:  # a word that begins no indexed word: nothing can match
        return [], None
    where, params = _list_filters(units, state, channel, overdue, contact_id, now, flag=flag)
    by_id, _ = _list_filters(units, state, channel, overdue, contact_id, now, flag=flag, by_id=True)
    if all(listed is not None for listed in terms.values()):
        ids = await NewestMatches(core.store, match, where, params, before_id, limit + 1, where_by_id=by_id).run()
        if not ids:
            return [], None
        rows = await core.store.fetchall(
            f"{CONVERSATION_SELECT} WHERE c.id IN ({','.join('?' * len(ids))}) ORDER BY c.id DESC", tuple(ids)
        )
        return _page(rows, limit, now)
    # A word begins too many indexed words to list them. FTS5 reads every match of such a
    # prefix query whatever is asked next, so collect the matches in one statement and walk
    # their conversations newest first (the by-id filters keep SQLite from sorting them all).
    before = " AND c.id < ?" if before_id is not None else ""
    rows = await core.store.fetchall(
        f"{CONVERSATION_SELECT} WHERE {' AND '.join(by_id)} AND c.id IN ({MATCHING_CONVERSATIONS}){before}"
        " ORDER BY c.id DESC LIMIT ?",
        (*params, match, *((before_id,) if before_id is not None else ()), limit + 1),
    )
    return _page(rows, limit, now)


def _page(rows: Sequence[Any], limit: int, now: datetime) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` items, and a cursor when a further row (``limit + 1`` asked) exists."""
    items = [_conversation_item(r, now) for r in rows[:limit]]
    next_cursor = encode_cursor(rows[limit - 1]["id"]) if len(rows) > limit else None
    return items, next_cursor


# The definition of a free-text match: a conversation with a message whose id is a match of the
# search index. NewestMatches computes the newest of these without reading all of them.
MATCHING_CONVERSATIONS = (
    "SELECT m.conversation_id FROM message_search s JOIN messages m ON m.id = s.rowid WHERE message_search MATCH ?"
)
# Does conversation c have a message that matches? One index probe per message, oldest first.
_HAS_MATCH = (
    "EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id{below}"
    " AND EXISTS (SELECT 1 FROM message_search s WHERE s.rowid = m.id AND message_search MATCH ?))"
)
_NO_ID = 2**63 - 1


class NewestMatches:
    """The ids of the newest ``want`` conversations that pass the list filters ``where``, lie
    below ``before_id`` and match the FTS5 query ``match``, newest first: the same ids, in the
    same order, as ``c.id IN (MATCHING_CONVERSATIONS) ... ORDER BY c.id DESC LIMIT want``, which
    reads every match first (half a second for a word in each of a million messages).

    Three ways to the answer take turns, and the first one that is sure of it gives it:

    - ``walk``: read the matches newest message first (FTS5 reads ``ORDER BY rowid DESC``
      lazily when the query has no prefix terms) in growing chunks, and keep the conversations
      that pass the filters. Once every match is read, the newest ``want`` of those are the
      answer: a rare word is done after one chunk.
    - ``verify``: message ids grow with conversation ids only roughly. A late message of an old
      conversation is harmless (the walk meets it early), but a conversation could also have a
      matching message older than the walk's position ``below``, which the walk has not reached.
      Once the walk holds ``want`` conversations, T the oldest of the newest ``want``, the answer
      is sure when no other conversation above T (and below ``before_id``) has any message below
      ``below``. That is read off the (conversation_id, id) index of messages in slices down
      from the top; the few conversations that do have such a message are checked against the
      search index, and added when they match. Cheap when the newest matches belong to the
      newest conversations: a common word, a first page.
    - ``scan``: walk the conversations that pass the filters newest first, in growing chunks,
      and probe the search index for their messages (about 20 to 100 us a probe). Cheap when
      most of them match: a page deep into a common word's results, one contact's conversations.

    Each turn goes to the way expected to finish first, judged by its hit rate and time per item
    so far; once that estimate exceeds ``EXPLORE_AFTER``, a way that has had less than a third
    of the leader's time gets a turn, so a wrong estimate costs a bounded share. Which way wins
    changes the time taken, never the answer. (Several statements, not one transaction: what is
    written meanwhile may or may not be seen, as between two requests.)

    ``where_by_id``: the same filters, with the same parameters, written for statements that
    look up given conversation ids (``_list_filters(by_id=True)``); ``ways`` and the chunk
    sizes are there for tests.
    """

    EXPLORE_AFTER = 0.005  # seconds
    VERIFY_SECONDS_PER_ID = 1e-7  # before the first slice has been timed

    def __init__(
        self,
        store: SQLiteStore,
        match: str,
        where: Sequence[str],
        params: Sequence[Any],
        before_id: int | None,
        want: int,
        *,
        ways: Sequence[str] = ("walk", "verify", "scan"),
        walk_chunk: int | None = None,
        verify_slice: int = 8192,
        scan_chunk: int = 16,
        suspects: int = 64,
        where_by_id: Sequence[str] | None = None,
    ) -> None:
        self.store = store
        self.match = match
        self.where = " AND ".join(where) or "1"
        # The same filters with the same parameters, for statements that look up given ids
        # (see _list_filters).
        self.where_by_id = " AND ".join(where if where_by_id is None else where_by_id) or "1"
        self.params = tuple(params)
        self.before_id = before_id
        self.want = want
        self.ways = tuple(ways)
        self.spent = dict.fromkeys(self.ways, 0.0)
        self.done = dict.fromkeys(self.ways, 0)  # matches walked, ids verified, conversations scanned
        # walk: every match with rowid >= below has been read; collected: conversations of those
        # matches that pass the filters and lie below before_id, among them all that can still
        # be in the answer (every one above the oldest of the newest `want`).
        self.below = _NO_ID
        self.walk_start: int | None = None  # the newest match
        self.walk_chunk = walk_chunk or 4 * want
        self.collected: set[int] = set()
        self.top: int | None = None
        # verify: no conversation in [verified_down_to, before_id) has a message below `below`
        # that matches, unless it is collected.
        self.verified_down_to: int | None = None
        self.verify_slice = verify_slice
        self.suspects = suspects
        # scan: conversations below scan_cursor are not scanned yet; found: the matches above.
        self.scan_cursor = before_id if before_id is not None else _NO_ID
        self.scan_chunk = scan_chunk
        self.found: list[int] = []

    async def run(self) -> list[int]:
        """Take turns until one way is sure; returns the ids, newest first."""
        while True:
            ready = [w for w in self.ways if w != "verify" or len(self.collected) >= self.want]
            finish = {w: self.spent[w] + self._remaining(w) for w in ready}
            way = min(ready, key=lambda w: (finish[w], self.spent[w]))
            if finish[way] > self.EXPLORE_AFTER:
                behind = [w for w in ready if 3 * self.spent[w] < self.spent[way]]
                if behind:
                    way = min(behind, key=self.spent.__getitem__)
            started = time.perf_counter()
            result = await getattr(self, f"_{way}")()
            self.spent[way] += time.perf_counter() - started
            if result is not None:
                return result

    def _remaining(self, way: str) -> float:
        """Seconds ``way`` still needs, projected from its record so far; infinite when it has
        none to go by."""
        spent, done = self.spent[way], self.done[way]
        if way == "verify":
            high = self.verified_down_to if self.verified_down_to is not None else self._verify_top()
            per_id = spent / done if done else self.VERIFY_SECONDS_PER_ID
            return max(0, high - self._newest()[-1] - 1) * per_id
        if not done:
            return math.inf
        hits = len(self.collected) if way == "walk" else len(self.found)
        needed = (self.want - hits) * done / hits if 0 < hits < self.want else math.inf
        if way == "walk":
            # Or read every match: as many again as so far per message id, down to id 1.
            needed = min(needed, done * self.below / max(1, self.walk_start - self.below))
        return needed * spent / done

    def _newest(self) -> list[int]:
        """The newest ``want`` conversations collected, newest first (T is the last)."""
        return sorted(self.collected, reverse=True)[: self.want]

    def _next_chunk(self, chunk: int, first: int, hits: int, done: int, upper: int) -> int:
        """Enough for the hits still missing at the rate so far, and a quarter more, at least
        the first chunk; twice the last one once enough is found (the walk reads on towards
        the end). Never more than four times the last one, so that a guess from a small sample
        costs one turn only, nor more than ``upper``."""
        if hits >= self.want:
            chunk *= 2
        elif hits:
            chunk = max(first, min(math.ceil((self.want - hits) * done / hits * 1.25), 4 * chunk))
        else:
            chunk *= 4
        return min(chunk, upper)

    def _verify_top(self) -> int:
        """Where verify starts: above the newest conversation, or at before_id."""
        top = (self.top or 0) + 1
        return top if self.before_id is None else min(top, self.before_id)

    async def _walk(self) -> list[int] | None:
        """Read the next chunk of matches, newest first; the answer once all are read."""
        # The first row counts the chunk and gives its oldest and newest message id; the others
        # are the newest `want` conversations of its matches that pass the filters, lie above
        # the current T (older ones cannot be in the answer any more) and below before_id.
        newest = self._newest()
        rows = await self.store.fetchall(
            "WITH f AS (SELECT rowid FROM message_search WHERE message_search MATCH ? AND rowid < ?"
            " ORDER BY rowid DESC LIMIT ?)"
            " SELECT COUNT(*), MIN(rowid), MAX(rowid), (SELECT MAX(id) FROM conversations) FROM f"
            " UNION ALL SELECT * FROM (SELECT NULL, NULL, NULL, c.id"
            " FROM conversations c JOIN contacts k ON k.id = c.contact_id"
            " WHERE c.id IN (SELECT m.conversation_id FROM f CROSS JOIN messages m ON m.id = f.rowid"
            "  WHERE m.conversation_id > ? AND m.conversation_id < ?)"
            f" AND {self.where_by_id} ORDER BY c.id DESC LIMIT ?)",
            (self.match, self.below, self.walk_chunk, newest[-1] if len(newest) >= self.want else 0,
             self.before_id if self.before_id is not None else _NO_ID, *self.params, self.want),
        )
        count, oldest, first, self.top = rows[0]
        self.collected.update(r[3] for r in rows[1:])
        if count < self.walk_chunk:
            return self._newest()  # every match has been read
        if self.walk_start is None:
            self.walk_start = first
        self.below = oldest
        self.done["walk"] += count
        self.walk_chunk = self._next_chunk(self.walk_chunk, 4 * self.want, len(self.collected), self.done["walk"], 16384)
        return None

    async def _verify(self) -> list[int] | None:
        """Check the next slice of conversations above T; the answer once all are checked."""
        if self.verified_down_to is None:
            self.verified_down_to = self._verify_top()
        threshold = self._newest()[-1]
        if self.verified_down_to <= threshold + 1:
            return self._newest()
        high = self.verified_down_to
        low = max(threshold, high - self.verify_slice)
        below = self.below
        # Collected conversations are in the answer already, whatever else they hold.
        known = [c for c in self.collected if low < c < high]
        exclude = f" AND conversation_id NOT IN ({','.join('?' * len(known))})" if known else ""
        rows = await self.store.fetchall(
            "SELECT DISTINCT conversation_id FROM messages"
            f" WHERE conversation_id > ? AND conversation_id < ? AND +id < ?{exclude}"
            " ORDER BY conversation_id DESC LIMIT ?",
            (low, high, below, *known, self.suspects + 1),
        )
        suspects = [r[0] for r in rows]
        if len(suspects) > self.suspects:
            # Settle the newest ones now; the next slice starts below them.
            low = suspects[self.suspects]
            suspects = suspects[: self.suspects]
        if suspects:
            marks = ",".join("?" * len(suspects))
            matching = await self.store.fetchall(
                f"SELECT c.id FROM conversations c JOIN contacts k ON k.id = c.contact_id"
                f" WHERE c.id IN ({marks}) AND {self.where_by_id} AND {_HAS_MATCH.format(below=' AND +m.id < ?')}",
                (*suspects, *self.params, below, self.match),
            )
            self.collected.update(r[0] for r in matching)
        self.done["verify"] += high - low - 1
        self.verified_down_to = low + 1
        self.verify_slice = min(self.verify_slice * 4, 1 << 20)
        if self.verified_down_to <= self._newest()[-1] + 1:
            return self._newest()
        return None

    async def _scan(self) -> list[int] | None:
        """Probe the next chunk of conversations; the answer once it has enough or reached the
        oldest conversation."""
        # The chunk: the next scan_chunk conversations that pass the filters, down to floor,
        # the oldest of them (0 when fewer are left). The first row carries floor alone.
        floor_sql = (
            f"COALESCE((SELECT c.id FROM conversations c WHERE {self.where} AND c.id < ?"
            " ORDER BY c.id DESC LIMIT 1 OFFSET ?), 0)"
        )
        floor_params = (*self.params, self.scan_cursor, self.scan_chunk - 1)
        rows = await self.store.fetchall(
            f"SELECT {floor_sql}, NULL UNION ALL SELECT * FROM ("
            " SELECT NULL, c.id FROM conversations c JOIN contacts k ON k.id = c.contact_id"
            f" WHERE {self.where} AND c.id < ? AND c.id >= {floor_sql} AND {_HAS_MATCH.format(below='')}"
            " ORDER BY c.id DESC LIMIT ?)",
            (*floor_params, *self.params, self.scan_cursor, *floor_params, self.match,
             self.want - len(self.found)),
        )
        floor = rows[0][0]
        self.found.extend(r[1] for r in rows[1:])
        if len(self.found) >= self.want or floor == 0:
            return self.found
        self.done["scan"] += self.scan_chunk
        self.scan_cursor = floor
        self.scan_chunk = self._next_chunk(self.scan_chunk, 16, len(self.found), self.done["scan"], 4096)
        return None


async def conversation_unit(core: Core, conversation_id: int) -> str | None:
    row = await core.store.fetchone("SELECT unit FROM conversations WHERE id = ?", (conversation_id,))
    return row["unit"] if row else None


def _message_item(row: Any, deliveries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    payload = json.loads(row["payload"]) if row["payload"] else {}
    item = {
        "id": row["id"],
        "direction": row["direction"],
        "kind": row["kind"],
        "channel": row["channel"],
        "author": row["author"],
        "subject": row["subject"],
        "text": row["text"],
        "language": row["language"],
        "created_at": rfc3339(row["created_at"]),
        "delivery_status": row["delivery_status"],
        "edited_at": rfc3339(row["edited_at"]),
        "deleted_at": rfc3339(row["deleted_at"]),
        "target_message_id": row["target_message_id"],
    }
    for key in ("attachments", "location", "address", "meta", "flags", "previous_text"):
        if key in payload:
            item[key] = payload[key]
    if deliveries is not None:
        item["deliveries"] = deliveries
    return item


async def conversation_detail(core: Core, conversation_id: int) -> dict[str, Any] | None:
    """One conversation with messages across channels, routing reason, escalations, events,
    call-back attempts and the delivery state of every outbound message."""
    now = core.clock.now()
    row = await core.store.fetchone(f"{CONVERSATION_SELECT} WHERE c.id = ?", (conversation_id,))
    if row is None:
        return None
    item = _conversation_item(row, now)
    item["routing"] = {"rule": row["routing_rule"], "reason": row["routing_reason"]}
    item["status_url"] = core.status_url(row["status_token"])
    outbox = await core.store.fetchall(
        "SELECT id, message_id, channel, to_kind, to_address, state, attempts, last_error, delivery_status,"
        " next_attempt_at FROM outbox WHERE conversation_id = ? ORDER BY id",
        (conversation_id,),
    )
    by_message: dict[int, list[dict[str, Any]]] = {}
    for o in outbox:
        by_message.setdefault(o["message_id"], []).append({
            "channel": o["channel"], "to": o["to_address"], "state": o["state"], "attempts": o["attempts"],
            "delivery_status": o["delivery_status"], "last_error": o["last_error"],
            "next_attempt_at": rfc3339(o["next_attempt_at"]) if o["state"] == "pending" else None,
        })
    messages = await core.store.fetchall(
        # A reaction or edit with deleted_at was superseded by a later one of its sender.
        "SELECT * FROM messages WHERE conversation_id = ?"
        " AND NOT (kind IN ('reaction', 'edit') AND deleted_at IS NOT NULL) ORDER BY id",
        (conversation_id,),
    )
    item["messages"] = [_message_item(m, by_message.get(m["id"], [])) for m in messages]
    item["pending_deliveries"] = sum(1 for o in outbox if o["state"] in ("pending", "sending"))
    escalations = await core.store.fetchall(
        "SELECT level, from_unit, to_unit, reason, at FROM escalations WHERE conversation_id = ? ORDER BY id",
        (conversation_id,),
    )
    item["escalations"] = [{**dict(e), "at": rfc3339(e["at"])} for e in escalations]
    events = await core.store.fetchall(
        "SELECT kind, actor, data, at FROM events WHERE conversation_id = ? ORDER BY id", (conversation_id,)
    )
    item["events"] = [
        {"kind": e["kind"], "actor": e["actor"], "data": json.loads(e["data"]) if e["data"] else {}, "at": rfc3339(e["at"])}
        for e in events
    ]
    callbacks = await core.store.fetchall(
        "SELECT outcome, note, staff, at FROM callback_attempts WHERE conversation_id = ? ORDER BY id", (conversation_id,)
    )
    item["callbacks"] = [{**dict(c), "at": rfc3339(c["at"])} for c in callbacks]
    item["contact"]["identities"] = await _identities(core, row["contact_id"])
    return item


async def resident_view(core: Core, status_token: str) -> dict[str, Any] | None:
    """What the resident sees on the status page: no notes, no internal notifications, no
    staff names beyond the unit."""
    row = await core.store.fetchone("SELECT * FROM conversations WHERE status_token = ?", (status_token,))
    if row is None:
        return None
    messages = await core.store.fetchall(
        "SELECT id, direction, kind, channel, text, created_at, delivery_status FROM messages"
        " WHERE conversation_id = ? AND direction IN ('in', 'out') AND kind NOT IN ('reaction', 'edit', 'deletion', 'callback')"
        " ORDER BY id",
        (row["id"],),
    )
    unit = core.config.units.get(row["unit"])
    sender = await core.store.fetchone(
        "SELECT kind, address FROM identities WHERE contact_id = ? ORDER BY id LIMIT 1", (row["contact_id"],)
    )
    return {
        "id": row["id"],
        "sender": {"kind": sender["kind"], "address": sender["address"]} if sender else None,
        "case_reference": row["case_reference"],
        "state": row["state"],
        "unit": row["unit"],
        "unit_name": unit.name if unit else row["unit"],
        "deadline": parse_iso(row["deadline"]),
        "language": row["language"],
        "topic": row["topic"],
        "created_at": parse_iso(row["created_at"]),
        "messages": [
            {"direction": m["direction"], "kind": m["kind"], "channel": m["channel"], "text": m["text"],
             "created_at": parse_iso(m["created_at"]), "delivery_status": m["delivery_status"]}
            for m in messages
        ],
    }


async def contact_detail(core: Core, contact_id: int) -> dict[str, Any] | None:
    row = await core.store.fetchone("SELECT * FROM contacts WHERE id = ?", (contact_id,))
    if row is None:
        return None
    identities = await _identities(core, contact_id)
    return {
        "id": row["id"],
        "display_name": row["display_name"],
        "language": row["language"],
        "is_customer": bool(row["is_customer"]),
        "customer_number": row["customer_number"],
        "customer_claim": row["customer_claim"],
        "merged_into": row["merged_into"],
        "created_at": rfc3339(row["created_at"]),
        "identities": identities,
    }


async def _identities(core: Core, contact_id: int) -> list[dict[str, Any]]:
    """A contact's addresses as staff see them: ``failed`` once a provider refused one for good,
    ``claimed`` while it was only typed into a web form beside another address and its owner has
    not written from it yet (it serves only that contact's form cases)."""
    rows = await core.store.fetchall(
        "SELECT kind, address, last_inbound_at, failed_at, claimed FROM identities WHERE contact_id = ? ORDER BY id",
        (contact_id,),
    )
    return [
        {"kind": i["kind"], "address": i["address"], "last_inbound_at": rfc3339(i["last_inbound_at"]),
         "failed": i["failed_at"] is not None, "claimed": bool(i["claimed"])}
        for i in rows
    ]


# A merged contact's conversations went to the contact it was merged into, which may have been
# merged into another since: the chain is followed (in one statement, one snapshot, so a merge
# in between cannot hide the contact), at most this many links.
_MAX_MERGES = 64


async def contact_units(core: Core, contact_id: int) -> set[str]:
    """The units of a contact's conversations; of a merged contact (it has none left), those of
    the contact it was merged into, at the end of the chain of merges: staff who see the
    survivor see where the merged contact went."""
    rows = await core.store.fetchall(
        "WITH RECURSIVE chain(id, n) AS (SELECT ?, 0 UNION ALL"
        " SELECT k.merged_into, chain.n + 1 FROM contacts k JOIN chain ON k.id = chain.id"
        " WHERE k.merged_into IS NOT NULL AND chain.n < ?)"
        " SELECT DISTINCT unit FROM conversations WHERE contact_id IN (SELECT id FROM chain)",
        (contact_id, _MAX_MERGES),
    )
    return {r["unit"] for r in rows}


def stats_query(units: Iterable[str], now: str, since: str | None = None, until: str | None = None) -> tuple[str, tuple[Any, ...]]:
    """The statement of ``stats`` and its parameters: one statement, so one connection and one
    snapshot. ``since`` and ``until`` (timestamps as the store writes them) keep the
    conversations created in [since, until); with either, SQLite reads that period through
    ``conversations_created``, not every conversation the units ever had. (An index of time
    alone, not of unit and time: its entries go to one end of one b-tree, where ingest
    measured 460 bytes more written per message, against 1,300 for one end per unit.)"""
    unit_list = sorted(set(units))
    marks = ",".join("?" * len(unit_list))
    # SQLite prefers the equality on unit (conversations_unit) to a range of time, and would read
    # the units' whole history for a day: with a period, "+unit" leaves it only the time.
    unit = "unit" if since is None and until is None else "+unit"
    period, bounds = "", ()
    if since is not None:
        period, bounds = period + " AND created_at >= ?", (*bounds, since)
    if until is not None:
        period, bounds = period + " AND created_at < ?", (*bounds, until)
    # The median is worked out in SQL, so the rows never reach Python (a million of them took
    # the reader's thread and the GIL for seconds); julianday() reads our timestamps to the
    # millisecond.
    sql = (
        "WITH d AS (SELECT channel, unit, (julianday(first_answered_at) - julianday(created_at)) * 86400.0 AS s"
        f"  FROM conversations WHERE {unit} IN ({marks}){period} AND first_answered_at IS NOT NULL),"
        " r AS (SELECT channel, unit, s, ROW_NUMBER() OVER w AS n, COUNT(*) OVER (PARTITION BY channel, unit) AS total"
        "  FROM d WINDOW w AS (PARTITION BY channel, unit ORDER BY s)),"
        " medians AS (SELECT channel, unit, AVG(s) AS median FROM r WHERE n IN ((total + 1) / 2, (total + 2) / 2)"
        "  GROUP BY channel, unit),"
        " a AS (SELECT channel, unit, COUNT(*) AS received,"
        # Acknowledged: an acknowledgement went out. Not "any state but open": a machine's
        # message opens a waiting conversation with none, and one closed or answered before
        # its acknowledgement went (or after it failed) had none either.
        "  SUM(state = 'acknowledged' OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND m.kind = 'ack'"
        "   AND m.delivery_status IN ('sent', 'delivered', 'read'))) AS acknowledged,"
        "  SUM(first_answered_at IS NOT NULL) AS answered,"
        "  SUM(deadline IS NOT NULL AND deadline < ? AND state IN ('open', 'acknowledged')) AS overdue"
        f"  FROM conversations AS c WHERE {unit} IN ({marks}){period} GROUP BY channel, unit)"
        " SELECT a.*, medians.median FROM a LEFT JOIN medians USING (channel, unit) ORDER BY channel, unit"
    )
    return sql, (*unit_list, *bounds, now, *unit_list, *bounds)


async def stats(
    core: Core, units: Iterable[str], since: datetime | None = None, until: datetime | None = None
) -> list[dict[str, Any]]:
    """Per channel and unit: received, acknowledged, answered, overdue, median time to first
    human answer (seconds), of the conversations created in [since, until) (all when open).
    Without a period it reads every conversation of the units (seconds at a million), so on a
    connection of its own."""
    sql, params = stats_query(units, iso(core.clock.now()), iso(since), iso(until))
    rows = await core.store.fetchall_apart(sql, params)
    result = []
    for r in rows:
        median = None if r["median"] is None else round(r["median"], 3)
        result.append({
            "channel": r["channel"], "unit": r["unit"], "received": r["received"],
            "acknowledged": r["acknowledged"] or 0, "answered": r["answered"] or 0, "overdue": r["overdue"] or 0,
            "median_first_answer_seconds": median,
        })
    return result


async def outbox_backlog(core: Core) -> list[tuple[str, str, int]]:
    """The outbox rows not sent, by state and channel: pending, sending and failed (for
    ``/metrics``)."""
    rows = await core.store.fetchall("SELECT state, channel, COUNT(*) AS n FROM outbox"
                                     " WHERE state IN ('pending', 'sending', 'failed') GROUP BY state, channel")
    return [(r["state"], r["channel"], r["n"]) for r in rows]


async def overdue_by_unit(core: Core) -> list[tuple[str, int]]:
    """The open and acknowledged conversations past their deadline, by unit, as ``overdue=true``
    lists them: the workload, read by the state index (for ``/metrics``)."""
    rows = await core.store.fetchall(
        "SELECT unit, COUNT(*) AS n FROM conversations WHERE state IN ('open', 'acknowledged')"
        " AND deadline IS NOT NULL AND deadline < ? GROUP BY unit ORDER BY unit", (iso(core.clock.now()),))
    return [(r["unit"], r["n"]) for r in rows]
