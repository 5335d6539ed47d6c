"""The ingest core without HTTP: parsed WhatsApp messages straight into ``Core.ingest``.

One command::

    python bench/core.py --messages 20000 --concurrency 50

Runs the real core (example organisation, WhatsApp channel registered, SQLite in a temporary
folder, no outbox worker) in this process and prints messages per second, CPU microseconds per
message (the writer thread's COMMIT included), bytes written per message, and the share of
time in the ingest unit. It isolates the storage and routing path from HTTP, so a change there
can be measured in a few seconds; the figures that count are those of ``bench/ingest.py``.
The mix of senders is the load generator's: about 10 % follow-ups from a sender already seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import TEXTS, wa_number, whatsapp_body  # noqa: E402

import router.core as core_module  # noqa: E402
from plugins.whatsapp.parse import parse_webhook  # noqa: E402
from router.testing import CoreHarness  # noqa: E402

WHATSAPP_ENV = {
    "WHATSAPP_APP_SECRET": "bench", "WHATSAPP_VERIFY_TOKEN": "bench", "WHATSAPP_ACCESS_TOKEN": "bench",
    "WHATSAPP_PHONE_NUMBER_ID": "100200300400500", "WHATSAPP_GRAPH_URL": "http://127.0.0.1:9",
}


def messages(count: int, seed: int = 1) -> list[dict[str, Any]]:
    """Canonical messages as the WhatsApp parser makes them from the load generator's bodies."""
    rng = random.Random(seed)
    senders: list[str] = []
    result = []
    for i in range(count):
        if senders and rng.random() < 0.1:
            wa_id = rng.choice(senders)
        else:
            wa_id = wa_number(i)
            senders.append(wa_id)
        body = json.loads(whatsapp_body(f"wamid.core.{i}", wa_id, "Erika Muster", TEXTS[i % len(TEXTS)]))
        result.extend(parse_webhook(body).messages)
    return result


def written_bytes() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar"))


async def run(count: int, concurrency: int) -> dict[str, float]:
    spent = [0.0]
    real_ingest_tx = core_module.ingest_tx

    def timed_ingest_tx(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_ingest_tx(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    core_module.ingest_tx = timed_ingest_tx
    inbound = messages(count)
    with tempfile.TemporaryDirectory() as folder:
        async with CoreHarness(Path(folder), entrypoints=("webform", "whatsapp"), env=WHATSAPP_ENV) as harness:
            core = harness.core
            queue = iter(inbound)

            async def sender() -> None:
                for message in queue:
                    await core.ingest(message)

            bytes_before, wall, cpu = written_bytes(), time.perf_counter(), time.process_time()
            await asyncio.gather(*(sender() for _ in range(concurrency)))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            written = written_bytes() - bytes_before
            commits = core.store.commits
    core_module.ingest_tx = real_ingest_tx
    return {
        "messages_per_second": count / wall,
        "cpu_us_per_message": 1e6 * cpu / count,
        "ingest_tx_us_per_message": 1e6 * spent[0] / count,
        "bytes_written_per_message": written / count,
        "messages_per_commit": count / max(1, commits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    if not 0 < args.messages <= 1_000_000 or not 0 < args.concurrency <= 1000:
        parser.error("--messages must be in (0, 1000000] and --concurrency in (0, 1000]")
    figures = asyncio.run(run(args.messages, args.concurrency))
    for key, value in figures.items():
        print(f"{key:28} {value:10.1f}")


if __name__ == "__main__":
    main()
