"""CPU per message at fixed rates, and per acknowledgement while the outbox drains a backlog.

One command::

    python bench/cpu.py --rates 100,600,1200,2000 --seconds 10 --drain 5

For each rate it starts a fresh server on a fresh data folder (``contact-router serve`` with
the WhatsApp channel on and a fake Graph API, or with ``--server baseline`` the bare baseline),
posts signed webhooks at that fixed rate and prints the server's CPU seconds (user and system,
from /proc) per message answered, and for the product the group commits and the
acknowledgements the fake Graph API received. ``--drain SECONDS`` then loads the product at
concurrency 50 for that long (the outbox falls behind) and measures the CPU per acknowledgement
while it works off the backlog with no messages coming in. Everything talks to 127.0.0.1 only.

Why: under load at concurrency 50 the product batches everything (25 messages a transaction,
50 acknowledgements a claim), and that is where it is cheapest per message. At a steady,
moderate rate every message pays for more of its own transactions and wake-ups.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    acks_sent,
    bench_config,
    cpu_seconds,
    free_port,
    service_env,
    start_service,
    stop,
    wait_http,
)


def _commits(service_url: str) -> float:
    """Group commits so far, from the product's /metrics."""
    with urllib.request.urlopen(f"{service_url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("contact_router_group_commits "):
                return float(line.split()[-1])
    return 0.0


def _load(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(BENCH / "loadgen.py"), json.dumps(spec)],
                         capture_output=True, text=True, timeout=float(spec["seconds"]) + 120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(server: str, rate: float, seconds: float, drain: float) -> dict[str, Any]:
    """One fresh server: the fixed-rate run (rate > 0), or the drain measurement (rate == 0)."""
    with tempfile.TemporaryDirectory(prefix="contact-router-cpu-") as tmp:
        folder = Path(tmp)
        graph_port, port, smtp_port = free_port(), free_port(), free_port()
        graph_url, url = f"http://127.0.0.1:{graph_port}", f"http://127.0.0.1:{port}"
        graph = subprocess.Popen([sys.executable, str(BENCH / "fake_graph.py"), "--port", str(graph_port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if server == "product":
            proc = start_service(bench_config(folder), folder / "data", port,
                                 service_env(graph_url, smtp_port, url), folder / "service.log")
        else:
            proc = subprocess.Popen([sys.executable, str(BENCH / "baseline.py"), "--port", str(port), "--db",
                                     str(folder / "baseline.sqlite3")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(f"{graph_url}/stats", proc=graph)
            wait_http(f"{url}/healthz", proc=proc)
            spec = {"scenario": "whatsapp", "url": url, "prefix": "cpu", "sender_base": 0}
            _load(spec | {"seconds": 0.5, "concurrency": 5, "prefix": "warm", "sender_base": 80_000_000})
            time.sleep(2.0)  # the warm-up's acknowledgements go out before the measurement
            product = server == "product"
            if rate > 0:
                cpu, sent = cpu_seconds(proc.pid), acks_sent(graph_url)
                commits = _commits(url) if product else 0.0
                figures = _load(spec | {"seconds": seconds, "concurrency": 0, "rate": rate})
                used = cpu_seconds(proc.pid) - cpu
                result = {"server": server, "rate": rate, "answered_per_s": figures["msgs_per_s"],
                          "p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"],
                          "cpu_per_s": round(used / seconds, 3), "cpu_us_per_message": round(1e6 * used / max(figures["ok"], 1))}
                if product:
                    result["commits_per_message"] = round((_commits(url) - commits) / max(figures["ok"], 1), 2)
                    result["acks_sent_per_message"] = round(
                        (acks_sent(graph_url) - sent) / max(figures["ok"], 1), 2)
                return result
            figures = _load(spec | {"seconds": drain, "concurrency": 50})
            cpu, sent, commits = cpu_seconds(proc.pid), acks_sent(graph_url), _commits(url)
            last, last_cpu, last_commits = sent, cpu, commits
            while True:  # until a second passes without a send
                time.sleep(1.0)
                now = acks_sent(graph_url)
                if now == last:
                    break
                last, last_cpu, last_commits = now, cpu_seconds(proc.pid), _commits(url)
            acks = max(last - sent, 1)
            return {"server": server, "drain_after_messages": figures["ok"], "acks_drained": last - sent,
                    "cpu_us_per_ack": round(1e6 * (last_cpu - cpu) / acks),
                    "acks_per_commit": round(acks / max(last_commits - commits, 1), 1)}
        finally:
            stop(proc)
            stop(graph)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("product", "baseline"), default="product")
    parser.add_argument("--rates", default="100,600,1200", help="comma-separated messages per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each fixed-rate run")
    parser.add_argument("--drain", type=float, default=0.0, help="seconds of load before the drain measurement (0: off)")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not all(0 < r <= 20_000 for r in rates) or not 0 < args.seconds <= 300 or not 0 <= args.drain <= 60:
        parser.error("rates in (0, 20000], --seconds in (0, 300], --drain in [0, 60]")
    if args.drain and args.server != "product":
        parser.error("--drain needs the product: the baseline sends nothing")
    for rate in rates:
        print(json.dumps(measure(args.server, rate, args.seconds, 0.0)), flush=True)
    if args.drain:
        print(json.dumps(measure(args.server, 0.0, args.seconds, args.drain)), flush=True)


if __name__ == "__main__":
    main()
