"""Never answer a machine: detect auto-replies, bulk and list mail, bounces and our own mail
coming back (RFC 3834 and the rules helpdesks such as Zammad learned), and cap
acknowledgements per address so two auto-responders facing each other stop at once.

Such mail is still stored and routed (an out-of-office note is context); only the automatic
acknowledgement is suppressed.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timedelta
from email.message import Message

from router.identity import canonical_domain

from .addresses import addresses_of
from .compose import is_own_message_id

# Local parts of senders that are machines, compared without ".", "-" and "_".
_BOUNCE_SENDERS = ("mailerdaemon", "postmaster")
_NOREPLY_PREFIXES = ("noreply", "donotreply", "donotrespond", "noresponse")

# X-Auto-Response-Suppress values that ask not to be auto-answered ([MS-OXCMAIL] 2.2.3.2.14);
# DR, NDR, RN and NRN only concern receipts and notifications, which we never send.
_SUPPRESS_AUTO_REPLY = {"all", "autoreply", "oof"}

_AUTOREPLY_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Autoreply-From", "X-Mail-Autoreply")

_MSGID = re.compile(r"<[^<>\s]+>")


def _header(msg: Message, name: str) -> str | None:
    """A header's value as text, or None; malformed headers never raise."""
    try:
        value = msg.get(name)
    except Exception:  # noqa: BLE001 - the stdlib's header parser can fail on hostile input
        for key, raw in msg.raw_items():
            if key.lower() == name.lower():
                return str(raw)
        return None
    return None if value is None else str(value)


def _local_part(address: str) -> str:
    local = address.rsplit("@", 1)[0] if "@" in address else address
    return re.sub(r"[.\-_]", "", local.strip().strip("<>").lower())


def _sender_addresses(msg: Message, envelope_from: str | None) -> list[str]:
    found = []
    if envelope_from:
        found.append(envelope_from)
    for name in ("From", "Sender", "Return-Path"):
        value = _header(msg, name)
        if value:
            found.extend(addr for _, addr in addresses_of(value) if addr)
    return found


def is_noreply(address: str) -> bool:
    """Whether an address says nobody reads what is sent to it (``noreply@``, ``donotreply@``)."""
    return _local_part(address).startswith(_NOREPLY_PREFIXES)


def relayed_sender(msg: Message) -> str | None:
    """The person a portal or a web form relays a mail for: a ``noreply`` From with a
    ``Reply-To`` naming someone at another domain. Such a mail is a person's, to be answered at that address,
    not an automatic one (unless other headers say it is)."""
    senders = [addr for _, addr in addresses_of(_header(msg, "From") or "") if addr]
    if not senders or not is_noreply(senders[0]):
        return None
    reply_to = [addr for _, addr in addresses_of(_header(msg, "Reply-To") or "") if addr and "@" in addr]
    if not reply_to or is_noreply(reply_to[0]) or _domain(reply_to[0]) == _domain(senders[0]):
        # Its own address (a ticket system's support@ beside its noreply@) is no person relayed.
        return None
    return reply_to[0].lower()


def _domain(address: str) -> str:
    """The domain of ``address`` in one form, so that a portal's ``noreply@`` and a ``Reply-To``
    at its own domain written the other way (Punycode, Unicode) are still one domain."""
    return canonical_domain(address.rpartition("@")[2])


def classify(
    msg: Message, *, envelope_from: str | None, own_domain: str, relayed: bool | None = None
) -> tuple[str, str] | None:
    """Why this mail must not be acknowledged, as (reason, detail), or None.

    ``reason`` is one of ``loop``, ``bounce``, ``auto-reply``, ``list`` and ``bulk``; ``detail``
    names the header or sender that decided it, for staff. ``envelope_from`` is the SMTP
    MAIL FROM (``""`` for the null return path) or None when unknown (a forwarded raw mail).
    """
    message_id = _header(msg, "Message-ID") or ""
    match = _MSGID.search(message_id)
    if match and is_own_message_id(match.group(0), own_domain):
        return "loop", "our own Message-ID came back"

    return_path = envelope_from if envelope_from is not None else _header(msg, "Return-Path")
    if return_path is not None and return_path.strip() in ("", "<>"):
        return "bounce", "empty return path"

    if relayed is None:  # not worked out by the caller already
        relayed = relayed_sender(msg) is not None
    for address in _sender_addresses(msg, envelope_from):
        local = _local_part(address)
        if local in _BOUNCE_SENDERS:
            return "bounce", f"sender {address}"
        if is_noreply(address) and not relayed:
            return "auto-reply", f"sender {address}"

    auto_submitted = (_header(msg, "Auto-Submitted") or "").split(";")[0].strip().lower()
    if auto_submitted and auto_submitted != "no":
        return "auto-reply", f"Auto-Submitted: {auto_submitted}"

    suppress = _header(msg, "X-Auto-Response-Suppress")
    if suppress:
        values = {v.strip().lower() for v in re.split(r"[,\s]+", suppress) if v.strip()}
        if values & _SUPPRESS_AUTO_REPLY:
            return "auto-reply", f"X-Auto-Response-Suppress: {suppress.strip()}"

    for name in _AUTOREPLY_HEADERS:
        if _header(msg, name) is not None:
            return "auto-reply", name

    for name in ("List-Id", "List-Unsubscribe", "List-Post"):
        if _header(msg, name) is not None:
            return "list", name

    precedence = (_header(msg, "Precedence") or "").strip().lower()
    if precedence == "list":
        return "list", "Precedence: list"
    if precedence in ("bulk", "junk"):
        return "bulk", f"Precedence: {precedence}"
    return None


def auto_reply_reason(msg: Message, *, envelope_from: str | None, own_domain: str) -> str | None:
    """The reason this mail must not get an automatic acknowledgement, or None (see ``classify``)."""
    found = classify(msg, envelope_from=envelope_from, own_domain=own_domain)
    return found[0] if found else None


class AckRateLimiter:
    """At most ``per_hour`` acknowledgements per address in any sliding hour, in memory.

    Call ``allowed`` before handing a message over and ``record`` once it was acknowledged, so
    that messages the core did not acknowledge (follow-ups, duplicates) do not use the quota.
    The state is per process: a restart forgets it, which only ever allows a few more.
    """

    def __init__(self, per_hour: int = 3, *, window: timedelta = timedelta(hours=1), max_addresses: int = 100_000) -> None:
        self.per_hour = per_hour
        self.window = window
        self.max_addresses = max_addresses
        self._sent: dict[str, deque[datetime]] = {}

    def _recent(self, address: str, now: datetime) -> deque[datetime] | None:
        times = self._sent.get(address.lower())
        if times is None:
            return None
        while times and now - times[0] >= self.window:
            times.popleft()
        if not times:
            del self._sent[address.lower()]
            return None
        return times

    def allowed(self, address: str, now: datetime) -> bool:
        """Whether one more acknowledgement to ``address`` is within the limit."""
        times = self._recent(address, now)
        return times is None or len(times) < self.per_hour

    def record(self, address: str, now: datetime) -> None:
        """Count one acknowledgement sent to ``address`` at ``now``."""
        if len(self._sent) >= self.max_addresses:
            self._sweep(now)
        times = self._recent(address, now)
        if times is None:
            times = self._sent[address.lower()] = deque()
        times.append(now)

    def _sweep(self, now: datetime) -> None:
        for address in list(self._sent):
            self._recent(address, now)

    def counts(self) -> Mapping[str, int]:
        """Acknowledgements currently counted per address (for diagnostics and tests)."""
        return {address: len(times) for address, times in self._sent.items()}
