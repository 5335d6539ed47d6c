"""The canonical inbound message schema, compiled once.

The JSON Schema in ``router/schemas/`` is the contract; ``fastjsonschema`` compiles it to
Python for the ingest path (jsonschema's validator costs about 124 us a message here, the
compiled one a few), and the tests check that both engines agree.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

import fastjsonschema

from .channel import InvalidMessage


@cache
def inbound_schema() -> dict[str, Any]:
    return json.loads(resources.files("router.schemas").joinpath("inbound_message.schema.json").read_text("utf-8"))


@cache
def _compiled() -> Any:
    return fastjsonschema.compile(inbound_schema())


# Half of a UTF-16 surrogate pair on its own: JSON can spell one ("\ud800"), and Python
# keeps it in a str, but it is no character and cannot be encoded for the database.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _repair_text(value: Any) -> Any:
    """``value`` with every lone surrogate, in strings and keys at any depth, replaced by
    U+FFFD. Containers are changed in place; a string is returned anew."""
    if isinstance(value, str):
        if value.isascii() or _LONE_SURROGATE.search(value) is None:
            return value
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        for key, item in list(value.items()):
            repaired = _repair_text(item)
            fixed_key = _repair_text(key) if isinstance(key, str) else key
            if fixed_key is not key:
                del value[key]
            if repaired is not item or fixed_key is not key:
                value[fixed_key] = repaired
    elif isinstance(value, list):
        for index, item in enumerate(value):
            repaired = _repair_text(item)
            if repaired is not item:
                value[index] = repaired
    return value


def validate_inbound(message: Any) -> dict[str, Any]:
    """Return the message with schema defaults filled in, or raise ``InvalidMessage`` naming the
    failing field (``sender.address``).

    A lone surrogate anywhere (a provider's JSON escape without its partner) becomes U+FFFD:
    the resident's message is kept, and SQLite is never handed text it cannot encode."""
    _repair_text(message)
    try:
        return _compiled()(message)
    except fastjsonschema.JsonSchemaValueException as exc:
        path = ".".join(str(p) for p in exc.path[1:]) if exc.path else ""
        raise InvalidMessage(exc.message.replace("data.", "", 1).replace("data ", "message ", 1), path) from None
