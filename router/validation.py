"""The canonical inbound message schema, compiled once.

The JSON Schema in ``router/schemas/`` is the contract; ``fastjsonschema`` compiles it to
Python for the ingest path (jsonschema's validator costs about 124 us a message here, the
compiled one a few), and the tests check that both engines agree.
"""

from __future__ import annotations

import json
import math
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


def _repair(text: str) -> str:
    return _LONE_SURROGATE.sub("\ufffd", text)


def _repair_text(value: Any) -> Any:
    """``value`` with every lone surrogate, in strings and keys at any depth, replaced by
    U+FFFD. Containers are changed in place; a string is returned anew. A number that is NaN or
    infinite (Python's JSON reads them) raises ``InvalidMessage``: it passes every minimum
    and maximum, and would be stored as JSON that nothing else reads.

    One loop over an explicit stack, and only strings that are not ASCII are looked at: it
    runs for every inbound message, and a function call per value cost more than the test
    (7 us a WhatsApp message walked recursively, 2 us so)."""
    if isinstance(value, str):
        return value if value.isascii() else _repair(value)
    stack = [value]
    seen: set[int] = set()  # a container a plugin built may contain itself
    while stack:
        container = stack.pop()
        if id(container) in seen:
            continue
        seen.add(id(container))
        if isinstance(container, dict):
            broken_keys = []
            for key, item in container.items():
                if isinstance(item, str):
                    if not item.isascii():
                        container[key] = _repair(item)  # same key: no change of size
                elif isinstance(item, (dict, list)):
                    stack.append(item)
                elif isinstance(item, float) and not math.isfinite(item):
                    raise InvalidMessage(f"{key} is not a finite number", str(key))
                if isinstance(key, str) and not key.isascii() and _repair(key) != key:
                    broken_keys.append(key)
            for key in broken_keys:
                container[_repair(key)] = container.pop(key)
        elif isinstance(container, list):
            for index, item in enumerate(container):
                if isinstance(item, str):
                    if not item.isascii():
                        container[index] = _repair(item)
                elif isinstance(item, (dict, list)):
                    stack.append(item)
                elif isinstance(item, float) and not math.isfinite(item):
                    raise InvalidMessage(f"a list holds {item}, not a finite number")
    return value


def validate_inbound(message: Any) -> dict[str, Any]:
    """Return the message with schema defaults filled in, or raise ``InvalidMessage`` naming the
    failing field (``sender.address``).

    A lone surrogate anywhere (a provider's JSON escape without its partner) becomes U+FFFD:
    the resident's message is kept, and SQLite is never handed text it cannot encode. NaN or
    infinity anywhere is refused, naming its key."""
    _repair_text(message)
    try:
        return _compiled()(message)
    except fastjsonschema.JsonSchemaValueException as exc:
        path = ".".join(str(p) for p in exc.path[1:]) if exc.path else ""
        raise InvalidMessage(exc.message.replace("data.", "", 1).replace("data ", "message ", 1), path) from None
