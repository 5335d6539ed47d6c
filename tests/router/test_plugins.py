"""The plugin contract: the documented example channel passes the contract kit, hooks are
called as documented, built-ins come in through entry points, every hook is documented."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import threading
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
from router.testing import CoreHarness, check_channel_contract, example_config

from .helpers import webform_message

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
# Seconds a plugin that ignores its cancellation takes to clean up: twice the bound of the tests
# that show nobody waits for it, so that a busy machine cannot make the one look like the other.
CLEAN_UP = 10.0


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



class CopyingToEveryChannel:
    """A reply_copies plugin that names the conversation's own channel as well as a copy."""

    @hookimpl
    def reply_copies(self, conversation, reply, identities):
        return [{"channel": conversation["channel"], "to_kind": "email", "to": "anwohner@example.net"}]


async def test_a_copy_on_the_conversations_own_channel_is_not_sent_twice(tmp_path):
    """The reply goes out on the conversation's channel anyway; a copy named on that channel
    sent the same answer to the resident a second time."""
    async with CoreHarness(tmp_path / "d", plugins=[CopyingToEveryChannel()]) as harness:
        result = await harness.core.ingest(webform_message())
        status, reply = await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies",
                                          json={"text": "Wir kümmern uns darum."})
        assert status == 201, reply
        assert await harness.count("outbox", "kind = 'reply'") == 1


class CopyingToTheFailedAddress:
    """A reply_copies plugin that copies every answer by e-mail to each of the contact's addresses."""

    @hookimpl
    def reply_copies(self, conversation, reply, identities):
        return [{"channel": "email", "to_kind": "email", "to": i["address"]} for i in identities if i["kind"] == "email"]


async def test_no_copy_goes_to_an_address_a_provider_refused_for_good(tmp_path):
    """An address that bounced for good (or a number that answered STOP) gets no copies."""
    from router.hookspecs import Capabilities, Channel, SendResult

    class Mail(Channel):
        name = "email"
        capabilities = Capabilities(identity_kinds=("email",))

        async def send(self, message):
            return SendResult(provider_id=f"mail-{message.outbox_id}")

    class Plugin:
        @hookimpl
        def register_channels(self):
            return [Mail()]

    async with CoreHarness(tmp_path / "d", plugins=[Plugin(), CopyingToTheFailedAddress()]) as harness:
        sender = {"kind": "email", "address": "anwohner@example.net",
                  "other_identities": [{"kind": "email", "address": "alt@example.net"}]}
        result = await harness.core.ingest(webform_message(sender=sender))
        await harness.core.store.write(lambda conn: conn.execute(
            "UPDATE identities SET failed_at = '2026-11-30T07:00:00.000000Z' WHERE address = 'alt@example.net'"))
        status, reply = await harness.api("POST", f"/api/v1/conversations/{result.conversation_id}/replies",
                                          json={"text": "Wir kümmern uns darum."})
        assert status == 201, reply
        copies = await harness.rows("SELECT to_address FROM outbox WHERE kind = 'reply' AND channel = 'email'")
        assert [r["to_address"] for r in copies] == ["anwohner@example.net"]

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


class ForeignTimeout(BaseException):
    """Another framework's timeout or abort, raised inside a plugin: no ``Exception``."""


class RaisingForeign:
    """A CRM and a router whose client library raises ``ForeignTimeout``, at once or awaited."""

    @hookimpl
    def route_message(self, message, is_customer):
        raise ForeignTimeout("routing service timed out")

    @hookimpl
    async def lookup_customer(self, claim):
        await asyncio.sleep(0)
        raise ForeignTimeout("CRM timed out")


async def test_a_plugin_that_raises_what_is_no_exception_costs_the_message_nothing(tmp_path):
    """The outbox already took any exception from a plugin's send as the plugin's failure; the
    CRM and routing hooks caught ``Exception`` only, so another framework's timeout went
    through the ingest into aiohttp: the provider got a 500 and nothing was stored."""
    async with CoreHarness(tmp_path / "d", plugins=[RaisingForeign()]) as harness:
        result = await harness.core.ingest(webform_message(customer_number="KD-1"))
        assert result.acknowledged and result.unit == "tiefbau-muster"  # the configured rules decided
        assert harness.core.metrics.value("contact_router_hook_errors_total", hook="route_message") == 1
        assert harness.core.metrics.value("contact_router_hook_errors_total", hook="lookup_customer") == 1
        assert await harness.count("messages", "direction = 'in'") == 1


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
    from router.plugins import ChannelsRefused, collect_channels

    pm = create_plugin_manager(False)
    pm.register(SettingsPlugin(SettingsError("channels.demochat.webhook_url", "expected a URL, got 'ftp: x'")), "demochat")
    pm.register(SettingsPlugin(RuntimeError("webhook_url: cannot be read")), "other")
    with pytest.raises(ChannelsRefused) as refused:
        collect_channels(pm, example_config(), {})
    assert sorted(refused.value.errors) == [
        ("channels (other)", "register_channels raised RuntimeError: webhook_url: cannot be read"),
        ("channels.demochat.webhook_url", "expected a URL, got 'ftp: x' (plugin demochat)"),
    ]


# A third-party channel plugin, installed as an integrator installs one: a module and a
# distribution whose entry point is in the group contact_router. ``{register}`` is its hook.
THIRD_PARTY = """
import asyncio

from aiohttp import web

from router.hookspecs import Capabilities, Channel, SendResult, SettingsError, hookimpl


class ThirdChannel(Channel):
    capabilities = Capabilities(identity_kinds=("phone",))

    def __init__(self, name="thirdchat", routes=None):
        self.name = name
        self._routes = routes

    def routes(self):
        return self._routes if self._routes is not None else [web.get("/ping", self.ping)]

    async def ping(self, request):
        return web.Response(text="pong")

    async def send(self, message):
        return SendResult(provider_id="x")


@hookimpl
{register}
"""

REFUSED = {
    "raises": ("def register_channels(settings):\n    raise RuntimeError('CRM credentials\\nmissing')",
               "register_channels raised RuntimeError: CRM credentials missing"),
    "answers text": ("def register_channels(settings):\n    return 'webform'",
                     "register_channels returned 'webform' (str), not a list of Channel instances"),
    "answers a list of text": ("def register_channels(settings):\n    return ['webform']",
                               "register_channels returned 'webform' (str), not a Channel instance"),
    "async and raises": ("async def register_channels(settings):\n    raise RuntimeError('CRM down')",
                         "register_channels raised RuntimeError: CRM down"),
    "async and answers text": ("async def register_channels(settings):\n    await asyncio.sleep(0)\n    return 'x'",
                               "register_channels returned 'x' (str), not a list of Channel instances"),
    "routes that are not RouteDefs": ("def register_channels(settings):\n    return [ThirdChannel(routes=['/x'])]",
                                      "channel 'thirdchat': routes() returned '/x', not an aiohttp RouteDef"),
    "a name taken": ("def register_channels(settings):\n    return [ThirdChannel('webform')]",
                     "a channel named 'webform' is provided by both plugin webform and plugin thirdparty; a name is served once"),
    "a name no message can carry": ("def register_channels(settings):\n    return [ThirdChannel('Third Chat')]",
                                    "a channel is named 'Third Chat'"),
    "a unit that does not exist": (
        "def register_channels(settings, units):\n"
        "    if 'nirgendwo' not in units:\n"
        "        raise SettingsError('channels.thirdchat.unit', 'no unit nirgendwo')\n"
        "    return [ThirdChannel()]",
        "no unit nirgendwo (plugin thirdparty)"),
}


def install_third_party(monkeypatch, folder: Path, register: str) -> None:
    """Put a plugin with this ``register_channels`` where ``create_plugin_manager(True)`` finds it."""
    module = "thirdparty_" + re.sub(r"\W", "_", folder.parent.name)  # a module of its own for each test
    folder.mkdir()
    (folder / f"{module}.py").write_text(THIRD_PARTY.replace("{register}", register), "utf-8")
    info = folder / "thirdparty-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty\nVersion: 0.1\n", "utf-8")
    (info / "entry_points.txt").write_text(f"[contact_router]\nthirdparty = {module}\n", "utf-8")
    monkeypatch.syspath_prepend(str(folder))


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_check_config_and_serve_refuse_the_same_channels_in_one_line_naming_the_plugin(tmp_path, monkeypatch, capsys, case):
    """serve died with a traceback (or, for async def, a coroutine that was never awaited)
    where check-config had said OK, for all but a plugin that raised."""
    from router.cli import main
    from router.config import DEFAULT_CONFIG

    register, says = REFUSED[case]
    install_third_party(monkeypatch, tmp_path / "plugin", register)
    for command in (["check-config", str(DEFAULT_CONFIG)],
                    ["serve", "--config", str(DEFAULT_CONFIG), "--port", "0", "--data-dir", str(tmp_path / "data")]):
        capsys.readouterr()
        assert main(command) == 1, command
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "demo staff tokens" not in line]
        assert len(lines) == 1 and lines[0].startswith(f"{DEFAULT_CONFIG}: "), (command, err)
        assert says in lines[0] and ("thirdparty" in lines[0] or "webform" in says), (command, err)
        assert "Traceback" not in err


def test_check_config_accepts_an_async_register_channels(tmp_path, monkeypatch, capsys):
    from router.cli import main
    from router.config import DEFAULT_CONFIG

    install_third_party(monkeypatch, tmp_path / "plugin",
                        "async def register_channels(settings):\n    await asyncio.sleep(0)\n    return [ThirdChannel()]")
    assert main(["check-config", str(DEFAULT_CONFIG)]) == 0, capsys.readouterr().err
    assert "OK" in capsys.readouterr().out


class UnitsChannelPlugins:
    """Two channel plugins: one that reads ``units`` and is async, one written before there
    were units to read."""

    def __init__(self) -> None:
        self.units: list[object] = []

    def plugins(self) -> list[object]:
        seen = self.units

        class WithUnits:
            @hookimpl
            async def register_channels(self, settings, units):
                seen.append(units)
                await asyncio.sleep(0)
                return [PingChannel("withunits")]

        class Old:
            @hookimpl
            def register_channels(self, settings):
                return [PingChannel("old")]

        return [WithUnits(), Old()]


class PingChannel(hookspecs.Channel):
    capabilities = hookspecs.Capabilities(identity_kinds=("phone",))

    def __init__(self, name: str) -> None:
        self.name = name

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/ping", self.ping)]

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(text=f"{self.name}: {bool(self.context)}")


async def test_register_channels_is_awaited_gets_the_units_and_older_plugins_still_work(tmp_path):
    """register_channels could not check a unit its settings name; an async one was a
    coroutine never awaited."""
    both = UnitsChannelPlugins()
    async with CoreHarness(tmp_path / "d", plugins=both.plugins()) as harness:
        for name in ("withunits", "old"):
            response = await harness.client.get(f"/channels/{name}/ping")
            assert (response.status, await response.text()) == (200, f"{name}: True")
        assert set(harness.core.channels) == {"webform", "withunits", "old"}
    [units] = both.units
    assert set(units) == set(harness.config.units)
    assert units["tiefbau-muster"]["name"] == harness.config.units["tiefbau-muster"].name


ROW = {"customer_number": "KD-1", "name": "Erika Mustermann", "email": "anwohner@example.net",
       "phone": "", "street": "Lindenweg 3", "postcode": "12345", "city": "Musterstadt"}


class Tampering:
    """A plugin that changes what it is passed, as one that strips personal data before asking
    an outside service might."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    @hookimpl
    def route_message(self, message, is_customer):
        message.pop("sender")
        message["text"] = message["text"].upper()
        message["address"]["postcode"] = "99999"
        return None

    @hookimpl
    def message_received(self, message, result):
        self.seen.append(message["text"])
        message["text"] = "changed"

    @hookimpl
    def conversation_routed(self, conversation, rule, reason):
        self.seen.append(conversation["unit"])
        conversation["unit"] = "vertrieb"


async def test_a_plugin_that_changes_what_it_is_passed_changes_nothing_else(tmp_path):
    """route_message got the core's own message: a plugin that popped a key made every message
    a 500, one that changed the text had it stored changed; event hooks shared one dict."""
    first, second = Tampering(), Tampering()
    async with CoreHarness(tmp_path / "d", plugins=[first, second]) as harness:
        result = await harness.core.ingest(webform_message("Baustelle vor dem Haus"))
        await harness.core.drain_background()
        assert result.unit == "tiefbau-muster"  # routed by postcode 12345, not 99999
        stored = await harness.rows("SELECT text FROM messages WHERE direction = 'in'")
        assert [row["text"] for row in stored] == ["Baustelle vor dem Haus"]
        for plugin in (first, second):
            assert sorted(plugin.seen) == ["Baustelle vor dem Haus", "tiefbau-muster"]
        assert harness.core.metrics.value("contact_router_hook_errors_total", hook="route_message") == 0


class Failing:
    """An implementation of both first-result hooks that fails in a given way."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.cancelled = False

    async def _fail(self) -> None:
        if self.how == "raises":
            raise RuntimeError("down")
        if self.how == "cancels itself":
            raise asyncio.CancelledError()  # awaited a client task of its own that was cancelled, say
        try:
            await asyncio.sleep(0.15 if self.how == "slow" else 3600)
        except asyncio.CancelledError:
            self.cancelled = True
            if self.how == "ignores cancellation":
                await asyncio.sleep(CLEAN_UP)  # a clean-up that takes its time
            raise

    @hookimpl
    async def lookup_customer(self, claim):
        await self._fail()

    @hookimpl
    async def route_message(self, message, is_customer):
        await self._fail()


class Deciding:
    @hookimpl(trylast=True)
    def route_message(self, message, is_customer):
        return RoutingDecision(unit="vertrieb", rule="last", reason="asked after the others")


async def test_each_implementation_of_a_first_result_hook_has_its_own_try_and_time_limit(tmp_path, monkeypatch):
    """One CRM that raised or hung shut out every later implementation, the built-in customer
    directory included, and two slow ones that each kept the limit shared it and ran out."""
    monkeypatch.setattr(router.core, "HOOK_SECONDS", 0.3)
    async with CoreHarness(tmp_path / "d", plugins=[Deciding(), *map(Failing, ("raises", "hangs", "slow", "slow"))]) as harness:
        await harness.core.import_customers(lambda: [ROW])
        result = await harness.core.ingest(webform_message(customer_number="KD-1"))
        contacts = await harness.rows("SELECT is_customer FROM contacts")
        assert [c["is_customer"] for c in contacts] == [1]  # the directory was asked, last
        assert result.unit == "vertrieb"  # the last routing plugin was asked
        for hook in ("lookup_customer", "route_message"):
            assert harness.core.metrics.value("contact_router_hook_errors_total", hook=hook) == 2, hook  # raised, hung


@pytest.mark.parametrize("how", ["cancels itself", "ignores cancellation"])
async def test_a_hook_that_cancels_itself_or_ignores_cancellation_fails_alone_in_its_time(tmp_path, monkeypatch, how):
    """A CRM that raised CancelledError itself cancelled the ingest: the message was lost and
    the webhook's connection dropped. One that ignored its cancellation held the message as
    long as its clean-up took (asyncio.wait_for waits for it)."""
    monkeypatch.setattr(router.core, "HOOK_SECONDS", 0.2)
    failing = Failing(how)
    async with CoreHarness(tmp_path / "d", plugins=[Deciding(), failing]) as harness:
        await harness.core.import_customers(lambda: [ROW])
        started = time.monotonic()
        result = await harness.core.ingest(webform_message(customer_number="KD-1"))
        assert time.monotonic() - started < CLEAN_UP / 2  # two hooks of 0.2 s; not the seconds a clean-up takes
        assert await harness.count("messages", "direction = 'in'") == 1
        assert [c["is_customer"] for c in await harness.rows("SELECT is_customer FROM contacts")] == [1]
        assert result.unit == "vertrieb"
        for hook in ("lookup_customer", "route_message"):
            assert harness.core.metrics.value("contact_router_hook_errors_total", hook=hook) == 1, hook
        assert failing.cancelled == (how == "ignores cancellation")


async def test_a_cancelled_ingest_cancels_the_hook_it_waits_for(tmp_path):
    """Our own cancellation (the service stopping) is not a hook's failure: it goes on, and the
    hook is cancelled with it instead of being left to run."""
    hanging = Failing("hangs")
    async with CoreHarness(tmp_path / "d", plugins=[hanging]) as harness:
        task = asyncio.create_task(harness.core.ingest(webform_message(customer_number="KD-1")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert hanging.cancelled
        assert harness.core.metrics.value("contact_router_hook_errors_total", hook="lookup_customer") == 0


async def test_an_event_hook_that_ignores_cancellation_holds_nobody(tmp_path, monkeypatch):
    monkeypatch.setattr(router.core, "HOOK_SECONDS", 0.2)

    class Stubborn:
        @hookimpl
        async def message_received(self, message, result):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(CLEAN_UP)

    async with CoreHarness(tmp_path / "d", plugins=[Stubborn()]) as harness:
        await harness.core.ingest(webform_message())
        started = time.monotonic()
        await harness.core.drain_background()
        assert time.monotonic() - started < CLEAN_UP / 2
        assert harness.core.metrics.value("contact_router_hook_errors_total", hook="message_received") == 1


class Routing:
    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl
    def route_message(self, message, is_customer):
        self.asked.append(message["channel_message_id"])
        return RoutingDecision(unit="vertrieb", rule="policy", reason="the policy service said so")

    @hookimpl
    def lookup_customer(self, claim):
        self.asked.append(f"lookup {claim.customer_number}")


async def test_route_message_is_asked_as_documented_and_its_decision_used_on_opening(tmp_path):
    """The hookspec said route_message was called only for a message that opens a
    conversation; it is called for every message but a reaction or an edit (whether one opens
    a conversation is known only in the transaction that stores it), and lookup_customer for a
    provider's retry too, as the guide now says. The decision counts only on opening."""
    routing = Routing()
    async with CoreHarness(tmp_path / "d", plugins=[routing]) as harness:
        first = await harness.core.ingest(webform_message(channel_message_id="m1", customer_number="KD-9"))
        retry = await harness.core.ingest(webform_message(channel_message_id="m1", customer_number="KD-9"))
        follow = await harness.core.ingest(  # from the status page: it joins the conversation
            webform_message("noch was", channel_message_id="m2", thread={"status_token": first.status_token}))
        assert retry.duplicate and follow.conversation_id == first.conversation_id
        assert routing.asked == ["lookup KD-9", "m1", "lookup KD-9", "m1", "m2"]
        assert first.unit == follow.unit == "vertrieb"


async def test_conversation_answered_gets_the_text_that_was_stored(tmp_path):
    """A call-back logged without a note stored "Call-back: reached" and told the plugins None."""
    events = Events()
    async with CoreHarness(tmp_path / "d", plugins=[events]) as harness:
        result = await harness.core.ingest(webform_message())
        answered: list[object] = []

        class Answered:
            @hookimpl
            def conversation_answered(self, conversation, message):
                answered.append(message["text"])

        harness.core.pm.register(Answered())
        harness.core._refresh_hook_flags()
        await harness.core.log_callback(result.conversation_id, "reached", None, "admin")
        await harness.core.drain_background()
        stored = await harness.rows("SELECT text FROM messages WHERE kind = 'callback'")
        assert answered == [stored[0]["text"]] == ["Call-back: reached"]


def test_an_async_register_channels_that_ignores_its_cancellation_holds_the_start_no_longer_than_its_limit():
    """The values were taken when the loop ended, and ending it waited for the abandoned hook:
    one that never ended held serve and check-config for ever, without a word."""
    import time

    from router.plugins import _resolve_at_start

    async def stubborn():
        for _ in range(int(CLEAN_UP * 10)):
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                pass  # ignores it
        return ["never"]

    async def quick():
        return ["channel"]

    started = time.monotonic()
    late, early = _resolve_at_start([stubborn(), quick()], timeout=0.2)
    assert time.monotonic() - started < CLEAN_UP / 2
    assert isinstance(late, TimeoutError) and early == ["channel"]


def test_serve_refuses_a_channel_whose_setup_raises_in_one_line_naming_the_plugin(tmp_path, monkeypatch, capsys):
    """Channel.setup is the plugin's code as much as register_channels; one that raised (a
    credential it checks there, a file it opens) ended serve with a bare traceback naming
    neither the configuration nor the plugin, while check-config said OK."""
    from router.cli import main
    from router.config import DEFAULT_CONFIG

    install_third_party(monkeypatch, tmp_path / "plugin",
                        "def register_channels(settings):\n"
                        "    class Broken(ThirdChannel):\n"
                        "        def setup(self, context):\n"
                        "            raise RuntimeError('no token for the provider')\n"
                        "    return [Broken()]")
    capsys.readouterr()
    try:
        code = main(["serve", "--config", str(DEFAULT_CONFIG), "--port", "0", "--data-dir", str(tmp_path / "data")])
    except RuntimeError as exc:
        pytest.fail(f"serve died with {exc!r} instead of refusing the plugin in one line")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "demo staff tokens" not in line]
    assert code == 1 and len(lines) == 1 and "thirdparty" in lines[0] and "no token for the provider" in lines[0], err


def test_serve_whose_third_party_service_fails_to_start_says_so_in_one_line_naming_the_plugin(tmp_path, monkeypatch, capsys):
    """A service that raises before its ``yield`` (a provider refusing the plugin's credentials)
    ended serve with aiohttp's traceback, or, for a port in use, with a line naming the
    service's --port, which was not the port in use."""
    from router.cli import main
    from router.config import DEFAULT_CONFIG

    install_third_party(monkeypatch, tmp_path / "plugin",
                        "def register_channels(settings):\n"
                        "    class Starting(ThirdChannel):\n"
                        "        def services(self):\n"
                        "            async def poller():\n"
                        "                raise RuntimeError('the provider refused the token')\n"
                        "                yield\n"
                        "            return [poller]\n"
                        "    return [Starting()]")
    capsys.readouterr()
    code = main(["serve", "--config", str(DEFAULT_CONFIG), "--port", "0", "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "demo staff tokens" not in line]
    assert code == 1 and "Traceback" not in err, err
    assert lines == ["contact-router serve: channel 'thirdchat' (plugin thirdparty) could not start:"
                     " the provider refused the token"], err
    # What had started is stopped: the store's threads kept the process alive, listening on nothing.
    assert not [t.name for t in threading.enumerate() if t.name.startswith("sqlite-writer") and t.is_alive()]


async def test_event_hooks_get_the_conversation_fields_the_hookspec_names_and_no_status_token(tmp_path):
    """conversation_routed got the fields its spec names; conversation_answered and
    conversation_escalated got the whole stored row: 26 columns, among them the status token
    (the secret of the resident's status page, which an audit-log plugin then writes out),
    contact_id and the flags as JSON text."""
    from datetime import timedelta

    seen: dict[str, list[dict]] = {}

    class Spy:
        @hookimpl
        def conversation_routed(self, conversation, rule, reason):
            seen.setdefault("routed", []).append(dict(conversation))

        @hookimpl
        def conversation_answered(self, conversation, message):
            seen.setdefault("answered", []).append(dict(conversation))

        @hookimpl
        def conversation_escalated(self, conversation, from_unit, to_unit, level):
            seen.setdefault("escalated", []).append(dict(conversation))

    async with CoreHarness(tmp_path / "d", plugins=[Spy()]) as harness:
        first = await harness.core.ingest(webform_message())
        await harness.api("POST", f"/api/v1/conversations/{first.conversation_id}/replies", json={"text": "Antwort"})
        await harness.run_outbox()
        second = await harness.core.ingest(webform_message("Noch etwas", email="zwei@example.net"))
        status, _ = await harness.api("POST", f"/api/v1/conversations/{second.conversation_id}/transfer",
                                      json={"unit": "bauhotline"})
        assert status == 200
        harness.clock.advance(timedelta(days=10))
        await harness.escalate()
        await harness.events_done()
    documented = {  # router/hookspecs.py
        "routed": {"id", "case_reference", "unit", "channel", "deadline"},
        "answered": {"id", "case_reference", "unit", "channel"},
        "escalated": {"id", "case_reference", "unit", "deadline"},
    }
    assert set(seen) == set(documented)
    assert len(seen["routed"]) == 3  # two openings and the transfer
    for hook, conversations in seen.items():
        for conversation in conversations:
            assert set(conversation) == documented[hook], (hook, sorted(conversation))


async def test_the_harness_outbox_retries_once_the_test_moves_its_clock_as_the_guide_says(tmp_path):
    """docs/plugins.md: the harness's outbox retries fast, by its clock, which stands still.
    run_outbox said "retries that fall due within the rounds included" and a plugin author
    waited for a retry that never came: each attempt is the test's to bring about."""
    from datetime import timedelta

    from router.hookspecs import RetryableDeliveryError, SendResult

    class Flaky(hookspecs.Channel):
        name = "flaky"
        capabilities = hookspecs.Capabilities(identity_kinds=("phone",))

        def __init__(self) -> None:
            self.calls = 0

        async def send(self, message):
            self.calls += 1
            if self.calls == 1:
                raise RetryableDeliveryError("provider answered 503")
            return SendResult(provider_id=f"f-{self.calls}")

    channel = Flaky()

    class Plugin:
        @hookimpl
        def register_channels(self, settings):
            return [channel]

    async with CoreHarness(tmp_path / "d", plugins=[Plugin()]) as harness:
        await harness.core.ingest({"channel": "flaky", "channel_message_id": "f1", "text": "Hallo",
                                   "sender": {"kind": "phone", "address": "+4915112345678"}})
        await harness.run_outbox()
        [row] = await harness.rows("SELECT state, attempts FROM outbox WHERE channel = 'flaky'")
        assert channel.calls == 1 and (row["state"], row["attempts"]) == ("pending", 1), (channel.calls, dict(row))
        harness.clock.advance(timedelta(seconds=1))  # as the guide says
        await harness.run_outbox()
        [row] = await harness.rows("SELECT state, attempts FROM outbox WHERE channel = 'flaky'")
        assert channel.calls == 2 and row["state"] == "sent", (channel.calls, dict(row))


def test_an_entry_point_installed_twice_is_loaded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same plugin found twice (an old copy of a distribution left on the path next to the
    new one) must be registered once: registering its name again stopped the start."""
    dist = tmp_path / "contact_router_webform_copy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: contact-router-webform-copy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[contact_router]\nwebform = plugins.webform\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from importlib.metadata import entry_points

    assert len([ep for ep in entry_points(group=hookspecs.PROJECT) if ep.name == "webform"]) >= 2
    pm = create_plugin_manager(("webform",))
    assert [name for name, _ in pm.list_name_plugin() if name == "webform"] == ["webform"]
