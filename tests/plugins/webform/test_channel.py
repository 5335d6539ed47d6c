"""The web form end to end: a resident's form becomes a routed, acknowledged, tracked case."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from urllib.parse import urlencode

import pytest

from plugins.webform import WebFormChannel, register_channels
from plugins.webform.channel import RateLimiter
from plugins.webform.fields import LIMITS
from router.hookspecs import SettingsError
from router.testing import CoreHarness, check_channel_contract, example_config, load_raw_config

FORM = {
    "name": "Erika Mustermann",
    "email": "",
    "phone": "",
    "street": "Lindenweg 3",
    "postcode": "12345",
    "city": "Musterstadt",
    "customer_number": "",
    "topic": "construction",
    "message": "Baustelle vor unserem Haus, Gehweg gesperrt. Seit Tagen kommt niemand.",
    "website": "",
}


async def get_token(harness: CoreHarness) -> str:
    response = await harness.client.get("/channels/webform/token")
    assert response.status == 200
    token = (await response.json())["form_token"]
    harness.clock.advance(timedelta(seconds=5))
    return token


async def submit_json(harness: CoreHarness, **changes: str) -> tuple[int, dict]:
    body = {**FORM, "form_token": await get_token(harness), **changes}
    response = await harness.client.post("/channels/webform/", json=body)
    return response.status, await response.json()


def page_token(html: str) -> str:
    return re.search(r'name="form_token" value="([^"]+)"', html).group(1)


def status_path(body: dict) -> str:
    return "/channels/webform/status/" + body["status_url"].rsplit("/", 1)[1]


async def status_page_token(harness: CoreHarness, path: str) -> str:
    """A reply form's token from the status page, old enough to be sent."""
    token = page_token(await (await harness.client.get(path)).text())
    harness.clock.advance(timedelta(seconds=5))
    return token


FORM_TYPE = "application/x-www-form-urlencoded"


async def test_form_page_is_german_with_token_and_honeypot(harness):
    response = await harness.client.get("/channels/webform/")
    assert response.status == 200
    html = await response.text()
    assert '<html lang="de">' in html
    assert 'name="form_token"' in html and 'name="website"' in html
    assert "Kundennummer (falls vorhanden)" in html
    english = await (await harness.client.get("/channels/webform/", headers={"Accept-Language": "en-GB,en;q=0.8"})).text()
    assert '<html lang="en">' in english and "Customer number (if you have one)" in english
    assert '<html lang="en">' in await (await harness.client.get("/channels/webform/?lang=en")).text()


async def test_non_customer_form_is_routed_to_contractor_and_acknowledged_on_status_page(harness):
    token = await get_token(harness)
    response = await harness.client.post(
        "/channels/webform/", data={**FORM, "form_token": token}, allow_redirects=False
    )
    assert response.status == 303
    location = response.headers["Location"]
    assert location.startswith("/channels/webform/status/")

    status, listing = await harness.api("GET", "/api/v1/conversations")
    assert status == 200 and len(listing["items"]) == 1
    item = listing["items"][0]
    assert item["unit"] == "tiefbau-muster"
    assert item["contact"]["is_customer"] is False
    assert item["state"] == "open"
    status, detail = await harness.api("GET", f"/api/v1/conversations/{item['id']}")
    assert detail["routing"]["rule"] == "construction-in-area"
    assert "Musterstadt Nord" in detail["routing"]["reason"]

    await harness.run_outbox()
    page = await (await harness.client.get(location)).text()
    assert item["case_reference"] in page
    assert "Tiefbau Muster GmbH" in page
    assert "Ihre Fallnummer ist " + item["case_reference"] in page  # the acknowledgement itself
    status, detail = await harness.api("GET", f"/api/v1/conversations/{item['id']}")
    assert detail["state"] == "acknowledged"
    ack = [m for m in detail["messages"] if m["kind"] == "ack"]
    assert len(ack) == 1 and ack[0]["delivery_status"] == "delivered"


async def test_json_submission_answers_201_with_case(harness):
    status, body = await submit_json(harness)
    assert status == 201
    assert body["case_reference"].startswith("K-") and len(body["case_reference"]) == 8
    assert body["status_url"].endswith(f"/channels/webform/status/{body['status_url'].rsplit('/', 1)[1]}")
    assert body["unit"] == "tiefbau-muster"


async def test_double_submit_gives_one_conversation(harness):
    token = await get_token(harness)
    first = await harness.client.post("/channels/webform/", json={**FORM, "form_token": token})
    second = await harness.client.post("/channels/webform/", json={**FORM, "form_token": token})
    a, b = await first.json(), await second.json()
    assert first.status == 201 and second.status == 200
    assert a["case_reference"] == b["case_reference"] and b["duplicate"] is True
    assert await harness.count("conversations") == 1
    assert await harness.count("outbox", "kind = 'ack'") == 1


async def test_another_submission_with_the_same_token_is_not_answered_with_the_first_case(harness):
    """The token's nonce alone was the message id: a second person on a shared computer (a
    restored page) got the first person's case and status page, and their own message was
    dropped as a duplicate."""
    token = await get_token(harness)
    first = await harness.client.post("/channels/webform/", json={**FORM, "form_token": token})
    other = await harness.client.post("/channels/webform/", json={
        **FORM, "form_token": token, "name": "Jan Nachbar", "email": "jan@example.org",
        "message": "Bei mir ist seit gestern das Wasser abgestellt."})
    a, b = await first.json(), await other.json()
    assert first.status == 201 and other.status == 201
    assert a["case_reference"] != b["case_reference"] and a["status_url"] != b["status_url"]
    assert await harness.count("messages", "direction = 'in'") == 2


async def test_staff_reply_shows_on_status_page_and_resident_writes_back(harness):
    status, body = await submit_json(harness)
    conversation_id = body["conversation_id"]
    await harness.run_outbox()
    status, reply = await harness.api(
        "POST", f"/api/v1/conversations/{conversation_id}/replies", token="contractor",
        json={"text": "Wir räumen den Gehweg bis Freitag frei."},
    )
    assert status == 201
    await harness.run_outbox()
    path = "/channels/webform/status/" + body["status_url"].rsplit("/", 1)[1]
    page = await (await harness.client.get(path)).text()
    assert "Wir räumen den Gehweg bis Freitag frei." in page
    status, detail = await harness.api("GET", f"/api/v1/conversations/{conversation_id}")
    assert detail["state"] == "answered"
    status, stats = await harness.api("GET", "/api/v1/stats")
    row = next(s for s in stats["items"] if s["unit"] == "tiefbau-muster" and s["channel"] == "webform")
    assert row["answered"] == 1 and row["received"] == 1 and row["median_first_answer_seconds"] is not None

    import re

    token = re.search(r'name="form_token" value="([^"]+)"', page).group(1)
    harness.clock.advance(timedelta(seconds=5))
    response = await harness.client.post(path, data={"form_token": token, "message": "Danke, und wann kommt der Bagger zurück?", "website": ""}, allow_redirects=False)
    assert response.status == 303
    assert await harness.count("conversations") == 1
    status, detail = await harness.api("GET", f"/api/v1/conversations/{conversation_id}")
    inbound = [m for m in detail["messages"] if m["direction"] == "in"]
    assert inbound[-1]["text"] == "Danke, und wann kommt der Bagger zurück?"
    assert detail["state"] == "acknowledged" and detail["deadline"] is not None


async def test_a_status_page_message_long_after_the_case_closed_leads_to_the_new_case(harness):
    """It opened a new case, linked, but the page went back to the old one, which shows neither
    the message nor the new case: its acknowledgement and answer landed on a page nobody had."""
    import re

    status, body = await submit_json(harness)
    path = "/channels/webform/status/" + body["status_url"].rsplit("/", 1)[1]
    await harness.api("POST", f"/api/v1/conversations/{body['conversation_id']}/close")
    harness.clock.advance(timedelta(days=60))
    page = await (await harness.client.get(path)).text()
    token = re.search(r'name="form_token" value="([^"]+)"', page).group(1)
    harness.clock.advance(timedelta(seconds=5))
    response = await harness.client.post(path, data={"form_token": token, "message": "Der Bagger ist wieder da.",
                                                     "website": ""}, allow_redirects=False)
    assert response.status == 303 and await harness.count("conversations") == 2
    (new,) = await harness.rows("SELECT status_token FROM conversations WHERE linked_to = ?", (body["conversation_id"],))
    assert response.headers["Location"].startswith(f"/channels/webform/status/{new['status_token']}?")
    page = await (await harness.client.get(response.headers["Location"])).text()
    assert "Der Bagger ist wieder da." in page


async def test_two_messages_from_one_status_page_are_two_messages(harness):
    """The status page's token nonce alone was the message id: a second message written on a
    restored page was dropped as a duplicate of the first."""
    import re

    status, body = await submit_json(harness)
    path = "/channels/webform/status/" + body["status_url"].rsplit("/", 1)[1]
    token = re.search(r'name="form_token" value="([^"]+)"', await (await harness.client.get(path)).text()).group(1)
    harness.clock.advance(timedelta(seconds=5))
    for text in ("Erste Frage", "Erste Frage", "Zweite Frage"):  # the first twice: a double submit
        response = await harness.client.post(path, data={"form_token": token, "message": text, "website": ""},
                                             allow_redirects=False)
        assert response.status == 303
    texts = [r["text"] for r in await harness.rows("SELECT text FROM messages WHERE direction = 'in' ORDER BY id")]
    assert texts[1:] == ["Erste Frage", "Zweite Frage"]


async def test_a_status_page_reply_with_the_honeypot_filled_is_refused_and_stores_nothing(harness):
    """The main form's bot trap, on the reply form of the status page too."""
    status, body = await submit_json(harness)
    path = status_path(body)
    before = await harness.count("messages")
    token = await status_page_token(harness, path)
    spam = {"form_token": token, "message": "Billige Uhren hier", "website": "http://spam.example"}
    response = await harness.client.post(path, data=spam, allow_redirects=False)
    assert response.status == 400
    response = await harness.client.post(path, json=spam)
    assert response.status == 400 and (await response.json())["error"]["field"] == "website"
    assert await harness.count("messages") == before


async def test_a_residents_email_and_phone_are_both_her_identities(harness):
    """The answer goes to the e-mail address, and an SMS or a call from the number she typed
    finds her case: the number is kept beside the address, not dropped."""
    status, _ = await submit_json(harness, email="Erika@Example.net", phone="0151 12345678")
    assert status == 201
    rows = await harness.rows("SELECT contact_id, kind, address FROM identities ORDER BY id")
    assert [(r["kind"], r["address"]) for r in rows] == [("email", "erika@example.net"), ("phone", "+4915112345678")]
    assert len({r["contact_id"] for r in rows}) == 1


async def test_customer_number_matching_directory_is_recognised_and_wrong_one_stays_claim(harness):
    await harness.core.import_customers(lambda: [
        {"customer_number": "KD-100200", "name": "Erika Mustermann", "email": "erika@example.net", "street": "Lindenweg 3", "postcode": "12345"}
    ])
    status, body = await submit_json(harness, customer_number="KD-100200", email="erika@example.net", topic="contract",
                                     message="Frage zu meinem Tarif")
    status, detail = await harness.api("GET", f"/api/v1/conversations/{body['conversation_id']}")
    assert detail["contact"]["is_customer"] is True and detail["contact"]["customer_number"] == "KD-100200"
    assert detail["unit"] == "vertrieb"

    status, body = await submit_json(harness, customer_number="KD-100200", name="Max Fremd", email="max@example.net",
                                     street="Hauptstraße 1", postcode="54321", topic="contract", message="Tarif?")
    status, detail = await harness.api("GET", f"/api/v1/conversations/{body['conversation_id']}")
    assert detail["contact"]["is_customer"] is False
    assert detail["contact"]["customer_claim"] == "KD-100200" and detail["contact"]["customer_number"] is None


async def test_bad_input_gets_4xx_and_stores_nothing(harness):
    cases = [
        ({"message": ""}, 400, "message"),
        ({"topic": "nonsense"}, 400, "topic"),
        ({"email": "not-an-address"}, 400, "email"),
        ({"postcode": "12"}, 400, "postcode"),
        ({"phone": "0151 123"}, 400, "phone"),  # too short for any number: no identity to text
        ({"website": "http://spam.example"}, 400, "website"),
        ({"message": "x" * 5001}, 400, "message"),
    ]
    for changes, expected, field in cases:
        status, body = await submit_json(harness, **changes)
        assert status == expected, (changes, body)
        assert body["error"]["field"] == field, (changes, body)
    # too fast: no waiting after taking the token
    token = (await (await harness.client.get("/channels/webform/token")).json())["form_token"]
    response = await harness.client.post("/channels/webform/", json={**FORM, "form_token": token})
    assert response.status == 400 and (await response.json())["error"]["code"] == "too_fast"
    # expired
    token = await get_token(harness)
    harness.clock.advance(timedelta(days=2))
    response = await harness.client.post("/channels/webform/", json={**FORM, "form_token": token})
    assert (await response.json())["error"]["code"] == "token_expired"
    # forged
    response = await harness.client.post("/channels/webform/", json={**FORM, "form_token": "1700000000.abc.def"})
    assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_token"
    # not ASCII, as no token of ours is: comparing it in constant time raised TypeError, a 500
    for token in ("1700000000.abc.\u00e9", "1700000000.\ud800.abc", "\u0661\u0662.abc.def"):
        response = await harness.client.post("/channels/webform/", json={**FORM, "form_token": token})
        assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_token", token
    response = await harness.client.post("/channels/webform/", data={**FORM, "form_token": "1.abc.\u00e9"})
    assert response.status == 400
    # malformed JSON and oversized bodies
    for raw in (b"{not json", b"[" * 50_000):  # the second nests deeper than the parser goes
        response = await harness.client.post("/channels/webform/", data=raw, headers={"Content-Type": "application/json"})
        assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_json"
    # multipart is not what the page sends, and would be read as garbage
    response = await harness.client.post("/channels/webform/", data=b"--b\r\n", headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status == 415
    response = await harness.client.post("/channels/webform/", data=b"x" * 70_000, headers={"Content-Type": "application/json"})
    assert response.status == 413
    # HTML form errors come back as the form with the field marked
    token = await get_token(harness)
    response = await harness.client.post("/channels/webform/", data={**FORM, "email": "kaputt", "form_token": token})
    assert response.status == 400
    html = await response.text()
    assert 'id="email-error"' in html and 'aria-invalid="true"' in html
    for table in ("messages", "conversations", "contacts", "outbox"):
        assert await harness.count(table) == 0, table


async def test_chunked_body_over_the_limit_is_refused_as_json_or_as_a_page(harness):
    """A body without Content-Length is counted while it is read: 413 in the form of the request."""

    async def chunks():
        for _ in range(7):
            yield b"x" * 10_000  # 70,000 bytes against the default 64 KiB

    response = await harness.client.post("/channels/webform/", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert await response.json() == {"error": {"code": "too_large", "message": "the body is larger than 65536 bytes"}}
    response = await harness.client.post(
        "/channels/webform/", data=chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status == 413 and response.content_type == "text/html"
    assert "the body is larger than 65536 bytes" in await response.text()
    assert await harness.count("messages") == 0


async def test_output_is_escaped(harness):
    status, body = await submit_json(harness, name="<script>alert(1)</script>", message="<b>fett</b> & <img src=x onerror=alert(1)>")
    assert status == 201
    path = "/channels/webform/status/" + body["status_url"].rsplit("/", 1)[1]
    page = await (await harness.client.get(path)).text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


async def test_unknown_status_token_is_404(harness):
    response = await harness.client.get("/channels/webform/status/doesnotexist123")
    assert response.status == 404


async def test_rate_limit_per_client(tmp_path):
    async with CoreHarness(tmp_path / "d", settings={"webform": {"rate_limit_per_minute": 2}}) as harness:
        statuses = [(await submit_json(harness, message=f"Nachricht {i}"))[0] for i in range(3)]
        assert statuses == [201, 201, 429]
        assert await harness.count("conversations") == 2


def test_the_rate_limit_counts_a_sliding_minute_per_client():
    """A submission counts for one minute: then that client may send again (counted for ever,
    a resident who sent ten forms was refused until the service restarted)."""
    limiter = RateLimiter(2)
    assert [limiter.allow("a", now=t) for t in (0.0, 1.0, 30.0)] == [True, True, False]
    assert limiter.allow("b", now=30.0)
    assert limiter.allow("a", now=60.0)  # the first went a minute ago
    assert not limiter.allow("a", now=60.5)
    assert limiter.allow("a", now=61.0)


async def test_rate_limit_behind_a_proxy_counts_the_address_the_proxy_added(tmp_path):
    settings = {"webform": {"rate_limit_per_minute": 2, "trust_forwarded_for": True}}
    async with CoreHarness(tmp_path / "d", settings=settings) as harness:
        statuses = []
        for i in range(3):  # a client sends an address of its choice; the proxy appends the real one
            body = {**FORM, "message": f"Nachricht {i}", "form_token": await get_token(harness)}
            response = await harness.client.post("/channels/webform/", json=body,
                                                 headers={"X-Forwarded-For": f"10.0.0.{i}, 198.51.100.7"})
            statuses.append(response.status)
        assert statuses == [201, 201, 429]


async def test_every_answer_that_shows_a_status_page_keeps_it_private(harness):
    """The page re-shown for an empty reply carried the whole conversation without the headers
    that keep it out of caches, referrers and search engines."""
    status, body = await submit_json(harness)
    assert status == 201
    path = "/channels/webform/" + body["status_url"].split("/channels/webform/", 1)[1]
    page = await harness.client.get(path)
    private = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex"}
    assert page.status == 200 and {k: page.headers.get(k) for k in private} == private
    html = await page.text()
    form_token = html.split('name="form_token" value="', 1)[1].split('"', 1)[0]
    harness.clock.advance(timedelta(seconds=5))
    again = await harness.client.post(path, data={"form_token": form_token, "message": "   "})
    assert again.status == 400 and {k: again.headers.get(k) for k in private} == private


async def test_contract_kit_passes_for_the_web_form(harness):
    tokens: dict[str, str] = {}

    async def deliver(h: CoreHarness, key: str) -> None:
        if key not in tokens:
            tokens[key] = await get_token(h)
        response = await h.client.post("/channels/webform/", json={**FORM, "email": "anwohner@example.net", "form_token": tokens[key]})
        assert response.status in (200, 201), await response.text()

    conv = await check_channel_contract(harness, "webform", deliver, sender=("email", "anwohner@example.net"))
    assert conv["state"] == "answered"


async def test_a_body_arriving_in_parts_is_read_whole(harness):
    import asyncio
    from urllib.parse import urlencode

    long_message = "Baustelle vor dem Haus. " + "Der Gehweg ist gesperrt und niemand sagt uns, wie lange noch. " * 45
    body = urlencode({**FORM, "message": long_message[:5000], "form_token": await get_token(harness)}).encode()

    async def parts():
        yield body[:900]
        await asyncio.sleep(0.2)
        yield body[900:]

    response = await harness.client.post("/channels/webform/", data=parts(), allow_redirects=False,
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 303
    rows = await harness.rows("SELECT text FROM messages WHERE direction = 'in'")
    assert rows == [{"text": long_message[:5000].strip()}]


async def test_a_form_sent_while_the_database_refuses_writes_comes_back_filled_in(harness):
    """A resident's form got the service's JSON error: what they typed was gone. The page comes
    back with their entries and a note to send it again shortly; the JSON API answers 503."""
    token = await get_token(harness)
    harness.refuse_writes()
    response = await harness.client.post("/channels/webform/", data={**FORM, "form_token": token}, allow_redirects=False)
    assert response.status == 503 and response.headers["Retry-After"] == "5"
    page = await response.text()
    assert response.content_type == "text/html" and "Ihre Eingaben sind erhalten" in page
    assert "Lindenweg 3" in page and "Seit Tagen kommt niemand." in page
    for _ in range(10):  # as many as the rate limit allows a minute: none of them counts
        status, body = await submit_json(harness)
        assert status == 503 and body["error"]["code"] == "unavailable"
    harness.refuse_writes(False)
    assert await harness.count("messages") == 0

    import re

    # Sent again at once: the page carries the same token, past its fill time, with its nonce.
    assert re.search(r'name="form_token" value="([^"]+)"', page).group(1) == token
    response = await harness.client.post("/channels/webform/", data={**FORM, "form_token": token}, allow_redirects=False)
    assert response.status == 303 and await harness.count("conversations") == 1
    again = await harness.client.post("/channels/webform/", data={**FORM, "form_token": token}, allow_redirects=False)
    assert again.status == 303 and await harness.count("conversations") == 1  # a double submit


async def test_a_reply_on_the_status_page_while_the_database_refuses_writes_keeps_its_text(harness):
    status, body = await submit_json(harness)
    path = "/channels/webform/status/" + body["status_url"].rsplit("/", 1)[1]
    page = await (await harness.client.get(path)).text()

    import re

    token = re.search(r'name="form_token" value="([^"]+)"', page).group(1)
    harness.clock.advance(timedelta(seconds=5))
    harness.refuse_writes()
    response = await harness.client.post(path, data={"form_token": token, "message": "Wann kommt der Bagger <zurück>?",
                                                     "website": ""}, allow_redirects=False)
    harness.refuse_writes(False)
    assert response.status == 503
    page = await response.text()
    assert "Ihre Eingaben sind erhalten" in page and "Wann kommt der Bagger &lt;zurück&gt;?</textarea>" in page
    assert await harness.count("messages", "direction = 'in'") == 1


async def test_a_lone_surrogate_in_a_json_post_is_no_500(harness):
    """JSON lets "\\ud800" through; the submission's id hashed the text and raised before the
    core could repair it: 500 on the form and on the status page."""
    token = await get_token(harness)
    body = json.dumps({**FORM, "form_token": token, "message": "Baustelle \ud800 vor dem Haus"})
    response = await harness.client.post("/channels/webform/", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 201
    created = await response.json()
    path = "/channels/webform/status/" + created["status_url"].rsplit("/", 1)[1]
    page = await (await harness.client.get(path)).text()
    status_token = re.search(r'name="form_token" value="([^"]+)"', page).group(1)
    harness.clock.advance(timedelta(seconds=5))
    body = json.dumps({"form_token": status_token, "message": "Noch eine Frage \udc00", "website": ""})
    response = await harness.client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 201
    texts = [r["text"] for r in await harness.rows("SELECT text FROM messages WHERE direction = 'in' ORDER BY id")]
    assert texts == ["Baustelle \ufffd vor dem Haus", "Noch eine Frage \ufffd"]


# ---------------------------------------------------------------- the status page's sender


async def test_a_status_page_reply_comes_from_the_page_not_from_the_contacts_first_address(harness, monkeypatch):
    """The reply was sent as from the contact's first identity: an address that may since be
    someone else's, or gone. It comes from the page: a digest of its token, nothing else."""
    status, body = await submit_json(harness, email="erika@example.net", phone="030 1234567")
    path = status_path(body)
    channel = harness.core.channels["webform"]
    sent: list[dict] = []
    ingest = channel.context.ingest

    async def spy(message: dict):
        sent.append(message)
        return await ingest(message)

    monkeypatch.setattr(channel.context, "ingest", spy)
    token = await status_page_token(harness, path)
    response = await harness.client.post(path, data={"form_token": token, "message": "Noch eine Frage", "website": ""},
                                         allow_redirects=False)
    assert response.status == 303
    status_token = path.rsplit("/", 1)[1]
    digest = hashlib.sha256(status_token.encode()).hexdigest()[:32]
    assert sent[-1]["sender"] == {"kind": "webform", "address": "status:" + digest}
    assert status_token not in json.dumps(sent[-1]["sender"])


async def test_status_page_replies_of_a_resident_whose_number_another_contact_named_stay_in_her_case(harness):
    """The reviewer's case: X names 030 1234567 beside her address; A, who gives only that
    number, gets a contact of her own. A's first reply on her status page went out as from the
    number (X's claim), the second had no address to send from: a 500. Both are A's now.
    (That they are filed under A's contact without a new identity is the core's part:
    router/ingest.py files a form session's message with a status token under its case's
    contact.)"""
    status, x = await submit_json(harness, email="x@example.net", phone="030 1234567")
    assert status == 201
    status, a = await submit_json(harness, phone="+49 30 1234567", message="Wann ist die Baustelle weg?")
    assert status == 201
    identities = await harness.rows("SELECT contact_id, kind, address, claimed FROM identities ORDER BY id")
    path = status_path(a)
    for text in ("Erste Rückfrage", "Zweite Rückfrage"):
        token = await status_page_token(harness, path)
        response = await harness.client.post(path, data={"form_token": token, "message": text, "website": ""},
                                             allow_redirects=False)
        assert response.status == 303, await response.text()
        assert response.headers["Location"].startswith(path + "?")
    (case,) = await harness.rows("SELECT contact_id FROM conversations WHERE id = ?", (a["conversation_id"],))
    rows = await harness.rows("SELECT conversation_id, contact_id, text FROM messages WHERE direction = 'in' "
                              "AND text LIKE '%Rückfrage' ORDER BY id")
    assert rows == [{"conversation_id": a["conversation_id"], "contact_id": case["contact_id"], "text": t}
                    for t in ("Erste Rückfrage", "Zweite Rückfrage")]
    assert await harness.rows("SELECT contact_id, kind, address, claimed FROM identities ORDER BY id") == identities
    assert await harness.count("conversations") == 2


# ---------------------------------------------------------------- the body's charset


async def test_a_form_posted_in_its_own_charset_is_read_in_it(harness):
    """The charset of a URL-encoded post was ignored: ISO-8859-1 was read as UTF-8 and stored
    garbled without a word."""
    entered = {"name": "Jürgen Müller", "message": "Straße aufgerissen, Bürgersteig gesperrt"}
    body = urlencode({**FORM, **entered, "form_token": await get_token(harness)}, encoding="iso-8859-1")
    response = await harness.client.post("/channels/webform/", data=body.encode("ascii"), allow_redirects=False,
                                         headers={"Content-Type": f"{FORM_TYPE}; charset=ISO-8859-1"})
    assert response.status == 303
    assert await harness.rows("SELECT text FROM messages WHERE direction = 'in'") == [{"text": entered["message"]}]
    assert await harness.rows("SELECT display_name FROM contacts") == [{"display_name": entered["name"]}]
    # raw bytes of the charset, not %-escaped, as some clients send them; and on the status page
    path = response.headers["Location"].split("?", 1)[0]
    token = await status_page_token(harness, path)
    raw = f"form_token={token}&website=&message=".encode() + "Grüße aus der Straße".encode("cp1252")
    response = await harness.client.post(path, data=raw, allow_redirects=False,
                                         headers={"Content-Type": f"{FORM_TYPE}; charset=windows-1252"})
    assert response.status == 303
    texts = [r["text"] for r in await harness.rows("SELECT text FROM messages WHERE direction = 'in' ORDER BY id")]
    assert texts[-1] == "Grüße aus der Straße"


async def test_an_unknown_charset_or_bytes_not_in_it_are_a_400_that_names_the_problem(harness):
    """Bytes that are not in the charset (ISO-8859-1 sent as UTF-8) were replaced by U+FFFD
    and stored; an unknown charset is no better. A browser gets the form again saying so."""
    latin1 = urlencode({**FORM, "message": "Grüße vom Lindenweg", "form_token": await get_token(harness)},
                       encoding="iso-8859-1").encode("ascii")
    for content_type, named in ((FORM_TYPE, "utf-8"), (f"{FORM_TYPE}; charset=utf-8", "utf-8"),
                                (f"{FORM_TYPE}; charset=x-klingon", "x-klingon"), (f"{FORM_TYPE}; charset=base64", "base64")):
        response = await harness.client.post("/channels/webform/", data=latin1, allow_redirects=False,
                                             headers={"Content-Type": content_type})
        assert response.status == 400 and response.content_type == "text/html", content_type
        assert response.headers["Cache-Control"] == "no-store"
        page = await response.text()
        assert "Zeichenkodierung" in page and f"({named})" in page, content_type
        assert "<form" in page and "Lindenweg 3" in page  # the form again, with what could be read
    # on the status page too, with what could be read of the reply
    status, body = await submit_json(harness)
    path = status_path(body)
    token = await status_page_token(harness, path)
    raw = f"form_token={token}&website=&message=Gr%FC%DFe".encode()
    response = await harness.client.post(path, data=raw, headers={"Content-Type": FORM_TYPE}, allow_redirects=False)
    assert response.status == 400 and response.headers["Cache-Control"] == "no-store"
    page = await response.text()
    assert "(utf-8)" in page and "Gr\ufffd\ufffde</textarea>" in page
    assert await harness.count("messages", "direction = 'in'") == 1
    # JSON is always UTF-8: a JSON client is told that the body is not
    body = json.dumps({**FORM, "message": "Grüße", "form_token": await get_token(harness)},
                      ensure_ascii=False).encode("iso-8859-1")
    response = await harness.client.post("/channels/webform/", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "invalid_json" and "not valid UTF-8" in error["message"]


# ---------------------------------------------------------------- what was typed is kept


async def test_an_expired_or_too_quick_form_comes_back_filled_in_with_a_fresh_token(harness):
    """A form left open overnight, or sent within the fill time (autofill and a pasted text),
    answered a bare page: what the resident typed was gone."""
    text = "Seit drei Wochen ist der Gehweg vor Nr. 3 aufgerissen, mit dem Rollator kommt man nicht raus."
    cases = (
        (timedelta(days=1, seconds=10), "zu lange geöffnet", "de"),
        (timedelta(seconds=1), "zu schnell", "de"),
        (timedelta(seconds=1), "too quick", "en"),
    )
    for wait, notice, language in cases:
        token = page_token(await (await harness.client.get(f"/channels/webform/?lang={language}")).text())
        harness.clock.advance(wait)
        response = await harness.client.post(f"/channels/webform/?lang={language}",
                                             data={**FORM, "message": text, "form_token": token}, allow_redirects=False)
        assert response.status == 400 and response.content_type == "text/html"
        assert response.headers["Cache-Control"] == "no-store"
        page = await response.text()
        assert notice in page and f'<html lang="{language}">' in page
        assert f">{text}</textarea>" in page and 'value="Lindenweg 3"' in page
        fresh = page_token(page)
        assert fresh != token
        harness.clock.advance(timedelta(seconds=5))
        again = await harness.client.post("/channels/webform/", data={**FORM, "message": text, "form_token": fresh},
                                          allow_redirects=False)
        assert again.status == 303
    assert await harness.count("conversations") == 3


async def test_a_rate_limited_form_comes_back_filled_in_and_json_keeps_its_error(tmp_path):
    async with CoreHarness(tmp_path / "d", settings={"webform": {"rate_limit_per_minute": 1}}) as harness:
        assert (await submit_json(harness))[0] == 201
        response = await harness.client.post("/channels/webform/", allow_redirects=False, data={
            **FORM, "message": "Noch etwas", "form_token": await get_token(harness)})
        assert response.status == 429 and response.content_type == "text/html"
        assert response.headers["Cache-Control"] == "no-store"
        page = await response.text()
        assert "in einer Minute noch einmal" in page and ">Noch etwas</textarea>" in page and "<form" in page
        status, body = await submit_json(harness, message="Und noch etwas")
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert await harness.count("conversations") == 1


async def test_a_status_page_reply_refused_for_its_token_or_the_rate_limit_keeps_its_text(tmp_path):
    async with CoreHarness(tmp_path / "d", settings={"webform": {"rate_limit_per_minute": 2}}) as harness:
        status, body = await submit_json(harness)
        path = status_path(body)
        token = await status_page_token(harness, path)
        harness.clock.advance(timedelta(days=2))  # the page left open
        response = await harness.client.post(path, data={"form_token": token, "message": "Wann <kommt> der Bagger?",
                                                         "website": ""}, allow_redirects=False)
        assert response.status == 400 and response.headers["Cache-Control"] == "no-store"
        page = await response.text()
        assert "zu lange geöffnet" in page and ">Wann &lt;kommt&gt; der Bagger?</textarea>" in page
        token = page_token(page)
        harness.clock.advance(timedelta(seconds=5))
        response = await harness.client.post(path, data={"form_token": token, "message": "Erste", "website": ""},
                                             allow_redirects=False)
        assert response.status == 303
        response = await harness.client.post(path, data={"form_token": token, "message": "Zweite", "website": ""},
                                             allow_redirects=False)
        assert response.status == 429 and response.headers["X-Robots-Tag"] == "noindex"
        page = await response.text()
        assert "in einer Minute noch einmal" in page and ">Zweite</textarea>" in page
        response = await harness.client.post(path, json={"form_token": token, "message": "Dritte", "website": ""})
        assert response.status == 429 and (await response.json())["error"]["code"] == "rate_limited"


async def test_a_status_page_reply_counts_a_line_break_once_and_keeps_a_refused_text(harness):
    """A browser sends each line break as CRLF: a reply the textarea allowed (4,999 characters)
    was counted as 5,098 and refused, and the page shown again had lost it."""
    status, body = await submit_json(harness)
    path = status_path(body)
    token = await status_page_token(harness, path)
    text = "\r\n".join(["y" * 49] * 100)
    response = await harness.client.post(path, data={"form_token": token, "message": text, "website": ""},
                                         allow_redirects=False)
    assert response.status == 303
    stored = await harness.rows("SELECT text FROM messages WHERE direction = 'in' ORDER BY id DESC LIMIT 1")
    assert stored == [{"text": text.replace("\r\n", "\n")}]
    too_long = "\r\n".join(["z" * 99] * 51)  # 5,100 characters with one per line break
    response = await harness.client.post(path, data={"form_token": token, "message": too_long, "website": ""},
                                         allow_redirects=False)
    assert response.status == 400
    page = await response.text()
    assert "Höchstens 5000 Zeichen." in page
    kept = page.split("</textarea>", 1)[0].rsplit(">", 1)[1]
    assert kept == too_long.replace("\r\n", "\n")[:5000]
    assert await harness.count("messages", "direction = 'in'") == 2


# ---------------------------------------------------------------- the form's fields


async def test_the_topic_has_an_empty_first_choice_and_an_empty_topic_is_refused_at_its_field(harness):
    """The first topic was preselected, so ``required`` never asked: a contract question went
    out as a construction case."""
    for language, choose in (("de", "– bitte wählen –"), ("en", "– please choose –")):
        page = await (await harness.client.get(f"/channels/webform/?lang={language}")).text()
        select = re.search(r"<select[^>]*>(.*?)</select>", page).group(1)
        assert select.startswith(f'<option value="" selected>{choose}</option><option value="construction">')
    status, body = await submit_json(harness, topic="")
    assert status == 400 and body["error"]["field"] == "topic"
    response = await harness.client.post("/channels/webform/", data={**FORM, "topic": "", "form_token": await get_token(harness)})
    assert response.status == 400
    page = await response.text()
    assert '<span class="error" id="topic-error">Bitte ein Thema wählen.</span>' in page
    assert '<option value="" selected>' in page
    response = await harness.client.post("/channels/webform/", data={
        **FORM, "topic": "fault", "email": "kaputt", "form_token": await get_token(harness)})
    page = await response.text()
    assert '<option value="fault" selected>' in page
    assert '<option value="">' in page and '<option value="" selected>' not in page
    assert await harness.count("messages") == 0


async def test_inputs_carry_their_limits_and_an_overlong_value_stays_in_the_form(harness):
    """No input told the browser its limit, and a value over it came back empty."""
    page = await (await harness.client.get("/channels/webform/")).text()
    for field in ("name", "email", "phone", "street", "postcode", "city", "customer_number"):
        tag = re.search(rf'<input id="{field}"[^>]*>', page).group(0)
        assert f'maxlength="{LIMITS[field]}"' in tag, field
    assert f'<textarea id="message" name="message" required maxlength="{LIMITS["message"]}"' in page
    long_name = "Erika " + "Mustermann-" * 20
    response = await harness.client.post("/channels/webform/", data={**FORM, "name": long_name,
                                                                     "form_token": await get_token(harness)})
    assert response.status == 400
    page = await response.text()
    assert f'name="name" value="{long_name[:LIMITS["name"]]}"' in page and 'id="name-error"' in page
    assert ">Baustelle vor unserem Haus" in page  # the other fields as typed
    status, body = await submit_json(harness)
    page = await (await harness.client.get(status_path(body))).text()
    assert f'maxlength="{LIMITS["message"]}"' in page


async def test_an_email_address_with_an_internationalised_domain_is_accepted_as_typed(harness):
    for typed, stored in (("info@müller-bau.de", "info@müller-bau.de"), ("Info@MÜLLER-Bau.de", "info@müller-bau.de"),
                          ("jürgen@straße.example", "jürgen@straße.example")):
        status, body = await submit_json(harness, email=typed, message=f"Frage von {typed}")
        assert status == 201, (typed, body)
        assert await harness.count("identities", "kind = 'email' AND address = ?", (stored,)) == 1, typed
    for junk in ("info@müller..de", "info@müller-bau", "info@", "@müller-bau.de", "in fo@müller-bau.de",
                 "info@müller bau.de", "info@" + "ü" * 70 + ".de", "a@b@müller-bau.de"):
        status, body = await submit_json(harness, email=junk)
        assert status == 400 and body["error"]["field"] == "email", junk


async def test_a_form_shown_again_for_its_fields_is_not_cached(harness):
    """It carries what the resident typed (name, address, message): no cache may keep it."""
    response = await harness.client.post("/channels/webform/", data={**FORM, "postcode": "12",
                                                                     "form_token": await get_token(harness)})
    assert response.status == 400 and response.headers["Cache-Control"] == "no-store"
    assert 'value="Erika Mustermann"' in await response.text()


# ---------------------------------------------------------------- the rate limit and retries


async def test_a_retried_submission_does_not_count_against_the_rate_limit(tmp_path):
    """A client retrying a submission that was stored (its answer lost) got 201, 200, 429: the
    retry changes nothing, so it is not counted; once per token, or one stored submission
    posted again and again went round the limit."""
    async with CoreHarness(tmp_path / "d", settings={"webform": {"rate_limit_per_minute": 2}}) as harness:
        body = {**FORM, "form_token": await get_token(harness)}
        statuses = [(await harness.client.post("/channels/webform/", json=body)).status for _ in range(4)]
        assert statuses == [201, 200, 200, 429]
        assert await harness.count("conversations") == 1
    async with CoreHarness(tmp_path / "f", settings={"webform": {"rate_limit_per_minute": 2}}) as harness:
        body = {**FORM, "form_token": await get_token(harness)}
        statuses = [(await harness.client.post("/channels/webform/", json=body)).status for _ in range(2)]
        statuses += [(await submit_json(harness, message=f"Neu {i}"))[0] for i in range(2)]
        assert statuses == [201, 200, 201, 429]
        assert await harness.count("conversations") == 2
    async with CoreHarness(tmp_path / "e", settings={"webform": {"rate_limit_per_minute": 3}}) as harness:
        status, created = await submit_json(harness)
        path = status_path(created)
        token = await status_page_token(harness, path)
        statuses = [(await harness.client.post(path, data={"form_token": token, "message": "Eine Frage", "website": ""},
                                               allow_redirects=False)).status for _ in range(4)]
        assert statuses == [303, 303, 303, 429]
        assert await harness.count("messages", "direction = 'in'") == 2


# ---------------------------------------------------------------- times on the status page


def _london() -> dict:
    """The example configuration with a service in London."""
    raw = load_raw_config()
    raw["service"]["timezone"] = "Europe/London"
    return raw


async def test_status_page_times_are_in_the_services_timezone_unless_the_channel_names_its_own(tmp_path):
    """The page used Europe/Berlin whatever the service's timezone, in which the
    acknowledgement tells its deadline: a London service's residents read two clocks."""
    async with CoreHarness(tmp_path / "d", config=example_config(_london())) as harness:
        status, body = await submit_json(harness)  # 08:00:05 UTC, 08:00 in London
        page = await (await harness.client.get(status_path(body))).text()
        assert "<strong>Sie</strong>, 30.11.2026, 08:00 Uhr" in page
    raw = _london()
    raw["channels"]["webform"]["timezone"] = "Asia/Tokyo"
    async with CoreHarness(tmp_path / "e", config=example_config(raw)) as harness:
        status, body = await submit_json(harness)
        page = await (await harness.client.get(status_path(body))).text()
        assert "<strong>Sie</strong>, 30.11.2026, 17:00 Uhr" in page


def test_an_unknown_channel_timezone_is_refused_at_start():
    """It made every status page a 500."""
    for value in ("Europe/Berln", "../etc/passwd", 1):
        with pytest.raises(SettingsError) as caught:
            WebFormChannel({"timezone": value})
        assert caught.value.path == "channels.webform.timezone"
    assert WebFormChannel({"timezone": ""})._timezone is None


async def test_trust_forwarded_for_false_from_the_environment_trusts_no_forwarded_address(tmp_path):
    """``{ "$env" = ... }`` hands over the string "false": ``bool("false")`` trusted
    X-Forwarded-For, and anyone could send a fresh address per post past the rate limit."""
    settings = {"webform": {"rate_limit_per_minute": "2", "trust_forwarded_for": "false"}}
    async with CoreHarness(tmp_path / "d", settings=settings) as harness:
        statuses = []
        for i in range(3):
            body = {**FORM, "message": f"Nachricht {i}", "form_token": await get_token(harness)}
            response = await harness.client.post("/channels/webform/", json=body,
                                                 headers={"X-Forwarded-For": f"198.51.100.{i}"})
            statuses.append(response.status)
        assert statuses == [201, 201, 429]


@pytest.mark.parametrize(("value", "trusted"), [("false", False), (" FALSE ", False), ("0", False), ("off", False),
                                                ("no", False), ("", False), (None, False), ("true", True), ("1", True)])
def test_trust_forwarded_for_reads_the_strings_of_the_environment(value, trusted):
    assert WebFormChannel({"trust_forwarded_for": value}).trust_forwarded is trusted


@pytest.mark.parametrize("value", [None, "", "  "])
def test_numbers_not_given_by_the_environment_are_the_defaults(value):
    """An unset variable without a default is None (``float(None)`` stopped the start) or ""."""
    keys = ("min_fill_seconds", "max_token_age_seconds", "max_body_bytes", "rate_limit_per_minute")
    channel = WebFormChannel(dict.fromkeys(keys, value))
    assert (channel.min_fill, channel.max_age, channel.max_body, channel.limiter.limit) == (3.0, 86400.0, 64 * 1024, 10)


def test_numbers_from_the_environment_are_read_beside_unset_ones():
    channel = WebFormChannel({"min_fill_seconds": "0", "max_token_age_seconds": None, "max_body_bytes": "1024",
                              "rate_limit_per_minute": ""})
    assert (channel.min_fill, channel.max_age, channel.max_body, channel.limiter.limit) == (0.0, 86400.0, 1024, 10)
    channel = WebFormChannel({"min_fill_seconds": None, "max_token_age_seconds": "3600", "max_body_bytes": "",
                              "rate_limit_per_minute": " 5 "})
    assert (channel.min_fill, channel.max_age, channel.max_body, channel.limiter.limit) == (3.0, 3600.0, 64 * 1024, 5)


@pytest.mark.parametrize(("key", "value"), [
    ("trust_forwarded_for", "ja"), ("trust_forwarded_for", 2), ("min_fill_seconds", "-1"), ("min_fill_seconds", "bald"),
    ("max_token_age_seconds", "0"), ("max_body_bytes", "64k"), ("max_body_bytes", True), ("rate_limit_per_minute", "0"),
    ("rate_limit_per_minute", 2.5), ("max_token_age_seconds", "inf"),
])
def test_a_setting_of_the_wrong_shape_is_refused_at_start_naming_its_key(key, value):
    with pytest.raises(SettingsError) as caught:
        WebFormChannel({key: value})
    assert caught.value.path == f"channels.webform.{key}"


@pytest.mark.parametrize(("value", "channels"), [("false", 0), ("FALSE", 0), ("off", 0), ("0", 0), (False, 0),
                                                 ("true", 1), ("", 1), (None, 1), (True, 1)])
def test_enabled_false_from_the_environment_registers_no_web_form(value, channels):
    """Only ``enabled is False`` switched the form off: the string "false" left it on."""
    assert len(register_channels(settings={"webform": {"enabled": value}}, topics={}) or []) == channels


def test_enabled_of_the_wrong_shape_is_refused_naming_its_key():
    with pytest.raises(SettingsError) as caught:
        register_channels(settings={"webform": {"enabled": "nein"}}, topics={})
    assert caught.value.path == "channels.webform.enabled"
