"""The command line's own decisions (the commands themselves are tested where their work is:
check-config and import-customers in test_config.py, serve in tests/reliability)."""

from __future__ import annotations

import pytest

from router.cli import demo_tokens_allowed


@pytest.mark.parametrize(("host", "public_base_url", "allowed"), [
    ("127.0.0.1", "http://127.0.0.1:8080", True),  # the README's demo
    ("localhost", "http://localhost:8080", True),
    ("::1", "http://[::1]:8080", True),
    ("0.0.0.0", "http://127.0.0.1:8080", False),  # reachable from other machines
    ("192.0.2.10", "http://192.0.2.10:8080", False),
    # a reverse proxy on the same machine reaches a loopback listener: the public URL tells
    ("127.0.0.1", "https://kontakt.example.org", False),
    ("127.0.0.1", "https://203.0.113.5", False),
])
def test_demo_tokens_only_for_a_service_on_this_machine_alone(host: str, public_base_url: str, allowed: bool) -> None:
    assert demo_tokens_allowed(host, public_base_url) is allowed
