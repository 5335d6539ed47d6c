"""Bad input at volume: generated and mutated bodies against the WhatsApp webhook, the web form's
JSON endpoint, inbound e-mail and the inbox API. Only 2xx or 4xx with a JSON error may come back,
never a 500, and a refused request leaves no row behind.

The service runs in a background thread's event loop for the whole module (one database, one
server), so that hypothesis can drive thousands of requests through plain synchronous tests.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.testing import CoreHarness

from .helpers import APP_SECRET, PHONE_NUMBER_ID, free_port, sign, whatsapp_body

T = TypeVar("T")
EMAIL_SECRET = "reliability-mail-secret"
TABLES = ("contacts", "identities", "conversations", "messages", "thread_keys", "outbox", "events")
EXAMPLES = 400
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


class Service:
    """A ``CoreHarness`` with the WhatsApp, web-form and e-mail channels, in its own thread."""

    def __init__(self, data_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        env = {"WHATSAPP_APP_SECRET": APP_SECRET, "WHATSAPP_VERIFY_TOKEN": "verify", "WHATSAPP_ACCESS_TOKEN": "access",
               "WHATSAPP_PHONE_NUMBER_ID": PHONE_NUMBER_ID, "WHATSAPP_GRAPH_URL": "http://127.0.0.1:9",
               "EMAIL_INBOUND_SECRET": EMAIL_SECRET, "SMTP_LISTEN_HOST": "127.0.0.1",
               "SMTP_LISTEN_PORT": str(free_port())}

        async def make() -> CoreHarness:
            h = CoreHarness(data_dir, entrypoints=("webform", "whatsapp", "email"), env=env,
                            settings={"webform": {"rate_limit_per_minute": 10_000_000, "min_fill_seconds": 0}})
            return await h.__aenter__()

        self.h = self.run(make())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.h.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def counts(self) -> dict[str, int]:
        async def count() -> dict[str, int]:
            return {t: await self.h.count(t) for t in TABLES}

        return self.run(count())

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, str | None, bytes]:
        async def call() -> tuple[int, str | None, bytes]:
            response = await self.h.client.request(method, path, **kwargs)
            return response.status, response.content_type, await response.read()

        return self.run(call())

    def check(self, method: str, path: str, **kwargs: Any) -> int:
        """One request: 2xx, or 4xx with a JSON error and nothing written; never 5xx."""
        before = self.counts()
        status, content_type, body = self.request(method, path, **kwargs)
        assert status < 500, f"{method} {path} answered {status}: {body[:300]!r}"
        if status >= 400:
            assert content_type == "application/json", f"{status} without a JSON error: {body[:200]!r}"
            error = json.loads(body)["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str)
            assert self.counts() == before, f"{method} {path} answered {status} but wrote rows"
        return status


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(tmp_path_factory.mktemp("bad-input") / "data")
    yield svc
    # Whatever was accepted is whole: no message without its conversation, no conversation
    # without a message, and every foreign key holds.
    def rows(sql: str) -> list[Any]:
        return svc.run(svc.h.rows(sql))

    assert rows("PRAGMA foreign_key_check") == []
    assert rows("SELECT c.id FROM conversations c WHERE NOT EXISTS"
                " (SELECT 1 FROM messages m WHERE m.conversation_id = c.id)") == []
    assert rows("SELECT m.id FROM messages m WHERE m.direction = 'in' AND m.conversation_id IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM conversations c WHERE c.id = m.conversation_id)") == []
    svc.close()


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False), st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                          max_leaves=12)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += _paths(inner, (*prefix, index))
    return found


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    value[path[0]] = _replace(value[path[0]], path[1:], new)
    return value


@st.composite
def mutated_json(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with one to three places replaced by arbitrary JSON, or a key dropped."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        if path and draw(st.booleans()) and isinstance(_get(doc, path[:-1]), dict):
            del _get(doc, path[:-1])[path[-1]]
        else:
            doc = _replace(doc, path, draw(json_value))
    return doc


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


WHATSAPP_BASE = json.loads(whatsapp_body("wamid.base", "4915100000001"))


@SETTINGS
@given(body=st.one_of(mutated_json(WHATSAPP_BASE), json_value.map(lambda v: v),
                      st.binary(max_size=300).map(lambda b: {"__raw__": b.hex()})),
       counter=st.integers(0, 10**9))
def test_whatsapp_webhook_mutations(service: Service, body: Any, counter: int) -> None:
    if isinstance(body, dict) and "__raw__" in body:
        raw = bytes.fromhex(body["__raw__"])
    else:
        raw = json.dumps(body).encode()
    service.check("POST", "/channels/whatsapp/webhook", data=raw,
                  headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(raw)})


FORM_FIELDS = ("name", "email", "phone", "street", "postcode", "city", "customer_number", "topic", "message")
FORM_BASE = {"name": "Anna Muster", "email": "anna@example.net", "phone": "+49 151 23456789",
             "street": "Musterstraße 3", "postcode": "12345", "city": "Musterstadt", "customer_number": "",
             "topic": "construction", "message": "Der Gehweg ist gesperrt.", "website": ""}


@SETTINGS
@given(form=st.one_of(mutated_json(FORM_BASE),
                      st.fixed_dictionaries({}, optional={f: st.one_of(st.text(max_size=300), json_value)
                                                          for f in (*FORM_FIELDS, "website")})))
def test_webform_json_mutations(service: Service, form: Any) -> None:
    _, _, token_body = service.request("GET", "/channels/webform/token")
    token = json.loads(token_body)["form_token"]
    if isinstance(form, dict):
        form = {**form, "form_token": token}
    service.check("POST", "/channels/webform/", data=json.dumps(form).encode(),
                  headers={"Content-Type": "application/json"})


MAIL_BASE = (b"From: Anna Muster <anna@example.net>\r\nTo: bau@example.org\r\nSubject: Baustelle\r\n"
             b"Message-ID: <m1@example.net>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nDer Gehweg ist gesperrt.\r\n")


@SETTINGS
@given(cut=st.integers(0, len(MAIL_BASE)), insert=st.binary(max_size=200),
       header=st.text(max_size=80), value=st.text(max_size=200), whole=st.one_of(st.none(), st.binary(max_size=400)))
def test_email_inbound_mutations(service: Service, cut: int, insert: bytes, header: str, value: str,
                                 whole: bytes | None) -> None:
    if whole is not None:
        raw = whole
    else:
        extra = f"{header}: {value}\r\n".encode("utf-8", "surrogateescape")
        raw = extra + MAIL_BASE[:cut] + insert + MAIL_BASE[cut:]
    service.check("POST", "/channels/email/inbound", data=raw,
                  headers={"Authorization": f"Bearer {EMAIL_SECRET}", "Content-Type": "message/rfc822"})


query_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


@SETTINGS
@given(params=st.dictionaries(st.sampled_from(["unit", "state", "channel", "overdue", "q", "cursor", "limit",
                                               "contact"]),
                              query_text | st.integers(-(2**70), 2**70).map(str), max_size=5),
       conversation=st.one_of(st.integers(-(2**70), 2**70).map(str), query_text.filter(lambda s: "/" not in s and s)),
       reply=json_value, action=st.sampled_from(["replies", "notes", "assign", "transfer", "close", "reopen", "callbacks"]))
def test_inbox_api_inputs(service: Service, params: dict[str, str], conversation: str, reply: Any, action: str) -> None:
    auth = {"Authorization": f"Bearer {service.h.tokens['admin']}"}
    service.check("GET", "/api/v1/conversations", params=params, headers=auth)
    from urllib.parse import quote

    path = f"/api/v1/conversations/{quote(conversation, safe='')}"
    service.check("GET", path, headers=auth)
    service.check("POST", f"{path}/{action}", data=json.dumps(reply).encode(),
                  headers={**auth, "Content-Type": "application/json"})
    # A real conversation with a generated body: validation must refuse cleanly or act.
    ids = service.run(service.h.rows("SELECT id FROM conversations ORDER BY id LIMIT 1"))
    if ids:
        service.check("POST", f"/api/v1/conversations/{ids[0]['id']}/{action}", data=json.dumps(reply).encode(),
                      headers={**auth, "Content-Type": "application/json"})
        contact = service.run(service.h.rows("SELECT contact_id FROM conversations ORDER BY id LIMIT 1"))[0]["contact_id"]
        service.check("GET", f"/api/v1/contacts/{quote(conversation, safe='')}", headers=auth)
        service.check("POST", f"/api/v1/contacts/{contact}/merge", data=json.dumps(reply).encode(),
                      headers={**auth, "Content-Type": "application/json"})
