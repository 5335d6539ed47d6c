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
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import BENCH, ROOT, bench_config, free_port, service_env, stop, wait_http


def instructions(webhooks: int, timeout: float) -> int:
    """Instructions the service executed for start-up, ``webhooks`` webhooks and its stop."""
    with tempfile.TemporaryDirectory(prefix="contact-router-instructions-") as tmp:
        folder = Path(tmp)
        graph_port, service_port, smtp_port = free_port(), free_port(), free_port()
        graph = subprocess.Popen([sys.executable, str(BENCH / "fake_graph.py"), "--port", str(graph_port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = folder / "service.log"
        with open(log, "wb") as out:
            service = subprocess.Popen(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder / 'callgrind.out'}", sys.executable,
                 "-m", "router.cli", "serve", "--config", str(bench_config(folder)), "--host", "127.0.0.1",
                 "--port", str(service_port), "--data-dir", str(folder / "data")],
                env=service_env(f"http://127.0.0.1:{graph_port}", smtp_port, f"http://127.0.0.1:{service_port}"),
                stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT),
            )
        try:
            wait_http(f"http://127.0.0.1:{graph_port}/stats", proc=graph)
            wait_http(f"http://127.0.0.1:{service_port}/healthz", timeout=timeout, proc=service)
            spec = {"scenario": "whatsapp", "url": f"http://127.0.0.1:{service_port}", "seconds": timeout,
                    "prefix": "ins", "concurrency": 50, "max_requests": webhooks, "sender_base": 0}
            out = subprocess.run([sys.executable, str(BENCH / "loadgen.py"), json.dumps(spec)],
                                 capture_output=True, text=True, timeout=timeout + 60, check=True)
            answered = json.loads(out.stdout.strip().splitlines()[-1])
            if answered.get("ok", webhooks) < webhooks:
                raise SystemExit(f"only {answered.get('ok')} of {webhooks} webhooks were answered 2xx")
            # The acknowledgements go out after the answers: wait until no more arrive.
            last, quiet = -1, 0
            deadline = time.monotonic() + timeout
            while quiet < 5 and time.monotonic() < deadline:
                with urllib.request.urlopen(f"http://127.0.0.1:{graph_port}/stats", timeout=5) as response:
                    sent = json.loads(response.read())["sent"]
                quiet = quiet + 1 if sent == last else 0
                last = sent
                time.sleep(1)
            service.send_signal(signal.SIGINT)
            service.wait(timeout)
        finally:
            stop(service)
            stop(graph)
        found = re.findall(r"Collected : (\d+)", log.read_text(errors="replace"))
        if not found:
            raise SystemExit(f"callgrind wrote no total; see the service log:\n{log.read_text(errors='replace')[-2000:]}")
        return int(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1000, help="webhooks of the first run")
    parser.add_argument("--large", type=int, default=3000, help="webhooks of the second run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each step may take")
    args = parser.parse_args()
    if not 0 < args.small < args.large <= 100_000:
        parser.error("0 < --small < --large <= 100000")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed")
    small, large = instructions(args.small, args.timeout), instructions(args.large, args.timeout)
    per_webhook = (large - small) / (args.large - args.small)
    print(json.dumps({"small": {"webhooks": args.small, "instructions": small},
                      "large": {"webhooks": args.large, "instructions": large},
                      "instructions_per_webhook": round(per_webhook)}))


if __name__ == "__main__":
    main()
