"""The public types a channel plugin works with: the channel base class, outbound messages and
delivery results, the errors that tell the outbox whether to retry, and the helpers channel
handlers share (the JSON error body, size-limited body reading and its deadline, ``Retry-After``
parsing, size-limited reading of a provider's JSON answer).

A channel has an input side (its HTTP routes and long-running services, which hand canonical
inbound messages to ``ChannelContext.ingest``) and an output side (``Channel.send``), as in
Rasa's connectors. Everything here is re-exported by ``router.hookspecs`` for plugin authors.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from aiohttp import ClientResponse, web

if TYPE_CHECKING:
    from .context import ChannelContext


def json_error(
    status: type[web.HTTPException], code: str, message: str, *, extra: Mapping[str, Any] | None = None, **kwargs: Any
) -> web.HTTPException:
    """An HTTP error to raise, with the service's one error body
    ``{"error": {"code": ..., "message": ..., **extra}}``; ``kwargs`` go to the exception
    (``headers``, or ``max_size`` and ``actual_size`` for a 413)."""
    body = json.dumps({"error": {"code": code, "message": message, **(extra or {})}})
    return status(text=body, content_type="application/json", **kwargs)


@dataclasses.dataclass(frozen=True, slots=True)
class BodyDeadline:
    """How long a request body may take to arrive: ``seconds`` from the moment its handler
    runs, plus one second for every ``min_rate`` bytes that have arrived (as Apache's
    ``mod_reqtimeout`` counts, ``body=30,MinRate=500``). A provider posts a webhook in
    milliseconds and a 25 MiB mail keeps its time as long as it comes at 500 bytes/s or more;
    a sender that stops, or trickles slower, is answered 408 and its connection closed,
    instead of holding a handler (and a channel's slot for bodies in work) for as long as it
    likes."""

    seconds: float = 30.0
    min_rate: float = 500.0

    def allowed(self, received: int) -> float:
        """Seconds allowed in all, once ``received`` bytes have arrived."""
        return self.seconds + received / self.min_rate


class BodyTimeout(TimeoutError):
    """A request body that did not arrive within the service's ``BodyDeadline``. Raised by any
    read of the body (``read_limited_body``, ``request.read()``, ``request.post()``); the
    service answers it with 408 ``body_timeout``, so a handler lets it pass (or answers it in
    its own way). It is a ``TimeoutError``, which aiohttp's own reading of an unread rest also
    takes as the end of that connection."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive in time ({seconds:.1f} s)")
        self.seconds = seconds


class BodyTooLarge(Exception):
    """A request body over the limit given to ``read_limited_body``; the caller answers it with
    its own 413. ``size`` is what was known when it was refused: the declared Content-Length,
    or the bytes read so far."""

    def __init__(self, limit: int, size: int) -> None:
        super().__init__(f"body exceeds {limit} bytes ({size} declared or read)")
        self.limit = limit
        self.size = size


async def read_limited_body(request: web.Request, limit: int) -> bytes:
    """The request body (decompressed, as aiohttp hands it over) of at most ``limit`` bytes.

    Raises ``BodyTooLarge`` before reading when Content-Length already says more, and while
    reading as soon as more has arrived (chunked or compressed bodies), so an oversized body is
    never held whole. Unlike ``request.read()`` it is not bound by the app's ``client_max_size``.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit, request.content_length)
    buffer = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):  # read() may return only a part
        buffer += chunk
        if len(buffer) > limit:
            raise BodyTooLarge(limit, len(buffer))
    return bytes(buffer)


MAX_RETRY_AFTER_SECONDS = 86400.0
"""The longest ``Retry-After`` taken from a provider; beyond it the outbox's backoff decides."""


def parse_retry_after(value: str | None) -> float | None:
    """The seconds of a ``Retry-After`` header value, for ``RetryableDeliveryError.retry_after``.

    Only the delay-seconds form is read. ``None`` (so the outbox's own backoff applies) when the
    value is missing, not a number (an HTTP-date too), negative, not finite or beyond
    ``MAX_RETRY_AFTER_SECONDS``: a provider's nonsense must not park a message for ever.
    """
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    # NaN fails both comparisons, infinity the second.
    return seconds if seconds is not None and 0 <= seconds <= MAX_RETRY_AFTER_SECONDS else None


MAX_PROVIDER_ANSWER_BYTES = 1024 * 1024
"""The most of a provider's answer that is read: its answers to a send or a lookup are a few
hundred bytes, and a longer one is not read on."""


async def read_provider_json(response: ClientResponse, limit: int = MAX_PROVIDER_ANSWER_BYTES) -> Any:
    """The JSON of a provider's answer, or ``None`` when it is not JSON or longer than ``limit``
    bytes (the rest is left unread and the connection is not reused).

    ``response.json()`` reads whatever arrives for as long as the call's timeout lasts: a
    broken or hostile endpoint could fill memory with one answer, once per send."""
    if response.content_length is not None and response.content_length > limit:
        return None
    buffer = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        buffer += chunk
        if len(buffer) > limit:
            return None
    try:
        return json.loads(buffer)
    except ValueError:  # UnicodeDecodeError is one too
        return None


class SettingsError(ValueError):
    """A channel's settings refused when its channels are registered: ``path`` names the key
    (``channels.phone.forward_timeout``), ``message`` what is wrong with it. ``check-config``
    and ``serve`` report it with the configuration file; raise it (or a subclass) from
    ``register_channels`` for a value of the wrong shape, instead of starting with a default."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class InvalidMessage(Exception):
    """A plugin handed over a message that does not match the canonical schema.

    ``path`` names the failing field (``sender.address``); HTTP handlers answer it as a 400.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.message = message


ENDINGS = (KeyboardInterrupt, SystemExit, GeneratorExit)
"""What is no failure of a plugin but the process or a generator ending: let through wherever
anything else a plugin raises (also what is no ``Exception``) is caught as its failure."""


class StorageUnavailable(Exception):
    """The service cannot store anything right now: the database refuses writes (disk full,
    read-only, an I/O error, locked beyond its timeout). Not the message's fault, and nothing of
    it was stored: answer so that the sender tries again later (HTTP 503, SMTP 451), and do not
    count it against the message (a mail that failed to import, say)."""

    retry_after: int = 5
    """Seconds a sender is asked to wait (``Retry-After``): long enough for a lock to clear,
    short enough that a provider's own backoff is not needed."""


class DeliveryError(Exception):
    """Base class of the errors ``Channel.send`` raises."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        # Kept as text whatever a plugin passes (``PermanentDeliveryError(exc)``): an exception
        # as the message could not be recorded, and the row was sent again at every lease, for
        # ever, with no fallback and no call-back flag.
        message = message if isinstance(message, str) else str(message)
        super().__init__(message)
        self.message = message
        self.code = code if code is None or isinstance(code, str) else str(code)


NOT_CONFIGURED = "not_configured"
"""The ``RetryableDeliveryError`` code of a channel that cannot send at all until an operator
fixes its settings (no mail relay, a refused access token or sender number): its messages stay
queued, are never given up, and the outbox logs an ERROR at each attempt."""


def _seconds_or_none(value: Any) -> float | None:
    """A provider's wait as the outbox can use it, read as ``parse_retry_after`` reads the
    header (a number or its text, at most a day); anything else None, leaving the wait to the
    backoff. A string passed on from ``Retry-After`` stopped the outcome from being recorded, and
    so did a wait too long for a date (``"1e12"``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return parse_retry_after(value if isinstance(value, str) else repr(value))
    except ValueError:  # an int too long to write out
        return None


class RetryableDeliveryError(DeliveryError):
    """The provider may accept the message later (timeout, 5xx, rate limit).

    ``retry_after`` (seconds) overrides the outbox's exponential backoff when the provider says.
    With ``code=NOT_CONFIGURED`` (the channel cannot send at all yet, e.g. no mail relay) the
    message stays queued and is never given up. ``outcome_unknown`` when the request may have
    reached the provider and no answer came (a timeout, a connection lost after sending): the
    send may have gone through, and on a channel with ``Capabilities.status_wait`` the outbox
    waits that long for a status proving it before sending again.
    """

    def __init__(
        self, message: str, *, code: str | None = None, retry_after: float | None = None, outcome_unknown: bool = False
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = _seconds_or_none(retry_after)
        self.outcome_unknown = bool(outcome_unknown)


class PermanentDeliveryError(DeliveryError):
    """The message can never be delivered to this address (invalid recipient, blocked, refused).

    The outbox stops retrying and tries the contact's other identities, else it flags the
    conversation for a call-back. ``address_failed`` (default) marks the address itself as
    failed, so later replies prefer the contact's other identities; pass False when the
    failure says nothing about the address (the channel is not configured, the message is
    empty, the address is of a kind the channel cannot reach).
    """

    def __init__(self, message: str, *, code: str | None = None, address_failed: bool = True) -> None:
        super().__init__(message, code=code)
        self.address_failed = address_failed


class ResendAsDeliveryError(DeliveryError):
    """The provider refused this form of the message but another form will do.

    WhatsApp's 131047 (outside the 24-hour window) is the example: the outbox queues the same
    message again at once with ``OutboundMessage.hint`` set to ``hint``.
    """

    def __init__(self, message: str, *, hint: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.hint = hint


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a channel can do; the core reads it to decide where replies go.

    ``identity_kinds``: the sender kinds this channel can send to (``("phone",)`` for SMS).
    ``push``: False for channels where the resident has to come and look (the web form's
    status page): replies are then also offered to ``reply_copies`` implementations.
    ``reply_window``: how long after the contact's last inbound message free text may be sent.
    ``delivery_receipts``: the provider reports ``delivered``; without them, a reply the
    provider accepted counts as delivered (e-mail). ``threads_by_sender``: messages without
    thread ids join the sender's open conversation on this channel (chats: WhatsApp, SMS).
    ``sender_verified``: False where anyone can give anyone's address and is answered
    themselves (the web form shows its answer to whoever submitted): a case reference in such a
    message then opens a new conversation linked to the one it names, never joins it, however
    the typed address matches that conversation's contact.
    ``status_wait``: the provider's statuses echo the idempotency key a send was made with
    (``DeliveryUpdate.idempotency_key``) and come within about this long. After a send whose
    outcome is unknown (no answer in time), the outbox waits at least this long before sending
    again, so that a status proving the send went through records it instead of a duplicate.
    None: statuses do not carry the key, and the retry follows the backoff alone.
    """

    can_reply: bool = True
    identity_kinds: tuple[str, ...] = ()
    push: bool = True
    reply_window: timedelta | None = None
    max_text_length: int | None = None
    media: bool = False
    delivery_receipts: bool = False
    threads_by_sender: bool = False
    status_wait: timedelta | None = None
    sender_verified: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One message the outbox asks a channel to deliver.

    ``kind`` is ``ack`` (the automatic acknowledgement), ``reply`` (a staff answer),
    ``notification`` (to a unit about a new owner) or ``callback_sms``.
    ``idempotency_key`` is stable across retries of the same outbox row while it is unknown
    whether the provider took the earlier send: pass it to providers that deduplicate on it. It
    changes when the earlier send is known to be over (refused with ``ResendAsDeliveryError``,
    or reported failed). ``hint`` is set when the message is re-queued after a
    ``ResendAsDeliveryError`` or a failed status asking for another form (``"template"``).
    ``last_inbound_at`` is the contact's last inbound message on this channel (reply windows).
    ``last_inbound_sent_at`` (optional, added later: None from an older core) is when the
    contact sent their latest message on this channel by the provider's own clock (the inbound
    messages' ``sent_at``; their arrival where they carry none; never later than that): a
    provider that counts its reply window from its own timestamp (WhatsApp's 24 hours) and
    delivers webhooks late (it retries for days) closes the window before ``last_inbound_at``
    says. Prefer it, and fall back to ``last_inbound_at`` when it is None.
    """

    outbox_id: int
    channel: str
    kind: str
    to_kind: str
    to: str
    text: str
    language: str
    idempotency_key: str
    conversation_id: int | None = None
    case_reference: str | None = None
    subject: str | None = None
    status_url: str | None = None
    unit_id: str | None = None
    unit_name: str | None = None
    unit_email: str | None = None
    recipient: str | None = None
    thread_refs: tuple[str, ...] = ()
    last_inbound_at: datetime | None = None
    hint: str | None = None
    attempt: int = 1
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    last_inbound_sent_at: datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SendResult:
    """What a channel returns after the provider accepted a message.

    ``status`` is ``sent`` unless the channel knows more (the web form's status page is
    ``delivered`` at once). ``thread_key``: an id later inbound messages may refer to (an
    e-mail Message-ID) when it differs from ``provider_id``. An empty ``provider_id`` says the
    provider took the message without naming its id (a 2xx cut short): the send is recorded and
    not made again, and a later status that carries the send's ``idempotency_key`` gives it its
    id. Raise ``RetryableDeliveryError`` instead only when the provider may not have taken it.
    """

    provider_id: str
    status: str = "sent"
    thread_key: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryUpdate:
    """A provider's status callback for one of our outbound messages.

    ``status`` is one of ``sent``, ``delivered``, ``read``, ``failed``. For ``failed``,
    ``permanent`` says whether other identities should be tried; ``resend_hint`` asks the
    outbox to send the same message again in another form (WhatsApp 131047 -> ``template``).
    ``idempotency_key`` is the ``OutboundMessage.idempotency_key`` of the send, for providers
    that echo it in their statuses (WhatsApp's ``biz_opaque_callback_data``): it ties a status
    to its message when the send's own answer never came (a timeout, a worker that died), so
    that the message is not sent twice. ``address_failed`` (default), for a permanent failure:
    the address itself is bad, as with ``PermanentDeliveryError``; False when only this message
    could not go there (WhatsApp 131062: not to a user id). ``at``: when the provider says the
    status happened; leave it None when its callbacks carry no time (Twilio's): the status is
    then stamped on arrival, and the same status again for the same message is taken for the
    provider sending the callback again.
    """

    provider_id: str
    status: str
    at: datetime | None = None
    error_code: str | None = None
    error_title: str | None = None
    error_detail: str | None = None
    permanent: bool = True
    resend_hint: str | None = None
    raw: Mapping[str, Any] | None = None
    idempotency_key: str | None = None
    address_failed: bool = True


Service = Callable[[], AsyncIterator[None]]
"""An async generator function: code before ``yield`` starts the service, after it stops it."""


class Channel:
    """Base class of a channel plugin's channel. Subclass it and return an instance from the
    ``register_channels`` hook.

    The host calls ``setup(context)`` once, mounts ``routes()`` under ``/channels/<name>/``,
    runs each of ``services()`` for the app's lifetime, and calls ``send()`` from the outbox.
    """

    name: str = ""
    capabilities: Capabilities = Capabilities()

    context: ChannelContext

    def setup(self, context: ChannelContext) -> None:
        """Keep the core's context; called once before routes and services are used."""
        self.context = context

    def routes(self) -> list[web.AbstractRouteDef]:
        """aiohttp route definitions, with paths relative to ``/channels/<name>``."""
        return []

    def services(self) -> list[Service]:
        """Long-running services (an SMTP listener, a poller) as async generator functions."""
        return []

    async def send(self, message: OutboundMessage) -> SendResult:
        """Deliver one message; raise a ``DeliveryError`` subclass when it fails."""
        raise PermanentDeliveryError(f"channel {self.name!r} cannot send messages")


