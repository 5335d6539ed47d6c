"""The OpenAPI 3.1 document of the shared inbox API, served at ``/api/v1/openapi.json``.

Written by hand and kept true by a test that compares it with the routes the app serves."""

from __future__ import annotations

from functools import cache
from typing import Any

from ..tracking import FLAGS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "404": {"$ref": "#/components/responses/NotFound"},
}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}]


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"},
    "description": "Sent again with the same key (within 24 hours, with the same token), the action is not done"
                   " again: the first answer comes back, with the header Idempotent-Replayed: true. The same key with"
                   " another request is a 422.",
}
_REPLAYED = {"Idempotent-Replayed": {"description": "true: the answer to this key's first request, given again",
                                     "schema": {"const": "true"}}}


def _action(
    summary: str, body: dict[str, Any] | None = None, status: str = "200", result: str = "ConversationDetail",
    *, idempotent: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "parameters": _ID, "responses": {status: _json(_ref(result)), **_ERRORS, "409": {"$ref": "#/components/responses/Conflict"}}}
    if body is not None:
        op["requestBody"] = _body(body)
    if idempotent:
        op["parameters"] = [*_ID, _IDEMPOTENCY_KEY]
        op["responses"][status] = {**op["responses"][status], "headers": _REPLAYED}
        op["responses"]["422"] = {"$ref": "#/components/responses/KeyReused"}
    return {"post": op}


@cache
def openapi_document() -> dict[str, Any]:
    text = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 20000}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "contact-router shared inbox API",
            "version": "1",
            "description": "Conversations from every channel, scoped to the caller's units. A conversation outside "
            "the caller's units answers 404, as if it did not exist. Errors are {\"error\": {\"code\", \"message\"}}.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/conversations": {
                "get": {
                    "summary": "List conversations, newest first",
                    "parameters": [
                        {"name": "unit", "in": "query", "schema": {"type": "string"}},
                        {"name": "state", "in": "query", "schema": {"enum": ["open", "acknowledged", "answered", "waiting", "closed"]}},
                        {"name": "channel", "in": "query", "schema": {"type": "string"}},
                        {"name": "overdue", "in": "query", "schema": {"enum": ["true", "false"]}},
                        {"name": "q", "in": "query", "description": "A case reference, or words that must all occur (as word starts; a one-character word as a whole word) in a message, its subject or the sender's name; umlauts match their spelt-out forms.", "schema": {"type": "string", "maxLength": 200}},
                        {"name": "contact", "in": "query", "schema": {"type": "integer"}},
                        {"name": "flag", "in": "query", "description": "Only the conversations carrying this flag (callback_required: the call-backs to make).", "schema": {"enum": sorted(FLAGS)}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json({"type": "object", "required": ["items", "next_cursor"], "properties": {
                            "items": {"type": "array", "items": _ref("Conversation")},
                            "next_cursor": {"type": ["string", "null"]}}}),
                        "400": _ERRORS["400"], "401": _ERRORS["401"],
                    },
                }
            },
            "/api/v1/conversations/{id}": {
                "get": {"summary": "One conversation with messages, routing, escalations and deliveries",
                        "parameters": _ID, "responses": {"200": _json(_ref("ConversationDetail")), **_ERRORS}}
            },
            "/api/v1/conversations/{id}/replies": _action("Reply to the contact on the conversation's channel", text, "201", "Message",
                                                                 idempotent=True),
            "/api/v1/conversations/{id}/notes": _action("Add an internal note", text, "201", "Message", idempotent=True),
            "/api/v1/conversations/{id}/assign": _action("Assign to a staff member (null unassigns)", {
                "type": "object", "required": ["assignee"],
                "properties": {"assignee": {"type": ["string", "null"], "maxLength": 100}}}),
            "/api/v1/conversations/{id}/transfer": _action(
                "Transfer to another unit: new deadline, new owner notified. The detail, or, when the new unit is not"
                " the caller's, only {id, unit, transferred}", {
                "type": "object", "required": ["unit"], "properties": {"unit": {"type": "string"}, "reason": {"type": "string"}}},
                result="TransferResult"),
            "/api/v1/conversations/{id}/close": _action("Close"),
            "/api/v1/conversations/{id}/reopen": _action("Reopen a closed or waiting conversation: a new deadline"),
            "/api/v1/conversations/{id}/wait": _action("Wait for the contact (no deadline while waiting)"),
            "/api/v1/conversations/{id}/callbacks": _action("Log a call-back attempt; reached answers the conversation", {
                "type": "object", "required": ["outcome"], "properties": {
                    "outcome": {"enum": ["reached", "not_reached", "wrong_number"]}, "note": {"type": "string"}}},
                "201", "CallbackResult", idempotent=True),
            "/api/v1/contacts/{id}": {"get": {"summary": "A contact with its identities", "parameters": _ID,
                                              "responses": {"200": _json(_ref("Contact")), **_ERRORS}}},
            "/api/v1/contacts/{id}/merge": {"post": {
                "summary": "Merge another contact into this one; identities and history follow", "parameters": _ID,
                "requestBody": _body({"type": "object", "required": ["other_contact_id"], "properties": {"other_contact_id": {"type": "integer"}}}),
                "responses": {"200": _json(_ref("Contact")), **_ERRORS, "409": {"$ref": "#/components/responses/Conflict"}}}},
            "/api/v1/units": {"get": {"summary": "The caller's units", "responses": {"200": _json({"type": "object", "properties": {"items": {"type": "array", "items": _ref("Unit")}}}), "401": _ERRORS["401"]}}},
            "/api/v1/stats": {"get": {
                "summary": "Per channel and unit: received, acknowledged, answered, overdue, median time to first human answer",
                "description": "Of the conversations created in [from, to); all of them without a period. A date alone means its"
                               " midnight; a date, or a date and time without an offset, is read in the service's timezone."
                               " Each may be given once.",
                "parameters": [
                    {"name": "from", "in": "query", "schema": {"type": "string"}, "description": "2026-11-01, 2026-11-01T08:00:00Z or 2026-11-01T08:00:00%2B01:00"},
                    {"name": "to", "in": "query", "schema": {"type": "string"}, "description": "exclusive; later than from"},
                ],
                "responses": {"200": _json({"type": "object", "properties": {
                    "items": {"type": "array", "items": _ref("Stat")},
                    "from": {"type": ["string", "null"], "format": "date-time"},
                    "to": {"type": ["string", "null"], "format": "date-time"}}}),
                    "400": _ERRORS["400"], "401": _ERRORS["401"]}}},
            "/api/v1/me": {"get": {"summary": "Who the token belongs to and which units it sees", "responses": {"200": _json({"type": "object", "properties": {"name": {"type": "string"}, "units": {"type": "array", "items": {"type": "string"}}}}), "401": _ERRORS["401"]}}},
            "/api/v1/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI document"}}}},
            "/healthz": {"get": {"summary": "Health", "security": [], "responses": {"200": {"description": "ok"}, "503": {"description": "storage unavailable"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {"200": {"description": "text/plain exposition format"}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                name: _json(_ref("Error"), desc)
                for name, desc in (("BadRequest", "Invalid input; error.field names the field"), ("Unauthorized", "Missing or unknown token"),
                                   ("NotFound", "Not found, or outside the caller's units"), ("Conflict", "Not possible in the current state"),
                                   ("KeyReused", "The Idempotency-Key came with another request before"))
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                    "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}}},
                "Contact": {"type": "object", "required": ["id", "is_customer"], "properties": {
                    "id": {"type": "integer"}, "display_name": {"type": ["string", "null"]}, "is_customer": {"type": "boolean"},
                    "customer_number": {"type": ["string", "null"]}, "customer_claim": {"type": ["string", "null"]},
                    "identities": {"type": "array", "items": {"type": "object", "properties": {"kind": {"type": "string"}, "address": {"type": "string"}}}}}},
                "Conversation": {"type": "object", "required": ["id", "case_reference", "channel", "unit", "state", "contact", "deadline", "overdue", "escalation_level"], "properties": {
                    "id": {"type": "integer"}, "case_reference": {"type": "string", "pattern": "^K-[2-9A-HJ-NP-Z]{6}$"},
                    "channel": {"type": "string"}, "unit": {"type": "string"},
                    "state": {"enum": ["open", "acknowledged", "answered", "waiting", "closed"]},
                    "contact": _ref("Contact"), "deadline": {"type": ["string", "null"], "format": "date-time"},
                    "overdue": {"type": "boolean"}, "escalation_level": {"type": "integer"},
                    "flags": {"type": "array", "items": {"type": "string"}}, "assignee": {"type": ["string", "null"]}}},
                "Message": {"type": "object", "required": ["id", "direction", "channel", "text", "created_at", "delivery_status"], "properties": {
                    "id": {"type": "integer"}, "direction": {"enum": ["in", "out", "internal"]}, "kind": {"type": "string"},
                    "channel": {"type": "string"}, "text": {"type": ["string", "null"]}, "created_at": {"type": "string", "format": "date-time"},
                    "delivery_status": {"type": ["string", "null"], "enum": [None, "queued", "sent", "delivered", "read", "failed"]}}},
                "ConversationDetail": {"allOf": [_ref("Conversation"), {"type": "object", "required": ["messages", "routing", "escalations"], "properties": {
                    "messages": {"type": "array", "items": _ref("Message"), "description": "Oldest first. A reaction replaced by a later one of its sender is not listed, nor an edit that arrived after a later edit of the same message had taken effect (it never took effect)."},
                    "routing": {"type": "object", "required": ["rule", "reason"], "properties": {"rule": {"type": "string"}, "reason": {"type": "string"}}},
                    "escalations": {"type": "array", "items": {"type": "object", "properties": {"level": {"type": "integer"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}, "reason": {"type": "string"}, "at": {"type": "string"}}}},
                    "events": {"type": "array"}, "callbacks": {"type": "array"}, "pending_deliveries": {"type": "integer"}}}]},
                "TransferResult": {"oneOf": [_ref("ConversationDetail"), {
                    "type": "object", "required": ["id", "unit", "transferred"], "additionalProperties": False, "properties": {
                        "id": {"type": "integer"}, "unit": {"type": "string"}, "transferred": {"const": True}}}]},
                "CallbackResult": {"type": "object", "properties": {"attempt": {"type": "object"}, "answered": {"type": "boolean"}, "escalated": {"type": "boolean"}}},
                "Unit": {"type": "object", "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "kind": {"enum": ["own", "external"]}, "first_response_hours": {"type": "number"}, "escalate_to": {"type": ["string", "null"]}, "oversees": {"type": "array", "items": {"type": "string"}}}},
                "Stat": {"type": "object", "properties": {"channel": {"type": "string"}, "unit": {"type": "string"}, "received": {"type": "integer"}, "acknowledged": {"type": "integer"}, "answered": {"type": "integer"}, "overdue": {"type": "integer"}, "median_first_answer_seconds": {"type": ["number", "null"]}}},
            },
        },
    }
