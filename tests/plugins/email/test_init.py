from __future__ import annotations

from plugins.email import register_channels, reply_copies


def test_register_channels_only_with_addresses():
    assert register_channels(settings={}, env={}) is None
    assert register_channels(settings={"email": {"addresses": {}}}, env={}) is None
    [channel] = register_channels(settings={"email": {"addresses": {"Bau@Example.org": {"unit": "bauhotline"}},
                                                      "listen_port": "2626"}}, env={})
    assert channel.name == "email"
    assert channel.settings.listen_port == 2626
    assert channel.settings.domain == "example.org"
    assert channel.settings.from_address == "bau@example.org"


def test_reply_copies_for_webform_residents_with_email():
    identities = [{"kind": "webform", "address": "s-1"}, {"kind": "email", "address": "max@example.com"}]
    assert reply_copies(conversation={"channel": "webform"}, reply={}, identities=identities) == [
        {"channel": "email", "to_kind": "email", "to": "max@example.com"}
    ]
    assert reply_copies(conversation={"channel": "email"}, reply={}, identities=identities) is None
    assert reply_copies(conversation={"channel": "webform"}, reply={}, identities=identities[:1]) is None
