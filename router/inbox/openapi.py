"""The OpenAPI 3.1 document of the shared inbox API, served at ``/api/v1/openapi.json``.

Written by hand and kept true by tests: every route is described and every described route
exists, real responses match the described schemas, and what the document says a parameter or
a body field accepts is what the server takes (``tests/router/test_openapi.py`` asks the
server at each bound). A generated client or a validator built from it agrees with the server."""

from __future__ import annotations

from functools import cache
from typing import Any

from ..tracking import FLAGS

MAX_ID = 2**62
"""The largest id a path, ``contact`` or ``other_contact_id`` takes (``api._int_param``); above
it the server answers 400 "out of range" before it looks anything up."""

# What str.strip() takes away (str.isspace(), 29 characters), spelt out: JSON Schema patterns
# are ECMA-262, whose \s is another set (it has U+FEFF, lacks U+001C-U+001F and U+0085).
BLANK = r"\t\n\v\f\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK = f"[^{BLANK}]"
"""A pattern that a text matches when it has something besides white space: the server strips
a text and refuses what is left empty."""

# /api/v1/stats' from and to, as api._MOMENT and datetime.fromisoformat take them: a date of the
# years 1970 to 9998 that exists (a 29 February only in a leap year), or a date and time, to
# the minute, second or microsecond, with Z, an offset or none ("t" and "z" in lower case too, as
# RFC 3339 allows). In a URL's query a "+" is a
# space; the server reads that space as the "+" it was.
_YEAR = r"(?:19[7-9][0-9]|[2-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])"
_LEAP_YEAR = r"(?:19(?:7[26]|8[048]|9[26])|[2-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[2468][048]|[3579][26])00)"
_DATE = (rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         rf"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)")
_TIME = r"[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]{1,6})?)?(?:[Zz]|[+ -](?:[01][0-9]|2[0-3]):[0-5][0-9])?"
MOMENT = f"^{_DATE}(?:{_TIME})?$"

# A unit's id as the configuration's schema allows it (router/schemas/config.schema.json).
_UNIT_ID = "^[a-z][a-z0-9_-]{0,63}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _response(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


# The answers that are not the operation's own, by status; each has the Error body.
_ANSWERS = {"400": "BadRequest", "401": "Unauthorized", "403": "Forbidden", "404": "NotFound", "408": "BodyTimeout", "409": "Conflict",
            "413": "TooLarge", "422": "KeyReused", "503": "Unavailable"}


def _errors(*statuses: str) -> dict[str, Any]:
    return {status: _response(_ANSWERS[status]) for status in statuses}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "description": "A JSON object (Content-Type: application/json, at most 1 MiB). Properties"
            " not described here are ignored.", "content": {"application/json": {"schema": schema}}}


def _object(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    # Unknown properties are ignored (a newer client's field does not break an older server).
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": True}


_ID_VALUE = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
_ID = [{"name": "id", "in": "path", "required": True, "schema": _ID_VALUE}]


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"},
    "description": "Sent again with the same key (within 24 hours, with the same token), the action is not done"
                   " again: the first answer comes back, with the header Idempotent-Replayed: true. The same key with"
                   " another request is a 422 idempotency_key_reused.",
}
_REPLAYED = {"Idempotent-Replayed": {"description": "true: the answer to this key's first request, given again",
                                     "schema": {"const": "true"}}}


def _action(
    summary: str, body: dict[str, Any] | None = None, status: str = "200", result: str = "ActionResult",
    *, idempotent: bool = False, conflict: bool = False,
) -> dict[str, Any]:
    """A POST on one conversation. Every one may answer 400 (the id), 401, 404 and 503 (the
    database refuses writes); one with a body also 408 and 413 (and 400 for its fields); one
    that takes an Idempotency-Key also 422; one that depends on the conversation's state
    (``conflict``) also 409. A 404 changes nothing: an action that was done answers its result,
    the detail (``ActionResult``) or, when another request moved the conversation out of the
    caller's units before the detail was read, ``{id, unit, moved}``."""
    statuses = ["400", "401", "404"]
    if body is not None:
        statuses += ["408", "413"]
    if conflict:
        statuses.append("409")
    if idempotent:
        statuses.append("422")
    op: dict[str, Any] = {"summary": summary, "parameters": _ID,
                          "responses": {status: _json(_ref(result)), **_errors(*sorted(statuses), "503")}}
    if body is not None:
        op["requestBody"] = _body(body)
    if idempotent:
        op["parameters"] = [*_ID, _IDEMPOTENCY_KEY]
        op["responses"][status] = {**op["responses"][status], "headers": _REPLAYED}
    return {"post": op}


def _text(max_length: int, description: str, *, nullable: bool = False) -> dict[str, Any]:
    return {"type": ["string", "null"] if nullable else "string", "minLength": 1, "maxLength": max_length,
            "pattern": NOT_BLANK, "description": description}


def _unit(unit_ids: tuple[str, ...], description: str) -> dict[str, Any]:
    """A configured unit's id: their list when the document is made for a configuration."""
    if unit_ids:
        return {"type": "string", "enum": list(unit_ids), "description": description}
    return {"type": "string", "pattern": _UNIT_ID,
            "description": f"{description} The id of a unit of the service's configuration (an admin's GET /api/v1/units"
                           " lists them all); another is a 400."}


def _record(required: list[str], properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An object the server answers, with every field it carries: ``required`` those it always
    carries (tests check that every field of real answers is described here)."""
    assert set(required) <= set(properties), set(required) - set(properties)
    return {"type": "object", "required": required, "properties": properties, **extra}


def _free(description: str) -> dict[str, Any]:
    """An object whose keys are not the API's own (a channel's details, an event's data)."""
    return {"type": "object", "additionalProperties": True, "description": description}


_AT = {"type": "string", "format": "date-time", "description": "UTC, as 2026-11-30T08:00:00Z (with a fraction of a"
       " second when it has one, up to six digits)."}
_AT_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_STRING_OR_NULL = {"type": ["string", "null"]}
_STATE = {"enum": ["open", "acknowledged", "answered", "waiting", "closed"]}
_CALLBACK_OUTCOME = {"enum": ["reached", "not_reached", "wrong_number"]}

_CONTACT_SUMMARY_FIELDS = {
    "id": {"type": "integer"}, "display_name": _STRING_OR_NULL, "is_customer": {"type": "boolean"},
    "customer_number": _STRING_OR_NULL,
    "customer_claim": {**_STRING_OR_NULL, "description": "A customer number the contact gave that the directory did not confirm."},
}
_IDENTITIES = {"type": "array", "items": _ref("Identity")}

# Fields of a message beyond those every answer with a message carries.
_MESSAGE_DETAIL = ["subject", "language", "edited_at", "deleted_at", "target_message_id", "deliveries"]

_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}}},
    "Identity": _record(["kind", "address", "last_inbound_at", "failed", "claimed"], {
        "kind": {"type": "string"}, "address": {"type": "string"}, "last_inbound_at": _AT_OR_NULL,
        "failed": {"type": "boolean", "description": "A provider refused the address for good."},
        "claimed": {"type": "boolean", "description": "Only typed into a web form beside another address; its owner has"
                    " not written from it yet, and it serves only this contact's form cases."}}),
    "ContactSummary": _record(list(_CONTACT_SUMMARY_FIELDS), _CONTACT_SUMMARY_FIELDS,
                              description="The contact as a conversation names it."),
    "Contact": {"allOf": [_ref("ContactSummary"), _record(["language", "merged_into", "created_at", "identities"], {
        "language": _STRING_OR_NULL,
        "merged_into": {"type": ["integer", "null"], "description": "The contact this one was merged into (its identities and"
                        " conversations went there; it has none left): answered to staff who see that contact's conversations."
                        " null: not merged."},
        "created_at": _AT, "identities": _IDENTITIES})]},
    "Conversation": _record(
        ["id", "case_reference", "channel", "unit", "state", "topic", "language", "subject", "area", "assignee", "flags",
         "contact", "deadline", "overdue", "escalation_level", "linked_to", "created_at", "updated_at", "last_inbound_at",
         "first_answered_at"], {
            "id": {"type": "integer"}, "case_reference": {"type": "string", "pattern": "^K-[2-9A-HJ-NP-Z]{6}$"},
            "channel": {"type": "string"}, "unit": {"type": "string"}, "state": _STATE,
            "topic": _STRING_OR_NULL, "language": {"type": "string"}, "subject": _STRING_OR_NULL,
            "area": {**_STRING_OR_NULL, "description": "The configured area the routing placed it in."},
            "assignee": _STRING_OR_NULL, "flags": {"type": "array", "items": {"type": "string"}},
            "contact": _ref("ContactSummary"), "deadline": _AT_OR_NULL, "overdue": {"type": "boolean"},
            "escalation_level": {"type": "integer"},
            "linked_to": {"type": ["integer", "null"], "description": "The conversation this one follows or belongs with:"
                          " one settled too long ago to reopen, one a case reference named, or the sender's case on another"
                          " chat (routing rule open-case)."},
            "created_at": _AT, "updated_at": _AT, "last_inbound_at": _AT_OR_NULL, "first_answered_at": _AT_OR_NULL}),
    "Delivery": _record(["channel", "to", "state", "attempts", "delivery_status", "last_error", "next_attempt_at"], {
        "channel": {"type": "string"}, "to": {"type": "string"},
        "state": {"enum": ["pending", "sending", "sent", "failed"], "description": "the outbox row's"},
        "attempts": {"type": "integer"}, "delivery_status": _STRING_OR_NULL, "last_error": _STRING_OR_NULL,
        "next_attempt_at": {**_AT_OR_NULL, "description": "When the next attempt is due: only while pending."}}),
    "Message": _record(["id", "direction", "kind", "channel", "author", "text", "created_at", "delivery_status"], {
        "id": {"type": "integer"},
        "conversation_id": {"type": "integer", "description": "In the answer to POST replies and notes."},
        "direction": {"enum": ["in", "out", "internal"]},
        "kind": {"type": "string", "description": "message, reply, note, ack, notification, callback, reaction, edit, deletion, ..."},
        "channel": {"type": "string"}, "author": {**_STRING_OR_NULL, "description": "The staff member of a reply or a note."},
        "subject": _STRING_OR_NULL, "text": _STRING_OR_NULL, "language": _STRING_OR_NULL, "created_at": _AT,
        "delivery_status": {"type": ["string", "null"], "enum": [None, "queued", "sent", "delivered", "read", "failed"]},
        "edited_at": _AT_OR_NULL, "deleted_at": {**_AT_OR_NULL, "description": "When its sender deleted it (staff still see it)."},
        "target_message_id": {"type": ["integer", "null"], "description": "The message a reaction, edit or deletion is about."},
        "attachments": {"type": "array", "items": {"type": "object", "properties": {
            "name": _STRING_OR_NULL, "content_type": _STRING_OR_NULL, "size": {"type": ["integer", "null"]},
            "sha256": _STRING_OR_NULL, "media_id": _STRING_OR_NULL, "url": _STRING_OR_NULL,
            "path": {**_STRING_OR_NULL, "description": "Where the service's data folder keeps the bytes."},
            "caption": _STRING_OR_NULL}}, "description": "Inbound, when it has some."},
        "location": {"type": "object", "required": ["lat", "lon"], "properties": {
            "lat": {"type": "number"}, "lon": {"type": "number"}, "name": _STRING_OR_NULL, "address": _STRING_OR_NULL},
            "description": "Inbound, when the sender shared one."},
        "address": {"type": "object", "properties": {"street": _STRING_OR_NULL, "postcode": _STRING_OR_NULL, "city": _STRING_OR_NULL},
                    "description": "Inbound, a postal address the sender gave (form fields)."},
        "meta": _free("Inbound, a channel's details kept for staff (reaction emoji, referral, errors, ...)."),
        "flags": {"type": "array", "items": {"type": "string"}, "description": "Inbound, the message's markers for staff."},
        "previous_text": {**_STRING_OR_NULL, "description": "An edit's: what the edited message said before it."},
        "deliveries": {"type": "array", "items": _ref("Delivery"),
                       "description": "In the conversation's detail (empty for a message that went nowhere): one per address"
                                      " an outbound message went to."}}),
    "PostedMessage": {"allOf": [_ref("Message"), {"type": "object", "required": ["conversation_id"]}]},
    "ConversationDetail": {"allOf": [_ref("Conversation"), _record(
        ["contact", "routing", "messages", "pending_deliveries", "escalations", "events", "callbacks"], {
            "contact": {"allOf": [_ref("ContactSummary"), _record(["identities"], {"identities": _IDENTITIES})]},
            "status_url": {"type": ["string", "null"], "description": "The resident's status page: not for staff of external units; null while no web form channel is on to serve it."},
            "routing": _record(["rule", "reason"], {"rule": {"type": "string"}, "reason": {"type": "string"}}),
            "messages": {"type": "array", "items": {"allOf": [_ref("Message"), {"type": "object", "required": _MESSAGE_DETAIL}]},
                         "description": "Oldest first. A reaction replaced by a later one of its sender is not listed, nor an"
                                        " edit that arrived after a later edit of the same message had taken effect (it never"
                                        " took effect)."},
            "pending_deliveries": {"type": "integer"},
            "escalations": {"type": "array", "items": _record(["level", "from_unit", "to_unit", "reason", "at"], {
                "level": {"type": "integer"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"},
                "reason": {"type": "string"}, "at": _AT})},
            "events": {"type": "array", "items": _record(["kind", "actor", "data", "at"], {
                "kind": {"type": "string"}, "actor": _STRING_OR_NULL, "data": _free("The event's details."), "at": _AT})},
            "callbacks": {"type": "array", "items": _ref("CallbackAttempt")}})]},
    "Moved": {
        "type": "object", "required": ["id", "unit", "moved"], "additionalProperties": False,
        "description": "The action was done, but another request (a transfer, an escalation) moved the conversation out of"
                       " the caller's units before its detail was read: where it is now.",
        "properties": {"id": {"type": "integer"}, "unit": {"type": "string"}, "moved": {"const": True}}},
    "ActionResult": {"oneOf": [_ref("ConversationDetail"), _ref("Moved")]},
    "TransferResult": {"oneOf": [_ref("ConversationDetail"), {
        "type": "object", "required": ["id", "unit", "transferred"], "additionalProperties": False, "properties": {
            "id": {"type": "integer"}, "unit": {"type": "string"}, "transferred": {"const": True}}}, _ref("Moved")]},
    "CallbackAttempt": _record(["outcome", "note", "staff", "at"], {
        "outcome": _CALLBACK_OUTCOME, "note": _STRING_OR_NULL, "staff": _STRING_OR_NULL, "at": _AT}),
    "CallbackResult": _record(["attempt", "answered", "escalated"], {
        "attempt": _ref("CallbackAttempt"), "answered": {"type": "boolean"}, "escalated": {"type": "boolean"}}),
    "Unit": _record(["id", "name", "kind", "languages", "first_response_hours", "escalate_to", "email", "oversees"], {
        "id": {"type": "string"}, "name": {"type": "string"}, "kind": {"enum": ["own", "external"]},
        "languages": {"type": "array", "items": {"type": "string"}}, "first_response_hours": {"type": "number"},
        "escalate_to": _STRING_OR_NULL, "email": _STRING_OR_NULL, "oversees": {"type": "array", "items": {"type": "string"}}}),
    "Health": _record(["status"], {
        "status": {"enum": ["ok", "error"]},
        "channels": {"type": "array", "items": {"type": "string"}, "description": "The channels that are on (with ok)."},
        "detail": {"type": "string", "description": "What is wrong (with error)."},
        "outbox": {**_ref("OutboxHealth"), "description": "Not when the database failed the check."}}),
    "OutboxHealth": _record(["due", "oldest_due_seconds", "retrying"], {
        "due": {"type": "integer", "minimum": 0, "maximum": 10000,
                "description": "Deliveries (acknowledgements, replies, notifications) due now: queued and due, or claimed by a"
                               " worker whose lease ran out. Counted up to 10,000; /metrics counts every row."},
        "oldest_due_seconds": {"type": ["number", "null"], "minimum": 0,
                               "description": "How long the oldest of them has been due; null when none is."},
        "retrying": {"type": "integer", "minimum": 0, "maximum": 10000,
                     "description": "Deliveries waiting for a later attempt after a failure (a provider that is down, a"
                                    " refusal to retry). Counted up to 10,000."}}),
    "Stat": _record(["channel", "unit", "received", "acknowledged", "answered", "overdue", "median_first_answer_seconds"], {
        "channel": {"type": "string"}, "unit": {"type": "string"}, "received": {"type": "integer"},
        "acknowledged": {"type": "integer"}, "answered": {"type": "integer"}, "overdue": {"type": "integer"},
        "median_first_answer_seconds": {"type": ["number", "null"]}}),
}


@cache
def openapi_document(unit_ids: tuple[str, ...] = ()) -> dict[str, Any]:
    """The document; with ``unit_ids`` (the configuration's units), the ``unit`` of the list
    filter and of a transfer are an ``enum`` of them, else a unit id's pattern."""
    text = _object(["text"], {"text": _text(20000, "Has a character that is not white space; at most 20,000"
                                                   " characters. Kept without the white space around it.")})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "contact-router shared inbox API",
            "version": "1",
            "description": "Conversations from every channel, scoped to the caller's units. A conversation outside "
            "the caller's units answers 404, as if it did not exist. Errors are {\"error\": {\"code\", \"message\"}},"
            " with \"field\" naming the parameter, header or body field at fault. A method a path does not take"
            " answers 405 with the header Allow. Ids are integers from 1 to 2^62.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/conversations": {
                "get": {
                    "summary": "List conversations, newest first",
                    "description": "Each parameter at most once: of one given twice, the first counts.",
                    "parameters": [
                        {"name": "unit", "in": "query", "schema": _unit(unit_ids, "Only this unit's conversations (none when"
                                                                                  " it is not one of the caller's).")},
                        {"name": "state", "in": "query", "schema": {"enum": ["open", "acknowledged", "answered", "waiting", "closed"]}},
                        {"name": "channel", "in": "query", "description": "Only the conversations of this channel (webform, email,"
                         " whatsapp, phone, or a plugin's): any text; empty: every channel; a channel that does not exist matches none.",
                         "schema": {"type": "string"}},
                        {"name": "overdue", "in": "query", "schema": {"enum": ["true", "false"]}},
                        {"name": "q", "in": "query", "description": "A case reference, or words that must all occur (as word starts; a"
                         " one-character word as a whole word) in a message, its subject or the sender's name; umlauts match their"
                         " spelt-out forms. Any text of up to 200 characters and ten words (more is a 400); empty, or without"
                         " any word (only blanks or punctuation, such as - or a + a URL turns into a space): no search.",
                         "schema": {"type": "string", "maxLength": 200}},
                        {"name": "contact", "in": "query", "description": "Only this contact's conversations.", "schema": _ID_VALUE},
                        {"name": "flag", "in": "query", "description": "Only the conversations carrying this flag (callback_required: the call-backs to make).", "schema": {"enum": sorted(FLAGS)}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}},
                        {"name": "cursor", "in": "query", "description": "The next_cursor of the page before, as it came (opaque);"
                         " empty: the first page. Another value is a 400.", "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"}},
                    ],
                    "responses": {
                        "200": _json({"type": "object", "required": ["items", "next_cursor"], "properties": {
                            "items": {"type": "array", "items": _ref("Conversation")},
                            "next_cursor": {"type": ["string", "null"]}}}),
                        **_errors("400", "401"),
                    },
                }
            },
            "/api/v1/conversations/{id}": {
                "get": {"summary": "One conversation with messages, routing, escalations and deliveries",
                        "parameters": _ID, "responses": {"200": _json(_ref("ConversationDetail")), **_errors("400", "401", "404")}}
            },
            "/api/v1/conversations/{id}/replies": _action("Reply to the contact on the conversation's channel", text, "201", "PostedMessage",
                                                          idempotent=True),
            "/api/v1/conversations/{id}/notes": _action("Add an internal note", text, "201", "PostedMessage", idempotent=True),
            "/api/v1/conversations/{id}/assign": _action("Assign to a staff member (null unassigns)", _object(["assignee"], {
                "assignee": _text(100, "A name (with a character that is not white space, at most 100 characters), or null.",
                                  nullable=True)})),
            "/api/v1/conversations/{id}/transfer": _action(
                "Transfer to another unit: new deadline, new owner notified. The detail, or, when the new unit is not"
                " the caller's, only {id, unit, transferred} (or {id, unit, moved} when another request moved it out of"
                " the caller's units before the detail was read)", _object(["unit"], {
                    "unit": _unit(unit_ids, "The new unit: any unit of the service, not only the caller's; the conversation's"
                                            " own is a 409 same_unit."),
                    "reason": {"type": ["string", "null"], "maxLength": 2000,
                               "description": "Shown with the transfer; empty, white space or null: \"Transferred by <name>.\""}}),
                result="TransferResult", conflict=True),
            "/api/v1/conversations/{id}/close": _action("Close (409 already_closed when it is)", conflict=True),
            "/api/v1/conversations/{id}/reopen": _action("Reopen a closed or waiting conversation: a new deadline (409 not_closed"
                                                         " for another)", conflict=True),
            "/api/v1/conversations/{id}/wait": _action("Wait for the contact (no deadline while waiting; 409 closed for a closed"
                                                       " conversation)", conflict=True),
            "/api/v1/conversations/{id}/callbacks": _action("Log a call-back attempt; reached answers the conversation", _object(
                ["outcome"], {"outcome": {"enum": ["reached", "not_reached", "wrong_number"]},
                              "note": {"type": ["string", "null"], "maxLength": 5000,
                                       "description": "Empty, white space or null: no note."}}),
                "201", "CallbackResult", idempotent=True),
            "/api/v1/contacts/{id}": {"get": {"summary": "A contact with its identities", "parameters": _ID,
                                              "description": "For staff who see one of its conversations. A merged contact"
                                              " (its identities and conversations went to the contact it was merged into)"
                                              " answers with its merged_into, for staff who see that contact's conversations.",
                                              "responses": {"200": _json(_ref("Contact")), **_errors("400", "401", "404")}}},
            "/api/v1/contacts/{id}/merge": {"post": {
                "summary": "Merge another contact into this one; identities and history follow (409 same_contact, or merged"
                           " when one of them was merged already; 403 for staff of external units only)", "parameters": _ID,
                "requestBody": _body(_object(["other_contact_id"], {"other_contact_id": {
                    **_ID_VALUE, "description": "The contact merged into this one: an integer written without a fraction."}})),
                "responses": {"200": _json(_ref("Contact")), **_errors("400", "401", "403", "404", "408", "409", "413", "503")}}},
            "/api/v1/units": {"get": {"summary": "The caller's units", "responses": {"200": _json(_record(["items"], {"items": {"type": "array", "items": _ref("Unit")}})), **_errors("401")}}},
            "/api/v1/stats": {"get": {
                "summary": "Per channel and unit: received, acknowledged, answered, overdue, median time to first human answer",
                "description": "Of the conversations created in [from, to); all of them without a period. A date alone means its"
                               " midnight; a date, or a date and time without an offset, is read in the service's timezone."
                               " Each may be given once (twice is a 400), and to must be later than from (else a 400 naming to).",
                "parameters": [
                    {"name": "from", "in": "query", "schema": {"type": "string", "minLength": 10, "maxLength": 32, "pattern": MOMENT},
                     "description": "A date of the years 1970 to 9998 (2026-11-01), or a date and time to the minute, second or"
                                    " microsecond, with Z, an offset or none: 2026-11-01T08:00, 2026-11-01T08:00:00Z,"
                                    " 2026-11-01T08:00:00.5%2B01:00 (a + left in a URL is a space, read as the +)."},
                    {"name": "to", "in": "query", "schema": {"type": "string", "minLength": 10, "maxLength": 32, "pattern": MOMENT},
                     "description": "Exclusive; later than from. Written as from is."},
                ],
                "responses": {"200": _json(_record(["items", "from", "to"], {
                    "items": {"type": "array", "items": _ref("Stat")},
                    "from": {**_AT_OR_NULL, "description": "The period's start in UTC, written as every time of the API is"
                             " (2026-10-31T23:00:00Z); null without one."},
                    "to": {**_AT_OR_NULL, "description": "Its end, written as from is."}})),
                    **_errors("400", "401")}}},
            "/api/v1/me": {"get": {"summary": "Who the token belongs to and which units it sees", "responses": {"200": _json(_record(["name", "units"], {"name": {"type": "string"}, "units": {"type": "array", "items": {"type": "string"}}})), **_errors("401")}}},
            "/api/v1/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI document"}}}},
            "/healthz": {"get": {
                "summary": "Health: the database takes writes, the workers run, and what the outbox has due",
                "description": "503 when the database does not take a write (or answer a read) within 5 s, when the outbox or"
                               " the escalation scheduler has stopped, or when the outbox is stuck: deliveries due for 5 minutes"
                               " and no outcome (sent, failed, to be tried again) recorded for as long. A provider that is down"
                               " is not a 503: its failures are outcomes, and a restart would not mend it; its backlog shows in"
                               " outbox.",
                "security": [], "responses": {"200": _json(_ref("Health"), "ok"),
                                              "503": _json(_ref("Health"), "error: detail says what is wrong")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {"200": {"description": "text/plain exposition format"}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "BadRequest": _json(_ref("Error"), "Invalid input (invalid_parameter, invalid_field, invalid_header, invalid_body:"
                                    " not a JSON object or not sent as application/json, invalid_json); error.field names the"
                                    " parameter, header or field"),
                "Unauthorized": {**_json(_ref("Error"), "Missing or unknown token (unauthorized)"), "headers": {
                    "WWW-Authenticate": {"schema": {"const": 'Bearer realm="contact-router"'}}}},
                "Forbidden": _json(_ref("Error"), "Not for the caller's units (forbidden)"),
                "NotFound": _json(_ref("Error"), "Not found, or outside the caller's units (not_found)"),
                "BodyTimeout": _json(_ref("Error"), "The body stopped or trickled: 30 s, plus a second for every 500 bytes that"
                                     " arrived (body_timeout); the connection is closed"),
                "Conflict": _json(_ref("Error"), "Not possible in the current state; error.code says why"),
                "TooLarge": _json(_ref("Error"), "The body is larger than 1 MiB (too_large)"),
                "KeyReused": _json(_ref("Error"), "The Idempotency-Key came with another request before (idempotency_key_reused);"
                                   " nothing was done"),
                "Unavailable": {**_json(_ref("Error"), "The database refuses writes now (unavailable); nothing was done, try again"),
                                "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "string", "pattern": "^[0-9]+$"}}}},
            },
            "schemas": _SCHEMAS,
        },
    }
