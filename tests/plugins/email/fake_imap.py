"""A small IMAP4rev1 server on loopback for tests: one mailbox, the commands the poller uses
(CAPABILITY, LOGIN, SELECT, UID SEARCH, UID FETCH of RFC822.SIZE or the body, UID STORE, IDLE,
NOOP, LOGOUT), and a log of what clients asked for. ``trickle`` makes it send a body a byte at
a time, and ``trickle_store`` answer a STORE with an endless stream of untagged lines, as a
stuck or hostile server does."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shlex


@dataclasses.dataclass
class StoredMail:
    uid: int
    raw: bytes
    flags: set[str] = dataclasses.field(default_factory=set)


class FakeImapServer:
    """``add(raw)`` puts a mail in the mailbox and wakes clients waiting in IDLE."""

    def __init__(self, *, user: str = "postfach", password: str = "geheim", idle: bool = True, uidvalidity: int = 1001) -> None:
        self.user = user
        self.password = password
        self.idle = idle
        self.uidvalidity = uidvalidity
        self.mails: list[StoredMail] = []
        self.commands: list[str] = []
        self.port = 0
        self.logins = 0
        self._next_uid = 1
        self._idlers: set[asyncio.Event] = set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.trickle: float | None = None  # seconds between the bytes of a fetched body
        self.trickle_store: float | None = None  # seconds between the untagged lines answering a STORE
        self.report_size: bool = True  # whether FETCH (RFC822.SIZE) answers with the size

    def add(self, raw: bytes) -> int:
        uid = self._next_uid
        self._next_uid += 1
        self.mails.append(StoredMail(uid, raw))
        for event in self._idlers:
            event.set()
        return uid

    @property
    def open_sessions(self) -> int:
        """Client connections the server still has open."""
        return len(self._writers)

    def fetched(self) -> list[int]:
        """UIDs whose body clients fetched, in order."""
        return [int(m.group(1)) for c in self.commands if (m := re.match(r"UID FETCH (\d+) \(BODY", c, re.IGNORECASE))]

    def sized(self) -> list[int]:
        """UIDs whose RFC822.SIZE clients asked for, in order."""
        return [int(m.group(1)) for c in self.commands if (m := re.match(r"UID FETCH (\d+) \(RFC822\.SIZE", c, re.IGNORECASE))]

    async def __aenter__(self) -> FakeImapServer:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    def _capabilities(self) -> str:
        return "IMAP4rev1" + (" IDLE" if self.idle else "")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        selected = False

        def send(data: bytes | str) -> None:
            writer.write(data.encode() if isinstance(data, str) else data)

        send("* OK fake IMAP ready\r\n")
        try:
            while line := await reader.readline():
                text = line.decode().rstrip("\r\n")
                tag, _, rest = text.partition(" ")
                self.commands.append(rest)
                words = shlex.split(rest) if rest else []
                command = words[0].upper() if words else ""
                if command == "CAPABILITY":
                    send(f"* CAPABILITY {self._capabilities()}\r\n{tag} OK CAPABILITY completed\r\n")
                elif command == "LOGIN":
                    if words[1:3] == [self.user, self.password]:
                        self.logins += 1
                        send(f"{tag} OK LOGIN completed\r\n")
                    else:
                        send(f"{tag} NO [AUTHENTICATIONFAILED] invalid credentials\r\n")
                elif command == "SELECT":
                    selected = True
                    send(f"* {len(self.mails)} EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY {self.uidvalidity}] UIDs valid\r\n"
                         f"* OK [UIDNEXT {self._next_uid}] next\r\n{tag} OK [READ-WRITE] SELECT completed\r\n")
                elif command == "UID" and selected and self.trickle and "FETCH" in rest.upper() and "BODY" in rest.upper():
                    await self._trickle(int(words[2]), send, writer)
                elif command == "UID" and selected and self.trickle_store and "STORE" in rest.upper():
                    send(self._uid(tag, "STORE", words[2:]).rsplit(b"\r\n", 2)[0] + b"\r\n")  # untagged only
                    while True:
                        await writer.drain()
                        await asyncio.sleep(self.trickle_store)
                        send(f"* 1 FETCH (UID {words[2]} FLAGS ())\r\n")
                elif command == "UID" and selected and len(words) > 1:
                    send(self._uid(tag, words[1].upper(), words[2:]))
                elif command == "IDLE" and self.idle and selected:
                    await self._idle(tag, reader, send)
                elif command == "NOOP":
                    send(f"{tag} OK NOOP completed\r\n")
                elif command == "LOGOUT":
                    send(f"* BYE bye\r\n{tag} OK LOGOUT completed\r\n")
                    await writer.drain()
                    break
                else:
                    send(f"{tag} BAD unknown command\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _uid(self, tag: str, command: str, args: list[str]) -> bytes:
        out = b""
        if command == "SEARCH":
            # only "UID n:*" is needed; like real servers, n:* always matches the highest UID
            start = int(re.match(r"(\d+):\*", args[-1]).group(1))  # type: ignore[union-attr]
            uids = [m.uid for m in self.mails if m.uid >= start]
            if not uids and self.mails:
                uids = [self.mails[-1].uid]
            return f"* SEARCH {' '.join(map(str, uids))}\r\n{tag} OK SEARCH completed\r\n".encode()
        if command == "FETCH":
            uid = int(args[0])
            for seq, mail in enumerate(self.mails, 1):
                if mail.uid != uid:
                    continue
                if "RFC822.SIZE" in " ".join(args[1:]).upper():
                    size = f" RFC822.SIZE {len(mail.raw)}" if self.report_size else ""
                    out += f"* {seq} FETCH (UID {uid}{size})\r\n".encode()
                else:
                    out += f"* {seq} FETCH (UID {uid} BODY[] {{{len(mail.raw)}}}\r\n".encode() + mail.raw + b")\r\n"
            return out + f"{tag} OK FETCH completed\r\n".encode()
        if command == "STORE":
            uid = int(args[0])
            for seq, mail in enumerate(self.mails, 1):
                if mail.uid == uid:
                    mail.flags.update(" ".join(args[2:]).strip("()").split())
                    out += f"* {seq} FETCH (UID {uid} FLAGS ({' '.join(sorted(mail.flags))}))\r\n".encode()
            return out + f"{tag} OK STORE completed\r\n".encode()
        return f"{tag} BAD unsupported UID command\r\n".encode()

    async def _trickle(self, uid: int, send, writer: asyncio.StreamWriter) -> None:  # type: ignore[no-untyped-def]
        """Answer a body FETCH one byte every ``trickle`` seconds; the session ends with it."""
        [mail] = [m for m in self.mails if m.uid == uid]
        send(f"* 1 FETCH (UID {uid} BODY[] {{{len(mail.raw)}}}\r\n".encode())
        for byte in mail.raw:
            await writer.drain()
            await asyncio.sleep(self.trickle or 0)
            send(bytes([byte]))

    async def _idle(self, tag: str, reader: asyncio.StreamReader, send) -> None:  # type: ignore[no-untyped-def]
        event = asyncio.Event()
        self._idlers.add(event)
        send("+ idling\r\n")
        done = asyncio.ensure_future(reader.readline())
        try:
            while True:
                woke = asyncio.ensure_future(event.wait())
                finished, _ = await asyncio.wait({done, woke}, return_when=asyncio.FIRST_COMPLETED)
                if woke in finished:
                    event.clear()
                    send(f"* {len(self.mails)} EXISTS\r\n")
                if done in finished:
                    woke.cancel()
                    self.commands.append(done.result().decode().strip())
                    send(f"{tag} OK IDLE terminated\r\n")
                    return
        finally:
            self._idlers.discard(event)
