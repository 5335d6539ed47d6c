"""Authentication-Results of a trusted mail server: whether a mail's From may be forged."""

from __future__ import annotations

import pytest

from plugins.email.authentication import failed_check, results

TRUSTED = ("mx.example.org",)


def test_a_header_is_read_with_comments_versions_and_folding() -> None:
    value = ('mx.example.org 1; spf=pass (sender IP is 192.0.2.1; "quoted (not a comment)")\r\n'
             ' smtp.mailfrom=example.com; dkim/1=fail (bad sig) header.d=example.com;\r\n'
             '\tdmarc=FAIL (p=REJECT sp=REJECT dis=NONE) header.from=example.com')
    assert results(value) == ("mx.example.org", {"spf": ["pass"], "dkim": ["fail"], "dmarc": ["fail"]})


def test_a_semicolon_the_sender_quotes_is_no_separator() -> None:
    """The envelope sender is the sender's choice: quoted, it must not make a result of its own."""
    value = 'mx.google.com; spf=pass smtp.mailfrom="x;dmarc=pass"@evil.example; dmarc=fail (p=NONE) header.from=bank.example'
    assert results(value)[1]["dmarc"] == ["fail"]
    assert failed_check([value], ("mx.google.com",)) == "dmarc=fail"
    assert results('mx; spf=pass (a comment; with "a quote) smtp.mailfrom=a@b; dmarc=pass')[1] == {
        "spf": ["pass"], "dmarc": ["pass"]}


@pytest.mark.parametrize(
    "headers, expected",
    [
        (["mx.example.org; spf=fail; dkim=none; dmarc=fail header.from=bank.example"], "dmarc=fail"),
        (["MX.Example.ORG; dmarc=fail (p=quarantine)"], "dmarc=fail"),  # names are case-insensitive
        (["mx.example.org; spf=pass; dkim=pass; dmarc=pass"], None),
        (["mx.example.org; spf=fail; dmarc=none"], None),  # no DMARC policy proves nothing
        (["mx.example.org; none"], None),
        # a header of a server we do not trust counts for nothing, whatever it says
        (["attacker.example; dmarc=fail", "mx.example.org; dmarc=pass"], None),
        (["attacker.example; dmarc=pass", "mx.example.org; dmarc=fail"], "dmarc=fail"),
        # our server's header is the topmost of its name: one below it was there before
        (["mx.example.org; dmarc=fail", "mx.example.org; dmarc=pass"], "dmarc=fail"),
        (["mx.example.org; dmarc=pass", "mx.example.org; dmarc=fail"], None),
        # a DKIM filter's header above the DMARC filter's, both of our server
        (["mx.example.org; dkim=pass header.d=bank.example", "mx.example.org; dmarc=fail"], "dmarc=fail"),
        # two DMARC results in one header: a failure counts
        (["mx.example.org; dmarc=pass header.from=a.example; dmarc=fail header.from=b.example"], "dmarc=fail"),
        # real headers: Gmail's, and OpenDMARC's under a monitoring-only policy
        (["mx.example.org; dkim=pass header.i=@example.com; spf=pass (google.com: domain of a@example.com"
          " designates 192.0.2.1 as permitted sender) smtp.mailfrom=a@example.com;"
          " dmarc=fail (p=REJECT sp=REJECT dis=NONE) header.from=example.com"], "dmarc=fail"),
        (["mx.example.org; dmarc=fail (p=none dis=none) header.from=example.net"], "dmarc=fail"),
        ([], None),
        (["", ";;;", "mx.example.org", "mx.example.org; dmarc"], None),
    ],
)
def test_the_topmost_trusted_header_decides(headers: list[str], expected: str | None) -> None:
    assert failed_check(headers, TRUSTED) == expected


def test_without_trusted_servers_nothing_is_checked() -> None:
    assert failed_check(["mx.example.org; dmarc=fail"], ()) is None


def test_a_huge_header_is_read_only_so_far() -> None:
    value = "mx.example.org; " + "x" * 10_000_000 + "; dmarc=fail"
    assert failed_check([value], TRUSTED) is None  # the result lies beyond what is read
