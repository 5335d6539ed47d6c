from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from plugins.phone.sms import error_for_response, messages_url, send_sms, shorten_sms
from router.hookspecs import PermanentDeliveryError, RetryableDeliveryError

STATUS = "https://example.org/channels/webform/status/abcdef"


def test_short_text_is_unchanged():
    assert shorten_sms("Hallo", STATUS) == "Hallo"


def test_long_text_ends_with_the_status_link_within_the_limit():
    text = "Wir haben Ihre Nachricht erhalten. " * 100
    short = shorten_sms(text, STATUS, limit=160)
    assert len(short) <= 160
    assert short.endswith(f"… {STATUS}")
    assert short.startswith("Wir haben Ihre Nachricht erhalten.")
    assert not short[: -len(STATUS) - 2].endswith(" ")  # cut at a word boundary, no dangling space


def test_long_text_without_link_gets_an_ellipsis():
    short = shorten_sms("x" * 2000, None, limit=100)
    assert len(short) == 100 and short.endswith("…")


def test_link_longer_than_the_limit_is_left_out():
    assert shorten_sms("y" * 50, STATUS, limit=20) == "y" * 19 + "…"


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (400, {"code": 21211, "message": "Invalid 'To' Phone Number"}, PermanentDeliveryError, "21211"),
        (400, {"code": 21614, "message": "not a mobile number"}, PermanentDeliveryError, "21614"),
        (400, "not json", PermanentDeliveryError, "http_400"),
        (429, {"code": 20429, "message": "Too Many Requests"}, RetryableDeliveryError, "20429"),
        (503, None, RetryableDeliveryError, "http_503"),
        (401, {"code": 20003, "message": "Authenticate"}, RetryableDeliveryError, "20003"),
    ],
)
def test_error_classification(status, body, kind, code):
    error = error_for_response(status, body, {"Retry-After": "7"})
    assert type(error) is kind
    assert error.code == code


def test_retry_after_is_passed_on():
    assert error_for_response(429, {}, {"Retry-After": "7"}).retry_after == 7.0


@pytest.mark.parametrize("header", ["-3", "nan", "inf", "90000", "Wed, 21 Oct 2015 07:28:00 GMT", "soon"])
def test_retry_after_that_cannot_be_used_leaves_the_backoff_to_the_outbox(header):
    assert error_for_response(503, None, {"Retry-After": header}).retry_after is None


@pytest.fixture
async def fake_twilio(aiohttp_server):
    """A Messages resource on loopback that records requests and answers as told."""
    state = {"requests": [], "answer": (201, {"sid": "SM" + "f" * 32, "status": "queued"}), "delay": 0.0}

    async def messages(request: web.Request) -> web.Response:
        state["requests"].append((request.path, request.headers.get("Authorization"), dict(await request.post())))
        await asyncio.sleep(state["delay"])
        status, body = state["answer"]
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", messages)
    server = await aiohttp_server(app)
    state["url"] = str(server.make_url("")).rstrip("/")
    return state


async def _send(fake, **overrides):
    async with aiohttp.ClientSession() as http:
        return await send_sms(
            http, api_url=fake["url"], account_sid="AC1", auth_token="secret", to="+4915112345678",
            from_="+4930999999", body="Hallo", status_callback="https://example.org/s", **overrides,
        )


async def test_send_posts_the_form_with_basic_auth(fake_twilio):
    assert await _send(fake_twilio) == "SM" + "f" * 32
    path, auth, form = fake_twilio["requests"][0]
    assert path == "/2010-04-01/Accounts/AC1/Messages.json"
    assert auth == "Basic QUMxOnNlY3JldA=="  # base64 of "AC1:secret"
    assert form == {"To": "+4915112345678", "From": "+4930999999", "Body": "Hallo", "StatusCallback": "https://example.org/s"}


async def test_send_refused_recipient_is_permanent(fake_twilio):
    fake_twilio["answer"] = (400, {"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400})
    with pytest.raises(PermanentDeliveryError) as caught:
        await _send(fake_twilio)
    assert caught.value.code == "21211"


async def test_send_server_error_is_retryable(fake_twilio):
    fake_twilio["answer"] = (500, {"message": "oops"})
    with pytest.raises(RetryableDeliveryError):
        await _send(fake_twilio)


async def test_send_timeout_is_retryable(fake_twilio):
    fake_twilio["delay"] = 1.0
    with pytest.raises(RetryableDeliveryError) as caught:
        await _send(fake_twilio, timeout=0.1)
    assert caught.value.code == "network"


async def test_send_unreachable_is_retryable(unused_tcp_port):
    with pytest.raises(RetryableDeliveryError):
        await _send({"url": f"http://127.0.0.1:{unused_tcp_port}"})


def test_messages_url():
    assert messages_url("https://api.twilio.com/", "AC1") == "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json"
