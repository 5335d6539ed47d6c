"""The web form at its edges: a token at exactly its limits or altered, a value at exactly its
field's limit, what was typed shown again, languages not offered, the rate limit per client."""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import urlencode

from plugins.webform.fields import LIMITS
from router.testing import CoreHarness
from tests.plugins.webform.test_channel import (
    FORM,
    FORM_TYPE,
    get_token,
    page_token,
    status_page_token,
    status_path,
    submit_json,
)


async def fresh_token(harness: CoreHarness) -> str:
    """A form token as handed out, the clock not moved."""
    return (await (await harness.client.get("/channels/webform/token")).json())["form_token"]


async def post_json(harness: CoreHarness, token: str, **changes: object) -> tuple[int, dict]:
    response = await harness.client.post("/channels/webform/", json={**FORM, "form_token": token, **changes})
    return response.status, await response.json()


# ---------------------------------------------------------------- the token


async def test_the_token_endpoint_tells_the_fill_time_and_the_age_it_is_held_to(harness):
    body = await (await harness.client.get("/channels/webform/token")).json()
    assert (body["min_fill_seconds"], body["max_age_seconds"]) == (3.0, 86400.0)


async def test_a_token_is_taken_from_exactly_the_minimum_fill_time_to_exactly_a_day(harness):
    """Refused when younger than the fill time or older than a day: at exactly either, taken."""
    for wait, expected in ((2, "too_fast"), (3, None), (86400, None), (86401, "token_expired")):
        token = await fresh_token(harness)
        harness.clock.advance(timedelta(seconds=wait))
        status, body = await post_json(harness, token, message=f"Nach {wait} Sekunden")
        if expected is None:
            assert status == 201, (wait, body)
        else:
            assert status == 400 and body["error"]["code"] == expected, (wait, body)
    assert await harness.count("conversations") == 2


async def test_a_fill_time_of_zero_takes_a_form_sent_at_once(tmp_path):
    """``min_fill_seconds = 0`` turns the check off: a token sent in the second it was handed
    out is taken."""
    async with CoreHarness(tmp_path / "d", settings={"webform": {"min_fill_seconds": 0}}) as harness:
        status, body = await post_json(harness, await fresh_token(harness))
        assert status == 201, body


async def test_a_token_with_its_time_nonce_or_signature_altered_is_refused(harness):
    """The signature covers when the token was handed out (or an old token made young again
    outlives its day, and a new one made old skips the fill time) and all of itself."""
    token = await fresh_token(harness)
    issued, nonce, signature = token.split(".")
    last = "A" if signature[-1] != "A" else "B"
    altered = (
        f"{int(issued) - 10}.{nonce}.{signature}",  # made old enough to skip the fill time
        f"{int(issued) + 10}.{nonce}.{signature}",
        f"{issued}.{nonce[:-1]}{'x' if nonce[-1] != 'x' else 'y'}.{signature}",
        f"{issued}.{nonce}.{signature[:-1]}{last}",
        f"{issued}.{nonce}.{signature[:-1]}",
    )
    harness.clock.advance(timedelta(seconds=5))
    for forged in altered:
        status, body = await post_json(harness, forged)
        assert status == 400 and body["error"]["code"] == "invalid_token", forged
    assert await harness.count("messages") == 0
    assert (await post_json(harness, token))[0] == 201


async def test_a_status_pages_token_is_refused_on_another_cases_page_and_on_the_form(harness):
    """A reply box's token belongs to its own case's page."""
    status, first = await submit_json(harness, message="Erster Fall")
    status, second = await submit_json(harness, message="Zweiter Fall")
    token = await status_page_token(harness, status_path(first))
    response = await harness.client.post(status_path(second), json={"form_token": token, "message": "Fremd", "website": ""})
    assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_token"
    assert (await post_json(harness, token))[1]["error"]["code"] == "invalid_token"
    form_token = await get_token(harness)
    response = await harness.client.post(status_path(first), json={"form_token": form_token, "message": "Fremd",
                                                                   "website": ""})
    assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_token"
    assert await harness.count("messages", "direction = 'in'") == 2


async def test_a_reply_on_the_status_page_waits_a_second_not_the_forms_fill_time(harness):
    """A short reply ("Danke!") is written in a moment: the reply box needs one second, not
    the form's three."""
    status, body = await submit_json(harness)
    path = status_path(body)
    token = page_token(await (await harness.client.get(path)).text())
    response = await harness.client.post(path, json={"form_token": token, "message": "Danke!", "website": ""})
    assert response.status == 400 and (await response.json())["error"]["code"] == "too_fast"
    harness.clock.advance(timedelta(seconds=1))
    response = await harness.client.post(path, json={"form_token": token, "message": "Danke!", "website": ""})
    assert response.status == 201


# ---------------------------------------------------------------- the fields


async def test_a_value_of_exactly_its_fields_limit_is_taken(harness):
    at_limit = {field: "a" * LIMITS[field] for field in ("name", "street", "city")}
    status, body = await submit_json(harness, **at_limit, message="m" * LIMITS["message"])
    assert status == 201, body
    token = await status_page_token(harness, status_path(body))
    response = await harness.client.post(status_path(body), data={"form_token": token, "website": "",
                                                                  "message": "r" * LIMITS["message"]},
                                         allow_redirects=False)
    assert response.status == 303
    texts = [r["text"] for r in await harness.rows("SELECT text FROM messages WHERE direction = 'in' ORDER BY id")]
    assert texts == ["m" * LIMITS["message"], "r" * LIMITS["message"]]


async def test_a_json_field_that_is_no_text_is_refused_at_its_field(harness):
    for changes in ({"name": 5}, {"message": ["Baustelle"]}, {"city": {"de": "Musterstadt"}}, {"topic": True}):
        status, body = await submit_json(harness, **changes)
        field = next(iter(changes))
        assert status == 400 and body["error"]["field"] == field, (changes, body)
    assert await harness.count("messages") == 0


async def test_what_was_typed_is_escaped_in_the_form_shown_again(harness):
    """The form shown again writes back what was typed, and a notice the charset the request
    named: none of it may become markup."""
    typed = {"name": '"><script>alert(1)</script>', "city": "Muster & <Stadt>",
             "message": "</textarea><script>alert(2)</script>"}
    response = await harness.client.post("/channels/webform/", data={**FORM, **typed, "email": "kaputt",
                                                                     "form_token": await get_token(harness)})
    assert response.status == 400
    page = await response.text()
    assert "<script>" not in page
    assert 'value="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in page
    assert 'value="Muster &amp; &lt;Stadt&gt;"' in page
    assert ">&lt;/textarea&gt;&lt;script&gt;alert(2)&lt;/script&gt;</textarea>" in page
    raw = urlencode({**FORM, "form_token": await get_token(harness)}).encode()
    response = await harness.client.post("/channels/webform/", data=raw,
                                         headers={"Content-Type": f'{FORM_TYPE}; charset="<img src=x>"'})
    assert response.status == 400
    page = await response.text()
    assert "<img" not in page and "(&lt;img src=x&gt;)" in page


# ---------------------------------------------------------------- languages


async def test_a_language_not_offered_falls_back_and_is_never_written_into_a_page(harness):
    """``lang`` and a posted ``language`` pick German or English; anything else is ignored,
    not a 500 and not markup in the page."""
    bad = '"><script>x</script>'
    for path in ("/channels/webform/?lang=" + bad, "/channels/webform/?lang=fr"):
        response = await harness.client.get(path)
        assert response.status == 200 and '<html lang="de">' in await response.text()
    status, body = await submit_json(harness, language="fr")
    assert status == 201, body
    page_response = await harness.client.get(status_path(body), params={"lang": bad})
    page = await page_response.text()
    assert page_response.status == 200 and '<html lang="de">' in page and "<script>" not in page
    response = await harness.client.post("/channels/webform/", data={**FORM, "language": bad, "email": "kaputt",
                                                                     "form_token": await get_token(harness)})
    page = await response.text()
    assert response.status == 400 and '<html lang="de">' in page and "<script>" not in page
    response = await harness.client.post("/channels/webform/", data={**FORM, "language": "en", "email": "kaputt",
                                                                     "form_token": await get_token(harness)})
    assert '<html lang="en">' in await response.text()


# ---------------------------------------------------------------- the rate limit


async def test_behind_a_proxy_each_client_has_a_limit_of_its_own(tmp_path):
    """One resident at the limit does not stop another behind the same proxy."""
    settings = {"webform": {"rate_limit_per_minute": 1, "trust_forwarded_for": True}}
    async with CoreHarness(tmp_path / "d", settings=settings) as harness:
        statuses = []
        for i, client in enumerate(("198.51.100.7", "198.51.100.7", "203.0.113.9")):
            body = {**FORM, "message": f"Nachricht {i}", "form_token": await get_token(harness)}
            response = await harness.client.post("/channels/webform/", json=body, headers={"X-Forwarded-For": client})
            statuses.append(response.status)
        assert statuses == [201, 429, 201]


async def test_only_json_and_url_encoded_bodies_are_read(harness):
    """A JSON-like type other than ``application/json`` is not read as JSON."""
    body = json.dumps({**FORM, "form_token": await get_token(harness)})
    for content_type in ("application/ld+json", "text/json", "application/json-seq"):
        response = await harness.client.post("/channels/webform/", data=body, headers={"Content-Type": content_type})
        assert response.status == 415, content_type
    assert await harness.count("messages") == 0


async def test_a_cases_page_and_a_reply_on_it_keep_the_cases_language_whatever_the_browser_says(harness):
    """The link in an English acknowledgement opens an English page in a German browser, and a
    reply written there (long after the case closed, so it opens a case of its own) is
    filed in English too."""
    status, body = await submit_json(harness, language="en", message="The pavement has been closed for weeks.")
    assert status == 201
    path = status_path(body)
    german = {"Accept-Language": "de-DE,de;q=0.9"}
    page = await (await harness.client.get(path, headers=german)).text()
    assert '<html lang="en">' in page and "Your case" in page
    await harness.api("POST", f"/api/v1/conversations/{body['conversation_id']}/close")
    harness.clock.advance(timedelta(days=60))
    token = await status_page_token(harness, path)
    response = await harness.client.post(path, data={"form_token": token, "message": "The digger is back.",
                                                     "website": ""}, headers=german, allow_redirects=False)
    assert response.status == 303
    rows = await harness.rows("SELECT language FROM conversations WHERE linked_to = ?", (body["conversation_id"],))
    assert rows == [{"language": "en"}]


async def test_a_body_with_more_fields_than_any_form_of_ours_is_refused(harness):
    body = urlencode({**FORM, "form_token": await get_token(harness),
                      **{f"extra{i}": "x" for i in range(60)}}).encode()
    response = await harness.client.post("/channels/webform/", data=body, headers={"Content-Type": FORM_TYPE},
                                         allow_redirects=False)
    assert response.status == 400 and "could not be read" in await response.text()
    assert await harness.count("messages") == 0


async def test_a_double_submit_at_the_rate_limit_answers_with_the_first_submissions_case(tmp_path):
    """The second click of a double submit that reached the limit answered 429 with the form
    again and a fresh token: the case was stored, and sending the form again a minute later
    opened a second one. A resend of a stored submission answers as the first did (once per
    token; later resends count)."""
    async with CoreHarness(tmp_path / "d", settings={"webform": {"rate_limit_per_minute": 1}}) as harness:
        body = {**FORM, "form_token": await get_token(harness)}
        first = await harness.client.post("/channels/webform/", data=body, allow_redirects=False)
        second = await harness.client.post("/channels/webform/", data=body, allow_redirects=False)
        assert (first.status, second.status) == (303, 303)
        assert second.headers["Location"] == first.headers["Location"]
        third = await harness.client.post("/channels/webform/", data=body, allow_redirects=False)
        assert third.status == 429
        assert await harness.count("conversations") == 1
    async with CoreHarness(tmp_path / "e", settings={"webform": {"rate_limit_per_minute": 2}}) as harness:
        status, created = await submit_json(harness)
        path = status_path(created)
        reply = {"form_token": await status_page_token(harness, path), "message": "Noch eine Frage", "website": ""}
        statuses = [(await harness.client.post(path, data=reply, allow_redirects=False)).status for _ in range(3)]
        assert statuses == [303, 303, 429]
        assert await harness.count("messages", "direction = 'in'") == 2
