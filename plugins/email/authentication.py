"""What the receiving mail server found out about a mail's sender (RFC 8601 Authentication-Results).

Anyone can write any address into From. The mail server that took the mail from the internet
checks SPF, DKIM and DMARC and writes its findings into an ``Authentication-Results`` header,
named by its ``authserv-id`` (``mx.example.org``). Only a header of a server we trust counts
(``channels.email.trusted_authserv_ids``): a sender can add headers of any name themselves. That
server puts its header on top and should remove older ones of its own name (RFC 8601, section
5), so the topmost trusted header is the one that counts.

Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

MAX_HEADERS = 20
"""Authentication-Results headers looked at, from the top: a mail can carry any number."""


def _without_comments(value: str) -> str:
    """The header value without its (possibly nested) comments in parentheses, outside quotes."""
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\":
            escaped = True
            if depth == 0:
                out.append(ch)
            continue
        if ch == '"' and depth == 0:
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
            continue
        elif not quoted and ch == ")" and depth:
            depth -= 1
            continue
        if depth == 0:
            out.append(ch)
    return "".join(out)


def results(value: str) -> tuple[str, dict[str, str]]:
    """The authserv-id (lower case) and the result of each method (``{"dmarc": "fail"}``) of one
    Authentication-Results header value; the first result of a method counts."""
    parts = [p.strip() for p in _without_comments(value).split(";")]
    server = parts[0].split()[0].lower() if parts and parts[0].split() else ""
    found: dict[str, str] = {}
    for part in parts[1:]:
        method, _, rest = part.partition("=")
        method = method.strip().lower().split("/")[0]  # "dkim/1" names a version
        result = rest.strip().split()[0].lower() if rest.strip() else ""
        if method and result and method not in found:
            found[method] = result
    return server, found


def failed_check(headers: Iterable[str], trusted: Collection[str]) -> str | None:
    """``"dmarc=fail"`` when the topmost Authentication-Results header of a trusted server says
    that the From domain's DMARC check failed: the From address may be forged. None otherwise:
    no trusted header, DMARC passed, or the domain publishes no DMARC policy (``none``), which
    proves nothing either way."""
    if not trusted:
        return None
    trusted_ids = {t.lower() for t in trusted}
    for index, value in enumerate(headers):
        if index >= MAX_HEADERS:
            break
        server, found = results(str(value))
        if server not in trusted_ids:
            continue
        return "dmarc=fail" if found.get("dmarc") == "fail" else None
    return None
