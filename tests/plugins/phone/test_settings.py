from __future__ import annotations

import pytest

from plugins.phone import register_channels
from plugins.phone.settings import DEFAULT_MENU, PhoneSettings, PhoneSettingsError

UNITS = dict.fromkeys(["kundenservice", "bauhotline", "stoerung", "vertrieb", "tiefbau-muster"], {})
"""The example organisation's units, as the core hands them to ``register_channels``."""

TWILIO = {"account_sid": "AC1", "auth_token": "tok", "phone_number": "+4930999999"}


def test_defaults():
    settings = PhoneSettings.from_config(TWILIO)
    assert settings.twilio_enabled and not settings.cti_enabled
    assert dict(settings.menu) == DEFAULT_MENU
    assert (settings.api_url, settings.forward_timeout, settings.voicemail_max_length) == ("https://api.twilio.com", 20, 120)
    assert "tok" not in repr(settings)


def test_twilio_credentials_fall_back_to_the_environment():
    env = {"TWILIO_ACCOUNT_SID": "AC9", "TWILIO_AUTH_TOKEN": "t", "TWILIO_PHONE_NUMBER": "+4930123456", "TWILIO_API_URL": "http://127.0.0.1:9"}
    settings = PhoneSettings.from_config({}, env)
    assert settings.twilio_enabled and settings.api_url == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"menu": {"12": "fault"}}, "menu.12"),
        ({"menu": {"1": "Bad Topic"}}, "menu.1"),
        ({"english_digit": "1"}, "english_digit"),
        ({"forward_timeout": "soon"}, "forward_timeout"),
        ({"forward_numbers": {"bauhotline": 4930}}, "forward_numbers"),
        ({"callback_attempts": 0}, "callback_attempts"),
        ({"timezone": "Europe/Berln"}, "timezone"),  # became UTC: deadlines told an hour early
        ({"region": "XX"}, "region"),  # every national number became no number
        ({"phone_number": "030 99999999"}, "phone_number"),  # every SMS refused with 21212, kept queued
        ({"phone_number": "4930999999"}, "phone_number"),
        ({"cti_number_format": "e164"}, "cti_number_format"),
        ({"phone_number": "+49301"}, "phone_number"),
        ({"phone_number": "Stadtwerke"}, "phone_number"),
        ({"screen_forwards": "ja"}, "screen_forwards"),  # a string is read, but only true/false and the like
        ({"screen_forwards": 2}, "screen_forwards"),
        ({"forward_timeout": "0"}, "forward_timeout"),
        ({"forward_timeout": "20.5"}, "forward_timeout"),
        ({"voicemail_max_length": True}, "voicemail_max_length"),
        ({"sms_max_length": "-1"}, "sms_max_length"),
        ({"send_timeout": "0"}, "send_timeout"),
        ({"send_timeout": "nan"}, "send_timeout"),
        ({"status_wait": "-1"}, "status_wait"),
        ({"status_wait": "soon"}, "status_wait"),
    ],
)
def test_bad_values_name_their_key(section, key):
    with pytest.raises(PhoneSettingsError, match=f"channels.phone.{key}") as caught:
        PhoneSettings.from_config({**TWILIO, **section})
    assert caught.value.path.startswith(f"channels.phone.{key}") and caught.value.message


def test_channel_is_off_without_credentials_or_cti_secret():
    assert register_channels(settings={}, env={}, units=UNITS) is None
    assert register_channels(settings={"phone": {"account_sid": "AC1"}}, env={}, units=UNITS) is None


def test_channel_runs_for_twilio_or_cti_alone():
    (twilio,) = register_channels(settings={"phone": TWILIO}, env={}, units=UNITS)
    assert twilio.name == "phone" and twilio.capabilities.identity_kinds == ("phone",)
    assert twilio.capabilities.max_text_length == 1600
    assert twilio.capabilities.delivery_receipts and twilio.capabilities.threads_by_sender
    (cti,) = register_channels(settings={"phone": {"cti_secret": "s3cret"}}, env={}, units=UNITS)
    assert not cti.capabilities.can_reply
    assert [route.path for route in cti.routes()] == ["/cti/{secret}"]


def test_a_region_in_lower_case_is_the_region():
    assert PhoneSettings.from_config({**TWILIO, "region": "at"}).region == "AT"


def test_a_national_phone_number_is_refused_with_its_e164_form():
    with pytest.raises(PhoneSettingsError) as caught:
        PhoneSettings.from_config({**TWILIO, "phone_number": "030 99999999"})
    assert caught.value.path == "channels.phone.phone_number"
    assert "E.164" in caught.value.message and "+493099999999" in caught.value.message


@pytest.mark.parametrize("number", ["+4930999999", "+493099999999", "+14155552671", "+447700900123"])
def test_e164_phone_numbers_are_taken(number):
    assert PhoneSettings.from_config({**TWILIO, "phone_number": number}).phone_number == number


def test_timezone_defaults_to_the_services():
    assert PhoneSettings.from_config(TWILIO).timezone is None
    assert PhoneSettings.from_config({**TWILIO, "timezone": "Europe/Vienna"}).timezone == "Europe/Vienna"


def test_numbers_and_switches_from_the_environment_are_read():
    """``{ "$env" = ... }`` hands over strings: every one of them was refused as no number or
    no switch, so a number or switch could not come from the environment at all."""
    settings = PhoneSettings.from_config({
        **TWILIO, "forward_timeout": "25", "voicemail_max_length": " 90 ", "sms_max_length": "480",
        "callback_attempts": "5", "send_timeout": "7.5", "screen_forwards": "false", "status_wait": "0",
    })
    assert settings.status_wait == 0
    assert (settings.forward_timeout, settings.voicemail_max_length, settings.sms_max_length) == (25, 90, 480)
    assert (settings.callback_attempts, settings.send_timeout, settings.screen_forwards) == (5, 7.5, False)
    assert PhoneSettings.from_config({**TWILIO, "screen_forwards": "TRUE"}).screen_forwards is True


@pytest.mark.parametrize("value", [None, "", " "])
def test_numbers_and_switches_the_environment_leaves_unset_are_the_defaults(value):
    keys = ("forward_timeout", "voicemail_max_length", "sms_max_length", "callback_attempts", "send_timeout", "screen_forwards",
            "status_wait")
    settings = PhoneSettings.from_config({**TWILIO, **dict.fromkeys(keys, value)})
    assert settings == PhoneSettings.from_config(TWILIO)
    assert (settings.forward_timeout, settings.send_timeout, settings.screen_forwards) == (20, 15.0, True)


def test_a_channel_with_settings_from_the_environment_is_registered():
    (channel,) = register_channels(settings={"phone": {**TWILIO, "forward_timeout": "20", "screen_forwards": "false"}},
                                   env={}, units=UNITS)
    assert (channel.settings.forward_timeout, channel.settings.screen_forwards) == (20, False)


def test_a_voice_is_a_name_or_a_table_by_language():
    from plugins.phone.settings import PhoneSettings, PhoneSettingsError

    assert PhoneSettings.from_config({"voice": " Polly.Vicki "}, {}).voice == "Polly.Vicki"
    assert PhoneSettings.from_config({"voice": {"de": "Polly.Vicki", "en": "Polly.Amy"}}, {}).voice == {
        "de": "Polly.Vicki", "en": "Polly.Amy"}
    assert PhoneSettings.from_config({"voice": ""}, {}).voice is None
    assert PhoneSettings.from_config({"voice": "  "}, {}).voice is None  # blank from the environment: not given
    for bad, key in (({"english": "Polly.Amy"}, "channels.phone.voice.english"), ({"en": ""}, "channels.phone.voice.en"),
                     (3, "channels.phone.voice"), ({}, "channels.phone.voice")):
        with pytest.raises(PhoneSettingsError) as caught:
            PhoneSettings.from_config({"voice": bad}, {})
        assert caught.value.path == key


def test_a_blank_text_from_the_environment_is_not_given():
    """ " " from an unset-but-exported variable was an unknown timezone or region."""
    from plugins.phone.settings import PhoneSettings

    settings = PhoneSettings.from_config({"timezone": " ", "region": "  ", "company_name": " "}, {})
    assert (settings.timezone, settings.region, settings.company_name) == (None, "DE", None)
