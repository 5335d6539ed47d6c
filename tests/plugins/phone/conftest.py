"""Shared helpers for the phone plugin's tests: the canonical schema's validator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

import router

SCHEMA = json.loads((Path(router.__file__).parent / "schemas" / "inbound_message.schema.json").read_text("utf-8"))


@pytest.fixture(scope="session")
def inbound_validator() -> Draft202012Validator:
    return Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)


@pytest.fixture
def assert_canonical(inbound_validator):
    """Assert that a message matches the canonical inbound schema, naming every error."""

    def check(message: dict) -> dict:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in inbound_validator.iter_errors(message)]
        assert errors == []
        return message

    return check
