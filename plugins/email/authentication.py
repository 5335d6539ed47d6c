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

MAX_HEADER_CHARS = 16 * 1024
"""Characters of one header read: real ones are a few hundred."""


def _parts(value: str) -> list[str]:
    """The header value split at its semicolons, without its (possibly nested) comments in
    parentheses; a semicolon or parenthesis inside a quoted string (``smtp.mailfrom="a;b"@x``,
    which the sender chooses) is text, not syntax."""
    parts: list[str] = []
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for ch in value[:MAX_HEADER_CHARS]:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
        elif ch == "\\" and (quoted or depth):
            escaped = True
            if depth == 0:
                out.append(ch)
        elif quoted:
            out.append(ch)
            quoted = ch != '"'
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif depth:
            continue
        elif ch == '"':
            quoted = True
            out.append(ch)
        elif ch == ";":
            parts.append("".join(out).strip())
            out = []
        else:
            out.append(ch)
    parts.append("".join(out).strip())
    return parts


def results(value: str) -> tuple[str, dict[str, list[str]]]:
    """The authserv-id (lower case) and the results of each method (``{"dmarc": ["fail"]}``)
    of one Authentication-Results header value."""
    parts = _parts(value)
    server = parts[0].split()[0].lower() if parts[0].split() else ""
    found: dict[str, list[str]] = {}
    for part in parts[1:]:
        method, _, rest = part.partition("=")
        method = method.strip().lower().split("/")[0]  # "dkim/1" names a version
        result = rest.strip().split()[0].lower() if rest.strip() else ""
        if method and result:
            found.setdefault(method, []).append(result)
    return server, found


def failed_check(headers: Iterable[str], trusted: Collection[str]) -> str | None:
    """``"dmarc=fail"`` when the topmost Authentication-Results header of a trusted server that
    reports DMARC says that the From domain's check failed: the From address may be forged. A
    server may write several headers (a DKIM filter's, then a DMARC filter's), so headers of a
    trusted server without a DMARC result are passed over. None otherwise: no trusted header
    reports DMARC, DMARC passed, or the domain publishes no DMARC policy (``none``), which
    proves nothing either way. A failure under a policy of ``p=none`` counts too: the domain
    only asks not to reject such mail, and a forger can use it as well as anyone."""
    if not trusted:
        return None
    trusted_ids = {t.lower() for t in trusted}
    for index, value in enumerate(headers):
        if index >= MAX_HEADERS:
            break
        server, found = results(str(value))
        if server in trusted_ids and "dmarc" in found:
            return "dmarc=fail" if "fail" in found["dmarc"] else None
    return None
