"""Turning mail body parts into readable text: charsets, format=flowed, HTML, and separating
the new text from quoted history and the signature.

Everything here is pure and never raises on bad input: a mail that cannot be decoded exactly is
decoded as well as it can be, because a resident's message must never be lost to a charset.
"""

from __future__ import annotations

import codecs
import re
from email.message import Message
from html.parser import HTMLParser

# Labels that mail clients put on text that is really Windows-1252 (as browsers do, per WHATWG).
_SINGLE_BYTE_LABELS = {"iso-8859-1", "latin-1", "latin1", "l1", "iso8859-1", "us-ascii", "ascii", "windows-1252", "cp1252"}


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode ``data`` labelled ``charset``, falling back when the label is wrong or unknown.

    UTF-8 content labelled as Latin-1 (a common client bug) is recognised because valid
    multi-byte UTF-8 sequences almost never occur in real Latin-1 text.
    """
    label = (charset or "").strip().strip('"').lower()
    if label in _SINGLE_BYTE_LABELS or not label:
        if not data.isascii():
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return _decode_cp1252(data)
    try:
        codecs.lookup(label)
    except LookupError:
        label = "utf-8"
    try:
        return data.decode(label)
    except (UnicodeDecodeError, LookupError):
        pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return _decode_cp1252(data)


def _decode_cp1252(data: bytes) -> str:
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        # cp1252 leaves five bytes undefined; Latin-1 decodes every byte.
        return data.decode("latin-1")


def fix_surrogates(value: str) -> str:
    """Repair header text holding undecoded 8-bit bytes (surrogate escapes) best-effort."""
    if not any("\udc80" <= ch <= "\udcff" for ch in value):
        return value
    return decode_bytes(value.encode("utf-8", "surrogateescape"), None)


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


class _HTMLText(HTMLParser):
    """Collect visible text; blockquotes become ``> `` lines so quote detection sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
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

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
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

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
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


def html_to_text(html: str) -> str:
    """Readable text from an HTML body: scripts, styles and the head dropped, blocks as lines."""
    parser = _HTMLText()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # noqa: BLE001 - html.parser is lenient, but never let markup stop us
        pass
    parser._break()
    text = "\n".join(parser.lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# Where quoted history starts. "Am ... schrieb ...:" and "On ... wrote:" need a digit (a date)
# so that "Am Montag schrieb ich Ihnen:" in the resident's own text is not taken as a quote.
_ATTRIBUTION = re.compile(
    r"^\s*(?:Am\s.*\d.*\sschrieb\s.*:|On\s.*\d.*\swrote:|Le\s.*\d.*\sa\sécrit\s?:)\s*$", re.IGNORECASE
)
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


def _history_start(lines: list[str]) -> int | None:
    for i, line in enumerate(lines):
        if _ORIGINAL_SEPARATOR.match(line):
            return i
        joined = line + " " + lines[i + 1] if i + 1 < len(lines) else line
        if _ATTRIBUTION.match(line):
            return i
        if not line.lstrip().startswith(">") and _ATTRIBUTION.match(joined) and not _ATTRIBUTION.match(lines[i + 1]):
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
