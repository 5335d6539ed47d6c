"""Every piece of application state, under typed ``web.AppKey``s declared in one place."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pluggy
from aiohttp import web

from .channel import BodyDeadline
from .clock import Clock
from .config import Config
from .core import Core
from .metrics import Metrics
from .outbox import OutboxPolicy
from .store.sqlite import SQLiteStore

if TYPE_CHECKING:  # the inbox's module imports this one
    from .inbox.api import OutboxWatch

CONFIG = web.AppKey("config", Config)
DATA_DIR = web.AppKey("data_dir", Path)
CLOCK = web.AppKey("clock", Clock)
PLUGINS = web.AppKey("plugins", pluggy.PluginManager)
STORE = web.AppKey("store", SQLiteStore)
CORE = web.AppKey("core", Core)
METRICS = web.AppKey("metrics", Metrics)
HTTP = web.AppKey("http", aiohttp.ClientSession)
OUTBOX_POLICY = web.AppKey("outbox_policy", OutboxPolicy)
RUN_WORKERS = web.AppKey("run_workers", bool)
BODY_DEADLINE = web.AppKey("body_deadline", BodyDeadline)  # how long a request body may take to arrive
STAFF = web.AppKey("staff", tuple)  # the StaffMembers whose tokens the inbox API accepts
CHANNEL_PLUGINS = web.AppKey("channel_plugins", dict)  # channel name -> the plugin that provides it
WORKERS = web.AppKey("workers", list)  # the outbox's and the escalation scheduler's tasks, for /healthz
OUTBOX_WATCH: web.AppKey[OutboxWatch] = web.AppKey("outbox_watch")  # /healthz's memory of the outbox's outcomes
