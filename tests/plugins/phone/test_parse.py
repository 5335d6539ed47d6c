from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.phone import parse

CALL = {
    "AccountSid": "AC00000000000000000000000000000000",
    "CallSid": "CA1111111111111111111111111111111a",
    "From": "+4930123456789",
    "To": "+4930999999",
    "CallStatus": "in-progress",
    "Direction": "inbound",
    "ApiVersion": "2010-04-01",
}


def with_(base: dict, **changes: str) -> dict:
    return {**base, **changes}


# -- calls -----------------------------------------------------------------------------------


def test_call_is_a_call_from_the_e164_number(assert_canonical):
    message = assert_canonical(parse.call_message(with_(CALL, Digits="1"), topic="construction", language="de"))
    assert message["kind"] == "call"
    assert message["channel"] == "phone"
    assert message["channel_message_id"] == CALL["CallSid"]
    assert message["sender"] == {"kind": "phone", "address": "+4930123456789"}
    assert message["recipient"] == "+4930999999"
    assert message["topic"] == "construction"
    assert message["language"] == "de"
    assert message["flags"] == []
    assert message["meta"]["digits"] == "1"


def test_national_number_is_normalised_with_the_default_region(assert_canonical):
    message = assert_canonical(parse.call_message(with_(CALL, From="0151 12345678")))
    assert message["sender"]["address"] == "+4915112345678"


def test_topic_and_language_outside_the_schema_are_dropped(assert_canonical):
    message = assert_canonical(parse.call_message(CALL, topic="Not A Topic", language="deutsch"))
    assert message["topic"] is None
    assert message["language"] is None


@pytest.mark.parametrize("caller", ["anonymous", "+266696687", "", "restricted", "Restricted", "sip:alice@pbx"])
def test_withheld_numbers_are_anonymous_with_no_number(caller, assert_canonical):
    message = assert_canonical(parse.call_message(with_(CALL, From=caller)))
    assert message["sender"] == {"kind": "anonymous", "address": f"anonymous:{CALL['CallSid']}"}
    assert "no_number" in message["flags"]


def test_missed_call_is_a_call_back_duty_in_the_calls_thread(assert_canonical):
    message = assert_canonical(
        parse.missed_call_message(with_(CALL, CallStatus="completed", CallDuration="7"), topic="fault")
    )
    assert message["kind"] == "missed_call"
    assert message["channel_message_id"] == f"{CALL['CallSid']}:missed"
    assert message["flags"] == ["callback_required"]
    assert message["thread"] == {"refs": [CALL["CallSid"]]}
    assert message["meta"]["call_duration"] == 7
    assert message["topic"] == "fault"


def test_missed_call_from_withheld_number_has_both_flags(assert_canonical):
    message = assert_canonical(parse.missed_call_message(with_(CALL, From="anonymous")))
    assert message["flags"] == ["callback_required", "no_number"]


def test_call_without_call_sid_is_a_payload_error():
    with pytest.raises(parse.PayloadError):
        parse.call_message({"From": "+4930123456789"})


# -- voicemail and transcripts ----------------------------------------------------------------

RECORDING = with_(
    CALL,
    RecordingSid="RE2222222222222222222222222222222b",
    RecordingUrl="https://api.twilio.com/2010-04-01/Accounts/AC0/Recordings/RE2222222222222222222222222222222b",
    RecordingDuration="42",
)


def test_voicemail_carries_the_recording(assert_canonical):
    message = assert_canonical(parse.voicemail_message(RECORDING, topic="construction", language="de"))
    assert message["kind"] == "voicemail"
    assert message["channel_message_id"] == RECORDING["RecordingSid"]
    assert message["flags"] == ["callback_required"]
    assert message["attachments"][0]["url"] == RECORDING["RecordingUrl"]
    assert message["attachments"][0]["media_id"] == RECORDING["RecordingSid"]
    assert message["meta"]["recording_duration"] == 42
    assert message["thread"] == {"refs": [CALL["CallSid"]]}


@pytest.mark.parametrize("changes", [{"RecordingDuration": "0"}, {"RecordingUrl": ""}])
def test_nothing_recorded_is_no_voicemail(changes):
    assert parse.voicemail_message(with_(RECORDING, **changes)) is None


def test_transcript_is_an_edit_of_the_voicemail(assert_canonical):
    params = with_(
        RECORDING, TranscriptionSid="TR3333333333333333333333333333333c", TranscriptionStatus="completed",
        TranscriptionText="Hallo, die Baugrube vor meinem Haus ist seit Wochen offen.",
    )
    update = parse.transcript_update(params)
    voicemail = parse.voicemail_message(RECORDING)
    assert update.target_message_id == voicemail["channel_message_id"]
    message = assert_canonical(parse.transcript_message(update))
    assert message["kind"] == "edit"
    assert message["target_message_id"] == RECORDING["RecordingSid"]
    assert message["channel_message_id"] == "TR3333333333333333333333333333333c"
    assert message["text"].startswith("Hallo, die Baugrube")
    assert message["sender"] == voicemail["sender"]
    assert "transcription_failed" not in message["flags"]


def test_failed_transcription_is_flagged_without_text(assert_canonical):
    params = with_(RECORDING, TranscriptionSid="TR4", TranscriptionStatus="failed", TranscriptionText="")
    message = assert_canonical(parse.transcript_message(parse.transcript_update(params)))
    assert message["text"] is None
    assert message["flags"] == ["transcription_failed"]
    assert message["meta"]["transcription_status"] == "failed"


def test_transcript_of_withheld_caller_keeps_the_calls_anonymous_address(assert_canonical):
    params = with_(RECORDING, From="anonymous", TranscriptionStatus="completed", TranscriptionText="Hallo")
    message = assert_canonical(parse.transcript_message(parse.transcript_update(params)))
    voicemail = parse.voicemail_message(with_(RECORDING, From="anonymous"))
    assert message["sender"] == voicemail["sender"]
    assert message["channel_message_id"] == f"{RECORDING['RecordingSid']}:transcript:completed"


# -- SMS --------------------------------------------------------------------------------------

SMS = {
    "MessageSid": "SM5555555555555555555555555555555e",
    "SmsSid": "SM5555555555555555555555555555555e",
    "AccountSid": "AC0",
    "From": "+4915112345678",
    "To": "+4930999999",
    "Body": "Wann wird mein Anschluss fertig?",
    "NumMedia": "0",
}


def test_sms_is_a_message(assert_canonical):
    message = assert_canonical(parse.sms_message(SMS))
    assert message["kind"] == "message"
    assert message["channel_message_id"] == SMS["MessageSid"]
    assert message["sender"] == {"kind": "phone", "address": "+4915112345678"}
    assert message["text"] == SMS["Body"]
    assert "ack_suppressed" not in message


def test_sms_media_become_attachments(assert_canonical):
    params = with_(SMS, NumMedia="2", MediaUrl0="https://m/0", MediaContentType0="image/jpeg", MediaUrl1="https://m/1")
    message = assert_canonical(parse.sms_message(params))
    assert message["attachments"] == [
        {"url": "https://m/0", "content_type": "image/jpeg"},
        {"url": "https://m/1", "content_type": None},
    ]
    # an absurd media type is cut to the schema's 200 characters, not a reason to lose the SMS
    long = assert_canonical(parse.sms_message(with_(SMS, NumMedia="1", MediaUrl0="https://m/0", MediaContentType0="x" * 500)))
    assert long["attachments"][0]["content_type"] == "x" * 200


def test_sms_media_are_read_up_to_ten(assert_canonical):
    """Twilio sends at most 10 media; ``NumMedia`` is the sender's word for how many to look
    for, and only the first ten are read."""
    urls = {f"MediaUrl{i}": f"https://m/{i}" for i in range(12)}
    message = assert_canonical(parse.sms_message(with_(SMS, NumMedia="12", **urls)))
    assert [a["url"] for a in message["attachments"]] == [f"https://m/{i}" for i in range(10)]


@pytest.mark.parametrize("body", [" Stop ", "STOPALL", "Unsubscribe", "CANCEL", "end", "Quit"])
def test_sms_opt_out_is_never_acknowledged(assert_canonical, body):
    """Twilio's default opt-out keywords: Twilio itself confirms the opt-out, and blocks
    whatever we send after it (21610)."""
    assert assert_canonical(parse.sms_message(with_(SMS, Body=body)))["ack_suppressed"] == "opt-out"
    assert "ack_suppressed" not in parse.sms_message(with_(SMS, Body=f"{body.strip()} the works, please"))


def test_sms_from_alphanumeric_sender_has_no_number(assert_canonical):
    message = assert_canonical(parse.sms_message(with_(SMS, From="Vodafone")))
    assert message["sender"]["kind"] == "anonymous"
    assert message["flags"] == ["no_number"]


# -- SMS statuses -----------------------------------------------------------------------------

AT = datetime(2025, 5, 13, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("twilio", "ours"),
    [("sent", "sent"), ("delivered", "delivered"), ("read", "read"), ("undelivered", "failed"), ("failed", "failed")],
)
def test_status_mapping(twilio, ours):
    update = parse.delivery_update({"MessageSid": "SM1", "MessageStatus": twilio}, at=AT)
    assert update.provider_id == "SM1"
    assert update.status == ours
    assert update.at == AT


@pytest.mark.parametrize("twilio", ["queued", "accepted", "sending", "scheduled", "", "bogus"])
def test_statuses_that_say_nothing_new_are_dropped(twilio):
    assert parse.delivery_update({"MessageSid": "SM1", "MessageStatus": twilio}) is None


@pytest.mark.parametrize(("code", "permanent"), [("30003", True), ("30005", True), ("30006", True), ("30008", False)])
def test_failed_status_says_whether_to_try_elsewhere(code, permanent):
    update = parse.delivery_update({"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": code})
    assert update.error_code == code
    assert update.permanent is permanent


@pytest.mark.parametrize(
    ("code", "address_failed"),
    [("30003", True), ("30005", True), ("30006", True), ("21610", True), ("30007", False), ("30032", False),
     ("30034", False)],
)
def test_only_a_failed_status_about_the_number_fails_the_address(code, address_failed):
    # 30007 (filtered as spam), 30032 (toll-free sender not verified), 30034 (sender not
    # registered) are about our message or sender, not the resident's number.
    update = parse.delivery_update({"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": code})
    assert update.permanent is True
    assert update.address_failed is address_failed


def test_a_canceled_sms_failed_for_good_without_failing_the_number():
    update = parse.delivery_update({"MessageSid": "SM1", "MessageStatus": "canceled"})
    assert (update.status, update.permanent, update.address_failed) == ("failed", True, False)


def test_error_code_0_is_no_error():
    # Twilio sends ErrorCode=0 with some successful statuses: no error code is recorded.
    update = parse.delivery_update({"MessageSid": "SM1", "MessageStatus": "delivered", "ErrorCode": "0"})
    assert update.status == "delivered" and update.error_code is None


@pytest.mark.parametrize(("status", "over"), [
    ("completed", True), ("busy", True), ("failed", True), ("no-answer", True), ("canceled", True),
    ("Canceled", True), ("queued", False), ("ringing", False), ("in-progress", False), ("", False),
])
def test_every_end_of_a_call_is_an_end(status, over):
    # Each end can be a missed call (``call_status``); a caller who hung up while it rang is one.
    assert parse.is_call_over({"CallSid": "CA1", "CallStatus": status}) is over


def test_old_style_sms_status_is_understood():
    assert parse.delivery_update({"SmsSid": "SM1", "SmsStatus": "delivered"}).status == "delivered"


# -- CTI --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "caller", "suppressed"),
    [
        (lambda params: parse.call_message(params), "+4930123456789", True),
        (lambda params: parse.call_message(params), "+4915112345678", False),
        (lambda params: parse.missed_call_message(params), "+4930123456789", True),
        (lambda params: parse.voicemail_message(
            {**params, "RecordingUrl": "https://api.twilio.com/r", "RecordingDuration": "5"}), "+4930123456789", True),
        (lambda params: parse.call_message(params), "+266696687", False),  # withheld: the core skips the ack
    ],
    ids=["call-landline", "call-mobile", "missed-landline", "voicemail-landline", "call-withheld"],
)
def test_calls_from_landlines_ask_for_no_sms_acknowledgement(build, caller, suppressed, assert_canonical):
    message = assert_canonical(build(with_(CALL, From=caller)))
    assert (message.get("ack_suppressed") == parse.LANDLINE_ACK) is suppressed


def cti(**fields):
    return {"event": "hangup", "direction": "in", "callId": "abc-123", "to": "030 9999999", **fields}


def test_cti_no_answer_from_national_number_is_a_missed_call(assert_canonical):
    message = assert_canonical(parse.cti_missed_call(cti(**{"from": "030 12345678", "cause": "noAnswer"})))
    assert message["kind"] == "missed_call"
    assert message["channel_message_id"] == "cti:abc-123:missed"
    assert message["sender"] == {"kind": "phone", "address": "+493012345678"}
    assert message["recipient"] == "+49309999999"
    assert message["flags"] == ["callback_required"]
    assert message["meta"]["cause"] == "noAnswer"
    assert message["ack_suppressed"] == parse.LANDLINE_ACK


@pytest.mark.parametrize(("number_format", "e164"), [("national", "+494921123456"), ("auto", "+4921123456")])
def test_a_cti_events_called_number_is_read_as_the_pbx_writes_numbers(assert_canonical, number_format, e164):
    """The caller was read in the PBX's format, the called number always as "auto": a number
    of Emden without its trunk 0 became one of Düsseldorf, and recipient rules matched another."""
    event = cti(**{"from": "4921123456", "to": "4921123456", "cause": "noAnswer"})
    message = assert_canonical(parse.cti_missed_call(event, number_format=number_format))
    assert message["recipient"] == message["sender"]["address"] == e164


@pytest.mark.parametrize(("value", "seconds"), [("95", 95), ("0", 0), ("", None), ("²", None), ("-3", None)])
def test_the_length_of_a_forwarded_call_is_read_or_left_out(value, seconds):
    """A digit that int() does not take ("²") raised, a 500 after staff had taken the call."""
    assert parse.dial_duration({"DialCallDuration": value}) == seconds


def test_cti_no_answer_from_anonymous_has_no_number(assert_canonical):
    message = assert_canonical(parse.cti_missed_call(cti(**{"from": "anonymous", "cause": "noAnswer"})))
    assert message["sender"] == {"kind": "anonymous", "address": "anonymous:cti:abc-123"}
    assert message["flags"] == ["callback_required", "no_number"]


@pytest.mark.parametrize("cause", ["busy", "cancel", "no_answer"])
def test_cti_other_missed_causes(cause, assert_canonical):
    assert assert_canonical(parse.cti_missed_call(cti(**{"from": "+4915112345678", "cause": cause})))


@pytest.mark.parametrize(
    "event",
    [
        cti(**{"from": "030 12345678", "cause": "normalClearing"}),
        cti(**{"from": "030 12345678", "cause": "noAnswer", "direction": "out"}),
        {"event": "newCall", "from": "030 12345678", "callId": "x", "direction": "in"},
        {"event": "answer", "from": "030 12345678", "callId": "x", "direction": "in"},
    ],
)
def test_cti_answered_and_outbound_calls_give_nothing(event):
    assert parse.cti_missed_call(event) is None


# sipgate.io's push API (github.com/sipgate/sipgate.io, "Call hangup"): a form post, numbers as
# international digits without "+", "user[]" per user who was rung.
SIPGATE_HANGUP = {
    "event": "hangup", "cause": "normalClearing", "callId": "123456", "from": "492111234567",
    "to": "4915791234567", "direction": "in", "answeringNumber": "4921199999999", "user[]": "Alice",
}


@pytest.mark.parametrize("cause", ["noAnswer", "busy", "cancel", "congestion", "notFound"])
def test_sipgate_hangups_that_reached_nobody_are_missed_calls(cause, assert_canonical):
    message = assert_canonical(parse.cti_missed_call(with_(SIPGATE_HANGUP, cause=cause)))
    assert message["kind"] == "missed_call"
    assert message["channel_message_id"] == "cti:123456:missed"
    assert message["sender"] == {"kind": "phone", "address": "+492111234567"}  # not +49492111234567
    assert message["recipient"] == "+4915791234567"
    assert message["meta"]["cause"] == cause


def test_sipgate_mobile_caller_without_plus_is_acknowledged_by_sms(assert_canonical):
    message = assert_canonical(parse.cti_missed_call(with_(SIPGATE_HANGUP, cause="notFound", **{"from": "4915791234567"})))
    assert message["sender"]["address"] == "+4915791234567"
    assert "ack_suppressed" not in message  # a mobile number: the acknowledgement goes by SMS


@pytest.mark.parametrize("cause", ["normalClearing", "forwarded"])
def test_sipgate_answered_or_forwarded_hangups_are_no_missed_calls(cause):
    # normalClearing: the call was established; forwarded: it goes on as a new call (own callId).
    assert parse.cti_missed_call(with_(SIPGATE_HANGUP, cause=cause)) is None


def test_sipgate_anonymous_caller(assert_canonical):
    message = assert_canonical(parse.cti_missed_call(with_(SIPGATE_HANGUP, cause="cancel", **{"from": "anonymous"})))
    assert message["sender"] == {"kind": "anonymous", "address": "anonymous:cti:123456"}


def test_cti_missed_call_without_call_id_is_a_payload_error():
    with pytest.raises(parse.PayloadError):
        parse.cti_missed_call({"event": "hangup", "cause": "noAnswer", "from": "anonymous"})


def test_cti_event_that_is_not_an_object_is_a_payload_error():
    with pytest.raises(parse.PayloadError):
        parse.cti_missed_call(["hangup"])


# -- malformed input --------------------------------------------------------------------------

KEYS = st.sampled_from(
    ["CallSid", "From", "To", "Digits", "RecordingUrl", "RecordingDuration", "RecordingSid", "TranscriptionText",
     "TranscriptionStatus", "MessageSid", "Body", "NumMedia", "MediaUrl0", "MessageStatus", "ErrorCode",
     "CallStatus", "CallDuration", "event", "cause", "callId", "from", "direction"]
)
VALUES = st.one_of(st.text(max_size=40), st.sampled_from(["hangup", "noAnswer", "anonymous", "+4915112345678", "3"]))


@settings(max_examples=200, deadline=None)
@given(params=st.dictionaries(KEYS, VALUES))
def test_malformed_payloads_give_valid_messages_or_payload_errors(params, inbound_validator):
    for build in (
        parse.call_message, parse.missed_call_message, parse.voicemail_message, parse.sms_message,
        lambda p: parse.transcript_message(parse.transcript_update(p)), parse.cti_missed_call,
    ):
        try:
            message = build(params)
        except parse.PayloadError:
            continue
        if message is not None:
            assert list(inbound_validator.iter_errors(message)) == []
    parse.delivery_update(params)
