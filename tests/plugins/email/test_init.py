from __future__ import annotations

from plugins.email import register_channels, reply_copies

UNITS = dict.fromkeys(["kundenservice", "bauhotline", "stoerung", "vertrieb", "tiefbau-muster"], {})
"""The example organisation's units, as the core hands them to ``register_channels``."""


def test_register_channels_only_with_addresses():
    assert register_channels(settings={}, env={}, units=UNITS) is None
    assert register_channels(settings={"email": {"addresses": {}}}, env={}, units=UNITS) is None
    [channel] = register_channels(settings={"email": {"addresses": {"Bau@Example.org": {"unit": "bauhotline"}},
                                                      "listen_port": "2626"}}, env={}, units=UNITS)
    assert channel.name == "email"
    assert channel.settings.listen_port == 2626
    assert channel.settings.domain == "example.org"
    assert channel.settings.from_address == "bau@example.org"


def test_enabled_from_the_environment_switches_the_channel():
    """Only ``enabled = false`` switched it off; "false" from the environment left it on."""
    import pytest

    from plugins.email.settings import EmailSettingsError

    section = {"addresses": {"bau@example.org": {"unit": "bauhotline"}}}
    for word in (False, "false", " Off ", "0", "no"):
        assert register_channels(settings={"email": {**section, "enabled": word}}, env={}, units=UNITS) is None
    for word in (True, "true", "", None):
        assert register_channels(settings={"email": {**section, "enabled": word}}, env={}, units=UNITS)
    with pytest.raises(EmailSettingsError, match=r"channels\.email\.enabled"):
        register_channels(settings={"email": {**section, "enabled": "nein"}}, env={}, units=UNITS)


def test_reply_copies_for_webform_residents_with_email():
    identities = [{"kind": "webform", "address": "s-1"}, {"kind": "email", "address": "max@example.com"}]
    assert reply_copies(conversation={"channel": "webform"}, reply={}, identities=identities) == [
        {"channel": "email", "to_kind": "email", "to": "max@example.com"}
    ]
    assert reply_copies(conversation={"channel": "email"}, reply={}, identities=identities) is None
    assert reply_copies(conversation={"channel": "webform"}, reply={}, identities=identities[:1]) is None


def test_an_address_of_a_unit_that_does_not_exist_is_refused_naming_it():
    """It passed check-config and serve; every mail to the address was then refused (a unit
    hint that is no unit id) or went to the fallback unit."""
    import pytest

    from plugins.email.settings import EmailSettingsError

    with pytest.raises(EmailSettingsError) as caught:
        register_channels(settings={"email": {"addresses": {"bau@example.org": {"unit": "Bauhotline"}}}}, env={}, units=UNITS)
    assert caught.value.path == "channels.email.addresses.bau@example.org.unit"
