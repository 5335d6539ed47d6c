"""The aiohttp application factory: configuration, store, plugins and channels wired together;
every resource with a lifetime lives in a ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from . import keys, tracking
from .channel import BodyDeadline, BodyTimeout, Channel, InvalidMessage, StorageUnavailable
from .clock import Clock
from .config import Config
from .context import ChannelContext
from .core import ActionError, Core, DirectoryPlugin
from .inbox.api import setup_inbox
from .metrics import Metrics
from .outbox import OutboxPolicy, OutboxWorker
from .plugins import ChannelsRefused, channels_by_plugin, create_plugin_manager, one_line
from .store.sqlite import SQLiteStore, is_outage

log = logging.getLogger("contact_router.app")

MAX_BODY_BYTES = 1024 * 1024


def json_error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    """The one error shape of the HTTP API: ``{"error": {"code": ..., "message": ...}}``."""
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
               409: "conflict", 413: "too_large", 415: "unsupported_media_type", 429: "rate_limited"}


class _BodyWatch:
    """Holds a request to its ``BodyDeadline`` while its body is still arriving: the timer
    looks again when the time allowed so far runs out, and once the time allowed for what has
    arrived has passed, every read of what is still missing raises ``BodyTimeout``."""

    __slots__ = ("_content", "_deadline", "_handle", "_loop", "_started")

    def __init__(self, content: aiohttp.StreamReader, deadline: BodyDeadline) -> None:
        self._content, self._deadline = content, deadline
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._handle = self._loop.call_later(deadline.seconds, self._look)

    def _look(self) -> None:
        if self._content.is_eof():
            return
        allowed = self._deadline.allowed(self._content.total_bytes)
        left = self._started + allowed - self._loop.time()
        if left > 0:  # it is arriving, fast enough so far
            self._handle = self._loop.call_later(left, self._look)
        else:
            self._content.set_exception(BodyTimeout(allowed))

    def cancel(self) -> None:
        self._handle.cancel()


def _logged_path(request: web.Request) -> str:
    """The request's route as registered (``/channels/phone/cti/{secret}``), not its path: a
    path can hold a secret (the PBX's credential, a resident's status token), which an outage
    or an error wrote into the log."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Domain errors become JSON responses; nothing unexpected leaks out as an HTML 500.

    It also holds the body deadline: a body not yet whole when the handler starts (a webhook's
    mostly is, in the packet of its headers, and then costs nothing here) must keep to the
    app's ``BodyDeadline``, or the reads waiting for it fail and the sender gets 408."""
    watch = None if request.content.is_eof() else _BodyWatch(request.content, request.config_dict[keys.BODY_DEADLINE])
    try:
        return await handler(request)
    except BodyTimeout as exc:
        log.info("%s %s: %s", request.method, _logged_path(request), exc)
        response = json_error(408, "body_timeout", str(exc))
        response.force_close()  # the rest of that body would only be read to be thrown away
        return response
    except InvalidMessage as exc:
        return json_error(400, "invalid_message", exc.message, field=exc.path)
    except StorageUnavailable as exc:
        # Nothing was stored; the sender (a provider, a form, a staff member) tries again.
        log.error("%s %s: %s", request.method, _logged_path(request), exc)
        response = json_error(503, "unavailable", "the service cannot store this now; try again shortly")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except sqlite3.DatabaseError as exc:
        if not is_outage(exc):
            log.exception("unhandled error on %s %s", request.method, _logged_path(request))
            return json_error(500, "internal_error", "internal error; it has been logged")
        # A read the database could not serve (its file gone, unreadable, the disk failing):
        # the database's fault, not the request's, as for a write.
        log.error("%s %s: the database cannot be read: %s", request.method, _logged_path(request), exc)
        response = json_error(503, "unavailable", "the service cannot read its data now; try again shortly")
        response.headers["Retry-After"] = str(StorageUnavailable.retry_after)
        return response
    except ActionError as exc:
        return json_error(exc.status, exc.code, exc.message, **({"field": exc.field} if exc.field else {}))
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json" and not request.path.startswith("/channels/webform/"):
            # A handler's own plain-text explanation is kept; aiohttp's default text is "400: Bad Request".
            own = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else None
            response = json_error(exc.status, _HTTP_CODES.get(exc.status, "error"), own or exc.reason)
            if exc.status == 405 and "Allow" in exc.headers:
                # RFC 9110 (15.5.6): a 405 names the methods the resource takes; aiohttp's exception carries them.
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        raise
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, _logged_path(request))
        return json_error(500, "internal_error", "internal error; it has been logged")
    finally:
        if watch is not None:
            watch.cancel()


def _channel_routes(channel: Channel) -> list[web.RouteDef]:
    prefix = f"/channels/{channel.name}"
    routes = []
    for route in channel.routes():
        if not isinstance(route, web.RouteDef):
            raise TypeError(f"channel {channel.name!r}: routes() must return aiohttp RouteDefs")
        path = route.path if route.path.startswith("/") else "/" + route.path
        routes.append(web.RouteDef(route.method, prefix + path, route.handler, route.kwargs))
    return routes


def create_app(
    config: Config,
    *,
    data_dir: Path,
    clock: Clock | None = None,
    entrypoints: bool | Iterable[str] = True,
    extra_plugins: Iterable[Any] = (),
    outbox_policy: OutboxPolicy | None = None,
    run_workers: bool = True,
    env: dict[str, str] | None = None,
    allow_demo_tokens: bool = True,
) -> web.Application:
    """Build the application. ``run_workers=False`` leaves the outbox worker and the escalation
    scheduler to the caller (tests drive them step by step). ``allow_demo_tokens=False`` refuses
    staff tokens that come from the configuration's demo defaults. Raises ``ChannelsRefused``
    (``router.plugins``) when a channel plugin's answer to ``register_channels`` cannot be served
    or a channel's ``setup`` raises. Starting it raises ``StartFailed`` when the database cannot
    be opened or a channel's service cannot start, after stopping what had started."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    clock = clock or Clock()
    metrics = Metrics()
    store = SQLiteStore(data_dir / "contact-router.sqlite3")
    pm = create_plugin_manager(entrypoints)
    pm.register(DirectoryPlugin(store), name="builtin-directory")
    for plugin in extra_plugins:
        pm.register(plugin)
    core = Core(config=config, store=store, pm=pm, clock=clock, data_dir=data_dir, metrics=metrics)

    app[keys.CONFIG] = config
    app[keys.DATA_DIR] = data_dir
    app[keys.CLOCK] = clock
    app[keys.PLUGINS] = pm
    app[keys.STORE] = store
    app[keys.CORE] = core
    app[keys.METRICS] = metrics
    policy = outbox_policy or OutboxPolicy()
    if policy.answer_deadline is None:  # a lost answer is due again in the unit's response time
        policy = dataclasses.replace(policy, answer_deadline=partial(tracking.deadline_for, config))
    app[keys.OUTBOX_POLICY] = policy
    app[keys.RUN_WORKERS] = run_workers
    app[keys.WORKERS] = []
    app[keys.BODY_DEADLINE] = BodyDeadline()

    # Called and checked as check-config does; raises ChannelsRefused, naming each plugin.
    provided = channels_by_plugin(pm, config, os.environ if env is None else env)
    channels = [channel for _, channel in provided]
    core.add_channels(channels)
    app[keys.CHANNEL_PLUGINS] = {channel.name: plugin for plugin, channel in provided}

    def http() -> aiohttp.ClientSession:
        return app[keys.HTTP]

    refused: list[tuple[str, str]] = []
    for plugin, channel in provided:
        try:
            context = ChannelContext(
                name=channel.name,
                settings=config.channels.get(channel.name, {}) or {},
                data_dir=data_dir,
                public_base_url=config.public_base_url,
                clock=clock,
                ingest=core.ingest,
                record_delivery=core.record_delivery,
                conversation_view=partial_view(core),
                http=http,
                render=core.templates.render,
                units={u.id: u.public() for u in config.units.values()},
                is_open=lambda unit_id, when: unit_id in config.units and config.units[unit_id].hours.is_open(when),
                record_event=core.record_channel_event,
                timezone=config.timezone,
                record_live_answer=core.record_live_answer,
            )
            channel.setup(context)
        except Exception as exc:  # the plugin's code: refused as check-config refuses register_channels
            refused.append((f"channels ({plugin})", one_line(
                f"channel {channel.name!r}: setup raised {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
            )))
            continue
        app.router.add_routes(_channel_routes(channel))
    if refused:
        raise ChannelsRefused(refused)

    app.cleanup_ctx.append(_lifetime_ctx)
    setup_inbox(app, allow_demo_tokens=allow_demo_tokens)
    return app


class StartFailed(Exception):
    """The database could not be opened, or a channel's service could not start (a port in
    use, a provider refusing the plugin's credentials): one line naming the data folder or the
    channel and its plugin, for ``serve`` to print."""


async def _lifetime_ctx(app: web.Application) -> AsyncIterator[None]:
    """The store, the HTTP client session, the channels' services and the workers, started in
    this order and stopped in the reverse. One context for them all, so that a part that fails
    to start stops the parts started before it: aiohttp runs no cleanup when its start fails,
    and the store's threads left running kept the process alive, listening on nothing."""
    async with contextlib.AsyncExitStack() as stack:
        for part in (_store_ctx, _http_ctx, _services_ctx, _workers_ctx):
            await stack.enter_async_context(contextlib.asynccontextmanager(part)(app))
        yield


def partial_view(core: Core) -> Callable[..., Awaitable[dict[str, Any] | None]]:
    from .inbox.queries import resident_view

    async def view(*, status_token: str) -> dict[str, Any] | None:
        return await resident_view(core, status_token)

    return view


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[keys.STORE]
    try:
        await store.open()
    except sqlite3.DatabaseError as exc:  # a file that is no database, a folder, no right to write, a full disk
        raise StartFailed(f"--data-dir {app[keys.DATA_DIR]}: the database {store.path.name} cannot be opened"
                          f" or brought up to date: {exc}") from exc
    config, clock = app[keys.CONFIG], app[keys.CLOCK]
    moved = await store.write(partial(tracking.adopt_orphans, config=config, now=clock.now()))
    if moved:
        log.warning("%d conversations named units no longer configured; moved to %s", moved, config.fallback_unit)
    try:
        yield
    finally:
        await app[keys.CORE].drain_background()
        await store.close()


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, connect=10))
    app[keys.HTTP] = session
    try:
        yield
    finally:
        await app[keys.CORE].drain_background()  # event hooks still running may use the session
        await session.close()


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start every channel's long-running services; stop them in reverse order."""
    plugins = app[keys.CHANNEL_PLUGINS]
    async with contextlib.AsyncExitStack() as stack:
        for channel in app[keys.CORE].channels.values():
            for service in channel.services():
                try:
                    await stack.enter_async_context(contextlib.asynccontextmanager(service)())
                except Exception as exc:
                    raise StartFailed(one_line(
                        f"channel {channel.name!r} (plugin {plugins.get(channel.name, '?')}) could not start:"
                        f" {exc or type(exc).__name__}"
                    )) from exc
        yield


async def _workers_ctx(app: web.Application) -> AsyncIterator[None]:
    core = app[keys.CORE]
    core.outbox = OutboxWorker(
        store=app[keys.STORE],
        config=app[keys.CONFIG],
        channels=core.channels,
        clock=app[keys.CLOCK],
        policy=app[keys.OUTBOX_POLICY],
        status_url=core.status_url,
        on_answered=core.on_answered,
    )
    tasks = []
    if app[keys.RUN_WORKERS]:
        tasks.append(asyncio.create_task(core.outbox.run(), name="outbox"))
        tasks.append(asyncio.create_task(core.run_scheduler(), name="escalation-scheduler"))
    app[keys.WORKERS].extend(tasks)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
