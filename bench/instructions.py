"""Instructions per signed webhook of the whole service, counted by callgrind.

One command (valgrind must be installed; a few minutes)::

    python bench/instructions.py --small 1000 --large 3000

Runs ``contact-router serve`` under ``valgrind --tool=callgrind`` twice, on a fresh data folder
each time, posts ``--small`` and then ``--large`` signed WhatsApp webhooks at concurrency 50 with
the load generator, waits until the fake Graph API has received every acknowledgement, stops the
service and prints the instructions it executed. The difference divided by the difference in
webhooks is the cost of one webhook (HTTP, signature, parsing, the ingest transaction, the
acknowledgement's send and its outcome), without the start-up both runs share. Unlike
messages per second it does not depend on how busy the machine is, so a change of a few percent
shows. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BENCH,
    ROOT,
    acks_sent,
    bench_config,
    free_port,
    service_env,
    stop,
    wait_http,
)


def instructions(webhooks: int, timeout: float, server: str = "product", keep: Path | None = None,
                 rate: float = 0.0) -> int:
    """Instructions the server executed for start-up, ``webhooks`` webhooks and its stop.

    ``server`` is ``product`` (``contact-router serve``) or ``baseline`` (``bench/baseline.py``,
    which sends nothing, so there are no acknowledgements to wait for). ``rate`` > 0 posts at
    that many webhooks per second instead of 50 at a time (each message then pays for its own
    transactions and wake-ups; valgrind slows the server about fifty-fold, so keep it to a few
    per second). With ``keep`` the
    callgrind profile is copied there for ``callgrind_annotate`` or :func:`by_object`.
    """
    with tempfile.TemporaryDirectory(prefix="contact-router-instructions-") as tmp:
        folder = Path(tmp)
        graph_port, service_port, smtp_port = free_port(), free_port(), free_port()
        graph = subprocess.Popen([sys.executable, str(BENCH / "fake_graph.py"), "--port", str(graph_port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = folder / "service.log"
        with open(log, "wb") as out:
            if server == "product":
                command = ["-m", "router.cli", "serve", "--config", str(bench_config(folder)), "--host", "127.0.0.1",
                           "--port", str(service_port), "--data-dir", str(folder / "data")]
            else:
                command = [str(BENCH / "baseline.py"), "--port", str(service_port), "--db",
                           str(folder / "baseline.sqlite3")]
            service = subprocess.Popen(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder / 'callgrind.out'}", sys.executable,
                 *command],
                env=service_env(f"http://127.0.0.1:{graph_port}", smtp_port, f"http://127.0.0.1:{service_port}"),
                stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT),
            )
        try:
            wait_http(f"http://127.0.0.1:{graph_port}/stats", proc=graph)
            wait_http(f"http://127.0.0.1:{service_port}/healthz", timeout=timeout, proc=service)
            spec = {"scenario": "whatsapp", "url": f"http://127.0.0.1:{service_port}", "seconds": timeout,
                    "prefix": "ins", "concurrency": 50, "max_requests": webhooks, "sender_base": 0}
            if rate > 0:
                spec |= {"concurrency": 0, "rate": rate, "seconds": webhooks / rate}
            out = subprocess.run([sys.executable, str(BENCH / "loadgen.py"), json.dumps(spec)],
                                 capture_output=True, text=True, timeout=timeout + 60, check=True)
            answered = json.loads(out.stdout.strip().splitlines()[-1])
            if answered.get("ok", webhooks) < webhooks:
                raise SystemExit(f"only {answered.get('ok')} of {webhooks} webhooks were answered 2xx")
            # The acknowledgements go out after the answers: wait until no more arrive.
            last, quiet = -1, 0
            deadline = time.monotonic() + timeout
            while server == "product" and quiet < 5 and time.monotonic() < deadline:
                sent = acks_sent(f"http://127.0.0.1:{graph_port}")
                quiet = quiet + 1 if sent == last else 0
                last = sent
                time.sleep(1)
            service.send_signal(signal.SIGINT)
            service.wait(timeout)
        finally:
            stop(service)
            stop(graph)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / "callgrind.out", keep / f"callgrind.{server}.{webhooks}.out")
        found = re.findall(r"Collected : (\d+)", log.read_text(errors="replace"))
        if not found:
            raise SystemExit(f"callgrind wrote no total; see the service log:\n{log.read_text(errors='replace')[-2000:]}")
        return int(found[-1])


def by_object(profile: Path) -> dict[str, int]:
    """Self instructions per shared object (interpreter, SQLite, uvloop, ...) of a callgrind profile.

    Reads the profile format directly: a cost line belongs to the object named by the last
    ``ob=`` line, except the inclusive cost line that follows each ``calls=`` line.
    """
    names: dict[str, str] = {}
    totals: collections.Counter[str] = collections.Counter()
    current = "?"
    skip_next = False
    with open(profile, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith(("ob=", "cob=")):
                # A compressed name is defined where it first occurs, in an ob= or a cob= line.
                ref, _, name = line.partition("=")[2].strip().partition(" ")
                if name:
                    names[ref] = name
                if line.startswith("ob="):
                    current = names.get(ref, ref) if ref.startswith("(") else ref
            elif line.startswith("calls="):
                skip_next = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if skip_next:
                    skip_next = False
                    continue
                totals[Path(current).name] += int(line.split()[-1])
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1000, help="webhooks of the first run")
    parser.add_argument("--large", type=int, default=3000, help="webhooks of the second run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each step may take")
    parser.add_argument("--server", choices=("product", "baseline"), default="product",
                        help="count the product or the baseline (bench/baseline.py)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="webhooks per second instead of 50 at a time (a few: valgrind is slow)")
    parser.add_argument("--by-object", action="store_true",
                        help="also split the instructions per webhook by shared object (interpreter, SQLite, ...)")
    args = parser.parse_args()
    if not 0 < args.small < args.large <= 100_000:
        parser.error("0 < --small < --large <= 100000")
    if not 0 <= args.rate <= 1000:
        parser.error("--rate must be in [0, 1000]")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed")
    with tempfile.TemporaryDirectory(prefix="contact-router-profiles-") as tmp:
        keep = Path(tmp) if args.by_object else None
        small = instructions(args.small, args.timeout, args.server, keep, args.rate)
        large = instructions(args.large, args.timeout, args.server, keep, args.rate)
        webhooks = args.large - args.small
        result: dict[str, object] = {
            "server": args.server,
            "rate": args.rate or "50 at a time",
            "small": {"webhooks": args.small, "instructions": small},
            "large": {"webhooks": args.large, "instructions": large},
            "instructions_per_webhook": round((large - small) / webhooks),
        }
        if keep is not None:
            before = by_object(keep / f"callgrind.{args.server}.{args.small}.out")
            after = by_object(keep / f"callgrind.{args.server}.{args.large}.out")
            split = {name: round((after.get(name, 0) - before.get(name, 0)) / webhooks) for name in after}
            result["per_webhook_by_object"] = dict(sorted(split.items(), key=lambda item: -item[1])[:15])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
