"""Ingest benchmark: the product against a bare "parse and durably store" baseline.

One command::

    python bench/ingest.py --seconds 10 --concurrency 50 --rounds 3 --json bench/results/ingest.json

It starts, each as its own process: a fake WhatsApp Graph API, ``contact-router serve`` (SQLite in
a temporary data folder, the WhatsApp channel on, outbound pointed at the fake), the baseline
(``bench/baseline.py``) and, per measurement, the load generator (``bench/loadgen.py``). Then:

1. signed WhatsApp webhooks at ``--concurrency`` for ``--seconds``, product and baseline
   alternating (the order flips every round), ``--rounds`` times; the ratio product/baseline
   per round with min and max;
2. the same at concurrency 1 (latency);
3. a fixed rate of ``--rate`` messages/s (default 2,000) for the p99;
4. web-form JSON submissions and SMTP mail into the product;
5. the product's resident memory before, between and after the load, and a check that every
   message answered 2xx is in the database.

Each product run also counts the WhatsApp acknowledgements the fake Graph API received meanwhile
("acks sent", per message answered): 0.9 means the outbox kept up with the load (one message in
ten joins an open conversation and gets none), less that it left them for after the run.

``--profile SECONDS`` additionally records the product under load with py-spy (when installed)
and prints the functions with the most samples. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH,
    acks_sent,
    bench_config,
    cpu_seconds,
    free_port,
    rss_kib,
    service_env,
    start_service,
    stop,
    wait_http,
    wait_tcp,
)


def load(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one load generator process and return its figures."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "loadgen.py"), json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    import os

    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(), "event_loop": loop,
            "platform": platform.platform()}


def quiesce(pid: int, limit: float = 60.0) -> float:
    """Wait until the process is idle (below 5 % of a core over 0.5 s; the product's outbox
    keeps sending acknowledgements after a load run) so the next run has both cores.
    Returns the seconds waited, bounded by ``limit``."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - before < 0.025:
            break
    return round(time.monotonic() - started, 1)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def profile(pid: int, seconds: float, url: str, concurrency: int, folder: Path) -> dict[str, Any]:
    """Sample the product with py-spy while the load generator runs; top functions by samples."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {"error": "py-spy is not installed"}
    raw = folder / "profile.txt"
    recorder = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250", "--format", "raw",
         "--output", str(raw), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(0.5)
    figures = load({"scenario": "whatsapp", "url": url, "seconds": seconds, "concurrency": concurrency,
                    "prefix": "profile", "sender_base": 90_000_000}, timeout=seconds + 120)
    try:
        recorder.wait(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        recorder.kill()
    if not raw.exists():
        return {"error": (recorder.stderr.read() if recorder.stderr else b"").decode()[-500:]}
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if frames:
            own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += count
    shutil.copy(raw, BENCH / "results" / "profile-raw.txt") if (BENCH / "results").is_dir() else None
    return {
        "samples": total,
        "load": figures,
        "self": [(f, round(100 * c / total, 1)) for f, c in own.most_common(25)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in inclusive.most_common(45)],
    }


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``: one entry per function."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if parts else file
    return f"{name} ({short})"


def _acks(figures: dict[str, Any]) -> str:
    """WhatsApp acknowledgements the fake Graph API received during a product run, per
    message answered: 0.9 when they keep up with the load (one in ten messages joins an open
    conversation and gets none); less when the outbox left them for after the run."""
    if "acks_sent_during" not in figures:
        return ""
    return f"{figures['acks_sent_during'] / max(figures['ok'], 1):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=2000.0, help="fixed-rate run, messages per second")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--profile", type=float, default=0.0, help="seconds of py-spy sampling under load (0: off)")
    parser.add_argument("--skip", default="", help="comma-separated scenarios to skip: latency,rate,webform,smtp")
    args = parser.parse_args()
    if not 0 < args.seconds <= 300 or not 0 < args.rounds <= 20:
        parser.error("--seconds must be in (0, 300] and --rounds in (0, 20]")
    skip = set(filter(None, args.skip.split(",")))
    timeout = args.seconds + 120

    with tempfile.TemporaryDirectory(prefix="contact-router-bench-") as tmp:
        folder = Path(tmp)
        graph_port, service_port, baseline_port, smtp_port = (free_port() for _ in range(4))
        service_url = f"http://127.0.0.1:{service_port}"
        graph_url = f"http://127.0.0.1:{graph_port}"
        baseline_url = f"http://127.0.0.1:{baseline_port}"
        graph = subprocess.Popen([sys.executable, str(BENCH / "fake_graph.py"), "--port", str(graph_port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        service = start_service(bench_config(folder), folder / "data", service_port,
                                service_env(f"http://127.0.0.1:{graph_port}", smtp_port, service_url),
                                folder / "service.log")
        baseline = subprocess.Popen(
            [sys.executable, str(BENCH / "baseline.py"), "--port", str(baseline_port), "--db",
             str(folder / "baseline.sqlite3")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results: dict[str, Any] = {"machine": machine(), "settings": vars(args) | {"json": str(args.json)}}
        try:
            wait_http(f"http://127.0.0.1:{graph_port}/stats", proc=graph)
            wait_http(f"{service_url}/healthz", proc=service)
            wait_http(f"{baseline_url}/healthz", proc=baseline)
            wait_tcp(smtp_port)

            def spec(url: str, prefix: str, **extra: Any) -> dict[str, Any]:
                return {"scenario": "whatsapp", "url": url, "seconds": args.seconds, "prefix": prefix,
                        "concurrency": args.concurrency, **extra}

            # Warm-up: imports, caches, first pages of the database files.
            load(spec(service_url, "warm", seconds=1.5, sender_base=80_000_000), timeout)
            load(spec(baseline_url, "warm", seconds=1.5, sender_base=80_000_000), timeout)
            rss = [("start", rss_kib(service.pid))]

            rounds = []
            for number in range(args.rounds):
                order = [("product", service_url), ("baseline", baseline_url)]
                if number % 2:
                    order.reverse()
                figures: dict[str, Any] = {}
                for name, url in order:
                    quiesce(service.pid)
                    cpu_before = cpu_seconds(service.pid if name == "product" else baseline.pid)
                    sent_before = acks_sent(graph_url)
                    figures[name] = load(spec(url, f"r{number}", sender_base=number * 1_000_000), timeout)
                    used = cpu_seconds(service.pid if name == "product" else baseline.pid) - cpu_before
                    figures[name]["server_cpu_share"] = round(used / figures[name]["seconds"], 3)
                    if name == "product":
                        figures[name]["acks_sent_during"] = acks_sent(graph_url) - sent_before
                figures["ratio"] = round(figures["product"]["msgs_per_s"] / max(figures["baseline"]["msgs_per_s"], 1e-9), 3)
                rounds.append(figures)
                rss.append((f"after round {number + 1}", rss_kib(service.pid)))
                print(f"round {number + 1}: product {figures['product']['msgs_per_s']}/s, "
                      f"baseline {figures['baseline']['msgs_per_s']}/s, ratio {figures['ratio']}", flush=True)
            ratios = [r["ratio"] for r in rounds]
            results["concurrency"] = {"rounds": rounds, "ratio_min": min(ratios), "ratio_max": max(ratios),
                                      "ratio_median": sorted(ratios)[len(ratios) // 2]}

            servers = (("product", service_url), ("baseline", baseline_url))
            if "latency" not in skip:
                results["latency"] = {}
                for name, url in servers:
                    quiesce(service.pid)
                    results["latency"][name] = load(spec(url, "c1", concurrency=1, sender_base=20_000_000), timeout)
            if "rate" not in skip:
                results["rate"] = {}
                for name, url in servers:
                    quiesce(service.pid)
                    sent_before = acks_sent(graph_url)
                    results["rate"][name] = load(
                        spec(url, "rate", concurrency=0, rate=args.rate, sender_base=30_000_000), timeout)
                    if name == "product":
                        results["rate"][name]["acks_sent_during"] = acks_sent(graph_url) - sent_before
            quiesce(service.pid)
            if "webform" not in skip:
                results["webform"] = load({"scenario": "webform", "url": service_url, "seconds": args.seconds,
                                           "concurrency": args.concurrency, "prefix": "wf"}, timeout)
            quiesce(service.pid)
            if "smtp" not in skip:
                results["smtp"] = load({"scenario": "smtp", "url": service_url, "seconds": args.seconds,
                                        "concurrency": min(args.concurrency, 20), "prefix": "smtp",
                                        "smtp_port": smtp_port}, timeout)
            rss.append(("after all load", rss_kib(service.pid)))
            if args.profile > 0:
                quiesce(service.pid)
                results["profile"] = profile(service.pid, args.profile, service_url, args.concurrency, folder)
                rss.append(("after profiling load", rss_kib(service.pid)))
            time.sleep(2.0)
            rss.append(("2 s idle after load", rss_kib(service.pid)))
            results["rss_kib"] = rss

            # Every message answered 2xx is stored: compare with the database.
            answered = sum(r["product"]["ok"] for r in rounds)
            answered += sum(results.get(k, {}).get("product", {}).get("ok", 0) for k in ("latency", "rate"))
            answered += results.get("profile", {}).get("load", {}).get("ok", 0)
            db = sqlite3.connect(folder / "data" / "contact-router.sqlite3")
            stored = db.execute(
                "SELECT COUNT(*) FROM messages WHERE channel = 'whatsapp' AND direction = 'in'"
                " AND channel_message_id NOT LIKE 'wamid.warm.%'").fetchone()[0]
            outbox = db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
            db.close()
            results["check"] = {"whatsapp_answered_2xx": answered, "whatsapp_stored": stored,
                                "outbox_by_state": dict(outbox)}
        finally:
            for proc in (service, baseline, graph):
                stop(proc)
            log_tail = (folder / "service.log").read_text(errors="replace")[-3000:]
            if service.returncode not in (0, -15, None):
                print(log_tail, file=sys.stderr)

    rows = [["scenario", "server", "msgs/s", "p50 ms", "p99 ms", "max ms", "server cpu", "client cpu", "acks sent"]]
    for i, r in enumerate(results["concurrency"]["rounds"]):
        for name in ("product", "baseline"):
            f = r[name]
            rows.append([f"c={args.concurrency} round {i + 1}", name, f"{f['msgs_per_s']:.0f}", f"{f['p50_ms']:.2f}",
                         f"{f['p99_ms']:.2f}", f"{f['max_ms']:.2f}", f"{f.get('server_cpu_share', 0):.2f}",
                         f"{f['client_cpu_share']:.2f}", _acks(f)])
    for key, label in (("latency", "c=1"), ("rate", f"{args.rate:.0f}/s fixed")):
        for name, f in results.get(key, {}).items():
            rows.append([label, name, f"{f['msgs_per_s']:.0f}", f"{f['p50_ms']:.2f}", f"{f['p99_ms']:.2f}",
                         f"{f['max_ms']:.2f}", "", f"{f['client_cpu_share']:.2f}", _acks(f)])
    for key in ("webform", "smtp"):
        if key in results:
            f = results[key]
            rows.append([f"{key} c={f['concurrency']}", "product", f"{f['msgs_per_s']:.0f}", f"{f['p50_ms']:.2f}",
                         f"{f['p99_ms']:.2f}", f"{f['max_ms']:.2f}", "", f"{f['client_cpu_share']:.2f}", ""])
    print()
    print(table(rows))
    c = results["concurrency"]
    print(f"\nratio product/baseline at c={args.concurrency}: median {c['ratio_median']}, min {c['ratio_min']}, "
          f"max {c['ratio_max']}")
    print("service RSS (KiB): " + ", ".join(f"{label} {value}" for label, value in results["rss_kib"]))
    print(f"check: {results['check']}")
    for key in ("webform", "smtp"):
        if key in results and set(results[key]["statuses"]) - {"200", "201", "202", "250"}:
            print(f"{key} statuses: {results[key]['statuses']} {results[key]['errors']}")
    if "profile" in results and "self" in results["profile"]:
        print("\nprofile, self time (% of samples):")
        for frame, share in results["profile"]["self"][:15]:
            print(f"  {share:5.1f}  {frame}")
        print("profile, inclusive (% of samples):")
        for frame, share in results["profile"]["inclusive"][:30]:
            print(f"  {share:5.1f}  {frame}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
