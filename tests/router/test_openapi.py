"""The OpenAPI document is served and stays true: every route is described, every described
route exists, and real responses match the described schemas."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import jsonschema
import pytest
from referencing import Registry, Resource

from router import keys
from router.channel import BodyDeadline
from router.inbox.openapi import BLANK, MAX_ID, NOT_BLANK, openapi_document
from router.testing import CoreHarness

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
    # served without a token, it does not name the organisation's units (a contractor sees
    # only its own in /units)
    (unit,) = [p for p in doc["paths"]["/api/v1/conversations"]["get"]["parameters"] if p["name"] == "unit"]
    assert "enum" not in unit["schema"] and "tiefbau-muster" not in json.dumps(doc)


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


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _resolve(doc: dict, pointer: str):
    node = doc
    for part in pointer.removeprefix("#/").split("/"):
        key = part.replace("~1", "/").replace("~0", "~")
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def _at(pointer: str) -> jsonschema.Draft202012Validator:
    """A validator of the schema at ``pointer`` in the document."""
    doc = openapi_document()
    registry = Registry().with_resource("urn:openapi", Resource.from_contents({**doc, "$schema": "https://json-schema.org/draft/2020-12/schema"}))
    return jsonschema.Draft202012Validator({"$ref": f"urn:openapi{pointer}"}, registry=registry,
                                           format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def _undescribed(doc: dict, pointers: list[str], value, where: str = "") -> list[str]:
    """The keys of ``value``, and of every object in it, that no schema at ``pointers`` describes:
    properties merged across $ref and allOf, and across the oneOf branches ``value`` matches. An
    object schema without properties describes its keys only when it says so (additionalProperties:
    a channel's meta, an event's data); a bare {"type": "object"} describes none."""
    flat: list[tuple[str, dict]] = []

    def expand(pointer: str) -> None:
        schema = _resolve(doc, pointer)
        flat.append((pointer, schema))
        if "$ref" in schema:
            expand(schema["$ref"])
        for i in range(len(schema.get("allOf", ()))):
            expand(f"{pointer}/allOf/{i}")
        branches = [f"{pointer}/oneOf/{i}" for i in range(len(schema.get("oneOf", ())))]
        # the branches the value matches; all of them when it matches none (an undescribed key
        # may be why), so that the keys none of them names are reported
        for branch in [b for b in branches if _at(b).is_valid(value)] or branches:
            expand(branch)

    for pointer in pointers:
        expand(pointer)
    missing = []
    if isinstance(value, dict):
        described: dict[str, list[str]] = {}
        for pointer, schema in flat:
            for key in schema.get("properties", {}):
                described.setdefault(key, []).append(f"{pointer}/properties/{_pointer(key)[2:]}")
        free = any(schema.get("additionalProperties", False) is not False and not schema.get("properties") for _, schema in flat)
        for key, inner in value.items():
            if key in described:
                missing += _undescribed(doc, described[key], inner, f"{where}.{key}")
            elif not free:
                missing.append(f"{where}.{key}")
    elif isinstance(value, list):
        items = [f"{pointer}/items" for pointer, schema in flat if "items" in schema]
        for i, inner in enumerate(value):
            missing += _undescribed(doc, items, inner, f"{where}[{i}]")
    return missing


def _chat(kind: str, message_id: str, **extra):
    """A canonical WhatsApp message (or reaction, edit, deletion) of one resident."""
    return {"channel": "whatsapp", "channel_message_id": message_id, "kind": kind,
            "sender": {"kind": "phone", "address": "+4915111111111", "display_name": "Max Muster"}, **extra}


async def test_every_field_of_real_answers_is_described_and_matches(harness):
    """Contact (language, merged_into, created_at), Conversation (topic, subject, area, created_at,
    linked_to, ...) and Message (author, subject, edited_at, ...) left out fields every answer
    carries: a client generated from the document did not have them. Every key of every answer
    below, nested ones too, must be described where the operation's answer is, and the answer
    must match it."""
    from datetime import timedelta

    doc = openapi_document()
    form = await harness.core.ingest(webform_message())
    case = form.conversation_id
    chat = (await harness.core.ingest(_chat(
        "message", "wamid.A1", text="Foto vom Gehweg", flags=["forwarded"], meta={"referral": {"source": "ad"}},
        attachments=[{"name": "gehweg.jpg", "content_type": "image/jpeg", "size": 1024, "sha256": "ab", "media_id": "m1",
                      "url": None, "path": None, "caption": "hier"}],
        location={"lat": 52.52, "lon": 13.40, "name": "Ecke Lindenweg", "address": "Lindenweg 3"}))).conversation_id
    await harness.core.ingest(_chat("edit", "wamid.A2", target_message_id="wamid.A1", text="Foto vom Gehweg, Lindenweg"))
    await harness.core.ingest(_chat("reaction", "wamid.A3", target_message_id="wamid.A1", meta={"emoji": "👍"}))
    await harness.core.ingest(_chat("deletion", "wamid.A4", target_message_id="wamid.A1"))
    await harness.run_outbox()
    answers: list[tuple[str, str, int, object]] = []  # (method, path, status, body)

    async def call(method: str, path: str, url: str, expected: int, **kwargs) -> dict:
        status, body = await harness.api(method.upper(), url, **kwargs)
        assert status == expected, (url, status, body)
        answers.append((method, path, status, body))
        return body

    c = "/api/v1/conversations/{id}"
    await call("post", f"{c}/notes", f"/api/v1/conversations/{case}/notes", 201, json={"text": "Kolonne informiert"})
    await call("post", f"{c}/replies", f"/api/v1/conversations/{case}/replies", 201, json={"text": "Wir kommen morgen."})
    await call("post", f"{c}/callbacks", f"/api/v1/conversations/{case}/callbacks", 201,
               json={"outcome": "not_reached", "note": "Mailbox"})
    await call("post", f"{c}/assign", f"/api/v1/conversations/{case}/assign", 200, json={"assignee": "Polier Schmidt"})
    await harness.run_outbox()
    harness.clock.set(form.deadline + timedelta(minutes=1))
    assert await harness.escalate()
    await call("post", f"{c}/wait", f"/api/v1/conversations/{chat}/wait", 200)
    await call("post", f"{c}/reopen", f"/api/v1/conversations/{chat}/reopen", 200)
    for token in ("admin", "contractor"):  # with the status link, and without
        await call("get", "/api/v1/conversations", "/api/v1/conversations", 200, token=token)
        await call("get", c, f"/api/v1/conversations/{case}", 200, token=token)
    await call("get", c, f"/api/v1/conversations/{chat}", 200)
    detail = answers[-1][3]
    assert {"attachments", "location", "meta", "flags", "previous_text", "edited_at"} <= {k for m in detail["messages"] for k in m}
    assert any(m["deleted_at"] for m in detail["messages"]) and any(m["target_message_id"] for m in detail["messages"])
    contact = detail["contact"]["id"]
    form_contact = (await harness.rows("SELECT contact_id FROM conversations WHERE id = ?", (case,)))[0]["contact_id"]
    await call("get", "/api/v1/contacts/{id}", f"/api/v1/contacts/{form_contact}", 200)
    await call("post", "/api/v1/contacts/{id}/merge", f"/api/v1/contacts/{form_contact}/merge", 200,
               json={"other_contact_id": contact})
    await call("get", "/api/v1/contacts/{id}", f"/api/v1/contacts/{contact}", 200)  # merged
    await call("post", f"{c}/transfer", f"/api/v1/conversations/{case}/transfer", 200, json={"unit": "bauhotline"}, token="hotline")
    await call("post", f"{c}/transfer", f"/api/v1/conversations/{case}/transfer", 200, json={"unit": "vertrieb"}, token="hotline")
    await call("post", f"{c}/close", f"/api/v1/conversations/{case}/close", 200)
    await call("get", "/api/v1/stats", "/api/v1/stats?from=2026-01-01", 200)
    await call("get", "/api/v1/units", "/api/v1/units", 200)
    await call("get", "/api/v1/me", "/api/v1/me", 200)
    await call("get", "/healthz", "/healthz", 200, token=None)
    with harness.refusing_writes():
        await harness.api("POST", f"/api/v1/conversations/{case}/notes", json={"text": "Kolonne informiert"})
        await call("get", "/healthz", "/healthz", 503, token=None)
    for method, path, status, body in answers:
        pointer = _pointer("paths", path, method, "responses", str(status), "content", "application/json", "schema")
        _at(pointer).validate(body)
        assert not _undescribed(doc, [pointer], body), (method, path, _undescribed(doc, [pointer], body))
    # The answers above carry what they are to be checked for.
    shapes = {(m, p): b for m, p, _, b in answers}
    assert shapes[("post", f"{c}/transfer")] == {"id": case, "unit": "vertrieb", "transferred": True}
    assert shapes[("get", "/api/v1/contacts/{id}")]["merged_into"] == form_contact
    assert shapes[("get", "/api/v1/stats")]["items"] and shapes[("post", f"{c}/notes")]["conversation_id"] == case


def test_what_is_undescribed_is_found_through_refs_all_of_and_one_of():
    """The check above finds what it is for: a key no schema names, at any depth, also in an
    object described only as {"type": "object"}; and not a key one part of an allOf names."""
    doc = openapi_document()
    detail = _pointer("components", "schemas", "ConversationDetail")
    assert _undescribed(doc, [detail], {"id": 1, "messages": [{"id": 1, "zzz": 1}], "contact": {"identities": [{"x": 1}]}}) == [
        ".messages[0].zzz", ".contact.identities[0].x"]
    assert _undescribed(doc, [detail], {"events": [{"data": {"anything": 1}}], "contact": {"display_name": None}}) == []
    moved = {"id": 1, "unit": "vertrieb", "moved": True}
    assert _undescribed(doc, [_pointer("components", "schemas", "ActionResult")], moved) == []
    assert _undescribed(doc, [_pointer("components", "schemas", "ActionResult")], {**moved, "extra": 1}) == [".extra"]
    bare = {"components": {"schemas": {"X": {"type": "object", "properties": {"o": {"type": "object"}}}}}}
    assert _undescribed(bare, ["#/components/schemas/X"], {"o": {"k": 1}}) == [".o.k"]


async def test_an_action_that_was_done_answers_as_described_when_the_case_moved_on(harness, monkeypatch):
    """{id, unit, moved}: what an action answers when another request moved the conversation out
    of the caller's units after its write; each action that answers the detail names it."""
    doc = openapi_document()
    case = (await harness.core.ingest(webform_message())).conversation_id
    transfer, assign = harness.core.transfer, harness.core.assign

    async def then_moved(*args, **kwargs):
        await assign(*args, **kwargs)
        await transfer(case, "kundenservice", "", "hotline")

    monkeypatch.setattr(harness.core, "assign", then_moved)
    status, answer = await harness.api("POST", f"/api/v1/conversations/{case}/assign", token="contractor",
                                       json={"assignee": "Polier Schmidt"})
    assert status == 200 and answer == {"id": case, "unit": "kundenservice", "moved": True}
    for action in ("assign", "transfer", "close", "reopen", "wait"):
        pointer = _pointer("paths", f"/api/v1/conversations/{{id}}/{action}", "post", "responses", "200", "content",
                           "application/json", "schema")
        _at(pointer).validate(answer)
        branches = {b["$ref"] for b in _resolve(doc, _resolve(doc, pointer)["$ref"])["oneOf"] if "$ref" in b}
        assert {"#/components/schemas/ConversationDetail", "#/components/schemas/Moved"} <= branches, action
        with pytest.raises(jsonschema.ValidationError):  # neither a detail nor a transfer away
            _at(pointer).validate({**answer, "moved": False})


# What the document says a request may carry is what the server takes: checked by asking the
# server, value by value, at the bounds the document names. A client generated from the document
# then sends nothing the server refuses, and a validator refuses nothing the server would take.


def _operations(doc: dict) -> list[tuple[str, str, dict]]:
    return [(method, path, op) for path, ops in doc["paths"].items() for method, op in ops.items()]


def _parameter(op: dict, name: str) -> dict:
    (found,) = [p for p in op.get("parameters", []) if p["name"] == name]
    return found


def _body_schema(op: dict) -> dict:
    return op["requestBody"]["content"]["application/json"]["schema"]


def _ecma_pattern(validator, pattern: str, instance, schema):
    """``pattern`` as JSON Schema means it, in ECMA-262: a closing ``$`` is the end of the text
    (Python's also matches before a final newline, which jsonschema lets through)."""
    if validator.is_type(instance, "string") and not re.search(re.sub(r"\$$", r"\\Z", pattern), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_RequestValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _ecma_pattern})


def _accepts(schema: dict, value) -> bool:
    return _RequestValidator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).is_valid(value)


# A body each action takes, so that only the id decides its answer.
_BODIES = {"replies": {"text": "Hallo"}, "notes": {"text": "Notiz"}, "assign": {"assignee": "Erika"},
           "transfer": {"unit": "vertrieb"}, "callbacks": {"outcome": "not_reached"}, "merge": {"other_contact_id": 1}}


async def test_every_id_in_a_path_has_the_bounds_the_server_enforces(harness):
    """The ids had only a minimum: a client could send 2^70, which the server refuses (400 "id
    is out of range"), and a validator could not tell."""
    await harness.core.ingest(webform_message())
    doc = openapi_document()
    checked = 0
    for method, path, op in _operations(doc):
        if "{id}" not in path:
            continue
        schema = _parameter(op, "id")["schema"]
        assert schema["type"] == "integer" and schema["minimum"] == 1 and schema["maximum"] == MAX_ID
        body = _BODIES.get(path.rsplit("/", 1)[-1])
        for value, taken in ((schema["maximum"], True), (schema["maximum"] + 1, False), (schema["minimum"] - 1, False)):
            status, answer = await harness.api(method.upper(), path.replace("{id}", str(value)), json=body)
            if taken:  # nothing has that id: the lookup answers, not the check of the parameter
                assert status == 404, (method, path, value, answer)
            else:
                assert status == 400 and answer["error"]["field"] == "id", (method, path, value, answer)
        checked += 1
    assert checked == 11


async def test_contact_filter_and_merge_take_the_ids_the_document_names(harness):
    doc = openapi_document()
    contact = _parameter(doc["paths"]["/api/v1/conversations"]["get"], "contact")["schema"]
    other = _body_schema(doc["paths"]["/api/v1/contacts/{id}/merge"]["post"])["properties"]["other_contact_id"]
    assert contact["maximum"] == other["maximum"] == MAX_ID and contact["minimum"] == other["minimum"] == 1
    for value in (0, 1, MAX_ID, MAX_ID + 1):
        status, answer = await harness.api("GET", f"/api/v1/conversations?contact={value}")
        assert (status == 200) == _accepts(contact, value), (value, answer)
    await harness.core.ingest(webform_message())
    (row,) = await harness.rows("SELECT contact_id FROM conversations")
    for value in (0, -1, MAX_ID, MAX_ID + 1, "1", True, None, 2**70):
        status, answer = await harness.api("POST", f"/api/v1/contacts/{row['contact_id']}/merge", json={"other_contact_id": value})
        # 404: a contact that does not exist, once the id passed the check
        assert (status != 400) == _accepts(other, value), (value, status, answer)


async def test_stats_period_pattern_is_what_the_server_reads(harness):
    """from and to were any string: an empty one, a 30 February or the year 1 were "valid"
    and answered 400."""
    doc = openapi_document()
    op = doc["paths"]["/api/v1/stats"]["get"]
    values = [
        "", "2026-11-01", "2026-11-01T08:00", "2026-11-01T08:00:00", "2026-11-01T08:00:00Z", "2026-11-01T08:00:00.5Z",
        "2026-11-01T08:00:00.123456+01:00", "2026-11-01T08:00:00.1234567Z", "2026-11-01T08:00:00 01:00",
        "2026-11-01T08:00-05:30", "2026-11-01T08:00:00+23:59", "2026-11-01T08:00:00+24:00", "2026-11-01T08:00:00+0100",
        "2026-11-01t08:00:00z", "2026-11-01T24:00", "2026-11-01T08:60", "2026-11-01T08:00:60", "2026-11-01T8:00",
        "2026-02-28", "2026-02-29", "2024-02-29", "2000-02-29", "2100-02-29", "2026-04-31", "2026-13-01", "2026-00-10",
        "1969-12-31", "1970-01-01", "9998-12-31T23:59:59-05:00", "9999-01-01", "0001-01-01", "20261-01-01",
        "2026-11-01 08:00", "٢٠٢٦-١١-٠١", "2026-11-01\n", " 2026-11-01",
    ]
    for name in ("from", "to"):
        schema = _parameter(op, name)["schema"]
        for value in values:
            response = await harness.client.get("/api/v1/stats", params={name: value},
                                                headers={"Authorization": f"Bearer {harness.tokens['admin']}"})
            assert (response.status == 200) == _accepts(schema, value), (name, value, response.status, await response.text())
    # to must be later than from: a rule over two parameters, which the document says in words
    status, answer = await harness.api("GET", "/api/v1/stats?from=2026-11-02&to=2026-11-01")
    assert status == 400 and answer["error"]["field"] == "to" and "later than from" in op["description"]


async def test_list_filters_take_what_the_document_says(harness):
    for i in range(2):
        await harness.core.ingest(webform_message(f"Baustelle Nummer {i}"))
    status, page = await harness.api("GET", "/api/v1/conversations?limit=1")
    doc = openapi_document(tuple(harness.config.units))
    op = doc["paths"]["/api/v1/conversations"]["get"]
    cases = {
        "unit": ["vertrieb", "tiefbau-muster", "", "nope", "Vertrieb"],
        "state": ["open", "closed", "", "OPEN"],
        "channel": ["", "webform", "nope", "\x00"],
        "overdue": ["true", "false", "", "1"],
        "q": ["", "Baustelle", "K-7F3QX2", "ä" * 200, "a" * 201, "\x00"],
        "flag": ["callback_required", "", "nope"],
        "limit": [0, 1, 200, 201],
        # a cursor is opaque: of the values its pattern allows, only the server's own are taken
        "cursor": ["", page["next_cursor"], "!!", "a b"],
    }
    for name, values in cases.items():
        schema = _parameter(op, name)["schema"]
        for value in values:
            response = await harness.client.get("/api/v1/conversations", params={name: str(value)},
                                                headers={"Authorization": f"Bearer {harness.tokens['admin']}"})
            assert (response.status == 200) == _accepts(schema, value), (name, value, response.status, await response.text())
    # Without the configuration's units, a unit is described by the pattern of its id.
    unit = _parameter(openapi_document()["paths"]["/api/v1/conversations"]["get"], "unit")["schema"]
    assert "enum" not in unit and _accepts(unit, "vertrieb") and not _accepts(unit, "")
    assert _parameter(op, "unit")["schema"]["enum"] == list(harness.config.units)


async def test_request_bodies_take_what_the_document_says(harness):
    """assignee "" and a text of white space were valid in the document and answered 400; a
    transfer's unit was any string."""
    case = (await harness.core.ingest(webform_message())).conversation_id
    doc = openapi_document(tuple(harness.config.units))
    blank = ["", " ", "\x1e", "\u3000", "\u2028 \t"]
    cases = {
        "notes": ("text", ["x", " x ", "\ufeff", "a" * 20000, "a" * 20001, " " + "a" * 19999, 5, None, *blank]),
        "replies": ("text", ["Hallo", "a" * 20001, *blank]),
        "assign": ("assignee", [None, "Erika", "a" * 100, "a" * 101, " " + "a" * 100, 5, *blank]),
        "transfer": ("unit", ["vertrieb", "stoerung", "nope", "", 5, "Vertrieb"]),
        "callbacks": ("note", [None, "", "angerufen", "a" * 5000, "a" * 5001, 5]),
    }
    for action, (field, values) in cases.items():
        op = doc["paths"][f"/api/v1/conversations/{{id}}/{action}"]["post"]
        schema = _body_schema(op)
        base = {**_BODIES[action]}
        for value in values:
            body = {**base, field: value}
            status, answer = await harness.api("POST", f"/api/v1/conversations/{case}/{action}", json=body)
            # 409: the body was taken and the state refused it (a transfer to the unit it has)
            assert status in (200, 201, 400, 409), (action, value, status, answer)
            assert (status != 400) == _accepts(schema, body), (action, field, value, status, answer)
        # Properties the document does not name are ignored, as it says.
        assert schema["additionalProperties"] is True
        status, answer = await harness.api("POST", f"/api/v1/conversations/{case}/{action}",
                                           json={**base, "unbekannt": {"x": [1]}, "": None})
        assert status in (200, 201, 409), (action, answer)
    for action, field in (("transfer", "reason"), ("assign", "assignee")):
        schema = _body_schema(doc["paths"][f"/api/v1/conversations/{{id}}/{action}"]["post"])
        assert field in schema["properties"]
    # A field left out that is required is a 400, as the document's "required" says.
    for action, (field, _) in cases.items():
        op = doc["paths"][f"/api/v1/conversations/{{id}}/{action}"]["post"]
        if field in _body_schema(op)["required"]:
            status, answer = await harness.api("POST", f"/api/v1/conversations/{case}/{action}", json={})
            assert status == 400 and answer["error"]["field"] == field


def test_the_blank_pattern_is_what_str_strip_takes_away():
    """The pattern names the white space itself: ECMA-262's \\s, which a client's validator
    would use, is not Python's."""
    every = "".join(map(chr, range(0x110000)))
    assert re.sub(NOT_BLANK, "", every) == "".join(c for c in every if c.isspace())
    assert re.sub(f"[{BLANK}]", "", " \u3000\x1cx\ufeff\t") == "x\ufeff"


async def test_idempotency_key_reused_is_documented_where_the_server_answers_it(harness):
    """The 422 of a key sent again with another request was answered but not listed; and only
    the actions that take a key answer it."""
    doc = openapi_document()
    second = {"replies": {"text": "Anders"}, "notes": {"text": "Anders"}, "assign": {"assignee": "Max"},
              "transfer": {"unit": "stoerung"}, "callbacks": {"outcome": "not_reached", "note": "anders"}}
    takes_key = set()
    for method, path, op in _operations(doc):
        if method != "post" or not path.startswith("/api/v1/conversations/"):
            continue
        action = path.rsplit("/", 1)[-1]
        declared = any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in op["parameters"])
        case = (await harness.core.ingest(webform_message(email=f"{action}@example.net"))).conversation_id
        answers = []
        for body in (_BODIES.get(action), second.get(action)):
            status, answer = await harness.api("POST", path.replace("{id}", str(case)), json=body,
                                               headers={"Idempotency-Key": f"key-{action}"})
            answers.append((status, answer))
        status, answer = answers[1]
        assert (status == 422) == declared, (path, answers)
        if declared:
            takes_key.add(action)
            assert answer["error"]["code"] == "idempotency_key_reused" and answer["error"]["field"] == "Idempotency-Key"
            assert op["responses"]["422"] == {"$ref": "#/components/responses/KeyReused"}
            _validator("Error").validate(answer)
        else:
            assert "422" not in op["responses"]
    assert takes_key == {"replies", "notes", "callbacks"}


@pytest.fixture
async def quick_harness(tmp_path) -> AsyncIterator[CoreHarness]:
    """A harness whose body deadline runs out in a blink."""
    harness = CoreHarness(tmp_path / "data")
    harness.app[keys.BODY_DEADLINE] = BodyDeadline(0.2, 500.0)
    async with harness:
        yield harness


async def test_every_error_the_server_gives_is_documented_with_the_error_body(quick_harness):
    harness = quick_harness
    case = (await harness.core.ingest(webform_message())).conversation_id
    contact = (await harness.rows("SELECT contact_id FROM conversations"))[0]["contact_id"]
    doc = openapi_document()
    c = f"/api/v1/conversations/{case}"
    huge = b'{"text": "' + b"a" * (1024 * 1024) + b'"}'
    provocations = [
        ("get", "/api/v1/conversations", "/api/v1/conversations?state=nope", {}, 400),
        ("get", "/api/v1/conversations", "/api/v1/conversations", {"token": None}, 401),
        ("get", "/api/v1/conversations/{id}", "/api/v1/conversations/x", {}, 400),
        ("get", "/api/v1/conversations/{id}", "/api/v1/conversations/424242", {}, 404),
        ("post", "/api/v1/conversations/{id}/notes", f"{c}/notes", {"data": b"{", "headers": {"Content-Type": "application/json"}}, 400),
        ("post", "/api/v1/conversations/{id}/notes", f"{c}/notes", {"data": b"{}", "headers": {"Content-Type": "text/plain"}}, 400),
        ("post", "/api/v1/conversations/{id}/notes", f"{c}/notes", {"json": {"text": "x"}, "headers": {"Idempotency-Key": "a b"}}, 400),
        ("post", "/api/v1/conversations/{id}/notes", f"{c}/notes", {"data": huge, "headers": {"Content-Type": "application/json"}}, 413),
        ("post", "/api/v1/conversations/{id}/replies", "/api/v1/conversations/424242/replies", {"json": {"text": "x"}}, 404),
        ("post", "/api/v1/conversations/{id}/transfer", f"{c}/transfer", {"json": {"unit": "tiefbau-muster"}}, 409),
        ("post", "/api/v1/conversations/{id}/reopen", f"{c}/reopen", {}, 409),
        ("post", "/api/v1/conversations/{id}/close", f"{c}/close", {}, 200),
        ("post", "/api/v1/conversations/{id}/close", f"{c}/close", {}, 409),
        ("post", "/api/v1/conversations/{id}/wait", f"{c}/wait", {}, 409),
        ("post", "/api/v1/contacts/{id}/merge", f"/api/v1/contacts/{contact}/merge", {"json": {"other_contact_id": contact}}, 409),
        ("post", "/api/v1/contacts/{id}/merge", f"/api/v1/contacts/{contact}/merge", {"json": {"other_contact_id": 424242}}, 404),
        ("get", "/api/v1/contacts/{id}", "/api/v1/contacts/424242", {}, 404),
        ("get", "/api/v1/stats", "/api/v1/stats?from=2026-11-01&from=2026-11-02", {}, 400),
        ("get", "/api/v1/units", "/api/v1/units", {"token": "nobody"}, 401),
        ("get", "/api/v1/me", "/api/v1/me", {"token": None}, 401),
    ]
    for method, path, url, kwargs, expected in provocations:
        status, answer = await harness.api(method.upper(), url, **kwargs)
        assert status == expected, (url, status, answer)
        responses = doc["paths"][path][method]["responses"]
        assert str(status) in responses, (method, path, status)
        if status >= 400:
            _validator("Error").validate(answer)
    with harness.refusing_writes():
        status, answer = await harness.api("POST", f"{c}/reopen")
    assert status == 503 and "503" in doc["paths"]["/api/v1/conversations/{id}/reopen"]["post"]["responses"]
    _validator("Error").validate(answer)
    reader, writer = await harness.stalled_request(f"{c}/notes", b'{"text": "Rufe', declared=400,
                                                   headers={"Authorization": f"Bearer {harness.tokens['admin']}"})
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408") and "408" in doc["paths"]["/api/v1/conversations/{id}/notes"]["post"]["responses"]
    # Every error answer an operation lists has the one error body; a body is read (408, 413)
    # only by the operations that take one, and 409 only where the state can refuse.
    components = doc["components"]["responses"]
    for _, path, op in _operations(doc):
        for status, response in op["responses"].items():
            if path.startswith("/api/v1/") and int(status) >= 400:
                resolved = components[response["$ref"].rsplit("/", 1)[-1]]
                assert resolved["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
        assert ("408" in op["responses"]) == ("requestBody" in op) == ("413" in op["responses"]), path
    conflicts = {path for method, path, op in _operations(doc) if "409" in op["responses"]}
    assert conflicts == {f"/api/v1/conversations/{{id}}/{a}" for a in ("transfer", "close", "reopen", "wait")} | {
        "/api/v1/contacts/{id}/merge"}


async def test_a_method_a_path_does_not_take_answers_405_with_allow(harness):
    """RFC 9110 requires the Allow header on a 405; the JSON error answer dropped the one
    aiohttp's exception carries."""
    for method, path, allowed in (("TRACE", "/api/v1/me", {"GET", "HEAD"}), ("DELETE", "/api/v1/conversations/1/close", {"POST"}),
                                  ("PUT", "/healthz", {"GET", "HEAD"}), ("TRACE", "/api/v1/conversations/1", {"GET", "HEAD"})):
        response = await harness.client.request(method, path, headers={"Authorization": f"Bearer {harness.tokens['admin']}"})
        assert response.status == 405
        assert set(response.headers["Allow"].split(",")) == allowed, (method, path, response.headers.get("Allow"))
        assert (await response.json())["error"]["code"] == "method_not_allowed"
