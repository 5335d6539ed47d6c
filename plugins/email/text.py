"""Turning mail body parts into readable text: charsets, format=flowed, HTML, and separating
the new text from quoted history and the signature.

Everything here is pure and never raises on bad input: a mail that cannot be decoded exactly is
decoded as well as it can be, because a resident's message must never be lost to a charset.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import re
from email.message import Message
from html import unescape

from .limits import MAX_ATTRIBUTION_CHARS

# Labels of text that is really Windows-1252: the WHATWG Encoding Standard's labels of
# windows-1252 (browsers, Thunderbird and webmail decode all of them so), and Python's spellings.
_SINGLE_BYTE_LABELS = frozenset({
    "ansi_x3.4-1968", "ascii", "cp1252", "cp819", "csisolatin1", "ibm819", "iso-8859-1", "iso-ir-100", "iso8859-1",
    "iso88591", "iso_8859-1", "iso_8859-1:1987", "l1", "latin1", "latin-1", "us-ascii", "windows-1252", "x-cp1252",
})

# The Windows code page beside each ISO-8859 charset (the same letters at 0xA0-0xFF, or nearly):
# what a byte 0x80-0x9F under that label really is. Any other charset: Windows-1252.
_WINDOWS_SIBLINGS = {
    "iso8859-2": "cp1250", "iso8859-5": "cp1251", "iso8859-7": "cp1253", "iso8859-9": "cp1254",
    "iso8859-8": "cp1255", "iso8859-6": "cp1256", "iso8859-13": "cp1257",
}

_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_C1 = re.compile("[\x80-\x9f]")


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode ``data`` labelled ``charset``, falling back when the label is wrong or unknown.

    UTF-8 content labelled as Latin-1 (a common client bug) is recognised because valid
    multi-byte UTF-8 sequences almost never occur in real Latin-1 text. As the WHATWG Encoding
    Standard says: a byte order mark decides the encoding, whatever the label, and is no text;
    Latin-1 and ASCII labels mean Windows-1252. And since no mail is text with C1 control
    characters (RFC 5198), those that a label gives (Outlook's „quotes“ and dashes under
    ISO-8859-15, or converted to UTF-8 as if Latin-1) are read as the Windows code page's
    characters (``_without_c1``). A text under a Windows label (windows-1250 ... 1258) that
    holds a byte its code page leaves undefined, and is no UTF-8, is read in that code page,
    the undefined byte as its code point (as WHATWG does), not as Windows-1252.
    """
    label = (charset or "").strip().strip('"').lower()
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            data, label = data[len(bom):], encoding
            break
    text, codec = _decode(data, label)
    return _without_c1(text, codec)


def _decode(data: bytes, label: str) -> tuple[str, str]:
    """The text of ``data`` and the name of the codec that read it."""
    if label in _SINGLE_BYTE_LABELS or not label:
        if not data.isascii():
            try:
                return data.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                pass
        return _decode_cp1252(data), "cp1252"
    try:
        codec = codecs.lookup(label).name
    except LookupError:
        codec = "utf-8"
    try:
        return data.decode(codec), codec
    except (UnicodeDecodeError, LookupError):
        pass
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    if codec in _WINDOWS_CODE_PAGES:
        # A byte the labelled code page leaves undefined costs only itself: Windows-1252 made
        # every letter of a Polish, Russian or Greek text a wrong one.
        return _decode_windows(data, codec), codec
    return _decode_cp1252(data), "cp1252"


def _without_c1(text: str, codec: str) -> str:
    """``text`` without the invisible: a byte order mark left inside it (the start of a second
    file pasted in: U+FEFF as a character is deprecated), and C1 controls (U+0080-U+009F) as the
    characters of the Windows code page beside ``codec`` (those it defines)."""
    if text.isascii():
        return text
    if "\ufeff" in text:
        text = text.replace("\ufeff", "")
    if _C1.search(text):
        # Under a Windows code page they are its undefined bytes, kept as their code points.
        windows = codec if codec in _WINDOWS_CODE_PAGES else _WINDOWS_SIBLINGS.get(codec, "cp1252")
        text = text.translate(_c1_table(windows))
    return text


@functools.cache
def _c1_table(windows: str) -> dict[int, str]:
    """U+0080-U+009F -> the character of that byte in the code page ``windows``, where it has one."""
    table = {}
    for byte in range(0x80, 0xA0):
        try:
            table[byte] = bytes([byte]).decode(windows)
        except UnicodeDecodeError:
            continue
    return table


# The Windows code pages (Python's names), decoded with ``_decode_windows`` where the codec refuses.
_WINDOWS_CODE_PAGES = frozenset(f"cp125{n}" for n in range(9))


@functools.cache
def _windows_table(codec: str) -> str:
    """A Windows code page with its undefined bytes as the code points of the same number (as
    WHATWG decodes them), for ``codecs.charmap_decode``."""
    return "".join(bytes([b]).decode(codec, errors="ignore") or chr(b) for b in range(256))


def _decode_windows(data: bytes, codec: str) -> str:
    """``data`` in the Windows code page ``codec``; a byte it leaves undefined is its code point."""
    return codecs.charmap_decode(data, "strict", _windows_table(codec))[0]


def _decode_cp1252(data: bytes) -> str:
    """Windows-1252 with its five undefined bytes as their code points: one such byte made the
    whole text Latin-1, every „quote“ a control character."""
    return _decode_windows(data, "cp1252")


# Characters that are text already: neither ASCII nor an undecoded byte (a surrogate escape).
_DECODED = re.compile(r"([^\x00-\x7f\udc80-\udcff]+)")


def fix_surrogates(value: str) -> str:
    """Repair header text holding undecoded 8-bit bytes (surrogate escapes) best-effort.

    Only the bytes are decoded (as UTF-8 where all of them are, else as Windows-1252): text
    that was decoded already stays as it is. The standard library hands over both at once, a
    display name of unencoded Latin-1 ("J\\xfcrgen") beside an encoded word it decoded
    ("Weiß"), and encoding it all again made the decoded text mojibake ("WeiÃŸ")."""
    if not any("\udc80" <= ch <= "\udcff" for ch in value):
        return value
    pieces = _DECODED.split(value)  # bytes and ASCII, text, bytes and ASCII, ...
    if len(pieces) == 1:
        return decode_bytes(value.encode("utf-8", "surrogateescape"), None)
    raw = [piece.encode("utf-8", "surrogateescape") for piece in pieces[0::2]]
    try:
        pieces[0::2] = [_without_c1(data.decode("utf-8"), "utf-8") for data in raw]
    except UnicodeDecodeError:
        pieces[0::2] = [_without_c1(_decode_cp1252(data), "cp1252") for data in raw]
    return "".join(pieces)


# A run of RFC 2047 encoded words (``=?charset?Q?text?=``), with or without blanks between.
_ENCODED_WORD = r"=\?[^?\s]+\?[qQbB]\?[^?\s]*\?="
_ENCODED_WORD_RUN = re.compile(rf"{_ENCODED_WORD}(?:\s*{_ENCODED_WORD})*")
_ENCODED_WORD_PARTS = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?\s]*)\?=")


def _encoded_word_bytes(encoding: str, data: str) -> bytes | None:
    """The bytes of one encoded word's text (Q or B), or None when they cannot be read."""
    try:
        if encoding in "qQ":
            return binascii.a2b_qp(data.encode("ascii"), header=True)
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (ValueError, binascii.Error):  # UnicodeEncodeError is a ValueError
        return None


def _word_run_text(run: str) -> str | None:
    """The text of one run of encoded words, each charset through ``decode_bytes``; None when a
    word cannot be read. Neighbouring words of one charset are decoded together: some clients
    split a character's bytes between two words."""
    chunks: list[tuple[str, bytearray]] = []
    for charset, encoding, data in _ENCODED_WORD_PARTS.findall(run):
        found = _encoded_word_bytes(encoding, data)
        if found is None:
            return None
        label = charset.split("*", 1)[0].lower()  # RFC 2231 adds a language: utf-8*de
        if chunks and chunks[-1][0] == label:
            chunks[-1][1].extend(found)
        else:
            chunks.append((label, bytearray(found)))
    return "".join(decode_bytes(bytes(data), label) for label, data in chunks)


def _utf8_word_run(match: re.Match[str]) -> str:
    """One run of encoded words as a single UTF-8 encoded word; the run unchanged when a word
    cannot be read."""
    text = _word_run_text(match.group())
    if text is None:
        return match.group()
    return "=?utf-8?b?" + base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii") + "?="


def _decoded_word_run(match: re.Match[str]) -> str:
    text = _word_run_text(match.group())
    return match.group() if text is None else text


def decode_encoded_words(value: str) -> str:
    """``value`` with each run of RFC 2047 encoded words replaced by its text (the blanks between
    the words of a run dropped, as RFC 2047 says), with the charset fallback bodies get; a run
    with a word that cannot be read stays as written. For header text the standard library
    does not parse: one that holds unencoded 8-bit bytes as well (``parse.header``)."""
    if "=?" not in value:
        return value
    return _ENCODED_WORD_RUN.sub(_decoded_word_run, value)


def utf8_encoded_words(value: str) -> str:
    """A raw header value with each run of RFC 2047 encoded words decoded through
    ``decode_bytes`` and encoded again as UTF-8, for the standard library to parse.

    The standard library decodes an encoded word strictly by its label: UTF-8 bytes under
    ``iso-8859-1`` became mojibake ("JÃ¼rgen") and Latin-1 bytes under ``utf-8`` U+FFFD. Bodies
    get a fallback for such labels; headers now get the same one. The header keeps its
    structure (a word stays a word where it stood), so addresses parse as before. Linear in
    the length of ``value``."""
    if "=?" not in value:
        return value
    return _ENCODED_WORD_RUN.sub(_utf8_word_run, value)


_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=\s]")


def _declared_base64_but_plain(part: Message) -> bool:
    """Whether a part claims base64 but holds text that cannot be base64 (broken senders and
    broken multiparts): decoding it would turn readable text into noise."""
    try:
        if str(part.get("Content-Transfer-Encoding", "")).strip().lower() != "base64":
            return False
        raw = part.get_payload()
    except Exception:  # noqa: BLE001
        return False
    return isinstance(raw, str) and bool(_NOT_BASE64.search(raw))


def part_text(part: Message) -> str:
    """The decoded text of one leaf part, with format=flowed joined; never raises."""
    try:
        payload = None if _declared_base64_but_plain(part) else part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - malformed transfer encodings must not stop parsing
        payload = None
    if payload is None:
        raw = part.get_payload()
        if isinstance(raw, str):
            return fix_surrogates(raw).replace("\r\n", "\n").replace("\r", "\n")
        return ""
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogateescape")
    try:
        charset = part.get_content_charset()
    except Exception:  # noqa: BLE001
        charset = None
    text = decode_bytes(payload, charset).replace("\r\n", "\n").replace("\r", "\n")
    try:
        is_flowed = part.get_content_type() == "text/plain" and str(part.get_param("format", "")).lower() == "flowed"
        delsp = str(part.get_param("delsp", "")).lower() == "yes"
    except Exception:  # noqa: BLE001
        is_flowed = delsp = False
    return unflow(text, delsp=delsp) if is_flowed else text


def unflow(text: str, *, delsp: bool = False) -> str:
    """Join the soft line breaks of RFC 3676 format=flowed text.

    A line ending in a space continues on the next line of the same quote depth; leading
    space-stuffing is removed; the signature separator ``-- `` is never flowed.
    """
    out: list[str] = []
    buf: str | None = None
    buf_depth = 0

    def flush() -> None:
        nonlocal buf
        if buf is not None:
            out.append((">" * buf_depth + " " + buf) if buf_depth else buf)
            buf = None

    for line in text.split("\n"):
        stripped = line.lstrip(">")
        depth = len(line) - len(stripped)
        if stripped.startswith(" "):
            stripped = stripped[1:]
        flowed = stripped.endswith(" ") and stripped != "-- "
        if flowed and delsp:
            stripped = stripped[:-1]
        if buf is not None and depth != buf_depth:
            flush()
        if buf is None:
            buf, buf_depth = stripped, depth
        else:
            buf += stripped
        if not flowed:
            flush()
    flush()
    return "\n".join(out)


_BLOCK_TAGS = {
    "p", "div", "br", "tr", "table", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6",
    "pre", "hr", "section", "article", "header", "footer", "address", "dl", "dt", "dd",
}
_PARAGRAPH_TAGS = {"p", "ul", "ol", "table", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dl"}
_SKIP_TAGS = {"script", "style", "head", "title", "template", "noscript"}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input"}


class _HTMLText:
    """Collect visible text; blockquotes become ``> `` lines so quote detection sees them.
    Driven by ``_read_html``, one call per tag and per run of text."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._line: list[str] = []
        self._skip = 0
        self._quote = 0
        self._pre = 0

    def _break(self, blank: bool = False) -> None:
        """End the current line; ``blank`` also ends a paragraph with an empty line."""
        text = "".join(self._line).strip()
        self._line = []
        if text:
            self.lines.append("> " * self._quote + text)
        if blank and self.lines and self.lines[-1]:
            self.lines.append("")

    def handle_starttag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            if tag not in _VOID_TAGS:
                self._skip += 1
            return
        if tag == "blockquote":
            self._break()
            self._quote += 1
        elif tag in _BLOCK_TAGS:
            self._break()
            if tag == "li":
                self._line.append("- ")
            if tag == "pre":
                self._pre += 1
        elif tag in ("td", "th"):
            self._line.append(" ")

    def handle_startendtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self._break()

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag == "blockquote":
            self._break(blank=True)
            self._quote = max(0, self._quote - 1)
        elif tag in _BLOCK_TAGS:
            self._break(blank=tag in _PARAGRAPH_TAGS)
            if tag == "pre":
                self._pre = max(0, self._pre - 1)

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._pre:
            parts = data.split("\n")
            for i, part in enumerate(parts):
                if i:
                    self._break()
                self._line.append(part)
            return
        self._line.append(re.sub(r"[ \t\r\n\f]+", " ", data))


# The HTML tokenizer. ``html.parser`` rescans the rest of the document for every unfinished
# construct ("<a" repeated 80,000 times took 16 s), so tags are read here in one forward pass:
# every search either consumes what it scanned or, finding nothing, ends the document, as a
# browser does with an unclosed comment, tag or script.
_TAG_NAME = re.compile(r"[a-zA-Z][^\t\n\r\f />\x00]*")
# The rest of a start tag: attribute values in quotes may hold ">"; possessive, so no backtracking.
_TAG_REST = re.compile(r"""(?:[^>"'=]++|=\s*+"[^"]*+"|=\s*+'[^']*+'|=|["'])*+>""")
_RAW_TEXT_END = {tag: re.compile(rf"</{tag}[\s/>]", re.IGNORECASE) for tag in ("script", "style")}
# Numeric character references beyond Unicode (html.unescape raises on more than 4300 digits).
_HUGE_CHARREF = re.compile(r"&#(?:[xX]0*+[0-9a-fA-F]{7,}|0*+[0-9]{8,});?")


def _text_of(data: str) -> str:
    """Character references resolved, as a browser shows them; never raises."""
    if "&" not in data:
        return data
    return unescape(_HUGE_CHARREF.sub("\ufffd", data))


def _read_html(html: str, out: _HTMLText) -> None:
    """Feed ``out`` the tags and text of ``html`` in order, in time linear in its length.

    Comments, doctypes and processing instructions are dropped; the content of script and
    style is passed as text (the handler skips it); tag names are lower-cased; attributes are
    not needed and not parsed. A ``<`` that starts no tag is text.
    """
    i, n = 0, len(html)
    while i < n:
        lt = html.find("<", i)
        if lt < 0:
            out.handle_data(_text_of(html[i:]))
            return
        if lt > i:
            out.handle_data(_text_of(html[i:lt]))
        i = lt
        if html.startswith("<!--", i):
            if html.startswith(("<!-->", "<!--->"), i):
                i = html.index(">", i) + 1
                continue
            end = html.find("-->", i + 4)
            if end < 0:
                return
            i = end + 3
        elif html.startswith(("<!", "<?"), i) or (html.startswith("</", i) and not _TAG_NAME.match(html, i + 2)):
            if html.startswith("</>", i):
                i += 3
                continue
            end = html.find(">", i + 2)  # a bogus comment, up to the next ">"
            if end < 0:
                return
            i = end + 1
        elif html.startswith("</", i):
            name = _TAG_NAME.match(html, i + 2)
            end = html.find(">", i + 2)
            if name is None or end < 0:
                return
            out.handle_endtag(name.group().lower())
            i = end + 1
        elif (name := _TAG_NAME.match(html, i + 1)) is not None:
            rest = _TAG_REST.match(html, name.end())
            if rest is None:
                return  # the document ends inside the tag
            tag, i = name.group().lower(), rest.end()
            if html.endswith("/>", 0, i):
                out.handle_startendtag(tag)
                continue
            out.handle_starttag(tag)
            if tag in _RAW_TEXT_END:
                end = _RAW_TEXT_END[tag].search(html, i)
                stop = end.start() if end else n
                out.handle_data(html[i:stop])
                i = stop
        else:
            out.handle_data("<")
            i += 1


def html_to_text(html: str) -> str:
    """Readable text from an HTML body: scripts, styles and the head dropped, blocks as lines.
    Linear in the length of ``html``; never raises."""
    parser = _HTMLText()
    try:
        _read_html(html, parser)
    except Exception:  # noqa: BLE001 - keep what was read; markup must never stop a mail
        pass
    parser._break()
    text = "\n".join(parser.lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# Where quoted history starts. "Am ... schrieb ...:" and "On ... wrote:" need a digit (a date)
# so that "Am Montag schrieb ich Ihnen:" in the resident's own text is not taken as a quote.
# One pattern ``^\s*Am\s.*\d.*\sschrieb\s.*:\s*$`` backtracks cubically on a long line of digits
# and spaces (a 66 KB mail took seconds), so the line is checked in linear steps instead: the
# opening word, the first digit after it, then the closing words after that digit.
_ATTRIBUTION_OPENING = re.compile(r"\s*(am|on|le)\s", re.IGNORECASE)
_DIGIT = re.compile(r"\d")
_SCHRIEB = re.compile(r"\sschrieb\s", re.IGNORECASE)
_ATTRIBUTION_CLOSING = {
    "on": re.compile(r"\swrote:$", re.IGNORECASE),
    "le": re.compile(r"\sa\sécrit\s?:$", re.IGNORECASE),
}
# The writer speaking of themselves: "am 12.05. schrieb ich Ihnen ...:", "... I wrote:".
_FIRST_PERSON_AFTER_SCHRIEB = re.compile(r"ich\b", re.IGNORECASE)
_FIRST_PERSON_BEFORE_WROTE = re.compile(r"\s(?:i|we)\swrote:$", re.IGNORECASE)


def _is_attribution(line: str) -> bool:
    """Whether ``line`` (one line, or two joined by a space) reads as an attribution line:
    "Am <date> schrieb <name>:", "On <date> <name> wrote:" or "Le <date> <name> a écrit :"
    (any case), but not in the first person ("am 12.05. schrieb ich Ihnen bereits ...:", "On
    Monday at 9 I wrote:"), which is the writer's own sentence. Lines longer than a real
    attribution (``MAX_ATTRIBUTION_CHARS``, twice that for a wrapped one) are not; the work is
    linear. Whether quoted history really follows is ``_history_start``'s question."""
    if len(line) > 2 * MAX_ATTRIBUTION_CHARS + 1 or "\n" in line:
        return False
    opening = _ATTRIBUTION_OPENING.match(line)
    if opening is None:
        return False
    text = line.rstrip()
    if not text.endswith(":"):
        return False
    digit = _DIGIT.search(text, opening.end())
    if digit is None:
        return False
    word = opening.group(1).lower()
    if word == "am":
        # "schrieb" after the date, then anything but "ich" up to the final colon
        found = _SCHRIEB.search(text, digit.end())
        return found is not None and found.end() < len(text) and not _FIRST_PERSON_AFTER_SCHRIEB.match(text, found.end())
    tail = max(digit.end(), len(text) - 12)
    if _ATTRIBUTION_CLOSING[word].search(text, tail) is None:
        return False
    return not (word == "on" and _FIRST_PERSON_BEFORE_WROTE.search(text, tail))


_ORIGINAL_SEPARATOR = re.compile(
    r"^\s*-{2,}\s*(?:Original Message|Ursprüngliche Nachricht|Originalnachricht|Message d'origine|"
    r"Forwarded message|Weitergeleitete Nachricht)\s*-{2,}\s*$",
    re.IGNORECASE,
)
_OUTLOOK_FROM = re.compile(r"^\s*\**(?:From|Von|De)\s*:\**\s*\S", re.IGNORECASE)
_OUTLOOK_NEXT = re.compile(r"^\s*\**(?:Sent|Gesendet|Date|Datum|To|An|Subject|Betreff)\s*:", re.IGNORECASE)
_UNDERSCORES = re.compile(r"^\s*_{10,}\s*$")
_MOBILE_SIGNATURE = re.compile(
    r"^\s*(?:Sent from my|Von meinem|Gesendet von meinem|Gesendet mit|Sent with|Get Outlook for)\b", re.IGNORECASE
)


def _quote_follows(lines: list[str], i: int) -> bool:
    """Whether quoted history starts at ``lines[i]``, blank lines skipped: a ``>`` line, an
    "Original Message" separator, or an Outlook header block (with or without its line of
    underscores). Scans only the blank lines up to the next text, so it stays linear."""
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i >= len(lines):
        return False
    line = lines[i]
    return bool(
        line.lstrip().startswith(">")
        or _ORIGINAL_SEPARATOR.match(line)
        or (_UNDERSCORES.match(line) and i + 1 < len(lines) and _OUTLOOK_FROM.match(lines[i + 1]))
        or (_OUTLOOK_FROM.match(line) and any(_OUTLOOK_NEXT.match(n) for n in lines[i + 1 : i + 4]))
    )


def _history_start(lines: list[str]) -> int | None:
    """The index of the line where quoted history starts, or None.

    An attribution line ("Am … schrieb …:") counts only when quoted history follows it
    (``_quote_follows``): a resident's own "am 12.05. schrieb ich Ihnen bereits wegen folgender
    Punkte:" hid the points that followed as quoted history."""
    for i, line in enumerate(lines):
        if _ORIGINAL_SEPARATOR.match(line):
            return i
        short = len(line) <= MAX_ATTRIBUTION_CHARS  # an attribution is one short line, or two
        if short and _is_attribution(line) and _quote_follows(lines, i + 1):
            return i
        if (
            short
            and i + 1 < len(lines)
            and len(lines[i + 1]) <= MAX_ATTRIBUTION_CHARS
            and not line.lstrip().startswith(">")
            and _is_attribution(line + " " + lines[i + 1])
            and not _is_attribution(lines[i + 1])
            and _quote_follows(lines, i + 2)
        ):
            return i
        if _UNDERSCORES.match(line) and i + 1 < len(lines) and _OUTLOOK_FROM.match(lines[i + 1]):
            return i
        if _OUTLOOK_FROM.match(line) and any(_OUTLOOK_NEXT.match(n) for n in lines[i + 1 : i + 4]):
            if i > 0 and not lines[i - 1].strip():
                return i
    return None


def split_reply(text: str) -> tuple[str, str | None, str | None]:
    """Split a body into (new text, quoted history, signature).

    History starts at an attribution line ("Am ... schrieb ...:", "On ... wrote:"), an Outlook
    separator or header block, or is a block of ``>`` lines before or after the new text.
    Interleaved answers (text between quotes) are kept whole, since the quotes give them
    meaning. When nothing new would remain (a plain forward), the whole body is the text.
    """
    lines = text.split("\n")
    quoted: str | None = None
    start = _history_start(lines)
    if start is not None:
        quoted = "\n".join(lines[start:]).strip() or None
        lines = lines[:start]
    else:
        quote_idx = [i for i, line in enumerate(lines) if line.lstrip().startswith(">")]
        own_idx = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith(">")]
        if quote_idx and own_idx and (max(quote_idx) < min(own_idx) or min(quote_idx) > max(own_idx)):
            quoted = "\n".join(lines[i] for i in quote_idx).strip() or None
            qset = set(quote_idx)
            lines = [line for i, line in enumerate(lines) if i not in qset]

    signature: str | None = None
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] in ("-- ", "--"):
            signature = "\n".join(lines[i + 1 :]).strip() or None
            lines = lines[:i]
            break
    else:
        tail = [i for i, line in enumerate(lines) if line.strip()]
        if tail and len(tail) > 1 and _MOBILE_SIGNATURE.match(lines[tail[-1]]):
            signature = lines[tail[-1]].strip()
            lines = lines[: tail[-1]]

    new = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if not new:
        return text.strip(), None, None
    return new, quoted, signature
