from __future__ import annotations

import pytest

from plugins.phone.numbers import is_mobile, is_withheld, pbx_to_e164, to_e164


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("030 12345678", "+493012345678"),
        ("+49 30 12345678", "+493012345678"),
        ("0049 30 12345678", "+493012345678"),
        ("0151 12345678", "+4915112345678"),
        ("+14158675309", "+14158675309"),
        ("sip:+4915112345678@pbx.example.org", "+4915112345678"),  # a caller through a SIP trunk
        ("tel:+49-30-12345678", "+493012345678"),
    ],
)
def test_numbers_become_e164(raw, e164):
    assert to_e164(raw) == e164


@pytest.mark.parametrize("raw", [None, "", "anonymous", "+266696687", "RESTRICTED", "Vodafone", "sip:a@b", "12",
                                 "client:015112345678", "client:anna", "1-800-FLOWERS", "sip:266696687@pbx.example.org"])
def test_withheld_and_unreadable_numbers_are_none(raw):
    assert to_e164(raw) is None


def test_00_is_read_as_the_international_prefix_whatever_the_region():
    # "00" is Germany's international prefix, not the United States' (011): a caller id written
    # with it is still the international number, not a national one of the configured region.
    assert to_e164("0049 151 12345678", "US") == "+4915112345678"


def test_a_short_international_string_is_no_identity():
    # "+491234" is possible by phonenumbers' lengths but no valid number: too short to be one of
    # a range its metadata does not know yet, so it names nobody.
    assert to_e164("+491234") is None


def test_withheld_spellings():
    assert is_withheld("Anonymous") and is_withheld(" ") and is_withheld(None)
    assert not is_withheld("+4930123456")


@pytest.mark.parametrize(
    ("number", "mobile"),
    [("+4915112345678", True), ("+491701234567", True), ("+493012345678", False), ("+14158675309", True),
     ("", False), (None, False), ("garbage", False)],
)
def test_is_mobile(number, mobile):
    # US numbers are FIXED_LINE_OR_MOBILE in phonenumbers: they can take an SMS.
    assert is_mobile(number) is mobile


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("4915791234567", "+4915791234567"),  # sipgate.io: international, without "+"
        ("492111234567", "+492111234567"),
        ("493099999999", "+493099999999"),
        ("015791234567", "+4915791234567"),  # national numbers keep their reading
        ("030 12345678", "+493012345678"),
        ("+4915791234567", "+4915791234567"),
        ("0049 30 12345678", "+493012345678"),
        ("3012345678", "+493012345678"),  # "+3012345678" is no valid number: read as before
    ],
)
def test_pbx_numbers_without_plus_are_international(raw, e164):
    assert pbx_to_e164(raw) == e164


@pytest.mark.parametrize(("raw", "region", "number_format", "e164"), [
    # auto: international only when the digits begin with the region's own country code
    ("9513500049", "US", "auto", "+19513500049"),  # read as international it is a number in Myanmar
    ("15223456789", "DE", "auto", "+4915223456789"),  # a PBX that drops the trunk 0; as international, American
    ("436641234567", "DE", "auto", "+49436641234567"),  # an Austrian caller cannot be told from a German number
    # international (sipgate.io): every run of digits without a 0 is country code and number
    ("436641234567", "DE", "international", "+436641234567"),
    ("14158675309", "DE", "international", "+14158675309"),
    ("4915791234567", "US", "international", "+4915791234567"),
    # national: as to_e164 reads it
    ("4915791234567", "DE", "national", "+494915791234567"),  # what such a PBX would mean
    ("15223456789", "DE", "national", "+4915223456789"),
])
def test_the_pbx_number_format_says_how_digits_without_plus_are_read(raw, region, number_format, e164):
    """Every run of 8 to 15 digits without a 0 was read as international first: a tenth of the
    national numbers of the US, Italy or Denmark came out as another country's."""
    assert pbx_to_e164(raw, region, number_format) == e164


@pytest.mark.parametrize("raw", [None, "", "anonymous", "266696687", "7378742833", "12"])
def test_pbx_withheld_and_unreadable_numbers_are_none(raw):
    assert pbx_to_e164(raw) is None
