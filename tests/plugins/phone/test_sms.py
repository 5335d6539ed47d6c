from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from plugins.phone.sms import error_for_response, messages_url, send_sms, shorten_sms
from router.hookspecs import PermanentDeliveryError, RetryableDeliveryError
from router.testing import unopened_connections

STATUS = "https://example.org/channels/webform/status/abcdef"


def test_short_text_is_unchanged():
    assert shorten_sms("Hallo", STATUS) == "Hallo"


def test_long_text_ends_with_the_status_link_within_the_limit():
    text = "Wir haben Ihre Nachricht erhalten. " * 100
    short = shorten_sms(text, STATUS, limit=160)
    assert len(short) <= 160
    assert short.endswith(f"... {STATUS}")
    assert short.startswith("Wir haben Ihre Nachricht erhalten.")
    assert not short[: -len(STATUS) - 2].endswith(" ")  # cut at a word boundary, no dangling space


def test_long_text_without_link_gets_an_ellipsis():
    short = shorten_sms("x" * 2000, None, limit=100)
    assert len(short) == 100 and short.endswith("...")


def test_an_answer_whose_conversation_is_elsewhere_carries_the_link():
    assert shorten_sms("Hallo", STATUS, with_link=True) == f"Hallo\n{STATUS}"
    assert shorten_sms(f"Hallo {STATUS}", STATUS, with_link=True) == f"Hallo {STATUS}"  # there already
    fits_alone = "Wir kommen am Freitag. " * 6  # fits the limit, not with the link
    assert len(fits_alone) <= 160 < len(fits_alone) + 1 + len(STATUS)
    short = shorten_sms(fits_alone, STATUS, limit=160, with_link=True)
    assert len(short) <= 160 and short.endswith(f"... {STATUS}") and short.startswith("Wir kommen am Freitag.")
    assert shorten_sms("Hallo", None, with_link=True) == "Hallo"
    assert shorten_sms("Hallo Welt", STATUS, limit=20, with_link=True) == "Hallo Welt"  # the link never fits: the text stays


def test_link_longer_than_the_limit_is_left_out():
    assert shorten_sms("y" * 50, STATUS, limit=20) == "y" * 17 + "..."


GSM7 = set("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
           "¿abcdefghijklmnopqrstuvwxyzäöñüà")


def test_a_cut_german_text_stays_in_the_gsm_alphabet():
    """The "…" made a German text go as UCS-2: 24 segments for 1,600 characters instead of 11."""
    reply = "Sehr geehrte Frau Müller, die Straße wird ab Montag gesperrt. " * 40
    assert set(reply) <= GSM7
    assert set(shorten_sms(reply, "https://example.org/channels/webform/status/abc", 1600)) <= GSM7


def test_emoji_count_twice_against_twilios_limit_and_are_never_cut_in_two():
    """Twilio counts UTF-16 code units: an answer with emoji cut to 1,600 characters was 1,655
    to Twilio, refused for good; a hard cut left half a joined emoji."""
    body = shorten_sms("Danke für Ihre Geduld 🙏 " * 100, STATUS, 1600)
    assert len(body.encode("utf-16-le")) // 2 <= 1600 and body.endswith(f"... {STATUS}")
    mechanic = "\U0001f468\u200d\U0001f527"
    for limit in range(20, 40):
        body = shorten_sms("Team: " + mechanic * 100, None, limit)
        assert len(body.encode("utf-16-le")) // 2 <= limit
        assert (len(body.removesuffix("...")) - len("Team: ")) % len(mechanic) == 0, (limit, body)


def test_a_text_of_few_characters_but_many_code_units_is_shortened():
    """Under 1,600 characters but over 1,600 UTF-16 code units (Twilio's count): sent as it
    was, Twilio refused it for good (21617)."""
    text = "Danke 🙏 " * 200  # 1,600 characters, 1,800 code units
    assert len(text) == 1600
    body = shorten_sms(text, None, 1600)
    assert len(body.encode("utf-16-le")) // 2 <= 1600 and body.endswith("...")


def test_the_link_goes_on_when_it_fits_to_the_last_unit():
    text = "Wir kommen am Freitag."
    exact = len(text) + 1 + len(STATUS)
    assert shorten_sms(text, STATUS, limit=exact, with_link=True) == f"{text}\n{STATUS}"
    assert shorten_sms(text, STATUS, limit=exact - 1, with_link=True).endswith(f"... {STATUS}")


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (400, "not json", PermanentDeliveryError, "http_400"),
        (429, {"code": 20429, "message": "Too Many Requests"}, RetryableDeliveryError, "20429"),
        (400, {"code": 21611, "message": "From number has exceeded the maximum queued"}, RetryableDeliveryError, "21611"),
        (503, None, RetryableDeliveryError, "http_503"),
    ],
)
def test_error_classification(status, body, kind, code):
    error = error_for_response(status, body, {"Retry-After": "7"})
    assert type(error) is kind
    assert error.code == code


# Answers as Twilio's Messages resource gives them (code, message, more_info, status).
def twilio_error(code: int, message: str, status: int = 400) -> dict:
    return {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status}


@pytest.mark.parametrize(
    "body",
    [
        twilio_error(21211, "The 'To' number 015112345 is not a valid phone number."),
        twilio_error(21610, "Attempt to send to unsubscribed recipient"),
        twilio_error(21612, "The 'To' phone number: +4915112345678, is not currently reachable using the 'From' phone number"),
        twilio_error(21614, "'To' number is not a valid mobile number"),
        twilio_error(21635, "'To' number cannot be a landline"),
    ],
    ids=lambda body: str(body["code"]),
)
def test_a_refused_recipient_fails_the_address(body):
    error = error_for_response(400, body)
    assert type(error) is PermanentDeliveryError
    assert error.code == str(body["code"]) and error.address_failed is True


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, twilio_error(21212, "The 'From' number 030 99999999 is not a valid phone number")),
        (400, twilio_error(21606, "The 'From' phone number provided is not a valid message-capable Twilio phone number")),
        (400, twilio_error(21660, "Mismatch between the 'From' number +493099999999 and the account")),
        (400, twilio_error(21659, "'From' is not a Twilio phone number")),
        (401, twilio_error(20003, "Authenticate", 401)),
        (404, twilio_error(20404, "The requested resource was not found", 404)),
    ],
    ids=lambda value: str(value["code"]) if isinstance(value, dict) else str(value),
)
def test_a_refusal_of_our_own_settings_keeps_the_message_queued(status, body):
    # Every SMS fails alike until the operator fixes the settings: never given up, never the
    # resident's number marked failed (the outbox's rule for "not_configured").
    error = error_for_response(status, body)
    assert type(error) is RetryableDeliveryError
    assert error.code == "not_configured"
    assert str(body["code"]) in error.message


@pytest.mark.parametrize("body", [None, "not json", {"message": "Not Found"}])
def test_a_404_without_a_twilio_code_is_our_settings(body):
    # No Messages resource at our account SID or api_url: a typo in our settings, not the resident's.
    error = error_for_response(404, body)
    assert type(error) is RetryableDeliveryError
    assert error.code == "not_configured"


@pytest.mark.parametrize(
    "body",
    [
        twilio_error(21408, "Permission to send an SMS has not been enabled for the region indicated by the 'To' number"),
        twilio_error(21608, "The number +4915112345678 is unverified. Trial accounts cannot send messages to unverified numbers"),
        twilio_error(21617, "The concatenated message body exceeds the 1600 character limit"),
        twilio_error(21658, "Parameter exceeded character limit"),
        twilio_error(21602, "Message body is required"),
        twilio_error(29999, "Some code nobody knows yet"),
        "not json",
    ],
    ids=lambda body: str(body["code"]) if isinstance(body, dict) else body,
)
def test_other_refusals_are_permanent_but_leave_the_address_alone(body):
    error = error_for_response(400, body)
    assert type(error) is PermanentDeliveryError
    assert error.address_failed is False


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


@pytest.mark.parametrize("body", [{"status": "queued"}, {"sid": ""}, {"sid": None}, "not json"])
async def test_send_that_twilio_took_without_naming_a_sid_is_sent(fake_twilio, body):
    """A 2xx is Twilio taking the SMS; its answer cut short or without a sid was a retryable
    error, and the outbox sent the SMS again: a second SMS, since Twilio has no idempotency key."""
    fake_twilio["answer"] = (201, body)
    assert await _send(fake_twilio) is None


async def test_send_refused_recipient_is_permanent(fake_twilio):
    fake_twilio["answer"] = (400, {"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400})
    with pytest.raises(PermanentDeliveryError) as caught:
        await _send(fake_twilio)
    assert caught.value.code == "21211" and caught.value.address_failed


async def test_send_refused_sender_waits_for_the_settings(fake_twilio):
    fake_twilio["answer"] = (400, {"code": 21212, "message": "The 'From' number is not a valid phone number", "status": 400})
    with pytest.raises(RetryableDeliveryError) as caught:
        await _send(fake_twilio)
    assert caught.value.code == "not_configured"


async def test_send_server_error_is_retryable(fake_twilio):
    fake_twilio["answer"] = (500, {"message": "oops"})
    with pytest.raises(RetryableDeliveryError):
        await _send(fake_twilio)


async def test_send_timeout_is_retryable(fake_twilio):
    fake_twilio["delay"] = 1.0
    with pytest.raises(RetryableDeliveryError) as caught:
        await _send(fake_twilio, timeout=0.1)
    assert caught.value.code == "network"
    assert caught.value.outcome_unknown is True  # Twilio may have taken it: its status callback will tell


async def test_send_whose_connection_broke_after_the_request_leaves_the_outcome_unknown():
    async def read_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(read_then_hang_up, "127.0.0.1", 0)
    try:
        with pytest.raises(RetryableDeliveryError) as caught:
            await _send({"url": f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"})
    finally:
        server.close()
        await server.wait_closed()
    assert caught.value.outcome_unknown is True


async def test_send_whose_connection_never_opened_is_known_not_sent():
    with unopened_connections() as url:
        if url is None:
            pytest.skip("this system completes connections to a full accept queue")
        with pytest.raises(RetryableDeliveryError) as caught:
            await _send({"url": url}, timeout=0.6)
    assert caught.value.code == "network"
    assert caught.value.outcome_unknown is False  # the request never went: no reason to wait for a status


async def test_send_unreachable_is_retryable(unused_tcp_port):
    with pytest.raises(RetryableDeliveryError) as caught:
        await _send({"url": f"http://127.0.0.1:{unused_tcp_port}"})
    assert caught.value.outcome_unknown is False  # no connection, so nothing was sent


def test_messages_url():
    assert messages_url("https://api.twilio.com/", "AC1") == "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json"
