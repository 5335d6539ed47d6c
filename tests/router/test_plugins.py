"""The plugin contract: the documented example channel passes the contract kit, hooks are
called as documented, built-ins come in through entry points, every hook is documented."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import router.core
from router import hookspecs
from router.hookspecs import Customer, RoutingDecision, hookimpl
from router.plugins import create_plugin_manager
from router.testing import CoreHarness, check_channel_contract

from .helpers import webform_message

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def load_example_plugin() -> types.ModuleType:
    """Execute the example channel exactly as the plugin guide prints it."""
    text = DOCS.read_text("utf-8")
    block = re.search(r"```python\n# example: demochat\n(.*?)```", text, re.S)
    assert block, "the plugin guide lost its example channel"
    module = types.ModuleType("demochat_plugin")
    exec(compile(block.group(1), str(DOCS), "exec"), module.__dict__)
    return module


@pytest.fixture
async def fake_demochat() -> AsyncIterator[tuple[str, list]]:
    sent: list = []

    async def messages(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer t"
        body = await request.json()
        sent.append({**body, "key": request.headers["Idempotency-Key"]})
        return web.json_response({"id": f"dc-{len(sent)}"})

    app = web.Application()
    app.router.add_post("/messages", messages)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), sent
    await server.close()


async def test_documented_example_channel_passes_the_contract_kit(tmp_path, fake_demochat):
    url, sent = fake_demochat
    plugin = load_example_plugin()
    settings = {"demochat": {"secret": "s3cret", "api_url": url, "token": "t"}}

    async def deliver(harness: CoreHarness, key: str) -> None:
        body = json.dumps({"id": key, "from": "+4915112345678", "text": "Baustelle vor dem Haus"}).encode()
        signature = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        response = await harness.client.post("/channels/demochat/inbound", data=body, headers={"X-DemoChat-Signature": signature})
        assert response.status == 200, await response.text()

    async with CoreHarness(tmp_path / "d", plugins=[plugin], settings=settings) as harness:
        conv = await check_channel_contract(harness, "demochat", deliver, sender=("phone", "+4915112345678"))
        assert conv["state"] == "answered"
        assert [m["to"] for m in sent] == ["+4915112345678", "+4915112345678"]
        response = await harness.client.post("/channels/demochat/inbound", data=b"{}", headers={"X-DemoChat-Signature": "forged"})
        assert response.status == 401


def test_built_in_channels_load_through_the_entry_point_group():
    pm = create_plugin_manager(True)
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert {"webform", "whatsapp", "email", "phone"} <= names
    only = create_plugin_manager(["webform"])
    assert {only.get_name(p) for p in only.get_plugins()} == {"webform"}


class CRM:
    def __init__(self) -> None:
        self.claims = []

    @hookimpl
    async def lookup_customer(self, claim):
        self.claims.append(claim)
        if claim.customer_number == "CRM-42":
            return Customer(customer_number="CRM-42", name="Erika Mustermann", source="crm")
        return None


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    @hookimpl
    def message_received(self, message, result):
        self.seen.append(("received", result.case_reference))

    @hookimpl
    async def conversation_answered(self, conversation, message):
        self.seen.append(("answered", conversation["case_reference"]))

    @hookimpl
    def conversation_routed(self, conversation, rule, reason):
        self.seen.append(("routed", (conversation["case_reference"], rule, bool(reason))))

    @hookimpl
    def conversation_escalated(self, conversation, from_unit, to_unit, level):
        self.seen.append(("escalated", (from_unit, to_unit, level)))

    @hookimpl
    def route_message(self, message):  # accepts fewer arguments than the spec names
        if "VIP" in (message.get("text") or ""):
            return RoutingDecision(unit="vertrieb", rule="vip", reason="VIP customers go to sales")
        return None


async def test_hooks_are_called_as_documented(tmp_path):
    crm, events = CRM(), Events()
    async with CoreHarness(tmp_path / "d", plugins=[crm, events]) as harness:
        first = await harness.core.ingest(webform_message(customer_number="CRM-42"))
        status, detail = await harness.api("GET", f"/api/v1/conversations/{first.conversation_id}")
        assert detail["contact"]["is_customer"] is True
        assert crm.claims and crm.claims[0].email == "anwohner@example.net"
        vip = await harness.core.ingest(webform_message("VIP: Baustelle", email="vip@example.net"))
        assert vip.unit == "vertrieb"
        status, detail = await harness.api("GET", f"/api/v1/conversations/{vip.conversation_id}")
        assert detail["routing"] == {"rule": "vip", "reason": "VIP customers go to sales"}
        # a message without a claim does not call lookup_customer
        calls = len(crm.claims)
        await harness.core.ingest(webform_message("ohne Kundennummer", email="c@example.net"))
        assert len(crm.claims) == calls
        await harness.api("POST", f"/api/v1/conversations/{first.conversation_id}/replies", json={"text": "Antwort"})
        await harness.run_outbox()
        from datetime import timedelta

        harness.clock.advance(timedelta(days=3))
        await harness.escalate()
        await harness.core.drain_background()
        kinds = [k for k, _ in events.seen]
        assert kinds.count("received") == 3
        assert ("answered", first.case_reference) in events.seen
        assert ("escalated", ("vertrieb", "kundenservice", 1)) in events.seen
        routed = [v for k, v in events.seen if k == "routed"]
        assert (vip.case_reference, "vip", True) in routed
        assert (first.case_reference, "construction-in-area", True) in routed
        assert len(routed) == 3  # one per opened conversation, none for follow-ups


async def test_a_failing_event_hook_never_costs_the_message(tmp_path):
    class Broken:
        @hookimpl
        def message_received(self, message, result):
            raise RuntimeError("CRM down")

    async with CoreHarness(tmp_path / "d", plugins=[Broken()]) as harness:
        result = await harness.core.ingest(webform_message())
        await harness.core.drain_background()
        assert result.conversation_id and await harness.count("messages", "direction = 'in'") == 1
        assert harness.core.metrics.value("contact_router_hook_errors_total", hook="message_received") == 1


class Hanging:
    """A plugin whose service never answers."""

    @hookimpl
    async def reply_copies(self, conversation, reply, identities):
        await asyncio.sleep(3600)

    @hookimpl
    async def message_received(self, message, result):
        await asyncio.sleep(3600)


class Listening:
    """A plugin beside it that answers at once: it records its events and names a copy in a
    shape that is not one."""

    def __init__(self) -> None:
        self.received: list[str] = []

    @hookimpl
    async def message_received(self, message, result):
        self.received.append(result.case_reference)

    @hookimpl
    def reply_copies(self, conversation, reply, identities):
        return ["sms"]  # not a list of {channel, to_kind, to}


async def test_a_hanging_or_wrong_plugin_costs_a_reply_its_copies_and_the_others_nothing(tmp_path, monkeypatch):
    """reply_copies and the event hooks had no time limit: a staff reply waited for ever (the
    API call never answered) and so did the service's shutdown, which waits for event hooks.
    With one limit for all implementations, the one that hung kept those after it from ever
    running; and an answer of the wrong shape was a 500 that lost the reply."""
    monkeypatch.setattr(router.core, "HOOK_SECONDS", 0.2)
    listening = Listening()
    async with CoreHarness(tmp_path / "d", plugins=[listening, Hanging()]) as harness:  # Hanging is called first
        result = await harness.core.ingest(webform_message())
        started = time.monotonic()
        status, reply = await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies",
                                          json={"text": "Wir kümmern uns darum."})
        assert status == 201, reply
        await harness.core.drain_background()
        assert time.monotonic() - started < 3
        assert await harness.count("outbox", "kind = 'reply'") == 1  # on its own channel, no copies
        assert listening.received == [result.case_reference]
        metrics = harness.core.metrics
        assert metrics.value("contact_router_hook_errors_total", hook="reply_copies") == 2  # hung, wrong shape
        assert metrics.value("contact_router_hook_errors_total", hook="message_received") == 1


def test_every_hook_is_documented_in_the_plugin_guide():
    text = DOCS.read_text("utf-8")
    hooks = [name for name in dir(hookspecs) if getattr(getattr(hookspecs, name), "contact_router_spec", None)]
    assert hooks, "no hooks found"
    for name in hooks:
        assert f"### `{name}`" in text, f"hook {name} is not documented in docs/plugins.md"
        doc = getattr(hookspecs, name).__doc__ or ""
        assert ":param" in doc and "Called" in doc, f"hook {name} lacks its docstring parts"


class BrokenRouter:
    @hookimpl
    def route_message(self, message, is_customer):
        raise RuntimeError("routing service down")


async def test_a_failing_routing_plugin_costs_the_message_nothing(tmp_path):
    async with CoreHarness(tmp_path / "d", plugins=[BrokenRouter()]) as harness:
        result = await harness.core.ingest(webform_message())
        assert result.conversation_id is not None and result.acknowledged
        assert result.unit == "tiefbau-muster"  # the configured rules decided
        assert harness.core.metrics.value("contact_router_hook_errors_total", hook="route_message") == 1


class Answers:
    """Plugins that answer in the wrong shape: a dict, or a decision without its reason."""

    def __init__(self, routing, customer):
        self.routing, self.customer = routing, customer

    @hookimpl
    def route_message(self, message, is_customer):
        return self.routing

    @hookimpl
    def lookup_customer(self, claim):
        return self.customer


@pytest.mark.parametrize(("routing", "customer"), [
    ({"unit": "vertrieb", "rule": "crm", "reason": "x"}, {"customer_number": "KD-1"}),
    (RoutingDecision(unit="vertrieb", rule="crm", reason=None), Customer(customer_number=None)),
    (RoutingDecision(unit="vertrieb", rule=7, reason="x"), Customer(customer_number="KD-1", name=["Erika"])),
])
async def test_a_plugin_answer_of_the_wrong_shape_costs_the_message_nothing(tmp_path, routing, customer):
    """Every message failed with a 500 and nothing was stored."""
    async with CoreHarness(tmp_path / "d", plugins=[Answers(routing, customer)]) as harness:
        result = await harness.core.ingest(webform_message(customer_number="KD-1"))
        assert result.acknowledged and result.unit == "tiefbau-muster"  # the configured rules decided
        assert harness.core.metrics.value("contact_router_hook_errors_total", hook="route_message") == 1
        assert harness.core.metrics.value("contact_router_hook_errors_total", hook="lookup_customer") == 1
        contact = await harness.rows("SELECT is_customer FROM contacts")
        assert [c["is_customer"] for c in contact] == [0]


class SettingsPlugin:
    """A third-party channel plugin whose settings are refused, as SettingsError or otherwise."""

    def __init__(self, error):
        self.error = error

    @hookimpl
    def register_channels(self, settings):
        raise self.error


def test_a_plugins_settings_errors_are_reported_by_their_key_path():
    """The key path was parsed out of the message text; a message with ": " in it, or a path
    with a space, came out wrong."""
    from router.hookspecs import SettingsError
    from router.plugins import channel_settings_errors

    pm = create_plugin_manager(False)
    pm.register(SettingsPlugin(SettingsError("channels.demochat.webhook_url", "expected a URL, got 'ftp: x'")), "demochat")
    pm.register(SettingsPlugin(RuntimeError("webhook_url: cannot be read")), "other")
    assert sorted(channel_settings_errors(pm, {}, {}, {})) == [
        ("channels (other)", "webhook_url: cannot be read"),
        ("channels.demochat.webhook_url", "expected a URL, got 'ftp: x'"),
    ]
