from __future__ import annotations

import pytest

from plugins.email.settings import EmailSettings, EmailSettingsError


def test_defaults_from_the_first_address():
    settings = EmailSettings.from_mapping({"addresses": {"Bau@Example.org": {"unit": "bauhotline"}, "x@example.net": "vertrieb"},
                                           "listen_port": "", "relay_port": None})
    assert list(settings.addresses) == ["bau@example.org", "x@example.net"]
    assert settings.addresses["x@example.net"] == {"unit": "vertrieb", "language": None}
    assert (settings.domain, settings.from_address) == ("example.org", "bau@example.org")
    assert (settings.listen_port, settings.relay_port, settings.relay_tls) == (2525, 587, "starttls")
    assert settings.max_message_bytes == 25 * 1024 * 1024


@pytest.mark.parametrize("section", [
    {"addresses": {"not-an-address": {"unit": "x"}}},
    {"addresses": {"a@example.org": {}}},
    {"addresses": {"a@example.org": "x"}, "relay_tls": "ssl"},
    {"addresses": {"a@example.org": "x"}, "tls_cert": "cert.pem"},
    {"addresses": {"a@example.org": "x"}, "listen_port": "smtp"},
])
def test_bad_settings_name_the_key(section):
    with pytest.raises(EmailSettingsError, match=r"channels\.email\."):
        EmailSettings.from_mapping(section)


@pytest.mark.parametrize("key", ["listen_port", "relay_port"])
def test_a_port_past_65535_is_refused_naming_the_key(key):
    with pytest.raises(EmailSettingsError) as info:
        EmailSettings.from_mapping({"addresses": {"a@example.org": "x"}, key: "70000"})
    assert info.value.path == f"channels.email.{key}"


def test_secrets_hidden_in_repr():
    settings = EmailSettings.from_mapping({"addresses": {"a@example.org": "x"}, "relay_password": "pw-123", "inbound_secret": "in-456"})
    assert "pw-123" not in repr(settings) and "in-456" not in repr(settings)


def test_trusted_mail_servers_are_names_compared_in_lower_case():
    section = {"addresses": {"a@example.org": "x"}}
    assert EmailSettings.from_mapping(section).trusted_authserv_ids == ()
    assert EmailSettings.from_mapping({**section, "trusted_authserv_ids": ["MX.Example.org "]}).trusted_authserv_ids == (
        "mx.example.org",)
    assert EmailSettings.from_mapping({**section, "trusted_authserv_ids": "mx.google.com"}).trusted_authserv_ids == (
        "mx.google.com",)
    for bad in (["mx example"], [""], [42], {"mx": True}, 7):
        with pytest.raises(EmailSettingsError) as info:
            EmailSettings.from_mapping({**section, "trusted_authserv_ids": bad})
        assert info.value.path == "channels.email.trusted_authserv_ids", bad


SECTION = {"addresses": {"a@example.org": "x"}}


def test_switches_and_numbers_from_the_environment_are_read():
    """``{ "$env" = ... }`` hands over strings: ``store_files = "false"`` still stored every mail
    and its attachments (only the bool False switched it off)."""
    settings = EmailSettings.from_mapping({
        **SECTION, "store_files": "false", "listen": "OFF", "listen_port": "2526", "max_message_bytes": "1048576",
        "ack_per_hour": "0", "relay_port": " 465 ", "relay_timeout": "12.5",
    })
    assert (settings.store_files, settings.listen) == (False, False)
    assert (settings.listen_port, settings.max_message_bytes, settings.ack_per_hour) == (2526, 1024 * 1024, 0)
    assert (settings.relay_port, settings.relay_timeout) == (465, 12.5)
    assert EmailSettings.from_mapping({**SECTION, "store_files": "yes", "listen": "1"}).store_files is True


@pytest.mark.parametrize("value", [None, "", "  "])
def test_switches_and_numbers_the_environment_leaves_unset_are_the_defaults(value):
    keys = ("store_files", "listen", "listen_port", "max_message_bytes", "ack_per_hour", "relay_port", "relay_timeout")
    settings = EmailSettings.from_mapping({**SECTION, **dict.fromkeys(keys, value)})
    assert settings == EmailSettings.from_mapping(SECTION)
    assert (settings.store_files, settings.listen, settings.relay_timeout, settings.ack_per_hour) == (True, True, 30.0, 3)


@pytest.mark.parametrize(("key", "value"), [
    ("store_files", "ja"), ("store_files", 2), ("listen", "nope"), ("ack_per_hour", "-1"), ("ack_per_hour", "2.5"),
    ("max_message_bytes", True), ("relay_timeout", "soon"), ("relay_timeout", "nan"), ("relay_timeout", -5),
])
def test_a_switch_or_number_of_the_wrong_shape_is_refused_naming_its_key(key, value):
    with pytest.raises(EmailSettingsError) as caught:
        EmailSettings.from_mapping({**SECTION, key: value})
    assert caught.value.path == f"channels.email.{key}"
