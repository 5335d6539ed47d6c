from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import router

SCHEMA = json.loads((Path(router.__file__).parent / "schemas" / "inbound_message.schema.json").read_text("utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)

ADDRESSES = {
    "bau@example.org": {"unit": "bauhotline", "language": "de"},
    "service@example.org": {"unit": "kundenservice", "language": None},
}


@pytest.fixture
def valid():
    """Assert that a message matches the canonical inbound schema and return it."""

    def check(message: dict) -> dict:
        errors = sorted(VALIDATOR.iter_errors(message), key=lambda e: list(e.path))
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
        return message

    return check
