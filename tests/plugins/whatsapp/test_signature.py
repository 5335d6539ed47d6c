from __future__ import annotations

import pytest

from plugins.whatsapp.signature import sign, verify_signature

BODY = b'{"a":1}'
# HMAC-SHA256 of BODY with the key "secret", computed independently (openssl dgst -hmac).
KNOWN = "sha256=aa9e2e3575f5d7098b6caccd790888c36d5fdb63342a73bada2d6a51747a8494"


def test_sign_matches_an_independently_computed_value() -> None:
    assert sign(BODY, "secret") == KNOWN


def test_valid_signature_is_accepted() -> None:
    assert verify_signature(BODY, KNOWN, "secret")


def test_uppercase_hex_and_surrounding_space_are_accepted() -> None:
    assert verify_signature(BODY, "  sha256=" + KNOWN.removeprefix("sha256=").upper() + " ", "secret")


@pytest.mark.parametrize(
    "body, header, secret",
    [
        (BODY, None, "secret"),
        (BODY, "", "secret"),
        (BODY, KNOWN, "other-secret"),
        (b'{"a":2}', KNOWN, "secret"),
        (BODY + b" ", KNOWN, "secret"),
        (BODY, KNOWN.removeprefix("sha256="), "secret"),
        (BODY, "sha1=" + KNOWN.removeprefix("sha256="), "secret"),
        (BODY, "sha512=" + KNOWN.removeprefix("sha256="), "secret"),
        (BODY, KNOWN[:-1] + ("0" if KNOWN[-1] != "0" else "1"), "secret"),
        (BODY, KNOWN[:-8], "secret"),
        (BODY, "sha256=", "secret"),
        (BODY, "sha256=zz" + KNOWN[9:], "secret"),
        (BODY, "sha256=äöü", "secret"),
        (BODY, KNOWN, ""),
        (BODY, sign(BODY, ""), ""),
    ],
    ids=[
        "missing",
        "empty",
        "wrong-secret",
        "other-body",
        "body-with-trailing-space",
        "no-prefix",
        "sha1",
        "other-algorithm-of-the-same-length",  # the digest is right, the name is not
        "last-digit-wrong",
        "digest-cut-short",
        "prefix-only",
        "not-hex",
        "non-ascii",
        "empty-secret",
        "empty-secret-signed-with-an-empty-key",  # anyone can compute that one
    ],
)
def test_invalid_signatures_are_refused(body: bytes, header: str | None, secret: str) -> None:
    assert verify_signature(body, header, secret) is False
