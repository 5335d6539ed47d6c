"""Shared helpers for the WhatsApp plugin tests: the recorded provider payloads and the schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

import router

FIXTURES = Path(__file__).resolve().parents[3].parent / "shared" / "fixtures" / "whatsapp"
SKIP_REASON = "recorded WhatsApp payloads not found: no shared/fixtures/whatsapp folder beside this checkout"

SCHEMA = json.loads((Path(router.__file__).parent / "schemas" / "inbound_message.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)


def fixture_cases() -> list[Any]:
    """Every case of every recorded file as pytest params ``(file_stem, case, body)``.

    Without the fixtures folder a single skipped param stands in, so the reason shows in the run.
    """
    if not FIXTURES.is_dir():
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason=SKIP_REASON), id="no-fixtures")]
    cases = []
    for path in sorted(FIXTURES.glob("*.json")):
        for case, body in json.loads(path.read_text(encoding="utf-8")).items():
            cases.append(pytest.param(path.stem, case, body, id=f"{path.stem}:{case}"))
    return cases


def schema_errors(message: dict[str, Any]) -> list[str]:
    """Where a message breaks the canonical inbound schema (empty when it is valid)."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(message)]
