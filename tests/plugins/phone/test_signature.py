from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from plugins.phone.signature import twilio_signature, verify

# The test vector published with Twilio's Python helper library (tests/unit/test_request_validator.py).
TOKEN = "12345"
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}
EXPECTED = "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_published_vector():
    assert twilio_signature(TOKEN, URL, PARAMS) == EXPECTED
    assert verify(TOKEN, URL, PARAMS, EXPECTED)


def test_published_vector_with_repeated_parameter():
    params = {"Sid": "CA123", "SidAccount": "AC123", "Digits": ["5678", "1234"]}
    assert twilio_signature(TOKEN, URL, params) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


def test_published_port_variants():
    # Twilio may sign with or without the port; its validator accepts both, and so do we.
    assert verify(TOKEN, URL.replace(".com", ".com:1234"), PARAMS, EXPECTED)
    assert verify(TOKEN, URL, PARAMS, "kvajT1Ptam85bY51eRf/AJRuM3w=")  # signed with :443
    assert verify(TOKEN, URL.replace("https", "http"), PARAMS, "0ZXoZLH/DfblKGATFgpif+LLRf4=")  # with :80


def test_forged_requests_fail():
    assert not verify("54321", URL, PARAMS, EXPECTED)
    assert not verify(TOKEN, URL, {**PARAMS, "Digits": "1"}, EXPECTED)
    assert not verify(TOKEN, URL, {**PARAMS, "Extra": "x"}, EXPECTED)
    assert not verify(TOKEN, URL.replace("foo=1", "foo=2"), PARAMS, EXPECTED)
    assert not verify(TOKEN, URL, PARAMS, EXPECTED[:-2] + "A=")


def test_missing_or_garbage_signature_fails():
    for signature in (None, "", "   ", "ä" * 28):
        assert not verify(TOKEN, URL, PARAMS, signature)
    assert not verify("", URL, PARAMS, EXPECTED)
    assert not verify("", URL, PARAMS, twilio_signature("", URL, PARAMS))  # anyone can compute that one


names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12)
values = st.text(max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    token=st.text(min_size=1, max_size=40),
    path=st.text(alphabet="abcdefghij/-_", max_size=30),
    params=st.dictionaries(names, st.one_of(values, st.lists(values, min_size=1, max_size=3))),
)
def test_requests_signed_by_twilios_validator_pass(token, path, params):
    url = f"https://example.org/channels/phone/{path}?lang=de"
    signature = RequestValidator(token).compute_signature(url, _multidict(params))
    assert verify(token, url, params, signature)
    assert not verify(token + "x", url, params, signature)


def _multidict(params):
    from multidict import MultiDict

    return MultiDict([(k, v) for k, vs in params.items() for v in ([vs] if isinstance(vs, str) else vs)])
