"""The web form channel: the public form, its JSON twin, and the private status page, which is
also where staff replies are delivered (a resident without e-mail or phone still gets them)."""

from __future__ import annotations

import hashlib
import html
import json
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web

from router.hookspecs import (
    BodyTimeout,
    BodyTooLarge,
    Capabilities,
    Channel,
    IngestResult,
    InvalidMessage,
    OutboundMessage,
    SendResult,
    SettingsError,
    StorageUnavailable,
    read_limited_body,
)
from router.settings import flag, given, non_negative_float, positive_float, positive_int

from . import fields, pages, tokens

WHERE = "channels.webform"
"""Where the channel's settings are, for the key paths of their errors."""
JSON_TYPE = "application/json"
# A status page is reached by its secret link: no cache keeps it, no link on it passes the
# address on, no search engine lists it; every answer that shows one sends these.
STATUS_PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex"}
MAX_FORM_FIELDS = 50  # the form has 11; a body with far more is no form of ours


def _status_path(status_token: str) -> str:
    """The path of a case's status page."""
    return f"/channels/webform/status/{status_token}"


def status_sender(status_token: str) -> dict[str, str]:
    """The sender of a message written on a case's status page: the page itself (a digest of
    its token, never the token), as a form session. The core files it under the contact of the
    conversation the token names, without keeping it as an identity. The contact's own first
    address was sent before: it may since belong to someone else, or be gone (a 500)."""
    return {"kind": "webform", "address": "status:" + hashlib.sha256(status_token.encode()).hexdigest()[:32]}


class Unreadable(Exception):
    """A URL-encoded body that cannot be read in the charset it names: ``code`` is
    ``unknown_charset`` or ``invalid_encoding``. ``data`` is what could be read with the bad
    bytes replaced, so a browser gets its form back with what was typed, to check and resend."""

    def __init__(self, code: str, message: str, charset: str, data: dict[str, str]) -> None:
        super().__init__(message)
        self.code = code
        self.charset = charset
        self.data = data



def _lenient_form(body: bytes, charset: str) -> dict[str, str]:
    """The fields of a body that failed strict reading, bad bytes replaced (U+FFFD): only for
    showing the form again, never stored."""
    try:
        text = body.decode(charset, "replace")
        return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS, encoding=charset,
                              errors="replace"))
    except (LookupError, ValueError):
        return {}


def parse_form(body: bytes, charset: str | None) -> dict[str, str]:
    """The fields of a URL-encoded body, read strictly in ``charset`` (UTF-8 when the request
    names none): its raw bytes and its %-escapes alike. Read as UTF-8 whatever it said, a form
    sent as ISO-8859-1 was stored garbled without a word. Raises ``Unreadable`` for an unknown
    charset or bytes that are not in it, ValueError for more fields than a form has."""
    name = charset or "utf-8"
    try:
        text = body.decode(name)
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS, encoding=name, errors="strict")
    except LookupError:  # an unknown name, or no text encoding (base64)
        raise Unreadable("unknown_charset", f"the charset {name[:40]!r} is unknown; send the form as UTF-8",
                         name[:40], _lenient_form(body, "utf-8")) from None
    except UnicodeDecodeError as exc:
        raise Unreadable("invalid_encoding", f"the form data is not valid {name} (byte 0x{exc.object[exc.start]:02x})",
                         name, _lenient_form(body, name)) from None
    return dict(pairs)


class RateLimiter:
    """At most ``limit`` submissions per client address in a sliding minute, kept in memory."""

    def __init__(self, limit: int, window: float = 60.0, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._hits: dict[str, deque[float]] = defaultdict(deque)

    def allow(self, client: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if len(self._hits) > self.max_clients:
            self._hits.clear()  # bounded memory beats a perfect count under a flood
        hits = self._hits[client]
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True

    def refund(self, client: str) -> None:
        """Give back the last submission counted: it was not taken (the service could not store it)."""
        hits = self._hits.get(client)
        if hits:
            hits.pop()


def _remember(seen: set[str], key: str, limit: int = 100_000) -> None:
    """Add ``key`` to an in-memory set kept bounded: emptied when full, as the rate limit is."""
    if len(seen) >= limit:
        seen.clear()
    seen.add(key)


def _timezone_setting(value: Any) -> str | None:
    """The channel's own ``timezone``, checked at start (an unknown one made every status page a
    500); None when it is not given, and the service's applies."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SettingsError("channels.webform.timezone", "expected a string")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError("channels.webform.timezone", f"unknown timezone {value!r}") from None
    return value


def _language(request: web.Request) -> str:
    lang = request.query.get("lang")
    if lang in pages.TEXT:
        return lang
    accept = request.headers.get("Accept-Language", "")
    for part in accept.split(","):
        code = part.split(";")[0].strip().lower()[:2]
        if code in pages.TEXT:
            return code
    return "de"


class WebFormChannel(Channel):
    name = "webform"
    capabilities = Capabilities(
        can_reply=True, identity_kinds=("webform", "email", "phone"), push=False, delivery_receipts=True,
        sender_verified=False,  # the e-mail and phone typed into the form are nobody's proof
    )

    def __init__(self, settings: Mapping[str, Any], topics: Mapping[str, Mapping[str, str]] | None = None) -> None:
        secret = settings.get("secret") or ""
        # Without a configured secret, tokens are signed with a per-process key: forms handed
        # out before a restart then need a reload, which is acceptable for a demo.
        self.secret = (secret or secrets.token_hex(32)).encode()
        # Any of these may come from the environment as a string ("false", "20") or not at all
        # (None): bool("false") trusted X-Forwarded-For, and float(None) stopped the start.
        self.min_fill = non_negative_float(settings, "min_fill_seconds", 3.0, WHERE)
        self.max_age = positive_float(settings, "max_token_age_seconds", 86400.0, WHERE)
        self.max_body = positive_int(settings, "max_body_bytes", 64 * 1024, WHERE)
        self.limiter = RateLimiter(positive_int(settings, "rate_limit_per_minute", 10, WHERE))
        self.trust_forwarded = flag(settings, "trust_forwarded_for", False, WHERE)
        self._topics = topics
        self._timezone = _timezone_setting(given(settings, "timezone"))  # a blank one from the environment is not given
        self._refunded: set[str] = set()  # form tokens whose duplicate was not counted once already
        self._stored: set[str] = set()  # message ids of submissions this process stored

    @property
    def topics(self) -> Mapping[str, Mapping[str, str]]:
        return self._topics or {
            "construction": {"de": "Baustelle", "en": "Construction works"},
            "contract": {"de": "Vertrag", "en": "Contract"},
            "fault": {"de": "Störung", "en": "Fault"},
            "other": {"de": "Sonstiges", "en": "Other"},
        }

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.form),
            web.post("/", self.submit),
            web.get("/token", self.token),
            web.get("/status/{token}", self.status),
            web.post("/status/{token}", self.status_reply),
        ]

    # ------------------------------------------------------------------ helpers

    def _client(self, request: web.Request) -> str:
        """The client address the rate limit counts: behind a trusted proxy the last entry of
        ``X-Forwarded-For``, the one that proxy appended; the entries before it are whatever
        the client sent, and taking the first let anyone choose a fresh address per post."""
        if self.trust_forwarded and request.headers.get("X-Forwarded-For"):
            return request.headers["X-Forwarded-For"].rsplit(",", 1)[-1].strip()
        return request.remote or "unknown"

    def _now(self) -> Any:
        return self.context.clock.now()

    @property
    def timezone(self) -> str:
        """The timezone of the times on the status page: the channel's own ``timezone`` when it
        is given, else the service's, the one the acknowledgement tells its deadline in (a
        fixed Europe/Berlin told a London service's residents another time than the ack)."""
        return self._timezone or self.context.timezone

    async def _read(self, request: web.Request) -> tuple[dict[str, Any], bool]:
        """The submitted fields and whether they came as JSON. Size-limited; bad JSON is a 400.
        A URL-encoded body that cannot be read in its charset raises ``Unreadable``: the caller
        shows its page again."""
        is_json = request.content_type == JSON_TYPE
        try:
            body = await read_limited_body(request, self.max_body)
        except BodyTooLarge:
            raise self._error(is_json, 413, "too_large", f"the body is larger than {self.max_body} bytes") from None
        except BodyTimeout as exc:  # a browser gets a page; JSON the service's 408
            if is_json:
                raise
            raise self._error(False, 408, "body_timeout", f"{exc}; please send the form again") from None
        if is_json:  # JSON is UTF-8 (RFC 8259: a charset parameter has no effect)
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self._error(True, 400, "invalid_json", f"the body is not valid UTF-8, as JSON must be "
                                  f"(byte 0x{exc.object[exc.start]:02x})") from None
            try:
                data = json.loads(text)
            except (ValueError, RecursionError):  # bad JSON, or nesting too deep
                raise self._error(True, 400, "invalid_json", "the body is not valid JSON") from None
            if not isinstance(data, dict):
                raise self._error(True, 400, "invalid_json", "the body must be a JSON object")
            return data, True
        # The page posts URL-encoded; a multipart body would be read as garbage, so it is refused.
        if request.content_type not in ("application/x-www-form-urlencoded", ""):
            raise self._error(False, 415, "unsupported_media_type", "send the form URL-encoded or as JSON")
        try:
            return parse_form(body, request.charset), False
        except ValueError:  # more fields than any form of ours has
            raise self._error(False, 400, "invalid_form", "the form data could not be read") from None

    @staticmethod
    def _error(is_json: bool, status: int, code: str, message: str, **extra: Any) -> web.HTTPException:
        cls = web.HTTPException
        for candidate in (web.HTTPBadRequest, web.HTTPRequestEntityTooLarge, web.HTTPUnsupportedMediaType,
                          web.HTTPTooManyRequests, web.HTTPNotFound, web.HTTPRequestTimeout):
            if candidate.status_code == status:
                cls = candidate
        if is_json:
            body = json.dumps({"error": {"code": code, "message": message, **extra}})
            if cls is web.HTTPRequestEntityTooLarge:
                return web.HTTPRequestEntityTooLarge(max_size=0, actual_size=0, text=body, content_type=JSON_TYPE)
            return cls(text=body, content_type=JSON_TYPE)
        text = f"<!doctype html><html lang=\"de\"><meta charset=\"utf-8\"><title>{status}</title><p>{html.escape(message)}</p></html>"
        if cls is web.HTTPRequestEntityTooLarge:
            return web.HTTPRequestEntityTooLarge(max_size=0, actual_size=0, text=text, content_type="text/html")
        return cls(text=text, content_type="text/html")

    def _unavailable(
        self, request: web.Request, is_json: bool, exc: StorageUnavailable, page: Callable[[], str]
    ) -> web.Response:
        """The service cannot store a submission now: it does not count against the rate limit,
        the JSON API gets the service's 503, and a browser the ``page`` again with what was
        typed and the same token (past its fill time, and its nonce keeps a later double submit
        one message)."""
        self.limiter.refund(self._client(request))
        if is_json:
            raise exc
        return web.Response(text=page(), content_type="text/html", status=503,
                            headers={"Retry-After": str(exc.retry_after), **STATUS_PAGE_HEADERS})

    def _allow(self, request: web.Request, message_id: str, nonce: str) -> bool:
        """Whether a submission may be taken now: within the rate limit, or the first resend of
        one this process stored, which is answered as the first was without being counted (the
        second click of a double submit that reached the limit got the form again with a fresh
        token, and sending it again opened a second case)."""
        if message_id in self._stored and nonce not in self._refunded:
            _remember(self._refunded, nonce)
            return True
        return self.limiter.allow(self._client(request))

    def _taken(self, request: web.Request, result: IngestResult, message_id: str, nonce: str) -> None:
        """Book an ingested submission: a stored one is remembered for its resends, a duplicate
        refunded (``_refund_duplicate``)."""
        if not result.duplicate:
            _remember(self._stored, message_id)
        self._refund_duplicate(request, result, nonce)

    def _refund_duplicate(self, request: web.Request, result: IngestResult, nonce: str) -> None:
        """A duplicate (a retried post of a stored submission) stored nothing: it does not count
        against the rate limit, or a client's honest retry of an acknowledged case got a 429.
        Once per token: refunded every time, one stored submission posted again and again (a
        token holds a day) went round the limit, and each post still cost a transaction."""
        if result.duplicate and nonce not in self._refunded:
            _remember(self._refunded, nonce)
            self.limiter.refund(self._client(request))

    # ------------------------------------------------------------------ the form

    def _form_page(
        self, language: str, status: int, values: Mapping[str, str], *, notice: str | None = None,
        errors: Mapping[str, str] | None = None,
    ) -> web.Response:
        """The form with a fresh token; shown again, filled in with what was typed, ``errors`` by
        field and a ``notice`` for the whole form: a resident who left the page open overnight,
        was quick, or was counted too often keeps their text. It carries what they typed, so
        no cache keeps it."""
        html = pages.form_page(language=language, token=tokens.issue(self.secret, self._now()), topics=self.topics,
                               values=values, errors=errors, notice=notice)
        return web.Response(text=html, content_type="text/html", status=status, headers={"Cache-Control": "no-store"})

    async def form(self, request: web.Request) -> web.Response:
        return self._form_page(_language(request), 200, {})

    async def token(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"form_token": tokens.issue(self.secret, self._now()), "min_fill_seconds": self.min_fill,
             "max_age_seconds": self.max_age},
            headers={"Cache-Control": "no-store"},
        )

    async def submit(self, request: web.Request) -> web.StreamResponse:
        language = _language(request)
        try:
            data, is_json = await self._read(request)
        except Unreadable as exc:
            values, _ = fields.clean(exc.data, topics=self.topics.keys(), language=language)
            return self._form_page(language, 400, values,
                                    notice=pages.TEXT[language][exc.code].format(charset=exc.charset))
        if isinstance(data.get("language"), str) and data["language"] in pages.TEXT:
            language = data["language"]
        if data.get("website"):
            raise self._error(is_json, 400, "rejected", "the submission was rejected", field="website")
        values, errors = fields.clean(data, topics=self.topics.keys(), language=language)
        try:
            token = tokens.check(self.secret, str(data.get("form_token") or ""), self._now(),
                                 min_age=self.min_fill, max_age=self.max_age)
        except tokens.TokenError as exc:
            if is_json:
                raise self._error(True, 400, exc.code, exc.message, field="form_token") from None
            return self._form_page(language, 400, values, errors=errors, notice=pages.TEXT[language][exc.code])
        if errors:
            if is_json:
                first = next(iter(errors))
                raise self._error(True, 400, "invalid_fields", f"{first}: {errors[first]}", field=first, fields=errors)
            return self._form_page(language, 400, values, errors=errors)
        message = fields.to_message(values, nonce=token.nonce, language=language)
        if not self._allow(request, message["channel_message_id"], token.nonce):
            if is_json:
                raise self._error(True, 429, "rate_limited", "too many submissions; please try again in a minute")
            return self._form_page(language, 429, values, notice=pages.TEXT[language]["rate_limited"])
        try:
            result = await self.context.ingest(message)
        except InvalidMessage as exc:
            raise self._error(is_json, 400, "invalid_message", exc.message, field=exc.path) from None
        except StorageUnavailable as exc:
            return self._unavailable(request, is_json, exc, lambda: pages.form_page(
                language=language, token=str(data["form_token"]), topics=self.topics, values=values,
                notice=pages.TEXT[language]["unavailable"]))
        self._taken(request, result, message["channel_message_id"], token.nonce)
        status_path = _status_path(result.status_token)
        if is_json:
            return web.json_response(
                {"case_reference": result.case_reference, "status_url": self.context.status_url(result.status_token),
                 "conversation_id": result.conversation_id, "unit": result.unit, "unit_name": result.unit_name,
                 "deadline": result.deadline.isoformat().replace("+00:00", "Z") if result.deadline else None,
                 "duplicate": result.duplicate},
                status=200 if result.duplicate else 201,
            )
        raise web.HTTPSeeOther(f"{status_path}?lang={language}")

    # ------------------------------------------------------------------ the status page

    async def _view(self, request: web.Request) -> dict[str, Any]:
        token = request.match_info["token"]
        view = await self.context.conversation_by_status_token(token) if 10 <= len(token) <= 128 else None
        if view is None:
            language = _language(request)
            raise web.HTTPNotFound(text=pages.not_found_page(language), content_type="text/html")
        return view

    def _scope(self, status_token: str) -> str:
        return "status:" + hashlib.sha256(status_token.encode()).hexdigest()[:16]

    def _status_again(
        self, request: web.Request, view: Mapping[str, Any], language: str, status: int, *, text: str, error: str,
    ) -> web.Response:
        """The status page shown again for a reply it could not take, the reply still in its box
        (cut to the limit), with a fresh token and ``error`` saying why."""
        status_token = request.match_info["token"]
        html = pages.status_page(language=language, view=view,
                                 token=tokens.issue(self.secret, self._now(), self._scope(status_token)),
                                 timezone=self.timezone, action=request.path, error=error,
                                 text=text[: fields.LIMITS["message"]])
        return web.Response(text=html, content_type="text/html", status=status, headers=STATUS_PAGE_HEADERS)

    async def status(self, request: web.Request) -> web.Response:
        view = await self._view(request)
        language = request.query.get("lang") if request.query.get("lang") in pages.TEXT else (
            view["language"] if view["language"] in pages.TEXT else _language(request))
        token = request.match_info["token"]
        html = pages.status_page(
            language=language, view=view, token=tokens.issue(self.secret, self._now(), self._scope(token)),
            timezone=self.timezone, action=request.path,
        )
        return web.Response(text=html, content_type="text/html", headers=STATUS_PAGE_HEADERS)

    async def status_reply(self, request: web.Request) -> web.StreamResponse:
        """The resident writes back on the status page; the message joins the conversation, from
        the conversation's contact (``status_sender``)."""
        view = await self._view(request)
        language = _language(request)
        status_token = request.match_info["token"]
        try:
            data, is_json = await self._read(request)
        except Unreadable as exc:
            raw = exc.data.get("message", "")
            return self._status_again(request, view, language, 400, text=fields.normalise(raw),
                                      error=pages.TEXT[language][exc.code].format(charset=exc.charset))
        if data.get("website"):
            raise self._error(is_json, 400, "rejected", "the submission was rejected", field="website")
        raw = data.get("message")
        # Checked as the main form checks it: a browser sends each line break as CRLF, and the
        # textarea's limit counted it once.
        text = fields.normalise(raw) if isinstance(raw, str) else ""
        try:
            token = tokens.check(self.secret, str(data.get("form_token") or ""), self._now(),
                                 min_age=min(self.min_fill, 1.0), max_age=self.max_age, scope=self._scope(status_token))
        except tokens.TokenError as exc:
            if is_json:
                raise self._error(True, 400, exc.code, exc.message, field="form_token") from None
            return self._status_again(request, view, language, 400, text=text, error=pages.TEXT[language][exc.code])
        if not text or len(text) > fields.LIMITS["message"]:
            problem = fields.MESSAGES[language]["too_long" if text else "required"].format(limit=fields.LIMITS["message"])
            if is_json:
                raise self._error(True, 400, "invalid_fields", f"message: {problem}", field="message")
            return self._status_again(request, view, language, 400, text=text, error=problem)
        message_id = fields.submission_id("status", token.nonce, text)
        if not self._allow(request, message_id, token.nonce):
            if is_json:
                raise self._error(True, 429, "rate_limited", "too many submissions; please try again in a minute")
            return self._status_again(request, view, language, 429, text=text,
                                      error=pages.TEXT[language]["rate_limited"])
        try:
            result = await self.context.ingest({
                "channel": "webform",
                "channel_message_id": message_id,
                "kind": "message",
                "sender": status_sender(status_token),
                "text": text,
                "language": view["language"] if view["language"] in pages.TEXT else language,
                "thread": {"status_token": status_token},
            })
        except StorageUnavailable as exc:
            return self._unavailable(request, is_json, exc, lambda: pages.status_page(
                language=language, view=view, token=str(data["form_token"]),
                timezone=self.timezone, action=request.path,
                error=pages.TEXT[language]["unavailable"], text=text))
        self._taken(request, result, message_id, token.nonce)
        if is_json:
            return web.json_response({"case_reference": result.case_reference, "conversation_id": result.conversation_id,
                                      "status_url": result.status_url, "duplicate": result.duplicate},
                                     status=200 if result.duplicate else 201)
        # The case's page; a message long after the case settled opens a case of its own (linked
        # to this one), and its page, where the acknowledgement and the answer show, is the one.
        raise web.HTTPSeeOther(f"{_status_path(result.status_token)}?lang={language}")

    # ------------------------------------------------------------------ delivery

    async def send(self, message: OutboundMessage) -> SendResult:
        """The status page shows every outbound message of its conversation: storing it was
        the delivery."""
        return SendResult(provider_id=f"status-page:{message.outbox_id}", status="delivered")
