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
