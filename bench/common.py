"""Helpers shared by the benchmark scripts: free ports, child processes, readiness checks,
resident memory, and the request bodies every scenario sends.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from plugins.whatsapp.signature import sign as whatsapp_signature

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent

APP_SECRET = "bench-app-secret"
VERIFY_TOKEN = "bench-verify"
ACCESS_TOKEN = "bench-access"
PHONE_NUMBER_ID = "100200300400500"


def acks_sent(graph_url: str) -> int:
    """How many sends the fake Graph API (``bench/fake_graph.py``) has received so far."""
    with urllib.request.urlopen(f"{graph_url}/stats", timeout=10) as response:
        return int(json.loads(response.read())["sent"])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers (any status) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def wait_tcp(port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not open within {timeout} s")


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (from /proc; 0 when unavailable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used so far (from /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, IndexError, ValueError):
        return 0.0


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def service_env(graph_url: str, smtp_port: int, public_base_url: str) -> dict[str, str]:
    """Environment that switches the WhatsApp channel on against a local fake Graph API."""
    env = dict(os.environ)
    env.update(
        {
            "WHATSAPP_APP_SECRET": APP_SECRET,
            "WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN,
            "WHATSAPP_ACCESS_TOKEN": ACCESS_TOKEN,
            "WHATSAPP_PHONE_NUMBER_ID": PHONE_NUMBER_ID,
            "WHATSAPP_GRAPH_URL": graph_url,
            "SMTP_LISTEN_HOST": "127.0.0.1",
            "SMTP_LISTEN_PORT": str(smtp_port),
            "PUBLIC_BASE_URL": public_base_url,
            "CONTACT_ROUTER_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    return env


def bench_config(directory: Path) -> Path:
    """A copy of the example configuration made for load: no web-form rate limit or fill
    time, and no acknowledgement-per-hour cap on e-mail (the load comes from few senders)."""
    text = (ROOT / "config" / "contact-router.toml").read_text(encoding="utf-8")
    text = text.replace("min_fill_seconds = 3", "min_fill_seconds = 0")
    text = text.replace("rate_limit_per_minute = 10", "rate_limit_per_minute = 100000000")
    text = text.replace("ack_per_hour = 3", "ack_per_hour = 0")
    path = directory / "bench.toml"
    path.write_text(text, encoding="utf-8")
    return path


def start_service(config: Path, data_dir: Path, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``contact-router serve`` as a child process (the real command line, uvloop if installed)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--host", "127.0.0.1",
             "--port", str(port), "--data-dir", str(data_dir)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT),
        )


def sign(body: bytes, secret: str = APP_SECRET) -> str:
    """``X-Hub-Signature-256`` for ``body``, as Meta computes it."""
    return whatsapp_signature(body, secret)


TEXTS = (
    "Hallo, vor meinem Haus ist der Gehweg seit einer Woche aufgegraben. Wann geht es weiter?",
    "Seit heute morgen kein Internet, Router blinkt rot.",
    "Ich möchte einen Glasfaser-Hausanschluss bestellen, was kostet das?",
    "Hello, the pavement in Lindenweg is blocked by construction works.",
    "Wer ist für die Baustelle in der Musterstraße zuständig?",
)


def whatsapp_body(message_id: str, wa_id: str, name: str, text: str, timestamp: int | None = None) -> bytes:
    """One WhatsApp Cloud API webhook body carrying one text message."""
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "WABA-1",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {"display_phone_number": "4930123456", "phone_number_id": PHONE_NUMBER_ID},
                            "contacts": [{"profile": {"name": name}, "wa_id": wa_id}],
                            "messages": [
                                {
                                    "from": wa_id,
                                    "id": message_id,
                                    "timestamp": str(timestamp or int(time.time())),
                                    "type": "text",
                                    "text": {"body": text},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def wa_number(index: int) -> str:
    """A valid German mobile number as a WhatsApp id (49 15x ...), distinct per ``index``."""
    return f"49151{index:08d}"
