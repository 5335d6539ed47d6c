"""The e-mail channel's configuration section, checked once at start.

Values may come from environment variables through the configuration (``{"$env": ...}``), so
ports arrive as strings and unset variables as ``None`` or ``""``: both mean "use the default".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from router.hookspecs import SettingsError
from router.identity import canonical_email
from router.settings import flag, given, positive_float, whole_number

RELAY_TLS_MODES = ("starttls", "tls", "none")
_DEFAULT_RELAY_PORT = {"starttls": 587, "tls": 465, "none": 25}
_MAX_MESSAGE_BYTES = 25 * 1024 * 1024
_WHERE = "channels.email"


class EmailSettingsError(SettingsError):
    """A setting of the ``email`` channel is wrong; ``path`` names the key."""


def port(where: str, number: int) -> int:
    """``number`` as a TCP port: one past 65535 was bound to some other port (uvloop), or ended
    in a traceback, or (an IMAP mailbox's) failed every poll with nothing but a log line."""
    if not 0 <= number <= 65535:
        raise EmailSettingsError(where, f"a port is 0 to 65535, got {number}")
    return number


def _str(section: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    value = given(section, key)
    return default if value is None else str(value).strip()


def _count(section: Mapping[str, Any], key: str, default: int) -> int:
    """A whole number of at least 0 (bytes, a port, acknowledgements per hour)."""
    return whole_number(section, key, default, _WHERE, error=EmailSettingsError)


@dataclasses.dataclass(frozen=True, slots=True)
class EmailSettings:
    """Resolved settings. ``addresses`` maps our lower-cased addresses to unit and language."""

    addresses: Mapping[str, Mapping[str, Any]]
    domain: str
    from_address: str
    from_name: str | None = None
    listen: bool = True
    listen_host: str = "127.0.0.1"
    listen_port: int = 2525
    hostname: str | None = None
    max_message_bytes: int = _MAX_MESSAGE_BYTES
    ack_per_hour: int = 3
    relay_host: str | None = None
    relay_port: int = 587
    relay_user: str | None = None
    relay_password: str | None = dataclasses.field(default=None, repr=False)
    relay_tls: str = "starttls"
    relay_timeout: float = 30.0
    inbound_secret: str | None = dataclasses.field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    store_files: bool = True
    imap: Any = None  # one table or a list of tables; checked by imap.imap_mailboxes
    # The mail servers whose Authentication-Results headers count (authentication.failed_check).
    trusted_authserv_ids: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any], units: Collection[str] | None = None) -> EmailSettings:
        """Check and resolve the ``channels.email`` section; raise ``EmailSettingsError``."""
        raw_addresses = section.get("addresses") or {}
        if not isinstance(raw_addresses, Mapping) or not raw_addresses:
            raise EmailSettingsError("channels.email.addresses", "expected a table of address -> {unit, language}")
        addresses: dict[str, dict[str, Any]] = {}
        for address, entry in raw_addresses.items():
            if "@" not in str(address):
                raise EmailSettingsError("channels.email.addresses", f"{address!r} is not an e-mail address")
            if isinstance(entry, str):
                entry = {"unit": entry}
            if not isinstance(entry, Mapping) or not entry.get("unit"):
                raise EmailSettingsError(f"channels.email.addresses.{address}", "needs a unit")
            if units is not None and entry["unit"] not in units:
                # Passed, every mail to the address was refused (a unit hint that is no unit id)
                # or went to the fallback unit.
                raise EmailSettingsError(f"channels.email.addresses.{address}.unit", f"unknown unit {entry['unit']!r}")
            # Kept in the form that identifies a mailbox: mail to the Punycode form of an address
            # written in Unicode (or in another case) is mail to it.
            addresses[canonical_email(str(address).strip())] = {"unit": entry["unit"], "language": entry.get("language")}
        first = next(iter(addresses))
        relay_tls = (_str(section, "relay_tls", "starttls") or "starttls").lower()
        if relay_tls not in RELAY_TLS_MODES:
            raise EmailSettingsError("channels.email.relay_tls", f"one of {', '.join(RELAY_TLS_MODES)}, got {relay_tls!r}")
        tls_cert, tls_key = _str(section, "tls_cert"), _str(section, "tls_key")
        if bool(tls_cert) != bool(tls_key):
            raise EmailSettingsError("channels.email.tls_cert", "tls_cert and tls_key: set both or neither")
        trusted = section.get("trusted_authserv_ids") or []
        if isinstance(trusted, str):
            trusted = [trusted]
        if not isinstance(trusted, list) or not all(isinstance(t, str) and t.strip() and " " not in t.strip() for t in trusted):
            raise EmailSettingsError(
                "channels.email.trusted_authserv_ids", "expected a list of mail server names (authserv-ids), such as"
                " [\"mx.example.org\"]")
        return cls(
            addresses=addresses,
            domain=_str(section, "domain") or first.rsplit("@", 1)[1],
            from_address=(_str(section, "from_address") or first).lower(),
            from_name=_str(section, "from_name"),
            listen=flag(section, "listen", True, _WHERE, error=EmailSettingsError),
            listen_host=_str(section, "listen_host", "127.0.0.1") or "127.0.0.1",
            listen_port=port("channels.email.listen_port", _count(section, "listen_port", 2525)),
            hostname=_str(section, "hostname"),
            max_message_bytes=_count(section, "max_message_bytes", _MAX_MESSAGE_BYTES) or _MAX_MESSAGE_BYTES,
            ack_per_hour=_count(section, "ack_per_hour", 3),
            relay_host=_str(section, "relay_host"),
            relay_port=port("channels.email.relay_port",
                            _count(section, "relay_port", _DEFAULT_RELAY_PORT[relay_tls]) or _DEFAULT_RELAY_PORT[relay_tls]),
            relay_user=_str(section, "relay_user"),
            relay_password=_str(section, "relay_password"),
            relay_tls=relay_tls,
            relay_timeout=positive_float(section, "relay_timeout", 30.0, _WHERE, error=EmailSettingsError),
            inbound_secret=_str(section, "inbound_secret"),
            tls_cert=tls_cert,
            tls_key=tls_key,
            store_files=flag(section, "store_files", True, _WHERE, error=EmailSettingsError),
            imap=section.get("imap") or None,
            trusted_authserv_ids=tuple(t.strip().lower() for t in trusted),
        )
