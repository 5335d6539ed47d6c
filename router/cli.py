"""The ``contact-router`` command: ``serve``, ``check-config``, ``import-customers``."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import csv
import gc
import ipaddress
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Collection, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from .channel import StorageUnavailable
from .config import DEFAULT_CONFIG, Config, ConfigError, load_config

log = logging.getLogger("contact_router")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def demo_tokens_allowed(host: str, public_base_url: str) -> bool:
    """Whether the demo staff tokens of the example configuration may be used: only for a
    service on this machine alone. Listening on a loopback address is not enough, since a
    reverse proxy on the same machine reaches the service there too; a public
    ``PUBLIC_BASE_URL`` says the service is exposed."""
    return _is_loopback(host) and _is_loopback(urlsplit(public_base_url).hostname or "")


def _default_data_dir() -> Path:
    return Path(os.environ.get("CONTACT_ROUTER_DATA_DIR", "data"))


LOCK_FILE = "contact-router.lock"
"""The file in the data folder that a running ``serve`` holds an exclusive lock on."""


class DataDirInUse(Exception):
    """Another process holds the data folder's lock: a second ``serve`` on the same folder."""

    def __init__(self, data_dir: Path, holder: int | None) -> None:
        who = f"another contact-router (PID {holder})" if holder else "another contact-router"
        super().__init__(f"the data folder {data_dir} is in use by {who}; two on one folder would send acknowledgements"
                         " and escalate cases twice: stop it first, or give this one a --data-dir of its own")
        self.data_dir = data_dir
        self.holder = holder


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on the data folder's ``LOCK_FILE`` for the
    block, with this process's id written into the file for the one refused. Raises
    ``DataDirInUse`` when another process holds it, ``OSError`` when the folder cannot be made
    or written to.

    Two services on one SQLite file would each run the outbox worker and the escalation
    scheduler. The OS drops the lock with the process, also after SIGKILL, so a lock left
    behind never blocks the next start; the file itself stays (removing it would let a third
    process lock a new file while the second still holds the old one). Not on Windows, which
    has no ``flock``: there the folder is not guarded."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            written = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise DataDirInUse(data_dir, int(written) if written.isdigit() else None) from None
        with contextlib.suppress(OSError):  # only for the message of a second start: a full disk does not stop this one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


async def _freeze_startup_objects(app: web.Application) -> None:
    """Take what startup made (modules, configuration, plugins, aiohttp's machinery) out of
    the garbage collector's sight, so that a full collection walks only what requests made.

    Measured at a steady 2,000 messages/s: full collections paused the loop for about 17 ms
    each (p99 24 to 34 ms, max 45 ms); frozen, about 3 ms (p99 17 to 23 ms, max 30 ms)."""
    gc.collect()
    gc.freeze()


SHUTDOWN_GRACE_SECONDS = 5.0
"""How long a stopping service waits for the requests in work before it cuts them off. A
webhook's commit takes milliseconds; what outlasts this is a body still arriving (a slow or
stalled sender, allowed 30 s), whose sender got no 2xx and sends again. Waiting that out made
a stop take 30 s, past the 10 s that Docker allows before its SIGKILL."""


async def _stop_once(app: web.Application) -> None:
    """Say that the service stops, and take a second SIGTERM or SIGINT (a supervisor signalling
    again, Ctrl-C twice) as the same request: aiohttp raised it into the cleanup under way,
    which ended with exit code 1 and tracebacks from every context it cut short."""
    loop = asyncio.get_running_loop()
    log.info("stopping: answering the requests in work (at most %g s), then the outbox and the channels",
             SHUTDOWN_GRACE_SECONDS)

    def again() -> None:
        log.warning("stopping already: waiting for the requests in work (a second signal does not cut that short)")

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers here (Windows, a thread)
            loop.add_signal_handler(signum, again)


def _load_or_report(path: str | Path) -> Config | None:
    """The configuration, or None after printing every error with its file and key path."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the service, holding the data folder's lock (``data_dir_lock``) for as long as it
    runs: a second ``serve`` on the same folder ends at once with one line, before it binds a
    port or starts a worker."""
    config = _load_or_report(args.config)
    if config is None:
        return 1
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(data_dir_lock(Path(args.data_dir)))
        except DataDirInUse as exc:
            print(f"contact-router serve: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # a data folder that is a file, or that this user may not write to
            print(f"contact-router serve (--data-dir {args.data_dir}): {exc}", file=sys.stderr)
            return 1
        return _serve(args, config)


def _serve(args: argparse.Namespace, config: Config) -> int:
    from .app import StartFailed, create_app

    local = demo_tokens_allowed(args.host, config.public_base_url)
    demo = [m.name for m in config.staff if m.demo]
    if demo and local:
        log.warning("demo staff tokens in use (%s): set CONTACT_ROUTER_TOKEN_* before exposing the service", ", ".join(demo))
    elif demo:
        log.warning("refusing demo staff tokens (%s): the service listens on %s for %s, which is not this machine alone",
                    ", ".join(demo), args.host, config.public_base_url)
    try:
        import uvloop  # optional: the faster event loop when installed

        uvloop.install()
    except ImportError:
        pass
    from .plugins import ChannelsRefused

    try:
        app = create_app(config, data_dir=Path(args.data_dir), allow_demo_tokens=local)
    except ChannelsRefused as exc:  # each names its plugin (and key), as check-config reports them
        print(ConfigError(config.file, exc.errors), file=sys.stderr)
        return 1
    app.on_startup.append(_freeze_startup_objects)  # after the cleanup contexts have started
    app.on_shutdown.insert(0, _stop_once)
    from . import keys

    log.info("contact-router on http://%s:%s (config %s, data %s, channels on: %s)", args.host, args.port, config.file,
             args.data_dir, ", ".join(sorted(app[keys.CORE].channels)) or "none")
    for warning in unserved_status_links(config, app[keys.CORE].channels):
        log.warning("%s: %s", config.file, warning)
    # A listen backlog above the default 128, so that a burst of provider connections waits
    # for the channels' own backpressure (503 + Retry-After) instead of being dropped by the kernel.
    try:
        web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, backlog=1024,
                    shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    except StartFailed as exc:  # what had started is stopped: the process ends
        print(f"contact-router serve: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # A port in use, a host that does not resolve, a data folder that is a file: one line
        # naming what to change, not a traceback.
        print(f"contact-router serve (--host {args.host} --port {args.port} --data-dir {args.data_dir}): {exc}",
              file=sys.stderr)
        return 1
    return 0


def unserved_status_links(config: Config, channels_on: Collection[str]) -> list[str]:
    """Warnings for templates that link to a status page while no channel serves the pages:
    their sentence with the link is left out of what is sent (a link would answer 404)."""
    from .core import STATUS_PAGE_CHANNEL
    from .templates import Templates

    if STATUS_PAGE_CHANNEL in channels_on:
        return []
    return [f"templates.{where}: warning: {{status_url}} is a status page, which only the {STATUS_PAGE_CHANNEL}"
            " channel serves, and it is off: the sentence with the link is left out"
            for where in Templates(config.templates, config.default_language).using("status_url")]


def cmd_check_config(args: argparse.Namespace) -> int:
    """The configuration and the channel plugins' settings, checked as ``serve`` checks them;
    the OK line names the channels that would be on, and a ``[channels.<name>]`` section that
    no installed plugin or channel answers to (a misspelt name, a plugin not installed) is
    warned about: such a channel would be silently off."""
    from .plugins import ChannelsRefused, channels_by_plugin, create_plugin_manager

    config = _load_or_report(args.file)
    if config is None:
        return 1
    pm = create_plugin_manager(True)
    try:  # as serve registers them (create_app), with the same checks
        provided = channels_by_plugin(pm, config, os.environ)
    except ChannelsRefused as exc:
        print(ConfigError(config.file, exc.errors), file=sys.stderr)
        return 1
    known = {name for name, _ in pm.list_name_plugin()} | {channel.name for _, channel in provided}
    for section in sorted(set(config.channels) - known):
        print(f"{config.file}: channels.{section}: warning: no installed plugin or channel is named {section!r};"
              " these settings are not read", file=sys.stderr)
    for warning in unserved_status_links(config, {channel.name for _, channel in provided}):
        print(f"{config.file}: {warning}", file=sys.stderr)
    on = ", ".join(sorted(channel.name for _, channel in provided)) or "none"
    counts = ", ".join(f"{len(items)} {name}{'' if len(items) == 1 else 's'}"
                       for name, items in (("unit", config.units), ("rule", config.rules), ("area", config.areas)))
    print(f"{config.file}: OK ({counts}; channels on: {on})")
    return 0


# The directory's columns, by a header's name as ``_column_key`` writes it: "E-Mail", "email"
# and "Customer Number" are all known.
CUSTOMER_COLUMNS = {
    "customernumber": "customer_number", "name": "name", "email": "email", "phone": "phone", "street": "street",
    "postcode": "postcode", "city": "city",
}


def _column_key(name: str) -> str:
    return "".join(char for char in name.lower() if char.isalnum())


class BadRow(ValueError):
    """A line of a CSV file that cannot be imported as it stands."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line
        self.problem = problem


class NotUtf8(ValueError):
    """A line of a CSV file that is not UTF-8; ``line`` and ``column`` count from 1."""

    def __init__(self, line: int, column: int) -> None:
        super().__init__(f"line {line} is not UTF-8")
        self.line = line
        self.column = column


def _not_utf8(path: str) -> NotUtf8:
    """Where a file is first not UTF-8, by line (as a CSV reader counts them: CRLF, LF or CR
    alone) and byte of the line. Read again in binary, since a text reader decodes blocks
    and its error's offset is within one."""
    line = 1
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh):  # UTF-8 never has a newline byte inside a character
            if number == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                before = raw[: exc.start]
                last = before.rfind(b"\r")
                return NotUtf8(line + before.count(b"\r"), exc.start - last if last >= 0 else exc.start + 1)
            line += 1 + raw.count(b"\r") - raw.endswith(b"\r\n")
    return NotUtf8(line, 1)


def cmd_import_customers(args: argparse.Namespace) -> int:
    from .clock import Clock
    from .core import Core
    from .identity import CustomerImport
    from .metrics import Metrics
    from .plugins import create_plugin_manager
    from .store.sqlite import SQLiteStore

    config = _load_or_report(args.config)
    if config is None:
        return 1
    delimiter = {"\\t": "\t", "tab": "\t"}.get(args.delimiter, args.delimiter)
    if len(delimiter) != 1 or delimiter in "\r\n\"":
        print(f"--delimiter: one character (',' or ';', or 'tab'), not {args.delimiter!r}", file=sys.stderr)
        return 1

    header: list[str] = []  # the columns' known names (``CUSTOMER_COLUMNS``), else as written

    def read_rows() -> Iterator[dict[str, str]]:
        """The file's rows after its header, as they are read (from the start at each call), by
        ``header``. A row with more or fewer fields than the header raises ``BadRow``: an
        unquoted comma in a name shifted every later column of its row (an e-mail address
        stored as the phone number), and the import said it went well."""
        with open(args.csv, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            try:
                next(reader, None)
                for fields in reader:
                    if not any(field.strip() for field in fields):
                        continue  # an empty line
                    if len(fields) != len(header):
                        quotes = " (a delimiter inside a value needs quotes)" if len(fields) > len(header) else ""
                        raise BadRow(reader.line_num, f"{len(fields)} fields where the header has {len(header)}{quotes}")
                    yield dict(zip(header, fields, strict=True))
            except UnicodeDecodeError:
                raise _not_utf8(args.csv) from None
            except csv.Error as exc:
                raise BadRow(reader.line_num, str(exc)) from None

    async def run() -> CustomerImport:
        data_dir = Path(args.data_dir)
        store = SQLiteStore(data_dir / "contact-router.sqlite3")
        await store.open()
        try:
            core = Core(config=config, store=store, pm=create_plugin_manager(False), clock=Clock(),
                        data_dir=data_dir, metrics=Metrics())
            return await core.import_customers(read_rows)
        finally:
            await store.close()

    try:
        with open(args.csv, newline="", encoding="utf-8-sig") as fh:
            try:
                fieldnames = next(csv.reader(fh, delimiter=delimiter), [])
            except UnicodeDecodeError:
                raise _not_utf8(args.csv) from None
        header.extend(CUSTOMER_COLUMNS.get(_column_key(name), name) for name in fieldnames)
        if "customer_number" not in header:
            other = ";" if delimiter == "," else ","
            hint = f" (split at {other!r}? then --delimiter '{other}')" if fieldnames and other in fieldnames[0] else ""
            print(f"{args.csv}: the header must name a customer_number column{hint}", file=sys.stderr)
            return 1
        unknown = [name for name in fieldnames if _column_key(name) not in CUSTOMER_COLUMNS]
        if unknown:  # "Telefon" or "Mail" held data that matched nobody's claim, without a word
            print(f"{args.csv}: columns not imported: {', '.join(repr(n) for n in unknown)}"
                  f" (the known ones: {', '.join(sorted(set(CUSTOMER_COLUMNS.values())))})", file=sys.stderr)
        done = asyncio.run(run())  # one transaction: a file that fails part-way imports nothing
    except NotUtf8 as exc:
        print(f"{args.csv}: line {exc.line} is not UTF-8 (byte {exc.column} of the line): save the file as UTF-8"
              " (CSV UTF-8 in Excel); nothing was imported", file=sys.stderr)
        return 1
    except BadRow as exc:
        print(f"{args.csv}: line {exc.line}: {exc.problem}; nothing was imported", file=sys.stderr)
        return 1
    except (sqlite3.DatabaseError, StorageUnavailable) as exc:
        # A file that is no database or was written by a newer release, or one that takes no
        # write (read-only, full, locked by the service beyond its timeout): one transaction, so
        # nothing of the file went in.
        print(f"{Path(args.data_dir) / 'contact-router.sqlite3'}: {exc}; nothing was imported", file=sys.stderr)
        return 1
    except (OSError, csv.Error) as exc:
        print(f"{args.csv}: {exc}; nothing was imported", file=sys.stderr)
        return 1
    repeated = sorted(done.repeated)
    for number in repeated[:20]:
        print(f"{args.csv}: customer number {number} appears {done.repeated[number]} times; the last row counts",
              file=sys.stderr)
    if len(repeated) > 20:
        print(f"{args.csv}: {len(repeated) - 20} more customer numbers appear more than once", file=sys.stderr)
    if done.without_number:
        print(f"{args.csv}: {done.without_number} rows without a customer number were left out", file=sys.stderr)
    print(f"imported {done.customers} customers into {args.data_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contact-router", description="Every contact gets an answer from the unit responsible.")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--config", default=str(DEFAULT_CONFIG), help="configuration file (default: the example organisation)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8080)
    serve.add_argument("--data-dir", default=str(_default_data_dir()), help="folder for the SQLite database and files")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    imp = sub.add_parser("import-customers", help="fill the built-in customer directory from a CSV file")
    imp.add_argument("csv", help="CSV with columns customer_number,name,email,phone,street,postcode,city")
    imp.add_argument("--config", default=str(DEFAULT_CONFIG))
    imp.add_argument("--data-dir", default=str(_default_data_dir()))
    imp.add_argument("--delimiter", default=",")
    imp.set_defaults(func=cmd_import_customers)
    return parser


def _port(value: str) -> int:
    """A TCP port for ``--port``: 0 (any free one) to 65535. A larger one was bound to some
    other port with uvloop, and a traceback without it."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {port}")
    return port


def _log_level() -> int:
    """``CONTACT_ROUTER_LOG_LEVEL`` as a level (``debug`` or ``DEBUG``); INFO, with a word on
    standard error, for a name logging does not know: it ended every command in a traceback."""
    name = os.environ.get("CONTACT_ROUTER_LOG_LEVEL", "INFO").strip().upper()
    level = logging.getLevelName(name)
    if isinstance(level, int):
        return level
    print(f"CONTACT_ROUTER_LOG_LEVEL: unknown level {name!r} (DEBUG, INFO, WARNING, ERROR); logging at INFO",
          file=sys.stderr)
    return logging.INFO


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=_log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
