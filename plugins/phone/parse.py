"""Pure functions from provider payloads to canonical inbound messages and delivery updates.

Twilio's voice and messaging webhooks arrive as form parameters (flattened here to one value per
name); vendor-neutral CTI events (newCall, answer, hangup from any PBX) as a JSON object or form.
Nothing here does I/O, so every function can be tested against recorded payloads. Malformed input
never raises anything but ``PayloadError``, which the handlers answer as a 400.

Ids, chosen so retries deduplicate and later events find earlier ones:
the call is ``<CallSid>``; its missed call ``<CallSid>:missed``; its voicemail ``<RecordingSid>``
(``<CallSid>:voicemail`` without one), which a transcript names as ``target_message_id``; a CTI
missed call ``cti:<callId>:missed``. Voicemail, missed call and transcript carry the CallSid in
``thread.refs`` so they join the call's conversation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from router.hookspecs import DeliveryUpdate

from .numbers import is_mobile, pbx_to_e164, to_e164

CHANNEL = "phone"

_TOPIC = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_LANGUAGE = re.compile(r"^[a-z]{2}$")
_MAX_ID = 512
_MAX_MEDIA = 10

OPT_OUT_KEYWORDS = frozenset({"stop", "stopall", "unsubscribe", "cancel", "end", "quit"})
"""SMS bodies that are an opt-out (Twilio's default keywords): stored, never acknowledged."""

MISSED_CTI_CAUSES = frozenset(
    {"noanswer", "busy", "cancel", "canceled", "cancelled", "congestion", "notfound", "unavailable", "rejected",
     "declined", "missed"}
)
"""CTI hangup causes (lower case, letters only) that mean nobody spoke to the caller. sipgate.io's
list: ``noAnswer`` (rejected, e.g. do not disturb), ``busy``, ``cancel`` (the caller hung up
while it rang), ``congestion`` (the called party could not be reached), ``notFound`` (the
called number does not exist or its phone is offline); the rest are other PBXs' words for the
same. Not missed: ``normalClearing`` (the call was established: someone or a PBX voicemail
answered) and ``forwarded`` (the call goes on as a new call with its own hangup event)."""

INBOUND_DIRECTIONS = frozenset({"in", "inbound", "incoming"})

SMS_STATUSES = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "undelivered": "failed",
    "failed": "failed",
    "canceled": "failed",
}
"""Twilio MessageStatus -> delivery status. queued, accepted, scheduled and sending say nothing
new (the send itself was recorded) and are dropped."""

TRANSIENT_SMS_ERRORS = frozenset({"30001", "30008", "30009", "30017"})
"""Delivery error codes worth another attempt (queue overflow, unknown error, missing segment,
carrier congestion). Every other code of a failed message is permanent: 30003 unreachable
handset, 30004 blocked, 30005 unknown handset, 30006 landline, 30007 filtered, 21610 opted out."""

RECIPIENT_SMS_ERRORS = frozenset({"30003", "30004", "30005", "30006", "21211", "21610", "21612", "21614", "21635"})
"""Permanent delivery error codes that are about the resident's number (unreachable, blocked by
its owner, unknown, a landline, invalid, opted out, no route, not mobile): they mark the address
failed. The others are about our message or our sender (30007 filtered as spam, 30032 toll-free
sender not verified, 30034 sender not registered, ...): the contact's other channels are tried,
but the number stays good for the next message."""

ANSWERED_DIAL_STATUSES = frozenset({"completed", "answered"})
TERMINAL_CALL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})


LANDLINE_ACK = "landline: no SMS can reach this number"
"""Why a call from a number that takes no SMS is not acknowledged automatically: the
acknowledgement of a call goes by SMS, to mobile numbers only. The conversation shows the
reason; a caller who reaches the voicemail hears the case reference instead."""


class PayloadError(ValueError):
    """A payload lacks what identifies the event (a CallSid, a MessageSid, a CTI callId)."""


@dataclasses.dataclass(frozen=True, slots=True)
class TranscriptUpdate:
    """A voicemail's transcript arrived, or failed. ``target_message_id`` is the voicemail's
    ``channel_message_id``; ``text`` is None when transcription failed or heard nothing."""

    channel_message_id: str
    target_message_id: str
    call_sid: str | None
    status: str
    text: str | None
    caller: str | None


def _text(params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, (str, int)):
        return str(value).strip()
    return ""


def _require(params: Mapping[str, Any], *names: str) -> str:
    for name in names:
        value = _text(params, name)
        if value:
            return _bounded_id(value)
    raise PayloadError(f"missing {names[0]}")


def _bounded_id(value: str, limit: int = 400) -> str:
    """Provider ids as they are, unless absurdly long: then a stable digest of them."""
    if len(value) <= limit:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()


def _int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _topic(topic: str | None) -> str | None:
    return topic if isinstance(topic, str) and _TOPIC.match(topic) else None


def _language(language: str | None) -> str | None:
    return language if isinstance(language, str) and _LANGUAGE.match(language) else None


def sender_for(
    raw: str | None, event_id: str, region: str = "DE", *, pbx: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The canonical sender for a caller id, and the flags it implies.

    A readable number is ``phone`` in E.164; a withheld or unreadable one is ``anonymous`` with
    an address unique to the event (``anonymous:<id>``) and the flag ``no_number``. With
    ``pbx`` (the PBX's number format) the number is read as the PBX writes it
    (``pbx_to_e164``: international digits may come without "+").
    """
    number = pbx_to_e164(raw, region, pbx) if pbx else to_e164(raw, region)
    if number:
        return {"kind": "phone", "address": number}, []
    return {"kind": "anonymous", "address": f"anonymous:{event_id}"[:320]}, ["no_number"]


def _ack_by_sms_only_to_mobiles(message: dict[str, Any]) -> dict[str, Any]:
    """Mark a call from a landline (or any number that takes no SMS) as not to be acknowledged,
    so no SMS is queued that cannot arrive and no failed delivery turns into a call-back duty."""
    sender = message["sender"]
    if sender["kind"] == "phone" and not is_mobile(sender["address"]):
        message["ack_suppressed"] = LANDLINE_ACK
    return message


def _voice_message(
    params: Mapping[str, Any],
    *,
    channel_message_id: str,
    call_sid: str,
    kind: str,
    flags: list[str],
    topic: str | None,
    language: str | None,
    region: str,
) -> dict[str, Any]:
    sender, sender_flags = sender_for(_text(params, "From") or _text(params, "Caller"), call_sid, region)
    name = _text(params, "CallerName")
    if name and sender["kind"] == "phone":
        sender["display_name"] = name[:200]
    meta: dict[str, Any] = {"call_sid": call_sid}
    raw_from = _text(params, "From")
    if sender["kind"] != "phone" and raw_from:
        meta["from"] = raw_from[:200]
    message: dict[str, Any] = {
        "channel": CHANNEL,
        "channel_message_id": _bounded_id(channel_message_id, _MAX_ID),
        "kind": kind,
        "sender": sender,
        "recipient": (to_e164(_text(params, "To"), region) or _text(params, "To") or None),
        "text": None,
        "topic": _topic(topic),
        "language": _language(language),
        "flags": list(dict.fromkeys(flags + sender_flags)),
        "meta": meta,
        "raw": {key: _text(params, key) for key in params},
    }
    if message["recipient"]:
        message["recipient"] = message["recipient"][:320]
    if channel_message_id != call_sid:
        message["thread"] = {"refs": [call_sid]}
    return _ack_by_sms_only_to_mobiles(message)


def call_message(
    params: Mapping[str, Any], *, topic: str | None = None, language: str | None = None, region: str = "DE"
) -> dict[str, Any]:
    """An incoming call (kind ``call``), ingested once the caller chose a topic in the menu."""
    call_sid = _require(params, "CallSid")
    message = _voice_message(
        params, channel_message_id=call_sid, call_sid=call_sid, kind="call", flags=[],
        topic=topic, language=language, region=region,
    )
    digits = _text(params, "Digits")
    if digits:
        message["meta"]["digits"] = digits[:20]
    return message


def missed_call_message(
    params: Mapping[str, Any], *, topic: str | None = None, language: str | None = None, region: str = "DE"
) -> dict[str, Any]:
    """A call that ended with neither an answered forward nor a voicemail: a call-back duty."""
    call_sid = _require(params, "CallSid")
    message = _voice_message(
        params, channel_message_id=f"{call_sid}:missed", call_sid=call_sid, kind="missed_call",
        flags=["callback_required"], topic=topic, language=language, region=region,
    )
    status = _text(params, "CallStatus")
    if status:
        message["meta"]["call_status"] = status[:40]
    duration = _int(_text(params, "CallDuration"))
    if duration is not None:
        message["meta"]["call_duration"] = duration
    return message


def voicemail_id(recording_sid: str | None, call_sid: str | None) -> str:
    """The ``channel_message_id`` of a voicemail, as its transcript refers to it."""
    if recording_sid:
        return _bounded_id(recording_sid)
    if call_sid:
        return f"{_bounded_id(call_sid)}:voicemail"
    raise PayloadError("missing RecordingSid")


def voicemail_message(
    params: Mapping[str, Any], *, topic: str | None = None, language: str | None = None, region: str = "DE"
) -> dict[str, Any] | None:
    """A voicemail (the ``<Record>`` action): the recording as an attachment, a call-back duty.

    None when nothing was recorded (no URL, or zero seconds): the call then ends as a missed call.
    """
    call_sid = _require(params, "CallSid")
    url = _text(params, "RecordingUrl")
    duration = _int(_text(params, "RecordingDuration"))
    if not url or (duration is not None and duration <= 0):
        return None
    recording_sid = _text(params, "RecordingSid") or None
    message = _voice_message(
        params, channel_message_id=voicemail_id(recording_sid, call_sid), call_sid=call_sid,
        kind="voicemail", flags=["callback_required"], topic=topic, language=language, region=region,
    )
    message["attachments"] = [
        {
            "name": f"voicemail-{recording_sid or call_sid}"[:500],
            "content_type": "audio/wav",
            "media_id": recording_sid[:500] if recording_sid else None,
            "url": url[:2000],
        }
    ]
    if recording_sid:
        message["meta"]["recording_sid"] = recording_sid
    if duration is not None:
        message["meta"]["recording_duration"] = duration
    return message


def transcript_update(params: Mapping[str, Any]) -> TranscriptUpdate:
    """A ``<Record transcribeCallback>`` request: the transcript, or the news that it failed."""
    call_sid = _text(params, "CallSid") or None
    target = voicemail_id(_text(params, "RecordingSid") or None, call_sid)
    status = (_text(params, "TranscriptionStatus") or "unknown").lower()[:40]
    text = _text(params, "TranscriptionText")
    if status != "completed" or not text:
        text = ""
    transcription_sid = _text(params, "TranscriptionSid")
    own_id = _bounded_id(transcription_sid) if transcription_sid else f"{target}:transcript:{status}"
    return TranscriptUpdate(
        channel_message_id=own_id,
        target_message_id=target,
        call_sid=call_sid,
        status=status,
        text=text[:200000] or None,
        caller=_text(params, "From") or _text(params, "Caller") or None,
    )


def transcript_message(update: TranscriptUpdate, *, region: str = "DE") -> dict[str, Any]:
    """The ``edit`` that puts a transcript on its voicemail (flag ``transcription_failed`` when
    there is none, with ``text`` null: staff listen to the recording instead)."""
    sender, flags = sender_for(update.caller, update.call_sid or update.target_message_id, region)
    message: dict[str, Any] = {
        "channel": CHANNEL,
        "channel_message_id": update.channel_message_id,
        "kind": "edit",
        "sender": sender,
        "target_message_id": update.target_message_id,
        "text": update.text,
        "flags": flags + ([] if update.text else ["transcription_failed"]),
        "meta": {"transcription_status": update.status},
    }
    if update.call_sid:
        message["thread"] = {"refs": [update.call_sid]}
        message["meta"]["call_sid"] = update.call_sid
    return message


def sms_message(params: Mapping[str, Any], *, region: str = "DE") -> dict[str, Any]:
    """An incoming SMS or MMS (Twilio Messaging webhook), kind ``message``."""
    sid = _require(params, "MessageSid", "SmsSid")
    sender, flags = sender_for(_text(params, "From"), sid, region)
    body = _text(params, "Body")
    attachments = []
    count = _int(_text(params, "NumMedia")) or 0
    for index in range(max(0, min(count, _MAX_MEDIA))):
        url = _text(params, f"MediaUrl{index}")
        if url:
            attachments.append(
                {"url": url[:2000], "content_type": (_text(params, f"MediaContentType{index}")[:200] or None)}
            )
    message: dict[str, Any] = {
        "channel": CHANNEL,
        "channel_message_id": sid,
        "kind": "message",
        "sender": sender,
        "recipient": (to_e164(_text(params, "To"), region) or _text(params, "To")[:320] or None),
        "text": body[:200000] or None,
        "flags": flags,
        "meta": {"message_sid": sid},
        "raw": {key: _text(params, key) for key in params},
    }
    if sender["kind"] != "phone" and _text(params, "From"):
        message["meta"]["from"] = _text(params, "From")[:200]
    if attachments:
        message["attachments"] = attachments
    if body.lower() in OPT_OUT_KEYWORDS:
        message["ack_suppressed"] = "opt-out"
    return message


def delivery_update(
    params: Mapping[str, Any], *, at: datetime | None = None, idempotency_key: str | None = None
) -> DeliveryUpdate | None:
    """An SMS status callback as a delivery update; None for statuses that add nothing.
    ``idempotency_key``: the send's key, from the query of the callback URL it was sent with."""
    sid = _text(params, "MessageSid") or _text(params, "SmsSid")
    status = SMS_STATUSES.get((_text(params, "MessageStatus") or _text(params, "SmsStatus")).lower())
    if not sid or status is None:
        return None
    error_code = _text(params, "ErrorCode") or None
    if error_code in ("0",):
        error_code = None
    return DeliveryUpdate(
        provider_id=sid,
        status=status,
        at=at,
        error_code=error_code,
        error_title=(_text(params, "ErrorMessage") or None),
        permanent=status == "failed" and error_code not in TRANSIENT_SMS_ERRORS,
        raw={key: _text(params, key) for key in params},
        address_failed=error_code in RECIPIENT_SMS_ERRORS,
        idempotency_key=_bounded_id(idempotency_key, 100) if idempotency_key else None,
    )


def is_answered_dial(params: Mapping[str, Any]) -> bool:
    """True when a ``<Dial>`` action says the forwarded call was picked up."""
    return _text(params, "DialCallStatus").lower() in ANSWERED_DIAL_STATUSES


def dial_duration(params: Mapping[str, Any]) -> int | None:
    """How long the forwarded call lasted, in seconds (``DialCallDuration``), if Twilio said."""
    seconds = _int(_text(params, "DialCallDuration"))
    return seconds if seconds is not None and seconds >= 0 else None


def is_call_over(params: Mapping[str, Any]) -> bool:
    """True when a call status callback says the call has ended."""
    return _text(params, "CallStatus").lower() in TERMINAL_CALL_STATUSES


def cti_missed_call(event: Any, *, region: str = "DE", number_format: str = "auto") -> dict[str, Any] | None:
    """A CTI event (``{event, from, to, direction, callId, cause}``) as a missed call, or None.

    Only an inbound ``hangup`` whose cause says nobody spoke to the caller (``MISSED_CTI_CAUSES``:
    noAnswer, busy, cancel, congestion, notFound, ...) is a missed call; newCall, answer and
    every other hangup (an answered call ends with normalClearing, a forwarded one goes on as a
    new call) give None. Numbers are read as the PBX writes them (``number_format``, see
    ``pbx_to_e164``): ``4915791234567`` (sipgate.io) is ``+4915791234567``, ``030 12345678``
    a national number of ``region``.
    """
    if not isinstance(event, Mapping):
        raise PayloadError("a CTI event is an object")
    if _text(event, "event").lower() != "hangup":
        return None
    cause = re.sub(r"[^a-z]", "", _text(event, "cause").lower())
    if cause not in MISSED_CTI_CAUSES:
        return None
    direction = _text(event, "direction").lower() or "in"
    if direction not in INBOUND_DIRECTIONS:
        return None
    call_id = _require(event, "callId")
    raw_from = _text(event, "from")
    sender, flags = sender_for(raw_from, f"cti:{call_id}", region, pbx=number_format)
    to = _text(event, "to")
    meta: dict[str, Any] = {"source": "cti", "call_id": call_id, "cause": _text(event, "cause")[:40]}
    if sender["kind"] != "phone" and raw_from:
        meta["from"] = raw_from[:200]
    return _ack_by_sms_only_to_mobiles({
        "channel": CHANNEL,
        "channel_message_id": f"cti:{call_id}:missed",
        "kind": "missed_call",
        "sender": sender,
        "recipient": (pbx_to_e164(to, region, number_format) or to[:320] or None),
        "text": None,
        "flags": ["callback_required", *flags],
        "meta": meta,
        "raw": {key: value for key, value in event.items() if isinstance(key, str)},
    })
