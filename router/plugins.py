"""The plugin manager: the hook specification, the built-in plugins, and third-party plugins
from the entry-point group ``contact_router`` (the built-in channels come in the same way).

pluggy is synchronous; hooks here may return awaitables, which ``call_first`` awaits in order,
as datasette's ``await_me_maybe`` does, and ``call_all`` awaits together, each with a time
limit of its own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pluggy

from . import hookspecs
from .channel import SettingsError

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


async def await_me_maybe(value: Any) -> Any:
    """A hook result may be a value, a callable or an awaitable; resolve it to a value."""
    if callable(value) and not inspect.isawaitable(value):
        value = value()
    if inspect.isawaitable(value):
        value = await value
    return value


def has_implementations(pm: pluggy.PluginManager, hook: str) -> bool:
    """Whether any plugin implements ``hook`` (so the host can skip calling it per message)."""
    return bool(getattr(pm.hook, hook).get_hookimpls())


async def call_first(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> Any:
    """Call implementations in pluggy's order (tryfirst first, trylast last), awaiting each,
    and return the first non-None result."""
    caller = getattr(pm.hook, hook)
    for impl in reversed(caller.get_hookimpls()):
        args = {name: kwargs[name] for name in impl.argnames if name in kwargs}
        result = await await_me_maybe(impl.function(**args))
        if result is not None:
            return result
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

    The awaitables run together, each within ``timeout`` seconds. An implementation that raises
    or runs out of time is handed to ``on_error`` (its plugin's name and the exception) and
    costs the others nothing: one CRM that hangs must not keep an audit log from its event,
    nor leave the implementations after it never called."""
    impls = list(reversed(getattr(pm.hook, hook).get_hookimpls()))

    async def settle(impl: Any) -> Any:
        args = {name: kwargs[name] for name in impl.argnames if name in kwargs}
        return await asyncio.wait_for(await_me_maybe(impl.function(**args)), timeout)

    outcomes = await asyncio.gather(*(settle(impl) for impl in impls), return_exceptions=True)
    results = []
    for impl, outcome in zip(impls, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            on_error(impl.plugin_name, outcome)
        elif outcome is not None:
            results.append(outcome)
    return results


def channel_settings_errors(
    pm: pluggy.PluginManager, settings: Mapping[str, Any], env: Mapping[str, str], topics: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """What each channel plugin refuses in its settings, as (key path, message) pairs, found
    by registering its channels as the service does at start (a ``SettingsError`` names its
    key; any other error is reported with the plugin's name), for ``check-config`` to report
    with the file. (``serve`` registers them once, in the app, and reports the same errors.)"""
    errors = []
    for impl in reversed(pm.hook.register_channels.get_hookimpls()):
        args = {"settings": settings, "env": dict(env), "topics": topics}
        try:
            impl.function(**{name: args[name] for name in impl.argnames if name in args})
        except SettingsError as exc:
            errors.append((exc.path, exc.message))
        except Exception as exc:  # anything else is reported as it is, with the plugin
            errors.append((f"channels ({impl.plugin_name})", str(exc)))
    return errors
