from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from plugins.phone.calls import CallLog

T0 = datetime(2025, 5, 13, 8, 0, tzinfo=UTC)


def test_notes_accumulate_and_outlive_the_end_of_the_call():
    log = CallLog()
    log.note("CA1", T0, topic="fault", language="en")
    log.note("CA1", T0, outcome="voicemail")
    state = log.state("CA1")
    assert (state.topic, state.language, state.outcome) == ("fault", "en", "voicemail")
    assert log.state("CA1") is state  # kept until it ages out: Twilio may report the end twice


def test_log_is_bounded_in_size_and_age():
    log = CallLog(max_calls=2, max_age=timedelta(hours=1))
    log.note("CA1", T0)
    log.note("CA2", T0)
    log.note("CA3", T0)
    assert log.state("CA1") is None and len(log) == 2
    log.note("CA4", T0 + timedelta(hours=2))
    assert len(log) == 1 and log.state("CA4") is not None


async def test_the_end_of_a_call_waits_for_an_outcome_being_stored():
    log = CallLog()
    log.note("CA1", T0, topic="fault")
    token = log.begin("CA1", T0)
    ended = asyncio.create_task(log.settled("CA1"))
    await asyncio.sleep(0)
    assert not ended.done()  # the voicemail is still being stored
    log.settle("CA1", token, T0, outcome="voicemail")
    state = await asyncio.wait_for(ended, 1)
    assert (state.topic, state.outcome, state.pending) == ("fault", "voicemail", [])


async def test_an_outcome_that_was_not_stored_leaves_the_call_open():
    log = CallLog()
    token = log.begin("CA1", T0)
    log.settle("CA1", token, T0, outcome=None)
    state = await asyncio.wait_for(log.settled("CA1"), 1)
    assert state.outcome is None and state.pending == []


async def test_settled_does_not_wait_for_a_call_without_pending_outcomes():
    log = CallLog()
    assert await asyncio.wait_for(log.settled("CA1"), 1) is None
    log.note("CA2", T0, outcome="answered")
    assert (await asyncio.wait_for(log.settled("CA2"), 1)).outcome == "answered"
