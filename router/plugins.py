"""The plugin manager: the hook specification, the built-in plugins, and third-party plugins
from the entry-point group ``contact_router`` (the built-in channels come in the same way).

pluggy is synchronous; hooks here may return awaitables, which ``call_first`` awaits in order,
as datasette's ``await_me_maybe`` does, and ``call_all`` awaits together. Either way each
implementation gets its own copy of the arguments and a time limit of its own, and one that
fails is reported and skipped. ``collect_channels`` calls and checks ``register_channels`` for
``serve`` and ``check-config`` alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import inspect
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pluggy
from aiohttp import web

from . import hookspecs
from .channel import ENDINGS, Capabilities, Channel, SettingsError

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("contact_router.plugins")


def create_plugin_manager(entrypoints: bool | Iterable[str] = True) -> pluggy.PluginManager:
    """A plugin manager with the hook specification registered.

    ``entrypoints``: True loads every plugin of the ``contact_router`` group; an iterable of
    names loads only those (tests use it so that unrelated installed packages never leak
    in); False loads none.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if entrypoints is True:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    elif entrypoints:
        wanted = set(entrypoints)
        from importlib.metadata import entry_points

        for ep in entry_points(group=hookspecs.PROJECT):
            if ep.name in wanted and pm.get_plugin(ep.name) is None:
                pm.register(ep.load(), name=ep.name)
    return pm


def has_implementations(pm: pluggy.PluginManager, hook: str) -> bool:
    """Whether any plugin implements ``hook`` (so the host can skip calling it per message)."""
    return bool(getattr(pm.hook, hook).get_hookimpls())


class HookCancelled(Exception):
    """A hook implementation raised ``asyncio.CancelledError`` although nobody cancelled it (it
    awaited a task of its own that was cancelled, say). That is its failure, not ours: passed
    on as a cancellation, it would cancel the request it was called for and lose the message."""


_abandoned: set[asyncio.Task[Any]] = set()
"""Hook tasks cancelled at their time limit and left to end on their own (one that ignores
the cancellation may take its time): held here, since the event loop keeps only weak references
to tasks and one collected while pending is reported as destroyed."""


def _let_go(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved, so that asyncio does not log it as never retrieved


def _own_copy(value: Any) -> Any:
    """A copy of an argument that one implementation may change as it likes: dicts and lists
    (a message, a conversation) all the way down; text, numbers, times and frozen dataclasses
    (``CustomerClaim``, ``IngestResult``) cannot be changed and are passed as they are."""
    if value is None or isinstance(value, (str, int, float, bytes, datetime)):
        return value
    if isinstance(value, Mapping):
        return {key: _own_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_own_copy(item) for item in value]
    if type(value) is tuple:
        return tuple(_own_copy(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and value.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        return value
    return copy.deepcopy(value)


async def _bounded(awaitable: Awaitable[Any], timeout: float) -> Any:
    """``awaitable``'s value, waited for at most ``timeout`` seconds.

    It runs as a task of its own: at the limit the task is cancelled and abandoned, not waited
    for (``asyncio.wait_for`` would wait until a hook that ignores the cancellation is done).
    When our caller is cancelled, the task is cancelled with it and the cancellation goes on;
    a task that ends cancelled without that raised ``CancelledError`` itself: ``HookCancelled``."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        _abandoned.add(task)
        task.add_done_callback(_let_go)
        raise TimeoutError(f"no answer within {timeout:g} s")
    if task.cancelled():
        raise HookCancelled("the hook raised CancelledError although it was not cancelled")
    return task.result()


async def _settle(impl: Any, kwargs: Mapping[str, Any], timeout: float) -> Any:
    """One implementation's answer: called with its own copy of the arguments it declares, its
    awaitable (or callable) answer resolved, within ``timeout`` seconds."""
    args = {name: _own_copy(kwargs[name]) for name in impl.argnames if name in kwargs}
    try:
        value = impl.function(**args)
        if callable(value) and not inspect.isawaitable(value):
            value = value()
    except asyncio.CancelledError as exc:  # nothing was awaited yet: it cannot be ours
        raise HookCancelled("the hook raised CancelledError although it was not cancelled") from exc
    if inspect.isawaitable(value):
        return await _bounded(value, timeout)
    return value


async def call_first(
    pm: pluggy.PluginManager,
    hook: str,
    *,
    timeout: float,
    on_error: Callable[[str, BaseException], None],
    accept: Callable[[str, Any], Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Ask the implementations one after another, in pluggy's order (tryfirst first, trylast
    last), and return the first answer that is not None.

    Each implementation gets its own copy of the arguments and ``timeout`` seconds of its own.
    One that raises (a ``CancelledError`` of its own, or anything that is no ``Exception``,
    included), runs out of time, or answers
    something ``accept`` refuses (``accept(plugin, answer)`` raises; it may also return None to
    pass the question on, or the answer to keep) is handed to ``on_error`` (its plugin's name
    and the exception) and skipped: the next one is asked. A CRM that is down or slow must not
    keep the built-in customer directory, a ``trylast`` implementation, from answering."""
    for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):
        try:
            answer = await _settle(impl, kwargs, timeout)
            if answer is not None and accept is not None:
                answer = accept(impl.plugin_name, answer)
        except (*ENDINGS, asyncio.CancelledError):
            raise  # the process or the caller is stopping (a hook's own CancelledError is HookCancelled)
        except BaseException as exc:  # also one that is no Exception, as another framework's timeout
            on_error(impl.plugin_name, exc)
            continue
        if answer is not None:
            return answer
    return None


async def call_all(
    pm: pluggy.PluginManager,
    hook: str,
    *,
    timeout: float,
    on_error: Callable[[str, BaseException], None],
    **kwargs: Any,
) -> list[Any]:
    """Call every implementation and collect the results (``None`` dropped), in pluggy's order.

    The awaitables run together, each with its own copy of the arguments and within ``timeout``
    seconds. An implementation that raises or runs out of time is handed to ``on_error`` (its
    plugin's name and the exception) and costs the others nothing: one CRM that hangs must not
    keep an audit log from its event, nor leave the implementations after it never called."""
    impls = list(reversed(getattr(pm.hook, hook).get_hookimpls()))
    outcomes = await asyncio.gather(*(_settle(impl, kwargs, timeout) for impl in impls), return_exceptions=True)
    results = []
    for impl, outcome in zip(impls, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            on_error(impl.plugin_name, outcome)
        elif outcome is not None:
            results.append(outcome)
    return results


# -------------------------------------------------------------------------------------------
# Channels
# -------------------------------------------------------------------------------------------

CHANNEL_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
"""What a channel may be called: the inbound message schema's pattern for ``channel``, since a
channel with another name could not hand over a single message."""

REGISTER_SECONDS = 10.0
"""How long an ``async`` ``register_channels`` may take at start."""


class ChannelsRefused(ValueError):
    """The channel plugins' answers to ``register_channels`` that cannot be served: ``errors``
    holds (key path, message) pairs, each naming its plugin, for ``ConfigError`` to print one
    line each with the configuration file."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("\n".join(f"{path}: {message}" for path, message in errors))
        self.errors = errors


def one_line(text: str, limit: int = 300) -> str:
    """A plugin's message as one line of a report: its own line breaks would split the error."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raised(exc: BaseException) -> str:
    return one_line(f"register_channels raised {type(exc).__name__}" + (f": {exc}" if str(exc) else ""))


def collect_channels(
    pm: pluggy.PluginManager, config: Config, env: Mapping[str, str], *, timeout: float = REGISTER_SECONDS
) -> list[Channel]:
    """Every channel the plugins provide, checked (see ``channels_by_plugin``)."""
    return [channel for _, channel in channels_by_plugin(pm, config, env, timeout=timeout)]


def channels_by_plugin(
    pm: pluggy.PluginManager, config: Config, env: Mapping[str, str], *, timeout: float = REGISTER_SECONDS
) -> list[tuple[str, Channel]]:
    """Every channel the plugins provide, checked, each with the name of its plugin: what
    ``serve`` mounts is what ``check-config`` checks, since both call this.

    Each ``register_channels`` implementation is called with its own copy of the arguments; an
    awaitable answer is awaited (see ``_resolve_at_start``). Each answer must be None or a list
    of ``Channel`` instances; each channel needs a name of its own that an inbound message can
    carry, ``Capabilities``, and ``routes()`` that are aiohttp ``RouteDef``s. Raises
    ``ChannelsRefused`` with every error found (a ``SettingsError`` under its key path, the
    rest under ``channels (<plugin>)``), each naming its plugin, so that both commands report
    them all at once, one line each, and ``serve`` starts with none of them."""
    kwargs = {
        "settings": config.channels,
        "env": dict(env),
        "topics": config.topics,
        "units": {unit.id: unit.public() for unit in config.units.values()},
    }
    errors: list[tuple[str, str]] = []
    answers: list[tuple[str, Any]] = []
    for impl in reversed(pm.hook.register_channels.get_hookimpls()):
        try:
            answers.append((impl.plugin_name, impl.function(
                **{name: _own_copy(kwargs[name]) for name in impl.argnames if name in kwargs}
            )))
        except (Exception, asyncio.CancelledError) as exc:
            answers.append((impl.plugin_name, exc))
    waiting = [i for i, (_, answer) in enumerate(answers) if inspect.isawaitable(answer)]
    if waiting:
        resolved = _resolve_at_start([answers[i][1] for i in waiting], timeout)
        for i, value in zip(waiting, resolved, strict=True):
            answers[i] = (answers[i][0], value)

    channels: list[tuple[str, Channel]] = []
    provided_by: dict[str, str] = {}
    for plugin, answer in answers:
        where = f"channels ({plugin})"
        if isinstance(answer, SettingsError):
            errors.append((answer.path, one_line(f"{answer.message} (plugin {plugin})")))
            continue
        if isinstance(answer, BaseException):
            errors.append((where, _raised(answer)))
            continue
        if answer is None:
            continue
        if isinstance(answer, (str, bytes, Mapping)) or not isinstance(answer, (list, tuple)):
            errors.append((where, one_line(
                f"register_channels returned {answer!r:.80} ({type(answer).__name__}), not a list of Channel instances"
            )))
            continue
        for channel in answer:
            problem = _channel_problem(channel, plugin, provided_by)
            if problem is not None:
                errors.append((where, one_line(problem)))
                continue
            provided_by[channel.name] = plugin
            channels.append((plugin, channel))
    if errors:
        raise ChannelsRefused(errors)
    return channels


def _channel_problem(channel: Any, plugin: str, provided_by: Mapping[str, str]) -> str | None:
    """What keeps one channel that ``register_channels`` returned from being served, or None."""
    if not isinstance(channel, Channel):
        return f"register_channels returned {channel!r:.80} ({type(channel).__name__}), not a Channel instance"
    name = channel.name
    if not isinstance(name, str) or not CHANNEL_NAME.fullmatch(name):
        return (f"a channel is named {name!r:.40}; a name is 1 to 32 lower-case letters, digits, '_' or '-',"
                " starting with a letter")
    if name in provided_by:  # neither is to blame alone: both are named
        other = provided_by[name]
        if other == plugin:
            return f"plugin {plugin} provides two channels named {name!r}"
        return f"a channel named {name!r} is provided by both plugin {other} and plugin {plugin}; a name is served once"
    if not isinstance(channel.capabilities, Capabilities):
        return f"channel {name!r}: capabilities is {channel.capabilities!r:.80}, not a Capabilities instance"
    try:
        routes = channel.routes()
    except Exception as exc:
        return f"channel {name!r}: routes() raised {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
    if not isinstance(routes, (list, tuple)):
        return f"channel {name!r}: routes() returned {routes!r:.80}, not a list of aiohttp RouteDefs"
    wrong = [route for route in routes if not isinstance(route, web.RouteDef)]
    if wrong:
        return (f"channel {name!r}: routes() returned {wrong[0]!r:.80}, not an aiohttp RouteDef"
                " (web.get(...), web.post(...))")
    return None


def _resolve_at_start(awaitables: list[Awaitable[Any]], timeout: float) -> list[Any]:
    """The values (or exceptions) of ``register_channels`` answers that are awaitables.

    Registration happens once, in the synchronous app factory, before the service's event loop
    runs (or, under a test, while it runs the caller), so they are awaited together on an event
    loop of their own, in a thread of its own, each within ``timeout`` seconds. Whatever such a
    coroutine creates bound to that loop (a ``ClientSession``, a task) is useless afterwards: a
    channel gets ``context.http`` and starts its work in ``services()``.

    The values are taken as soon as they are there, not when the loop ends: ending it waits
    for every task still running, an abandoned hook that ignores its cancellation too (a
    coroutine that never ended held the start for ever). The thread is a daemon, so such a
    hook does not keep the process alive either."""
    values: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()

    async def settle() -> None:
        try:
            values.set_result(await asyncio.gather(*(_bounded(a, timeout) for a in awaitables), return_exceptions=True))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            values.set_exception(exc)

    threading.Thread(target=asyncio.run, args=(settle(),), daemon=True, name="register-channels").start()
    return values.result()
