"""The OpenAPI document is served and stays true: every route is described, every described
route exists, and real responses match the described schemas."""

from __future__ import annotations

import jsonschema
from referencing import Registry, Resource

from router.inbox.openapi import openapi_document

from .helpers import webform_message


def _served_paths(app) -> set[tuple[str, str]]:
    result = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if (path.startswith("/api/") or path in ("/healthz", "/metrics")) and route.method != "HEAD":
            result.add((route.method.lower(), path))
    return result


def _validator(name: str) -> jsonschema.Draft202012Validator:
    doc = openapi_document()
    registry = Registry().with_resource("urn:openapi", Resource.from_contents({**doc, "$schema": "https://json-schema.org/draft/2020-12/schema"}))
    return jsonschema.Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{name}"}, registry=registry,
                                           format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


async def test_document_is_served_and_covers_every_route(harness):
    response = await harness.client.get("/api/v1/openapi.json")
    assert response.status == 200
    doc = await response.json()
    assert doc["openapi"].startswith("3.1")
    described = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert described == _served_paths(harness.app)


async def test_responses_match_the_described_schemas(harness):
    result = await harness.core.ingest(webform_message())
    await harness.run_outbox()
    status, listing = await harness.api("GET", "/api/v1/conversations")
    for item in listing["items"]:
        _validator("Conversation").validate(item)
    status, detail = await harness.api("GET", f"/api/v1/conversations/{result.conversation_id}")
    _validator("ConversationDetail").validate(detail)
    status, reply = await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies", json={"text": "Hallo"})
    _validator("Message").validate(reply)
    status, error = await harness.api("GET", "/api/v1/conversations/424242")
    _validator("Error").validate(error)
    status, stats = await harness.api("GET", "/api/v1/stats")
    for row in stats["items"]:
        _validator("Stat").validate(row)


async def test_notes_replies_and_a_transfer_away_answer_as_described(harness):
    """A note lacked channel and delivery_status; replies and notes wrote created_at otherwise
    than the detail does; a transfer to a unit not the caller's answered an undescribed shape."""
    case = (await harness.core.ingest(webform_message())).conversation_id
    status, note = await harness.api("POST", f"/api/v1/conversations/{case}/notes", token="hotline",
                                     json={"text": "Kolonne informiert"})
    assert status == 201
    _validator("Message").validate(note)
    status, reply = await harness.api("POST", f"/api/v1/conversations/{case}/replies", token="hotline", json={"text": "Hallo"})
    status, detail = await harness.api("GET", f"/api/v1/conversations/{case}", token="hotline")
    listed = {m["id"]: m["created_at"] for m in detail["messages"]}
    assert note["created_at"] == listed[note["id"]] and reply["created_at"] == listed[reply["id"]]
    status, away = await harness.api("POST", f"/api/v1/conversations/{case}/transfer", token="contractor",
                                     json={"unit": "vertrieb"})
    assert status == 200 and away == {"id": case, "unit": "vertrieb", "transferred": True}
    _validator("TransferResult").validate(away)
    status, here = await harness.api("POST", f"/api/v1/conversations/{case}/transfer", json={"unit": "kundenservice"})
    _validator("TransferResult").validate(here)
