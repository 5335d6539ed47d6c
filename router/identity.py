"""Sender resolution: channel addresses normalised into identities, identities into contacts.

An unknown sender becomes a new contact (not a customer), never a refusal. Phone numbers are
E.164 through ``phonenumbers``, so a WhatsApp message, an SMS and a call from one number are
one contact; e-mail addresses are lower-cased, their domains in one form (``canonical_email``).
Merged contacts point to the survivor.
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import idna
import phonenumbers

from .models import Customer
from .text import normalize

if TYPE_CHECKING:
    from .channel import Channel

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


class InvalidAddress(ValueError):
    """A channel address that cannot be normalised (a phone number that is not one)."""


def normalize_phone(raw: str, region: str = "DE") -> str:
    """E.164 form of a phone number written nationally or internationally."""
    text = raw.strip()
    if E164.match(text):
        return text  # already canonical (WhatsApp, Twilio): no need to parse, nor to cache
    return _parse_phone(text, raw, region)


@lru_cache(maxsize=4096)
def _parse_phone(text: str, raw: str, region: str) -> str:
    """phonenumbers costs ~150 us a number, and the same senders write again: cached, but
    bounded, since every distinct sender adds an entry (65,536 of them grew the process by
    tens of MB under sustained load for no gain: E.164 addresses never get here)."""
    if text.isdigit() and len(text) > 10 and not text.startswith("0"):
        text = "+" + text  # WhatsApp ids and Twilio "From" without a plus
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidAddress(f"not a phone number: {raw!r}") from exc
    if not phonenumbers.is_possible_number(number):
        raise InvalidAddress(f"not a possible phone number: {raw!r}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_address(kind: str, address: str) -> str:
    """The canonical form of a channel address of the given kind."""
    address = address.strip()
    if kind == "phone":
        return normalize_phone(address)
    if kind == "email":
        if "@" not in address or len(address) > 320:
            raise InvalidAddress(f"not an e-mail address: {address!r}")
        return canonical_email(address)
    if not address:
        raise InvalidAddress("empty address")
    return address


def canonical_email(address: str) -> str:
    """The one form of an e-mail address that identifies its mailbox: lower case, NFC ("müller@…"
    typed on a Mac, u and a combining mark, is the same address), and the domain in its Unicode
    form (``canonical_domain``), so ``info@xn--mller-bau-q9a.de`` and ``Info@Müller-Bau.DE`` are
    one sender. Never raises: what cannot be converted is kept as written (lower-cased)."""
    lowered = address.lower()
    if lowered.isascii() and "xn--" not in lowered:
        return lowered  # nearly every address: nothing to convert
    local, at, domain = address.rpartition("@")
    if not at:
        return unicodedata.normalize("NFC", lowered)
    return f"{unicodedata.normalize('NFC', local.lower())}@{canonical_domain(domain)}"


@lru_cache(maxsize=4096)
def canonical_domain(domain: str) -> str:
    """A mail domain in the form that identifies it: each label as IDNA 2008 (UTS #46 mapping,
    non-transitional) writes it in Unicode, ``XN--MLLER-BAU-Q9A.de`` and ``Müller-Bau.DE`` ->
    ``müller-bau.de``; ``straße.de`` stays itself (IDNA 2003 made it ``strasse.de``, another
    domain). A label that is not valid IDNA 2008 (``xn--zz``, an emoji, ``a_b``) is kept as
    written, lower-cased: it must not cost the message, and it is one address still.

    The Unicode form rather than the ASCII one, because it is what staff read in the inbox and
    what the resident wrote; the one step that needs ASCII, a relay without SMTPUTF8, converts
    (``ascii_domain``). Both forms name the same labels one to one, so either identifies.
    Cached like phone numbers: the same senders write again, and idna costs tens of us."""
    labels = unicodedata.normalize("NFC", domain).translate(_IDEOGRAPHIC_DOTS).split(".")
    return ".".join(_canonical_label(label) for label in labels)


def _canonical_label(label: str) -> str:
    """One label of ``canonical_domain``: ASCII other than Punycode as it is (lower case)."""
    lowered = label.lower()
    if lowered.isascii() and not lowered.startswith("xn--"):
        return lowered
    try:
        return idna.decode(label, uts46=True)
    except (UnicodeError, ValueError):  # idna.IDNAError is a UnicodeError
        return unicodedata.normalize("NFC", lowered)


# Dots that IDNA (RFC 3490 3.1) reads as label separators besides ".".
_IDEOGRAPHIC_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def ascii_domain(domain: str) -> str | None:
    """``domain`` in ASCII, each label beyond ASCII as ``xn--`` and its Punycode (RFC 3492),
    after NFC and lower case: the IDNA 2008 form, ``müller-bau.de`` -> ``xn--mller-bau-q9a.de``.
    None when it cannot be written so (an empty or too long label).

    Not the standard library's ``idna`` codec: that is IDNA 2003, which maps ``ß`` to ``ss``,
    and ``straße.de`` is not ``strasse.de`` (a domain of someone else, since 2010)."""
    labels = unicodedata.normalize("NFC", domain).translate(_IDEOGRAPHIC_DOTS).lower().rstrip(".").split(".")
    found = []
    for label in labels:
        if not label.isascii():
            try:
                label = "xn--" + label.encode("punycode").decode("ascii")
            except UnicodeError:
                return None
        if not 0 < len(label) <= 63:
            return None
        found.append(label)
    return ".".join(found)


def identities_of(message: Mapping[str, Any]) -> list[tuple[str, str]]:
    """All (kind, normalised address) pairs a message names for its sender, primary first."""
    sender = message["sender"]
    pairs = [(sender["kind"], normalize_address(sender["kind"], sender["address"]))]
    for other in sender.get("other_identities") or ():
        try:
            pair = (other["kind"], normalize_address(other["kind"], other["address"]))
        except InvalidAddress:
            continue  # a secondary address that is wrong must not cost the message
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def survivor(conn: sqlite3.Connection, contact_id: int) -> int:
    """The contact that ``contact_id`` was merged into, through every later merge; itself if none."""
    for _ in range(20):
        row = conn.execute("SELECT merged_into FROM contacts WHERE id = ?", (contact_id,)).fetchone()
        if row is None or row[0] is None:
            return contact_id
        contact_id = row[0]
    return contact_id


def resolve_contact(
    conn: sqlite3.Connection,
    identities: list[tuple[str, str]],
    *,
    display_name: str | None,
    language: str | None,
    customer: Customer | None,
    claim: str | None,
    channel: str,
    now: str,
    sender_verified: bool = True,
) -> tuple[int, bool, bool]:
    """Find or create the contact for these identities; returns (contact id, is_customer,
    created now).

    The sender's own address (the first identity) says who they are. Further addresses a
    sender merely typed in (a form's phone field) are unverified: they are kept only on a
    contact created now, and never move an address that another contact already has, so
    nobody can redirect someone else's answers by naming their number.

    An account id beside the address (``ACCOUNT_KINDS``: WhatsApp's user id, from Meta) on a
    channel that vouches for its sender says who they are as well: a sender whose address is
    new (or merely claimed) but whose account id is known is that contact; a known contact
    without one learns it; and a known number that comes with an account id the contact does
    not have, while it has another, has a new owner: the number goes to the contact of the
    account id, or to a new one.

    Where the channel does not vouch for the sender (``sender_verified`` False: the web form),
    a further address is kept as ``claimed``, and the first message from the address itself
    takes it to a contact of its own (still a claim when that message is a form's too): naming
    a number nobody has used yet must not file its owner's later messages, or another form's,
    under the one who named it. Staff merge contacts that are really one person; a merge ends every claim. Nor
    does such a sender change anything about the contact they are filed under (language, name,
    customer claim): they may not be that person.
    """
    primary = identities[0]
    contact: sqlite3.Row | None = conn.execute(_CONTACT_OF_IDENTITY, primary).fetchone()
    # Ids the provider issued to the sender's account, beside their address: never typed in.
    accounts = [i for i in identities[1:] if i[0] in ACCOUNT_KINDS] if sender_verified else []
    holders = [conn.execute(_CONTACT_OF_IDENTITY, account).fetchone() for account in accounts]
    changed_hands = contact is not None and _changed_hands(conn, contact["contact_id"], accounts, holders)
    if accounts and (contact is None or contact["claimed"] or changed_hands):
        # A person known by their account id is that contact, now with this address as well
        # (taken from whoever merely named it, or from its former owner).
        known = next((h for h in holders if h is not None and not h["claimed"]), None)
        if known is not None:
            owner = survivor(conn, known["contact_id"])
            if contact is None:
                conn.execute(
                    "INSERT INTO identities (contact_id, kind, address, created_at) VALUES (?, ?, ?, ?)", (owner, *primary, now)
                )
            else:
                conn.execute(
                    "UPDATE identities SET contact_id = ?, claimed = 0 WHERE kind = ? AND address = ?", (owner, *primary)
                )
            contact, changed_hands = known, False
    if contact is not None and (contact["claimed"] or changed_hands):
        # An address someone else merely named: its owner's (or, on a form, its latest
        # claimant's) now, on a contact of their own, with the sender's other addresses. The
        # same for a number whose account id is not its contact's: a new owner of the number.
        contact_id = _new_contact(conn, display_name, language, None if customer is not None else claim, now)
        conn.execute(
            "UPDATE identities SET contact_id = ?, claimed = ?, last_inbound_at = ?, last_inbound_channel = ?,"
            " failed_at = NULL WHERE kind = ? AND address = ?",
            (contact_id, 0 if sender_verified else 1, now, channel, *primary),
        )
        _add_secondary(conn, contact_id, identities[1:], now, sender_verified)
        contact = None
    elif contact is not None:
        contact_id = contact["contact_id"]
        if contact["merged_into"] is not None:
            contact_id = survivor(conn, contact["merged_into"])
            contact = conn.execute(
                "SELECT id, is_customer, display_name, language FROM contacts WHERE id = ?", (contact_id,)
            ).fetchone()
        conn.execute(
            "UPDATE identities SET last_inbound_at = ?, last_inbound_channel = ?, failed_at = NULL"
            " WHERE kind = ? AND address = ?",
            (now, channel, *primary),
        )
        # A contact from before the provider sent account ids learns its own.
        _add_secondary(conn, contact_id, [a for a, h in zip(accounts, holders, strict=True) if h is None], now,
                       sender_verified)
    else:
        contact_id = _new_contact(conn, display_name, language, None if customer is not None else claim, now)
        conn.execute(
            "INSERT INTO identities (contact_id, kind, address, last_inbound_at, last_inbound_channel, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (contact_id, *primary, now, channel, now),
        )
        _add_secondary(conn, contact_id, identities[1:], now, sender_verified)
    if customer is not None:
        conn.execute(
            "UPDATE contacts SET is_customer = 1, customer_number = ?, customer_claim = NULL,"
            " display_name = COALESCE(display_name, ?), updated_at = ? WHERE id = ?",
            (customer.customer_number, customer.name or display_name, now, contact_id),
        )
        return contact_id, True, contact is None
    if contact is None:  # created just now, with name and language already
        return contact_id, False, True
    if not sender_verified:
        # Someone who may not be the contact (a form naming their address, a mail whose From
        # failed DMARC) changes nothing about them: not their language, name or customer claim.
        return contact_id, bool(contact["is_customer"]), False
    row = contact
    updates = []
    params: list[Any] = []
    if claim and not row["is_customer"]:
        updates.append("customer_claim = ?")
        params.append(claim)
    if display_name and not row["display_name"]:
        updates.append("display_name = ?")
        params.append(display_name)
    if language and row["language"] != language:
        updates.append("language = ?")
        params.append(language)
    if updates:
        conn.execute(
            f"UPDATE contacts SET {', '.join(updates)}, updated_at = ? WHERE id = ?", (*params, now, contact_id)
        )
    return contact_id, bool(row["is_customer"]), False


ACCOUNT_KINDS = frozenset({"whatsapp_user"})
"""Address kinds a provider issues to the sender's account and hands over beside their address
(Meta's business-scoped user id beside the WhatsApp number): one per person and number, never
typed in. Where the channel vouches for its sender, a sender known by one is that contact."""

_CONTACT_OF_IDENTITY = (
    "SELECT i.contact_id, i.claimed, k.merged_into, k.is_customer, k.display_name, k.language FROM identities i"
    " JOIN contacts k ON k.id = i.contact_id WHERE i.kind = ? AND i.address = ?"
)


def _changed_hands(
    conn: sqlite3.Connection, contact_id: int, accounts: list[tuple[str, str]], holders: list[sqlite3.Row | None]
) -> bool:
    """Whether the contact's address came with account ids none of which is the contact's own
    (``holders``: who has each), while it has another of their kind: a number given to somebody
    else (Meta issues a new user id with a new number, so the new owner comes with one the
    contact never had, perhaps one known from their own messages without a number)."""
    if not accounts or any(h is not None and h["contact_id"] == contact_id for h in holders):
        return False
    return any(
        conn.execute("SELECT 1 FROM identities WHERE contact_id = ? AND kind = ? LIMIT 1", (contact_id, kind)).fetchone()
        for kind in {kind for kind, _ in accounts}
    )


def claims_usable(channel: Channel | None) -> bool:
    """Whether a conversation on ``channel`` may be answered at addresses its contact merely
    named (``claimed``): only where the channel does not vouch for its sender either (the form
    that named them). A conversation of a channel that does (an e-mail from an address someone
    typed into a form as their own) must not reach the typist's phone, whether by a reply, a
    fallback or a call-back SMS. As an SQL parameter: ``claimed <= ?``."""
    return channel is not None and not channel.capabilities.sender_verified


def _new_contact(conn: sqlite3.Connection, display_name: str | None, language: str | None, claim: str | None, now: str) -> int:
    """A contact created for a sender seen for the first time (or for an address's owner)."""
    return conn.execute(
        "INSERT INTO contacts (display_name, language, customer_claim, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
        (display_name, language, claim, now, now),
    ).lastrowid


def _add_secondary(
    conn: sqlite3.Connection, contact_id: int, identities: list[tuple[str, str]], now: str, sender_verified: bool
) -> None:
    """The further addresses a sender gave, on their new contact: never one another contact has,
    and a mere claim where the channel does not vouch for the sender."""
    for kind, address in identities:
        conn.execute(
            "INSERT OR IGNORE INTO identities (contact_id, kind, address, created_at, claimed) VALUES (?, ?, ?, ?, ?)",
            (contact_id, kind, address, now, 0 if sender_verified else 1),
        )


def merge_contacts(conn: sqlite3.Connection, survivor: int, other: int, now: str) -> None:
    """Merge ``other`` into ``survivor``: identities, conversations and messages follow. Staff
    say the two are one person, so no address of either stays a mere claim."""
    if survivor == other:
        raise ValueError("cannot merge a contact with itself")
    conn.execute("UPDATE identities SET contact_id = ?, claimed = 0 WHERE contact_id IN (?, ?)", (survivor, other, survivor))
    conn.execute("UPDATE conversations SET contact_id = ? WHERE contact_id = ?", (survivor, other))
    conn.execute("UPDATE messages SET contact_id = ? WHERE contact_id = ?", (survivor, other))
    conn.execute("UPDATE contacts SET merged_into = ?, updated_at = ? WHERE id = ?", (survivor, now, other))
    row = conn.execute("SELECT * FROM contacts WHERE id = ?", (other,)).fetchone()
    conn.execute(
        "UPDATE contacts SET display_name = COALESCE(display_name, ?), language = COALESCE(language, ?),"
        " is_customer = MAX(is_customer, ?), customer_number = COALESCE(customer_number, ?),"
        " customer_claim = COALESCE(customer_claim, ?), updated_at = ? WHERE id = ?",
        (row["display_name"], row["language"], row["is_customer"], row["customer_number"], row["customer_claim"], now, survivor),
    )


def directory_match(row: Mapping[str, Any], claim: Any) -> Customer | None:
    """The built-in customer directory's check of one directory entry against a claim: it must
    match the sender by name, e-mail, phone or postal address; a number alone proves nothing."""

    def same(a: str | None, b: str | None) -> bool:
        return bool(a and b) and normalize(a).split() == normalize(b).split()

    matches = (
        same(claim.name, row["name"])
        or (claim.email and row["email"] and canonical_email(claim.email.strip()) == canonical_email(row["email"].strip()))
        or (claim.phone and row["phone"] and _same_phone(claim.phone, row["phone"]))
        or (same(claim.street, row["street"]) and (claim.postcode or "").strip() == (row["postcode"] or ""))
    )
    if not matches:
        return None
    return Customer(customer_number=row["customer_number"], name=row["name"], email=row["email"], phone=row["phone"])


def _same_phone(a: str, b: str) -> bool:
    try:
        return normalize_phone(a) == normalize_phone(b)
    except InvalidAddress:
        return False


def directory_number(value: str | None) -> str:
    """A customer number as the directory keeps it (trimmed, upper case): "k-6" and " K-6 " are
    one customer. Empty when there is none."""
    return (value or "").strip().upper()


@dataclasses.dataclass(frozen=True, slots=True)
class CustomerImport:
    """What an import did: how many customers it holds, and the numbers given more than once
    (with how often; the last row of each counts)."""

    customers: int
    repeated: dict[str, int]
    without_number: int = 0
    """Rows left out for having no customer number."""


def import_customers(conn: sqlite3.Connection, rows: Iterable[Mapping[str, str]], now: str) -> CustomerImport:
    """Insert or replace directory entries, reading ``rows`` as they come (a file of a million
    customers is never held whole); a number given twice: the last row counts."""
    seen: set[str] = set()
    repeated: dict[str, int] = {}
    without_number = 0

    def entries() -> Iterator[tuple[str | None, ...]]:
        nonlocal without_number
        for row in rows:
            number = directory_number(row.get("customer_number"))
            if not number:
                without_number += 1
                continue
            if number in seen:
                repeated[number] = repeated.get(number, 1) + 1
            seen.add(number)
            yield (
                number,
                row.get("name") or None,
                (row.get("email") or "").strip().lower() or None,
                row.get("phone") or None,
                row.get("street") or None,
                (row.get("postcode") or "").strip() or None,
                row.get("city") or None,
                now,
            )

    conn.executemany(
        "INSERT OR REPLACE INTO customers (customer_number, name, email, phone, street, postcode, city, imported_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        entries(),
    )
    return CustomerImport(customers=len(seen), repeated=repeated, without_number=without_number)
