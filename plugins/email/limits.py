"""How much of one inbound mail the channel looks at, in one place.

A mail within ``max_message_bytes`` must never cost the service more than a bounded, linear
amount of work: text scanners see at most a fixed number of characters, the MIME tree is walked
to a fixed depth and part count. What lies beyond a limit is not refused but kept as it is (the
original mail is stored byte for byte) and the message gets a flag saying what was cut, so the
mail is still stored, acknowledged and owned. docs/channels/email.md lists these limits.
"""

from __future__ import annotations

MAX_TEXT = 200_000
"""Characters of body text that are split into new text, quote and signature, and stored."""

MAX_HTML = 1_000_000
"""Characters of an HTML body turned into text (newsletters with inline images are large)."""

MAX_META_TEXT = 50_000
"""Characters kept of the quoted history and of the signature."""

MAX_ATTRIBUTION_CHARS = 500
"""A longer line is never an attribution line ("Am ... schrieb ...:")."""

MAX_MIME_DEPTH = 50
"""MIME entities nested deeper than this are kept as one opaque part, not parsed."""

MAX_MIME_ENTITIES = 25_000
"""MIME entities the parser builds (parts, and the header blocks of a delivery status); beyond,
the mail is read as its headers and one opaque body. Each costs a header parse: 200,000 blocks
in a 6 MB delivery status took 4.9 s of a worker thread, holding the interpreter's lock."""

MAX_MIME_PARTS = 300
"""MIME parts looked at for the body and attachments; later ones are left in the original."""

MAX_ATTACHMENTS = 50
"""Attachments described and stored per mail."""

MAX_BOUNCE_TEXT = 100_000
"""Characters of a non-standard bounce searched for the failed recipient and status."""

MAX_DSN_GROUPS = 100
"""Per-recipient groups of a delivery status read (after the per-message one): one mail is sent
to a handful of addresses, and each group costs a header parse (200,000 of them in 6 MB took
6.6 s)."""

MAX_RECIPIENTS = 100
"""Accepted RCPT TO per SMTP transaction (RFC 5321 4.5.3.1.8: at least 100)."""

FETCH_BYTES_PER_SECOND = 64 * 1024
"""Slowest IMAP download allowed: a fetch may take the mailbox's ``timeout`` plus a second
for every this many bytes of the mail."""
