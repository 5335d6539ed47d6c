"""router.text: secret identifiers, and text folded once for routing, language and search."""

from __future__ import annotations

import os
import re
import time
import unicodedata

from hypothesis import example, given, settings
from hypothesis import strategies as st

from router.routing import message_text
from router.search import folded_search_text, search_text
from router.text import (
    CASE_ALPHABET,
    guess_folded_language,
    guess_language,
    new_case_reference,
    normalize,
    random_bytes,
    sortable_token,
    strip_accents,
)


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


def test_the_random_pool_never_hands_out_the_same_bytes_twice():
    chunks = [random_bytes(24) for _ in range(2000)]  # crosses several refills of 4 KiB
    assert all(len(c) == 24 for c in chunks)
    assert len(set(chunks)) == len(chunks)
    assert len(random_bytes(10_000)) == 10_000  # more than a pool at once


def test_case_references_use_the_alphabet_evenly():
    refs = [new_case_reference() for _ in range(3000)]
    assert all(re.fullmatch(r"K-[2-9A-HJ-NP-Z]{6}", r) for r in refs)
    seen = {ch for r in refs for ch in r[2:]}
    assert seen == set(CASE_ALPHABET)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=60)), st.one_of(st.none(), st.text(max_size=200)),
       st.one_of(st.none(), st.text(max_size=30)))
@example(None, "0", "\U000119e0")  # a name that folds to nothing (a lone combining mark): no stray space
def test_folding_once_gives_what_folding_each_time_gave(subject, text, name):
    """The ingest path folds subject and text once (``message_text``) and reuses the result for
    the language guess and the search index."""
    folded = message_text({"subject": subject, "text": text})
    joined = " ".join(filter(None, (subject, text)))
    assert folded_search_text(folded, name, joined) == search_text(subject, text, name)
    if len(folded) <= 2000 and len(joined) <= 2000:
        assert guess_folded_language(folded, "xx") == guess_language(joined, "xx")


def test_a_forked_child_does_not_repeat_the_parents_random_bytes():
    random_bytes(1)  # the pool holds bytes now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send what it takes, then leave at once
        os.write(write, random_bytes(32))
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 32)
    os.close(read)
    assert len(child) == 32
    assert child != random_bytes(32)


def test_a_cut_moves_back_to_where_a_character_begins() -> None:
    from router.text import cluster_start

    assert cluster_start("ab", 0) == 0 and cluster_start("ab", 2) == 2  # the ends stay
    mechanic = "\U0001f468\u200d\U0001f527"  # man, zero-width joiner, wrench: one emoji
    text = "Team: " + mechanic * 3
    for index in range(len("Team: "), len(text)):
        assert (cluster_start(text, index) - len("Team: ")) % len(mechanic) == 0
    assert cluster_start("Mu\u0308ller", 2) == 1  # before the u, not between u and its umlaut
    assert cluster_start("\U0001f1e9\U0001f1ea\U0001f1e9\U0001f1ea", 3) == 2  # between two flags, not inside one
    assert cluster_start("a" + "\u0301" * 5, 3) == 3  # one cluster before it: a hard cut


def test_words_german_uses_as_much_as_english_tell_nothing():
    """ "in" and "an" counted as English: short German texts were answered in English."""
    from router.text import guess_language

    for text in ("Rückruf an 0151 12345678 erbeten", "Termin an Montag?", "Kabel in Hofeinfahrt beschädigt"):
        assert guess_language(text, "de") == "de", text
    assert guess_language("Rückruf an 0151 12345678 erbeten", "en") == "de"  # "rueckruf" tells
    assert guess_language("The street in front of our house is closed", "de") == "en"


def test_letters_unicode_does_not_decompose_are_folded_too():
    """NFKD takes the accent off "é" and the dots off "ü", but "ø", "æ", "ł" are letters of
    their own: "Sørensen" stayed "sørensen", and "Sorensen" did not find it. They fold as a
    German writes them without the key (ø as oe, like ö), and without the mark (ø as o)."""
    assert normalize("Søren Sørensen") == "soeren soerensen" and strip_accents("Søren SØRENSEN") == "soren sorensen"
    assert normalize("Ærø, Œuvre") == "aeroe, oeuvre" and strip_accents("Ærø, Œuvre") == "aero, oeuvre"
    assert normalize("Łódź, Żółtowski") == strip_accents("Łódź, Żółtowski") == "lodz, zoltowski"
    assert normalize("Đorđević, Þór, Yılmaz, Ħamrun, Ŧ") == "dordevic, thor, yilmaz, hamrun, t"
    assert normalize("Straße, STRASSE, Maß") == "strasse, strasse, mass"  # ß as before
    assert normalize("Ǿrsted") == "oersted"  # ø with an accent: the accent goes, then the ø folds


_UMLAUTS = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue"})
_OWN_LETTERS = str.maketrans({"ø": "oe", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i",
                              "ħ": "h", "ŧ": "t"})


def _folded_as_specified(text: str) -> str:
    """What ``normalize`` does, written the plain way (slow: a dictionary look-up and a test for
    each character)."""
    folded = unicodedata.normalize("NFC", text).casefold().translate(_UMLAUTS).translate(_OWN_LETTERS)
    bare = "".join(ch for ch in unicodedata.normalize("NFKD", folded) if not unicodedata.combining(ch))
    return bare.translate(_OWN_LETTERS)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from("aouAOUäöüÄÖÜßẞøØæÆœŒłŁđĐðÐþÞıİħŧǿǾéÉ\u0308\u0301\u0338 .-–„“🚧ℌＡ\u00b7ĳ"), max_size=40)
       | st.text(max_size=40))
def test_folding_is_the_plain_definition(text):
    assert normalize(text) == _folded_as_specified(text)
