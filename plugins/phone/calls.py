"""What happened so far in each call in progress, so the call's end can tell a missed call.

Twilio's call status callback says only that a call ended, not whether a forward was answered or a
voicemail left, so the channel notes those outcomes here. The log lives in memory, bounded in
size and age. A call whose notes are lost (a restart, another instance) ends as a missed call: a
needless call-back is better than a lost one.

An outcome whose message is still being stored (a voicemail: the caller hangs up while
recording, and Twilio posts the recording and the call's end at once) is noted as pending
before the store begins (``begin``), and the call's end waits for it (``settled``): noted only
after the commit, the end came first and stored a needless missed call.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from datetime import datetime, timedelta


@dataclasses.dataclass(slots=True)
class CallState:
    """One call's menu choice and outcome (``answered``, ``voicemail`` or None yet)."""

    topic: str | None = None
    language: str | None = None
    outcome: str | None = None
    taken: bool = False
    """Someone pressed 1 at the screen of a forward: a person took the call."""
    updated: datetime | None = None
    pending: list[asyncio.Event] = dataclasses.field(default_factory=list)
    """One event per outcome being stored (``begin``), set when it is settled."""


class CallLog:
    """Notes per CallSid; the oldest are dropped beyond ``max_calls`` or after ``max_age``."""

    def __init__(self, max_calls: int = 10_000, max_age: timedelta = timedelta(hours=6)) -> None:
        self._calls: OrderedDict[str, CallState] = OrderedDict()
        self._max_calls = max_calls
        self._max_age = max_age

    def __len__(self) -> int:
        return len(self._calls)

    def note(
        self,
        call_sid: str,
        now: datetime,
        *,
        topic: str | None = None,
        language: str | None = None,
        outcome: str | None = None,
        taken: bool | None = None,
    ) -> CallState:
        """Record what is known now; values given replace earlier ones, None keeps them."""
        state = self._calls.pop(call_sid, None) or CallState()
        if taken is not None:
            state.taken = taken
        if topic is not None:
            state.topic = topic
        if language is not None:
            state.language = language
        if outcome is not None:
            state.outcome = outcome
        state.updated = now
        self._calls[call_sid] = state
        self._prune(now)
        return state

    def begin(self, call_sid: str, now: datetime) -> asyncio.Event:
        """Say that an outcome of the call is being stored now; hand the token to ``settle``
        (in a ``finally``: a call's end waits for it)."""
        token = asyncio.Event()
        self.note(call_sid, now).pending.append(token)
        return token

    def settle(self, call_sid: str, token: asyncio.Event, now: datetime, *, outcome: str | None) -> None:
        """The store that ``begin`` announced is over: note ``outcome`` when it was stored (None
        when it failed, so that the call's end is still a missed call) and wake whoever waits."""
        state = self._calls.get(call_sid)
        if state is not None:
            if token in state.pending:
                state.pending.remove(token)
            if outcome is not None:
                self.note(call_sid, now, outcome=outcome)
        token.set()

    async def settled(self, call_sid: str) -> CallState | None:
        """The call's notes (as ``state``) once no outcome of it is still being stored."""
        while (state := self._calls.get(call_sid)) is not None and state.pending:
            await state.pending[0].wait()
        return state

    def state(self, call_sid: str) -> CallState | None:
        """The call's notes so far (None when there are none). They stay until they age out,
        also after the call ended: Twilio may report the end twice, and notes dropped at the
        first report made an answered call a missed one at the second."""
        return self._calls.get(call_sid)

    def _prune(self, now: datetime) -> None:
        while len(self._calls) > self._max_calls:
            self._calls.popitem(last=False)
        while self._calls:
            oldest = next(iter(self._calls.values()))
            if oldest.updated is not None and now - oldest.updated <= self._max_age:
                break
            self._calls.popitem(last=False)
