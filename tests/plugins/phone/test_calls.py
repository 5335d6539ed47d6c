from __future__ import annotations

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
