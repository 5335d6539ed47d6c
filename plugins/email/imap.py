"""IMAP polling: import mail from existing mailboxes (aioimaplib), IDLE where the server
offers it, else at an interval.

Every message goes through ``EmailChannel.receive`` like SMTP mail, so it is committed before
it counts as imported. What was imported is remembered twice: a UID high-water mark per
mailbox in a small JSON file under the data folder (``email/imap/<id>.json``, together with the
mailbox's UIDVALIDITY), and the keyword ``$ContactRouter`` set on the message on the server, so
people looking at the mailbox see what the router took. A restart searches only above the
mark; when the server's UIDVALIDITY changes (the mailbox was rebuilt) everything is looked at
again, and the core's de-duplication keeps anything from being stored twice (the key is the
mail's Message-ID with its From and Date, read from the mail itself: ``parse.dedupe_key``).

A mail that fails to import every time must not block the mailbox: failed attempts are counted
per UID in the same state file (a restart does not reset them), and after ``max_attempts`` the
raw mail is written durably to ``email/imap/unprocessable/`` and the mark moves past it. A mail
larger than ``max_message_bytes`` (its ``RFC822.SIZE``, asked for first) is not downloaded: it is
set aside at once and stays in the mailbox.

Messages are fetched with ``BODY.PEEK[]``: the router never marks them read. aioimaplib's own
timeout of a FETCH or STORE starts again with every byte, so a server sending a byte a second
would hold the mailbox for ever; these calls get a deadline for the whole answer instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aioimaplib

from router.files import write_durably
from router.hookspecs import StorageUnavailable
from router.settings import flag, positive_float, positive_int

from .limits import FETCH_BYTES_PER_SECOND
from .settings import EmailSettingsError, port

IMPORTED_KEYWORD = "$ContactRouter"
MAX_ATTEMPTS = 3  # failed imports of one UID before it is set aside as unprocessable
UNPROCESSABLE_DIR = "unprocessable"  # under the state folder: email/imap/unprocessable/
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_FETCH_UID = re.compile(rb"\bUID (\d+)\b", re.IGNORECASE)
_FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)\b", re.IGNORECASE)
_TLS_MODES = ("tls", "none")
_DEFAULT_PORT = {"tls": 993, "none": 143}
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9@.+-]+")

Receive = Callable[[bytes, list[str] | None], Awaitable[Any]]


class ImapError(Exception):
    """The IMAP server refused a command; the poller reconnects after a pause."""


class ImapTimeout(ImapError):
    """An IMAP command whose whole answer did not arrive within its deadline."""


class ImapRefused(ImapError):
    """The server answered a command with NO or BAD."""


class ImportFailed(Exception):
    """Importing one mail failed (and it is not yet set aside); the poller tries again after
    ``retry_seconds``."""


@dataclasses.dataclass(frozen=True, slots=True)
class ImapMailbox:
    """One mailbox to import from.

    ``address`` is our address the mailbox receives for (it picks the unit, like the SMTP
    envelope recipient); without it the mail's own To/Cc headers decide.
    """

    host: str
    user: str
    password: str = dataclasses.field(repr=False)
    port: int = 993
    tls: str = "tls"
    mailbox: str = "INBOX"
    address: str | None = None
    idle: bool = True
    poll_seconds: float = 60.0
    idle_seconds: float = 25 * 60.0
    timeout: float = 30.0
    retry_seconds: float = 30.0
    max_attempts: int = MAX_ATTEMPTS

    @property
    def key(self) -> str:
        """A stable id for this mailbox's state file, revealing no credentials."""
        ident = f"{self.host.lower()}:{self.port}:{self.user}:{self.mailbox}"
        return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16]

    @property
    def label(self) -> str:
        """``user@host/mailbox``, for log lines."""
        return f"{self.user}@{self.host}/{self.mailbox}"

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any], where: str) -> ImapMailbox:
        """Check one ``imap`` table; raises ``EmailSettingsError`` naming the key."""
        if not isinstance(section, Mapping):
            raise EmailSettingsError(where, "expected a table with host, user and password")
        missing = [k for k in ("host", "user", "password") if not str(section.get(k) or "").strip()]
        if missing:
            raise EmailSettingsError(f"{where}.{missing[0]}", "required")
        tls = str(section.get("tls") or "tls").strip().lower()
        if tls not in _TLS_MODES:
            raise EmailSettingsError(f"{where}.tls", f"one of {', '.join(_TLS_MODES)}, got {tls!r}")

        def seconds(key: str, default: float) -> float:
            return positive_float(section, key, default, where, error=EmailSettingsError)

        address = str(section.get("address") or "").strip().lower() or None
        if address is not None and "@" not in address:
            raise EmailSettingsError(f"{where}.address", f"{address!r} is not an e-mail address")
        return cls(
            host=str(section["host"]).strip(),
            user=str(section["user"]).strip(),
            password=str(section["password"]),
            port=port(f"{where}.port", positive_int(section, "port", _DEFAULT_PORT[tls], where, error=EmailSettingsError)),
            tls=tls,
            mailbox=str(section.get("mailbox") or "INBOX"),
            address=address,
            idle=flag(section, "idle", True, where, error=EmailSettingsError),
            poll_seconds=seconds("poll_seconds", 60.0),
            idle_seconds=seconds("idle_seconds", 25 * 60.0),
            timeout=seconds("timeout", 30.0),
            retry_seconds=seconds("retry_seconds", 30.0),
            max_attempts=positive_int(section, "max_attempts", MAX_ATTEMPTS, where, error=EmailSettingsError),
        )


def imap_mailboxes(value: Any) -> list[ImapMailbox]:
    """The ``channels.email.imap`` setting: one table or a list of tables (``[[...imap]]``)."""
    if not value:
        return []
    if isinstance(value, Mapping):
        return [ImapMailbox.from_mapping(value, "channels.email.imap")]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [ImapMailbox.from_mapping(v, f"channels.email.imap[{i}]") for i, v in enumerate(value)]
    raise EmailSettingsError("channels.email.imap", "expected a table or a list of tables")


@dataclasses.dataclass(slots=True)
class UidMark:
    """The high-water mark of one mailbox: everything up to ``last_uid`` was imported (or set
    aside) while the mailbox had ``uidvalidity``. ``failed`` counts failed import attempts per
    UID above the mark, so that a restart does not give a broken mail fresh attempts."""

    uidvalidity: int = 0
    last_uid: int = 0
    failed: dict[int, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> UidMark:
        try:
            data = json.loads(path.read_text("utf-8"))
            mark = cls(int(data["uidvalidity"]), int(data["last_uid"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()
        try:
            found = {int(uid): int(n) for uid, n in (data.get("failed") or {}).items()}
            mark.failed = {uid: n for uid, n in found.items() if uid > mark.last_uid}
        except (AttributeError, ValueError, TypeError):
            pass  # a damaged count only gives the mail its attempts again
        return mark

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves the old mark or the new one, never half a file."""
        data: dict[str, Any] = {"uidvalidity": self.uidvalidity, "last_uid": self.last_uid}
        if self.failed:
            data["failed"] = {str(uid): n for uid, n in sorted(self.failed.items())}
        write_durably(path, json.dumps(data).encode("utf-8"))


def _lines(response: Any) -> list[bytes]:
    return [bytes(line) for line in response.lines]


def _check(response: Any, what: str) -> list[bytes]:
    if response.result != "OK":
        detail = b" ".join(_lines(response)).decode("utf-8", "replace")[:300]
        raise ImapRefused(f"{what}: {response.result} {detail}")
    return _lines(response)


def _imap_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# How long a stopping poller is given to end before it is cancelled again (``ImapPoller.service``):
# longer than its LOGOUT may take (2 s), which a second cancellation would cut short.
STOP_RETRY_SECONDS = 3.0


class ImapPoller:
    """Imports one mailbox for the app's lifetime; reconnects after errors."""

    def __init__(
        self,
        mailbox: ImapMailbox,
        receive: Receive,
        state_dir: Path,
        log: logging.Logger,
        on_set_aside: Callable[[dict[str, Any]], Awaitable[Any]] | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        self.mailbox = mailbox
        self.receive = receive
        # Larger mail is set aside without being downloaded, as SMTP refuses it with 552.
        self.max_message_bytes = max_message_bytes
        # Told of every mail set aside (the channel keeps it as an event, which /metrics counts),
        # so that it shows beyond the log.
        self.on_set_aside = on_set_aside
        self.state_path = Path(state_dir) / f"{mailbox.key}.json"
        self.unprocessable_dir = Path(state_dir) / UNPROCESSABLE_DIR
        self.log = log
        self.imported = 0
        self.set_aside = 0

    async def service(self) -> AsyncIterator[None]:
        """A channel service: the poller runs as a task between start and stop."""
        task = asyncio.create_task(self.run(), name=f"imap:{self.mailbox.host}:{self.mailbox.mailbox}")
        try:
            yield
        finally:
            # Cancelled again until it ends: Python 3.11's asyncio.wait_for (around every IMAP
            # call) loses a cancellation that arrives as the call completes, and the poller then
            # polled on while the stop waited for it for ever.
            while not task.done():
                task.cancel()
                await asyncio.wait((task,), timeout=STOP_RETRY_SECONDS)
            if not task.cancelled() and task.exception() is not None:
                self.log.warning("IMAP %s: the poller ended with %r", self.mailbox.host, task.exception())

    async def run(self) -> None:
        """Poll until cancelled; a failed session is retried after ``retry_seconds``."""
        while True:
            try:
                await self.session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep polling; the cause is logged
                self.log.warning("IMAP %s@%s/%s: %s; retrying in %.0f s", self.mailbox.user, self.mailbox.host,
                                 self.mailbox.mailbox, exc or type(exc).__name__, self.mailbox.retry_seconds)
            await asyncio.sleep(self.mailbox.retry_seconds)

    def _client(self) -> aioimaplib.IMAP4:
        box = self.mailbox
        if box.tls == "tls":
            return aioimaplib.IMAP4_SSL(host=box.host, port=box.port, timeout=box.timeout,
                                        ssl_context=ssl.create_default_context())
        return aioimaplib.IMAP4(host=box.host, port=box.port, timeout=box.timeout)

    async def session(self) -> None:
        """One connection: log in, select, import, then wait for news (IDLE or interval)."""
        box = self.mailbox
        client = self._client()
        try:
            await client.wait_hello_from_server()
            _check(await client.login(box.user, box.password), "LOGIN")
            lines = _check(await client.select(_imap_quote(box.mailbox)), "SELECT")
            uidvalidity = next((int(m.group(1)) for line in lines if (m := _UIDVALIDITY.search(line))), 0)
            use_idle = box.idle and client.has_capability("IDLE")
            self.log.info("IMAP %s@%s/%s selected (%s)", box.user, box.host, box.mailbox,
                          "IDLE" if use_idle else f"every {box.poll_seconds:g} s")
            while True:
                await self.import_new(client, uidvalidity)
                if use_idle:
                    await self._idle(client)
                else:
                    await asyncio.sleep(box.poll_seconds)
        finally:
            try:
                await asyncio.wait_for(client.logout(), 2)
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass
            finally:
                # After a command cancelled at its deadline aioimaplib never closes the connection
                # itself: each reconnect left one open, until the server refused further logins.
                transport = getattr(getattr(client, "protocol", None), "transport", None)
                if transport is not None:
                    transport.close()

    async def _idle(self, client: aioimaplib.IMAP4) -> None:
        """Wait in IDLE until the server reports something or ``idle_seconds`` pass."""
        idle = await client.idle_start(timeout=self.mailbox.idle_seconds)
        try:
            await client.wait_server_push(timeout=self.mailbox.idle_seconds + 5)
        except TimeoutError:
            pass
        finally:
            client.idle_done()
            await asyncio.wait_for(idle, self.mailbox.timeout)

    async def import_new(self, client: aioimaplib.IMAP4, uidvalidity: int) -> int:
        """Import every message above the mark, oldest first; returns how many."""
        mark = UidMark.load(self.state_path)
        if mark.uidvalidity != uidvalidity:
            if mark.uidvalidity:
                self.log.warning("IMAP %s/%s: UIDVALIDITY changed; looking at every message again (duplicates are skipped)",
                                 self.mailbox.host, self.mailbox.mailbox)
            mark = UidMark(uidvalidity=uidvalidity, last_uid=0)
        lines = _check(await client.uid_search(f"UID {mark.last_uid + 1}:*", charset=None), "UID SEARCH")
        uids = sorted({int(tok) for line in lines for tok in line.split() if tok.isdigit()})
        # "n:*" always matches the highest UID, even when it is below n
        uids = [u for u in uids if u > mark.last_uid]
        count = 0
        for uid in uids:
            raw, broken = await self._download(client, mark, uid)
            if raw is not None:
                envelope_to = [self.mailbox.address] if self.mailbox.address else None
                # Counted before the attempt, so that a mail during which the process died (out
                # of memory, a crash) counts too, instead of taking it down again at every start.
                attempts = mark.failed.get(uid, 0) + 1
                mark.failed = {uid: attempts}  # mail is imported in UID order: only this one can be failing
                counted = asyncio.ensure_future(asyncio.to_thread(mark.save, self.state_path))
                try:
                    await asyncio.shield(counted)
                    if attempts > self.mailbox.max_attempts:
                        # Its attempts are used up: an earlier one ended with the process, or the
                        # mail could not be set aside yet. Not tried again, only set aside.
                        raise ImportFailed("no attempts left (the last may have ended with the process)")
                    await self.receive(raw, envelope_to)  # returns after the commit
                except asyncio.CancelledError:
                    # Stopping the service is no failed attempt, also when it stops while the
                    # count is being written: that write ends first, then the count is undone.
                    await asyncio.wait([counted])
                    mark.failed = {uid: attempts - 1} if attempts > 1 else {}
                    mark.save(self.state_path)
                    raise
                except StorageUnavailable as exc:
                    # The database refuses every write (disk full, read-only): not this mail's
                    # fault, and counted against it every mail would be set aside in turn during
                    # an outage, unanswered. It stays in the mailbox until the service can store.
                    mark.failed = {uid: attempts - 1} if attempts > 1 else {}
                    await self._save(mark)
                    self.log.error("IMAP %s: UID %s not imported, the service cannot store mail now (%s); "
                                   "it stays in the mailbox and is tried again", self.mailbox.label, uid, exc)
                    raise ImportFailed(f"UID {uid}: the service cannot store mail now") from exc
                except Exception as exc:  # noqa: BLE001 - counted; raises until the mail is set aside
                    await self._failed(mark, uid, raw, exc, attempts)
                else:
                    count += 1
                    broken = await self._flag(client, uid)
            mark.last_uid = uid
            mark.failed.pop(uid, None)
            await self._save(mark)
            if broken:  # a command cut short at its deadline leaves the connection unusable
                raise ImapError(broken)
        if not uids and mark.uidvalidity and not self.state_path.exists():
            await self._save(mark)
        self.imported += count
        return count

    async def _failed(self, mark: UidMark, uid: int, raw: bytes, exc: Exception, attempts: int) -> None:
        """After the ``attempts``-th failed import of ``uid`` (counted in the state file already):
        raises ``ImportFailed`` (the session is retried) until ``max_attempts`` are used up; then
        writes the raw mail to the unprocessable folder and returns, so the caller moves the mark
        past it. A mail that cannot be written there stays where it is and is tried again (to
        be set aside, not imported): nothing is lost."""
        box = self.mailbox
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if attempts < box.max_attempts:
            raise ImportFailed(f"UID {uid}: import failed (attempt {attempts} of {box.max_attempts}): {cause}") from exc
        try:
            path = await asyncio.to_thread(self._write_unprocessable, mark.uidvalidity, uid, raw)
        except (OSError, StorageUnavailable) as write_error:
            raise ImportFailed(
                f"UID {uid}: import failed {attempts} times ({cause}), and the mail could not be set aside: {write_error}"
            ) from write_error
        await self._report_set_aside({"mailbox": box.label, "uidvalidity": mark.uidvalidity, "uid": uid,
                                      "file": path.name, "cause": cause})
        self.log.error("IMAP %s: UID %s (UIDVALIDITY %s) failed to import %d times, last with %s; "
                       "set aside as %s, importing the next mail", box.label, uid, mark.uidvalidity, attempts,
                       cause, path, exc_info=exc)

    async def _report_set_aside(self, details: dict[str, Any]) -> None:
        """Count a mail set aside and tell ``on_set_aside`` (an event, which /metrics counts)."""
        self.set_aside += 1
        if self.on_set_aside is not None:
            try:
                await self.on_set_aside(details)
            except Exception:  # the mail is safe (in its file or the mailbox), and the log tells
                self.log.exception("IMAP %s: could not record UID %s as set aside", self.mailbox.label, details["uid"])

    def _too_large(self, size: int) -> bool:
        """Whether a mail of ``size`` bytes is over ``max_message_bytes`` (when one is set)."""
        return self.max_message_bytes is not None and size > self.max_message_bytes

    async def _set_aside_too_large(self, mark: UidMark, uid: int, size: int) -> None:
        """A mail over ``max_message_bytes``: not imported, left in the mailbox (without the
        import keyword, so it stands out), reported like any mail set aside; the caller moves
        the mark past it."""
        box = self.mailbox
        cause = f"larger than max_message_bytes ({size} > {self.max_message_bytes} bytes)"
        await self._report_set_aside({"mailbox": box.label, "uidvalidity": mark.uidvalidity, "uid": uid,
                                      "size": size, "cause": cause})
        self.log.error("IMAP %s: UID %s (UIDVALIDITY %s) is %s; not downloaded, it stays in the mailbox; "
                       "importing the next mail", box.label, uid, mark.uidvalidity, cause)

    async def _set_aside_unfetched(self, mark: UidMark, uid: int, cause: str, attempts: int) -> None:
        """A mail whose body did not come in time, or that the server refused to send,
        ``attempts`` times: not imported, left in the mailbox (without the import keyword),
        reported like any mail set aside; the caller moves the mark past it."""
        box = self.mailbox
        await self._report_set_aside({"mailbox": box.label, "uidvalidity": mark.uidvalidity, "uid": uid,
                                      "cause": f"not downloaded, {attempts} times: {cause}"})
        self.log.error("IMAP %s: UID %s (UIDVALIDITY %s) could not be downloaded %s times (%s); it stays in "
                       "the mailbox; importing the next mail", box.label, uid, mark.uidvalidity, attempts, cause)

    async def _save(self, mark: UidMark) -> None:
        """Write the mark in a worker thread, and have it written when this returns, also when
        the poller is stopped meanwhile: the thread went on writing after a cancelled await,
        and whoever read the file next could find the mark before this write."""
        saving = asyncio.ensure_future(asyncio.to_thread(mark.save, self.state_path))
        try:
            await asyncio.shield(saving)
        except asyncio.CancelledError:
            await asyncio.wait([saving])
            raise

    async def _within(self, call: Awaitable[Any], what: str, seconds: float | None = None) -> Any:
        """Await one IMAP call with a deadline for its whole answer (``timeout`` unless given);
        raises ``ImapTimeout`` when it passes, or when aioimaplib's own timeout (nothing
        received for ``timeout`` seconds) ends the call first. The connection is unusable
        afterwards."""
        seconds = self.mailbox.timeout if seconds is None else seconds
        try:
            return await asyncio.wait_for(call, seconds)
        except TimeoutError:
            raise ImapTimeout(f"{what}: no complete answer within {seconds:g} s") from None
        except aioimaplib.CommandTimeout:
            raise ImapTimeout(f"{what}: nothing received for {self.mailbox.timeout:g} s") from None

    async def _flag(self, client: aioimaplib.IMAP4, uid: int) -> str | None:
        """Set the import keyword on ``uid``; why the connection cannot be used any more (a
        STORE that got no answer in time), or None. A refused STORE is only logged: the mark is
        what counts."""
        try:
            await self._within(client.uid("store", str(uid), "+FLAGS", f"({IMPORTED_KEYWORD})"), "UID STORE")
        except ImapTimeout as exc:
            self.log.warning("IMAP %s: could not flag UID %s: %s", self.mailbox.label, uid, exc)
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - the mark is what counts
            self.log.info("IMAP: could not flag UID %s: %s", uid, exc)
        return None

    async def _download(self, client: aioimaplib.IMAP4, mark: UidMark, uid: int) -> tuple[bytes | None, str | None]:
        """The raw mail with this UID, and why the connection cannot be used any more (or None).
        No mail when it vanished, when it is larger than ``max_message_bytes`` (set aside, mostly
        before downloading it), or when its attempts to download it are used up (set aside)."""
        size = await self._size(client, uid)
        if size is not None and self._too_large(size):
            await self._set_aside_too_large(mark, uid, size)
            return None, None
        try:
            raw = await self._fetch(client, uid, size)
        except (ImapTimeout, ImapRefused) as exc:
            # The server answered at once about the mail, but its body did not come in time, or
            # it refused to send it (a corrupt file on its side): a failed attempt of this mail
            # (else one such mail held the whole mailbox for ever). Once they are used up it is
            # left in the mailbox.
            attempts = mark.failed.get(uid, 0) + 1
            mark.failed = {uid: attempts}
            await self._save(mark)
            if attempts < self.mailbox.max_attempts:
                raise
            await self._set_aside_unfetched(mark, uid, str(exc), attempts)
            return None, str(exc) if isinstance(exc, ImapTimeout) else None
        if raw is not None and self._too_large(len(raw)):  # the server did not tell, or told wrong
            await self._set_aside_too_large(mark, uid, len(raw))
            return None, None
        return raw, None

    async def _size(self, client: aioimaplib.IMAP4, uid: int) -> int | None:
        """The mail's ``RFC822.SIZE``, or None when the server does not say."""
        response = await self._within(client.uid("fetch", str(uid), "(RFC822.SIZE)"), "UID FETCH RFC822.SIZE")
        if response.result != "OK":
            return None
        for line in _lines(response):
            found_uid, found_size = _FETCH_UID.search(line), _FETCH_SIZE.search(line)
            if found_uid and found_size and int(found_uid.group(1)) == uid:
                return int(found_size.group(1))
        return None

    def _write_unprocessable(self, uidvalidity: int, uid: int, raw: bytes) -> Path:
        """Write the raw mail durably, named by mailbox, UIDVALIDITY and UID (and the mailbox's
        state-file key, which keeps names apart that the sanitising made equal)."""
        box = self.mailbox

        def safe(text: str) -> str:
            # 40 each: with the key, the numbers and write_durably's temporary suffix the name
            # stays well under the 255 bytes a file name may have.
            return _UNSAFE_IN_NAME.sub("_", text).strip("._")[:40] or "_"

        name = f"{safe(box.host)}_{safe(box.user)}_{safe(box.mailbox)}_{box.key}_uidvalidity-{uidvalidity}_uid-{uid}.eml"
        path = self.unprocessable_dir / name
        write_durably(path, raw)
        return path

    async def _fetch(self, client: aioimaplib.IMAP4, uid: int, size: int | None) -> bytes | None:
        """The raw message with this UID, or None when it vanished (expunged meanwhile). The
        whole download gets ``timeout`` plus a second per ``FETCH_BYTES_PER_SECOND`` bytes of
        ``size`` (of ``max_message_bytes`` when the size is unknown)."""
        expected = size if size is not None else self.max_message_bytes or 0
        seconds = self.mailbox.timeout + expected / FETCH_BYTES_PER_SECOND
        lines = _check(await self._within(client.uid("fetch", str(uid), "(BODY.PEEK[])"), "UID FETCH", seconds), "UID FETCH")
        for i, line in enumerate(lines[:-1]):
            found = _FETCH_UID.search(line)
            if b"FETCH" in line.upper() and found and int(found.group(1)) == uid and line.rstrip().endswith(b"}"):
                return lines[i + 1]
        return None
