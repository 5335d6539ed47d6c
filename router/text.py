"""Text helpers for matching and threading: umlaut-insensitive normalisation, keyword search,
a small language guess, and case references."""

from __future__ import annotations

import base64
import os
import re
import threading
import time
import unicodedata

# Umlauts as a German writes them without the key. (Case folding writes ß and ẞ as "ss" already.)
_UMLAUTS = (("ä", "ae"), ("ö", "oe"), ("ü", "ue"))
# Letters that Unicode does not decompose, so that NFKD leaves them as they are: Nordic ø, æ, œ,
# Polish ł, Croatian đ, Icelandic ð and þ, Turkish ı, Maltese ħ, Sami ŧ. ``normalize`` writes
# them like the umlauts (ø as oe, as it is ö's sibling and Danes and Norwegians transliterate
# it), ``strip_accents`` without the mark (ø as o).
_OWN_LETTERS = (("æ", "ae"), ("œ", "oe"), ("ł", "l"), ("đ", "d"), ("ð", "d"), ("þ", "th"), ("ı", "i"), ("ħ", "h"),
                ("ŧ", "t"))
_FOLDS = (*_UMLAUTS, ("ø", "oe"), *_OWN_LETTERS)
_PLAIN_OWN_LETTERS = (("ø", "o"), *_OWN_LETTERS)
_NOT_ASCII = re.compile(r"[^\x00-\x7f]+")


def _replaced(text: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """``text`` with each letter of ``pairs`` written as given. A test and a replace for each
    letter: str.translate with a table looks each character up in a dictionary, and took 21 us
    of the 24 that folding a message of 250 characters cost; these take about 1."""
    for letter, written in pairs:
        if letter in text:
            text = text.replace(letter, written)
    return text


def _without_marks(match: re.Match[str]) -> str:
    return "".join(ch for ch in match.group() if not unicodedata.combining(ch))


def _bare(text: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """``text`` decomposed (NFKD) without its combining marks, then its own letters (``pairs``)
    folded: a letter with an accent on ø (ǿ) is ø once the accent is gone. Only the runs beyond
    ASCII are looked at character by character: a message with a few "„" or "é" took 25 us."""
    bare = _NOT_ASCII.sub(_without_marks, unicodedata.normalize("NFKD", text))
    return bare if bare.isascii() else _replaced(bare, pairs)


# K- and six characters from an alphabet without 0/O/1/I, as DESIGN.md specifies.
CASE_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
CASE_REFERENCE_RE = re.compile(r"\bK-([2-9A-HJ-NP-Z]{6})\b")


def normalize(text: str) -> str:
    """Case-fold, write umlauts as ae/oe/ue/ss, letters Unicode does not decompose likewise
    (ø as oe, æ as ae, ł as l: ``_OWN_LETTERS``) and drop other accents: "Straße" -> "strasse",
    "Sørensen" -> "soerensen".
    An umlaut written as a letter and a combining mark (NFD, as macOS and iOS often send it)
    folds as the one character does: "Störung" is "stoerung" either way."""
    if text.isascii():
        return text.lower()
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    folded = _replaced(text.casefold(), _FOLDS)
    if folded.isascii():
        return folded
    return _bare(folded, _FOLDS)


def strip_accents(text: str) -> str:
    """``normalize``, but umlauts lose their dots instead of becoming two letters: "Müller" ->
    "muller", "Öztürk" -> "ozturk", and ø its stroke: "Sørensen" -> "sorensen" ("ß" is still
    "ss", "æ" "ae", "ł" "l"). The spelling of whoever has no umlaut on their keyboard, and of
    names that are not German."""
    if text.isascii():
        return text.lower()
    return _bare(unicodedata.normalize("NFC", text).casefold(), _PLAIN_OWN_LETTERS)


_GERMAN = frozenset(
    "und der die das ist nicht ich sie wir bitte danke mit auf fuer vor bei eine einen ein "
    "unser unsere meine mein haus strasse seit wann warum hallo guten tag gehweg baustelle "
    "sehr geehrte damen herren gruessen zu von im wird kein keine nach noch auch wie "
    "wo heute morgen gestern termin rueckruf".split()
)
# Neither list has a word both languages use ("in", "an", "am", "was"): "Kabel in Hofeinfahrt
# beschaedigt" was English, and "The cable was cut" would be German.
_ENGLISH = frozenset(
    "the and is not you we please thanks thank with on for front of at a our my house "
    "street since when why hello dear regards there here".split()
)
_WORD = re.compile(r"[a-z]+")


def guess_language(text: str | None, default: str) -> str:
    """A cheap German/English guess by common words; ``default`` when unsure."""
    if not text:
        return default
    return guess_folded_language(normalize(text[:2000]), default)


def guess_folded_language(folded: str, default: str) -> str:
    """``guess_language`` for text already passed through ``normalize``."""
    words = _WORD.findall(folded[:2000])
    de = sum(w in _GERMAN for w in words)
    en = sum(w in _ENGLISH for w in words)
    if de > en:
        return "de"
    if en > de:
        return "en"
    return default


class _RandomPool:
    """Bytes from the operating system's CSPRNG, fetched 4 KiB at a time.

    A message needs three secrets (case reference, status token, idempotency key); one
    ``getrandom`` system call each was 6 % of the ingest unit under load. The bytes are the
    same kernel randomness, handed out once each; a forked child empties its copy of the pool,
    so parent and child never hand out the same bytes."""

    SIZE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0

    def take(self, count: int) -> bytes:
        with self._lock:
            if self._offset + count > len(self._buffer):
                self._buffer = os.urandom(max(self.SIZE, count))
                self._offset = 0
            start = self._offset
            self._offset += count
            return self._buffer[start:self._offset]


random_bytes = _RandomPool().take


def new_case_reference() -> str:
    """A fresh random case reference like ``K-7F3QX2``."""
    # 256 is a multiple of the alphabet's 32 characters, so every character is equally likely.
    return "K-" + "".join([CASE_ALPHABET[b % 32] for b in random_bytes(6)])


def sortable_token(random_count: int, *, hex: bool = False) -> str:
    """A secret key (``random_count`` random bytes, URL-safe or hex) led by the time in hex.

    Status tokens and idempotency keys are looked up through unique indexes. Wholly random
    keys land anywhere in such an index, so every commit rewrote index pages all over the
    file (measured at 60,000 conversations: 31 KB written per message instead of 18 KB, and
    12 % more time on the ingest path, growing with the file). Led by the time, new keys go
    next to the newest ones; the random part keeps them unguessable."""
    secret = random_bytes(random_count)
    text = secret.hex() if hex else base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")
    return f"{time.time_ns() // 1000:013x}{text}"


def find_case_reference(*texts: str | None) -> str | None:
    """The first case reference in any of the texts (subject first), upper-cased."""
    for text in texts:
        if text:
            m = CASE_REFERENCE_RE.search(text.upper())
            if m:
                return "K-" + m.group(1)
    return None


# -- where a text may be cut -------------------------------------------------------------------

_ZWJ = "\u200d"


def _is_regional_indicator(char: str) -> bool:
    return "\U0001f1e6" <= char <= "\U0001f1ff"


def _extends(char: str) -> bool:
    """Whether ``char`` belongs to the character before it (Unicode's Extend and SpacingMark,
    roughly): combining marks (the umlaut of a decomposed "ü"), variation selectors (the
    emoji form of "❤"), skin-tone modifiers, the zero-width joiner and non-joiner, the tags
    of a subdivision flag, and the vowels and final consonants of a Hangul syllable."""
    if unicodedata.category(char) in ("Mn", "Me", "Mc"):  # variation selectors are Mn
        return True
    point = ord(char)
    return (
        point in (0x200C, 0x200D)
        or 0x1F3FB <= point <= 0x1F3FF  # skin tones (Sk)
        or 0xE0020 <= point <= 0xE007F  # tags (Cf)
        or 0x1160 <= point <= 0x11FF  # Hangul medial vowels and final consonants
        or 0xD7B0 <= point <= 0xD7FF
    )


def _breaks_before(text: str, index: int) -> bool:
    """Whether a part may end before ``text[index]`` without cutting a character in two."""
    char, before = text[index], text[index - 1]
    if _extends(char) or before == _ZWJ or (before == "\r" and char == "\n"):
        return False
    if 0x1100 <= ord(before) <= 0x115F and (0x1100 <= ord(char) <= 0x115F or 0xAC00 <= ord(char) <= 0xD7A3):
        return False  # a Hangul leading consonant before another, or before a syllable
    if _is_regional_indicator(char) and _is_regional_indicator(before):
        # Flags are pairs of regional indicators: count the run to know which pair this is.
        run = 0
        while index - run - 1 >= 0 and _is_regional_indicator(text[index - run - 1]):
            run += 1
        return run % 2 == 0
    return True


def cluster_start(text: str, index: int) -> int:
    """``index`` moved back to where the character a reader sees begins (a grapheme cluster,
    after Unicode's rules in the cases that matter here): never between a letter and its
    combining mark, inside a flag's pair of regional indicators or an emoji joined with
    zero-width joiners, or before a skin-tone modifier or variation selector. ``index`` itself
    when it is at either end of ``text``, or when one cluster fills everything before it (a
    hard cut is all that is left then)."""
    if index <= 0 or index >= len(text):
        return index
    cut = index
    while cut > 0 and not _breaks_before(text, cut):
        cut -= 1
    return cut or index
