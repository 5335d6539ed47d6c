"""Sender resolution: normalised identities, one contact across channels, never a refusal."""

from __future__ import annotations

import unicodedata
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.identity import InvalidAddress, ascii_domain, canonical_domain, directory_match, normalize_address, normalize_phone
from router.models import CustomerClaim


@pytest.mark.parametrize("raw", ["030 12345678", "+49 30 12345678", "0049 30 12345678", "493012345678"])
def test_phone_numbers_become_e164(raw):
    assert normalize_phone(raw) == "+493012345678"


def test_email_lower_cased_and_bad_addresses_refused():
    assert normalize_address("email", " Erika@Example.NET ") == "erika@example.net"
    with pytest.raises(InvalidAddress):
        normalize_address("phone", "not a number")
    with pytest.raises(InvalidAddress):
        normalize_address("email", "nobody")


def test_an_email_address_with_a_decomposed_umlaut_is_the_same_address():
    import unicodedata

    assert normalize_address("email", unicodedata.normalize("NFD", "Jörg.Müller@Bäckerei.de")) == "jörg.müller@bäckerei.de"


@pytest.mark.parametrize("written", [
    "info@xn--mller-bau-q9a.de",  # the ASCII form most mail programs put into From
    "INFO@XN--MLLER-BAU-Q9A.DE",
    "Info@Müller-Bau.DE",
    unicodedata.normalize("NFD", "info@müller-bau.de"),  # a Mac writes u and a combining mark
    "info@müller-bau\u3002de",  # an ideographic full stop, a dot to IDNA
    "info@\uff4düller-bau.de",  # a full-width m, mapped by UTS #46
])
def test_an_internationalised_domain_is_one_address_in_any_of_its_forms(written):
    """info@müller-bau.de and its punycode form were two contacts: one resident, two histories."""
    assert normalize_address("email", written) == "info@müller-bau.de"


def test_the_canonical_domain_is_idna_2008_not_2003():
    assert canonical_domain("xn--strae-oqa.de") == canonical_domain("Straße.de") == "straße.de"  # IDNA 2003: strasse.de
    assert canonical_domain("STRASSE.de") == "strasse.de"
    assert normalize_address("email", "Jürgen@XN--EXMPLE-CUA.DE") == "jürgen@exämple.de"
    assert normalize_address("email", "x@a_b.xn--mller-bau-q9a.de") == "x@a_b.müller-bau.de"  # label by label


@pytest.mark.parametrize(("written", "kept"), [
    ("Info@XN--ZZ.de", "info@xn--zz.de"),  # not Punycode at all
    ("info@xn--i-7iq.ws", "info@xn--i-7iq.ws"),  # Punycode of an emoji, which IDNA 2008 disallows
    ("Info@I\u2764.ws", "info@i\u2764.ws"),
    ("x@-ü.de", "x@-ü.de"),  # a hyphen first
    ("x@ab--ü.de", "x@ab--ü.de"),  # hyphens in the third and fourth place
    ("x@" + "ü" * 70 + ".de", "x@" + "ü" * 70 + ".de"),
    ("x@\udcff.de", "x@\udcff.de"),
    ("x@", "x@"),
])
def test_an_invalid_internationalised_domain_is_kept_as_written(written, kept):
    assert normalize_address("email", written) == kept


_DOMAIN_PIECES = st.sampled_from(["xn--", "xn--mller-bau-q9a", "ü", "Ü", "u\u0308", "ß", "-", ".", "\u3002", "\u2764", "_",
                                  "a", "Z", "\u0644", "\u05d0", "1", "\u200d", "\uff41", "\u2488", "\u0130", "\udcff"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_DOMAIN_PIECES | st.text(max_size=3), max_size=12))
def test_any_mail_domain_has_one_canonical_form_and_never_raises(pieces):
    address = "Max@" + "".join(pieces)
    canonical = normalize_address("email", address)
    assert normalize_address("email", canonical) == canonical


async def test_a_resident_writing_from_either_form_of_their_domain_is_one_contact(harness):
    first = await harness.core.ingest({"channel": "webform", "channel_message_id": "i1", "text": "Hallo",
                                       "sender": {"kind": "email", "address": "info@xn--mller-bau-q9a.de"}})
    second = await harness.core.ingest({"channel": "webform", "channel_message_id": "i2", "text": "Hallo nochmal",
                                        "sender": {"kind": "email", "address": "Info@Müller-Bau.de"}})
    assert await harness.count("contacts") == 1
    rows = await harness.rows("SELECT DISTINCT contact_id FROM messages WHERE id IN (?, ?)", (first.message_id, second.message_id))
    assert len(rows) == 1
    assert [r["address"] for r in await harness.rows("SELECT address FROM identities")] == ["info@müller-bau.de"]
    assert [r["to_address"] for r in await harness.rows("SELECT DISTINCT to_address FROM outbox")] == ["info@müller-bau.de"]


def test_the_directory_matches_an_e_mail_address_in_either_form():
    row = {"customer_number": "K-1", "name": "Bau GmbH", "email": "Info@XN--MLLER-BAU-Q9A.de", "phone": None,
           "street": None, "postcode": None}
    claim = CustomerClaim(customer_number="K-1", name=None, email="info@müller-bau.de", phone=None, street=None,
                          postcode=None, city=None)
    found = directory_match(row, claim)
    assert found is not None and found.customer_number == "K-1"


async def test_same_number_on_two_channels_is_one_contact(harness):
    a = await harness.core.ingest({"channel": "webform", "channel_message_id": "p1", "text": "Hallo",
                                   "sender": {"kind": "phone", "address": "0151 23456789"}})
    b = await harness.core.ingest({"channel": "webform", "channel_message_id": "p2", "text": "Hallo nochmal",
                                   "sender": {"kind": "phone", "address": "+4915123456789"}})
    rows = await harness.rows("SELECT DISTINCT contact_id FROM messages WHERE id IN (?, ?)", (a.message_id, b.message_id))
    assert len(rows) == 1
    assert await harness.count("contacts") == 1


async def test_invalid_sender_is_a_typed_error_and_stores_nothing(harness):
    from router.channel import InvalidMessage

    with pytest.raises(InvalidMessage) as info:
        await harness.core.ingest({"channel": "webform", "channel_message_id": "x", "sender": {"kind": "phone", "address": "abc"}})
    assert info.value.path == "sender.address"
    with pytest.raises(InvalidMessage) as info:
        await harness.core.ingest({"channel": "webform", "channel_message_id": "x", "sender": {"kind": "email"}})
    assert "address" in info.value.message
    assert await harness.count("messages") == 0 and await harness.count("contacts") == 0


async def test_naming_someone_elses_number_on_the_form_does_not_redirect_their_answers(harness):
    victim = await harness.core.ingest({
        "channel": "webform", "channel_message_id": "v1", "text": "Baustelle",
        "sender": {"kind": "email", "address": "victim@example.com", "other_identities": [{"kind": "phone", "address": "+4915112345678"}]},
    })
    await harness.core.ingest({
        "channel": "webform", "channel_message_id": "a1", "text": "Hallo",
        "sender": {"kind": "email", "address": "attacker@evil.example", "other_identities": [{"kind": "phone", "address": "+4915112345678"}]},
    })
    rows = await harness.rows("SELECT i.address FROM identities i JOIN conversations c ON c.contact_id = i.contact_id WHERE c.id = ?",
                              (victim.conversation_id,))
    assert {r["address"] for r in rows} == {"victim@example.com", "+4915112345678"}
    owner = await harness.rows("SELECT contact_id FROM identities WHERE address = '+4915112345678'")
    victim_contact = await harness.rows("SELECT contact_id FROM conversations WHERE id = ?", (victim.conversation_id,))
    assert owner == victim_contact


async def test_a_number_named_in_a_form_is_its_owners_once_they_write_from_it(harness):
    """A form sender named a number nobody had used yet: its owner's WhatsApp messages were
    filed under the form sender's contact, and the answers' fallback could reach the form
    sender's address."""
    form = {"channel": "webform", "channel_message_id": "f1", "text": "Frage zur Baustelle",
            "sender": {"kind": "email", "address": "jemand@example.org", "display_name": "Jemand",
                       "other_identities": [{"kind": "phone", "address": "+4915199999999"}]}}
    named = await harness.core.ingest(form)
    owner = await harness.core.ingest({"channel": "whatsapp", "channel_message_id": "wamid.V1", "text": "Hallo",
                                       "sender": {"kind": "phone", "address": "+4915199999999", "display_name": "Erika"}})
    contacts = await harness.rows("SELECT contact_id, display_name FROM conversations c JOIN contacts k ON k.id = c.contact_id"
                                  " WHERE c.id IN (?, ?) ORDER BY c.id", (named.conversation_id, owner.conversation_id))
    assert contacts[0]["contact_id"] != contacts[1]["contact_id"] and contacts[1]["display_name"] == "Erika"
    idents = await harness.rows("SELECT contact_id, kind, claimed FROM identities ORDER BY id")
    assert [(i["contact_id"], i["kind"], i["claimed"]) for i in idents] == [
        (contacts[0]["contact_id"], "email", 0), (contacts[1]["contact_id"], "phone", 0)]
    # From then on the number is the owner's: the form sender's next message does not take it back
    again = await harness.core.ingest({**form, "channel_message_id": "f2"})
    assert (await harness.rows("SELECT contact_id FROM identities WHERE kind = 'phone'"))[0]["contact_id"] == contacts[1]["contact_id"]
    again_contact = await harness.rows("SELECT contact_id FROM conversations WHERE id = ?", (again.conversation_id,))
    assert again_contact[0]["contact_id"] == contacts[0]["contact_id"]


async def test_an_address_a_vouched_channel_names_is_no_claim(harness):
    """WhatsApp's user id beside the number comes from Meta, not from the sender's typing."""
    await harness.core.ingest({"channel": "whatsapp", "channel_message_id": "wamid.W1", "text": "Hallo",
                               "sender": {"kind": "phone", "address": "+4915111111111",
                                          "other_identities": [{"kind": "whatsapp_user", "address": "DE.123"}]}})
    assert [i["claimed"] for i in await harness.rows("SELECT claimed FROM identities ORDER BY id")] == [0, 0]


def _whatsapp(message_id: str, phone: str | None, user_id: str | None):
    """A WhatsApp message as the channel hands it over: the number when Meta shares it, the
    business-scoped user id beside it or alone (a person with a username)."""
    if phone:
        sender = {"kind": "phone", "address": phone}
        if user_id:
            sender["other_identities"] = [{"kind": "whatsapp_user", "address": user_id}]
    else:
        sender = {"kind": "whatsapp_user", "address": user_id}
    return {"channel": "whatsapp", "channel_message_id": message_id, "text": "Frage zur Baustelle", "sender": sender}


async def test_a_whatsapp_user_who_shows_their_number_later_stays_one_contact(harness):
    """Known first by the user id alone, then writing with the number beside it: one person,
    one contact, and the number is where they last wrote from."""
    await harness.core.ingest(_whatsapp("wamid.U1", None, "DE.777"))
    harness.clock.advance(timedelta(minutes=5))
    await harness.core.ingest(_whatsapp("wamid.U2", "+4915111111111", "DE.777"))
    assert len(await harness.rows("SELECT DISTINCT contact_id FROM messages")) == 1
    idents = await harness.rows("SELECT contact_id, kind, last_inbound_at FROM identities ORDER BY last_inbound_at DESC")
    assert [i["kind"] for i in idents] == ["phone", "whatsapp_user"]
    assert idents[0]["contact_id"] == idents[1]["contact_id"]
    assert await harness.count("contacts") == 1


async def test_a_whatsapp_number_known_before_user_ids_gains_the_user_id_and_keeps_it_when_the_number_hides(harness):
    """A contact from before Meta sent user ids: the first message with one records it, so
    that a later message with the user id alone (the number now hidden) is the same person's."""
    await harness.core.ingest(_whatsapp("wamid.P1", "+4915111111111", None))
    await harness.core.ingest(_whatsapp("wamid.P2", "+4915111111111", "DE.777"))
    await harness.core.ingest(_whatsapp("wamid.P3", None, "DE.777"))
    assert len(await harness.rows("SELECT DISTINCT contact_id FROM messages")) == 1
    assert await harness.count("contacts") == 1
    assert {i["kind"] for i in await harness.rows("SELECT kind FROM identities")} == {"phone", "whatsapp_user"}


async def _contacts_of_messages(harness) -> list[int]:
    return [r["contact_id"] for r in await harness.rows("SELECT contact_id FROM messages WHERE direction = 'in' ORDER BY id")]


async def test_a_number_that_comes_with_another_persons_user_id_has_a_new_owner(harness):
    """Meta issues a new user id with a new number: the same number with a user id its contact
    does not have, while it has another, was given to somebody else. They get a contact of
    their own with the number, and their later messages without it stay theirs."""
    await harness.core.ingest(_whatsapp("wamid.A1", "+4915111111111", "DE.111"))
    await harness.core.ingest(_whatsapp("wamid.B1", "+4915111111111", "DE.222"))
    await harness.core.ingest(_whatsapp("wamid.B2", None, "DE.222"))
    old, new, new_again = await _contacts_of_messages(harness)
    assert old != new == new_again
    owners = {(r["kind"], r["address"]): r["contact_id"] for r in await harness.rows("SELECT * FROM identities")}
    assert owners == {("phone", "+4915111111111"): new, ("whatsapp_user", "DE.111"): old, ("whatsapp_user", "DE.222"): new}


async def test_a_number_that_comes_with_a_user_id_known_from_elsewhere_goes_to_that_user(harness):
    """The number's new owner wrote before by user id alone: their message with the number is
    theirs, and the number moves to them, so the former owner's answers do not reach them."""
    await harness.core.ingest(_whatsapp("wamid.D1", "+4915111111111", "DE.111"))
    await harness.core.ingest(_whatsapp("wamid.D2", None, "DE.222"))
    await harness.core.ingest(_whatsapp("wamid.D3", "+4915111111111", "DE.222"))
    former, new, new_with_number = await _contacts_of_messages(harness)
    assert former != new == new_with_number
    (number,) = await harness.rows("SELECT contact_id FROM identities WHERE kind = 'phone'")
    assert number["contact_id"] == new


async def test_a_message_with_the_contacts_own_user_id_and_another_stays_with_the_contact(harness):
    """A channel may name several account ids: one of them the contact's own is enough."""
    await harness.core.ingest(_whatsapp("wamid.E1", "+4915111111111", "DE.111"))
    await harness.core.ingest({**_whatsapp("wamid.E2", "+4915111111111", None), "sender": {
        "kind": "phone", "address": "+4915111111111",
        "other_identities": [{"kind": "whatsapp_user", "address": "DE.111"}, {"kind": "whatsapp_user", "address": "DE.999"}]}})
    assert len(set(await _contacts_of_messages(harness))) == 1
    assert await harness.count("contacts") == 1


async def test_a_merged_contact_with_two_user_ids_keeps_both_numbers(harness):
    """Someone who changed their number has two user ids once staff merge the two contacts:
    neither number then counts as given to somebody else."""
    await harness.core.ingest(_whatsapp("wamid.M1", "+4915111111111", "DE.111"))
    await harness.core.ingest(_whatsapp("wamid.M2", "+4915122222222", "DE.222"))
    first, second = await _contacts_of_messages(harness)
    await harness.core.merge_contacts(first, second, "staff")
    await harness.core.ingest(_whatsapp("wamid.M3", "+4915122222222", "DE.222"))
    assert (await _contacts_of_messages(harness))[-1] == first
    assert await harness.count("contacts", "merged_into IS NULL") == 1


async def test_a_number_a_form_named_goes_to_the_contact_of_the_user_id_it_comes_with(harness):
    """Known by the user id alone; then a stranger typed the number into the form; then the
    person writes with number and user id: still their one contact, now with the number."""
    await harness.core.ingest(_whatsapp("wamid.C1", None, "DE.777"))
    await harness.core.ingest(_form("f1", "jemand@example.org", "+4915111111111"))
    await harness.core.ingest(_whatsapp("wamid.C2", "+4915111111111", "DE.777"))
    person, typist, person_again = await _contacts_of_messages(harness)
    assert person == person_again != typist
    (number,) = await harness.rows("SELECT contact_id, claimed FROM identities WHERE kind = 'phone'")
    assert (number["contact_id"], number["claimed"]) == (person, 0)


def _form(message_id: str, email: str | None, phone: str | None):
    sender = {"kind": "email", "address": email} if email else {"kind": "phone", "address": phone}
    if email and phone:
        sender["other_identities"] = [{"kind": "phone", "address": phone}]
    return {"channel": "webform", "channel_message_id": message_id, "text": "Frage zur Baustelle", "sender": sender}


async def _contact_of(harness, kind: str, address: str) -> int:
    return (await harness.rows("SELECT contact_id FROM identities WHERE kind = ? AND address = ?", (kind, address)))[0]["contact_id"]


async def test_a_merge_ends_the_claim(harness):
    """A merge kept the number a claim, so its owner's next message undid the merge."""
    named = await harness.core.ingest(_form("f1", "jemand@example.org", "+4915199999999"))
    other = await harness.core.ingest(_form("f2", "zweite@example.org", None))
    contacts = [c["contact_id"] for c in await harness.rows(
        "SELECT contact_id FROM conversations WHERE id IN (?, ?) ORDER BY id", (named.conversation_id, other.conversation_id))]
    status, _ = await harness.api("POST", f"/api/v1/contacts/{contacts[1]}/merge", json={"other_contact_id": contacts[0]})
    assert status == 200
    await harness.core.ingest({"channel": "whatsapp", "channel_message_id": "wamid.M1", "text": "Hallo",
                               "sender": {"kind": "phone", "address": "+4915199999999",
                                          "other_identities": [{"kind": "whatsapp_user", "address": "DE.777"}]}})
    assert await _contact_of(harness, "phone", "+4915199999999") == contacts[1]  # the merge holds


async def test_a_claimed_number_moves_with_its_owners_other_addresses(harness):
    """The move left the sender's WhatsApp user id behind: a later message naming only the user
    id got yet another contact."""
    await harness.core.ingest(_form("f1", "jemand@example.org", "+4915199999999"))
    await harness.core.ingest({"channel": "whatsapp", "channel_message_id": "wamid.M1", "text": "Hallo",
                               "sender": {"kind": "phone", "address": "+4915199999999",
                                          "other_identities": [{"kind": "whatsapp_user", "address": "DE.777"}]}})
    owner = await _contact_of(harness, "phone", "+4915199999999")
    assert owner != await _contact_of(harness, "email", "jemand@example.org")
    assert await _contact_of(harness, "whatsapp_user", "DE.777") == owner


async def test_a_form_whose_only_detail_is_a_number_another_form_named_gets_a_contact_of_its_own(harness):
    """It was filed under the contact of the first form, and its answer's copy went to that
    form's e-mail address."""
    await harness.core.ingest(_form("f1", "jemand@example.org", "+4915199999999"))
    second = await harness.core.ingest(_form("f2", None, "+4915199999999"))
    first_contact = await _contact_of(harness, "email", "jemand@example.org")
    second_contact = (await harness.rows("SELECT contact_id FROM conversations WHERE id = ?", (second.conversation_id,)))[0]
    assert second_contact["contact_id"] != first_contact
    claimed = await harness.rows("SELECT contact_id, claimed FROM identities WHERE kind = 'phone'")
    assert [(r["contact_id"], r["claimed"]) for r in claimed] == [(second_contact["contact_id"], 1)]


async def test_a_sender_who_may_not_be_the_contact_changes_nothing_about_them(harness):
    """A form naming someone's number, or a message flagged unverified_sender (a mail whose
    From failed DMARC), is filed under that contact but sets neither their language, their
    name nor a customer number they are said to have."""
    await harness.core.ingest({"channel": "whatsapp", "channel_message_id": "wamid.O1", "text": "Hallo", "language": "de",
                               "sender": {"kind": "phone", "address": "+4915111111111"}})
    stranger = {"text": "Hello", "language": "en", "customer_number": "4711",
                "sender": {"kind": "phone", "address": "+4915111111111", "display_name": "Mallory"}}
    await harness.core.ingest({**stranger, "channel": "webform", "channel_message_id": "form-1"})
    await harness.core.ingest({**stranger, "channel": "whatsapp", "channel_message_id": "wamid.O2", "flags": ["unverified_sender"]})
    (contact,) = await harness.rows("SELECT language, display_name, customer_claim FROM contacts")
    assert dict(contact) == {"language": "de", "display_name": None, "customer_claim": None}
    # the owner's own next message still does
    await harness.core.ingest({**stranger, "channel": "whatsapp", "channel_message_id": "wamid.O3"})
    (contact,) = await harness.rows("SELECT language, display_name, customer_claim FROM contacts")
    assert dict(contact) == {"language": "en", "display_name": "Mallory", "customer_claim": "4711"}


def _on_status_page(token: str, message_id: str, text: str) -> dict:
    return {"channel": "webform", "channel_message_id": message_id, "text": text, "thread": {"status_token": token},
            "sender": {"kind": "webform", "address": "status:" + token[:32]}}


async def test_a_message_on_a_status_page_is_from_its_conversations_contact(harness):
    """The page sent its replies as the contact's first address: one a later form had taken
    over filed the reply under that form's contact, and with the contact left without an
    address the next reply failed."""
    await harness.core.ingest(_form("f1", "jemand@example.org", "+4915199999999"))
    case = await harness.core.ingest(_form("f2", None, "+4915199999999"))
    (owner,) = await harness.rows("SELECT contact_id FROM conversations WHERE id = ?", (case.conversation_id,))
    await harness.core.ingest(_form("f3", "anders@example.org", "+4915199999999"))  # takes the number along
    identities = await harness.count("identities")
    for n in (1, 2):
        reply = await harness.core.ingest(_on_status_page(case.status_token, f"s{n}", f"Antwort {n}"))
        assert reply.conversation_id == case.conversation_id and not reply.duplicate
    rows = await harness.rows("SELECT contact_id FROM messages WHERE channel_message_id IN ('s1', 's2')")
    assert [r["contact_id"] for r in rows] == [owner["contact_id"]] * 2
    assert await harness.count("identities") == identities  # the page's session is nobody's address


async def test_a_status_page_of_a_merged_contact_files_under_the_contact_it_was_merged_into(harness):
    first = await harness.core.ingest(_form("f1", "jemand@example.org", None))
    second = await harness.core.ingest(_form("f2", "zweite@example.org", None))
    contacts = [c["contact_id"] for c in await harness.rows(
        "SELECT contact_id FROM conversations WHERE id IN (?, ?) ORDER BY id", (first.conversation_id, second.conversation_id))]
    status, _ = await harness.api("POST", f"/api/v1/contacts/{contacts[1]}/merge", json={"other_contact_id": contacts[0]})
    assert status == 200
    reply = await harness.core.ingest(_on_status_page(first.status_token, "s1", "Noch eine Frage"))
    (row,) = await harness.rows("SELECT contact_id FROM messages WHERE id = ?", (reply.message_id,))
    assert row["contact_id"] == contacts[1]


async def test_a_form_session_without_a_status_page_is_resolved_as_before(harness):
    unknown = await harness.core.ingest(_on_status_page("no-such-token", "s1", "Hallo"))
    (row,) = await harness.rows("SELECT i.kind FROM messages m JOIN identities i ON i.contact_id = m.contact_id WHERE m.id = ?",
                                (unknown.message_id,))
    assert row["kind"] == "webform"


def test_a_domain_beyond_ascii_is_written_in_its_idna_2008_form():
    """One rule for the form that checks an address and the mail that answers it: the form used
    the idna codec (IDNA 2003), and a domain it took went out as another one."""
    assert ascii_domain("straße.de") == "xn--strae-oqa.de"  # IDNA 2003 (the idna codec) gives strasse.de
    assert ascii_domain("bücher。example") == "xn--bcher-kva.example"
    assert ascii_domain("Müller-Bau.DE") == "xn--mller-bau-q9a.de"
    assert ascii_domain("ü" * 70 + ".de") is None and ascii_domain("") is None


async def test_a_known_contacts_name_is_kept_when_a_later_message_shows_another(harness):
    """A contact learns a name it has none of; a chat profile name changed since (or a
    customer's name from the directory) is not overwritten by the next message's."""
    sender = {"kind": "phone", "address": "+4915111111111"}
    await harness.core.ingest({"channel": "whatsapp", "channel_message_id": "wamid.N1", "text": "Hallo", "sender": sender})
    await harness.core.ingest({"channel": "whatsapp", "channel_message_id": "wamid.N2", "text": "Ich bin's",
                               "sender": {**sender, "display_name": "Erika Mustermann"}})
    await harness.core.ingest({"channel": "whatsapp", "channel_message_id": "wamid.N3", "text": "Noch was",
                               "sender": {**sender, "display_name": "Eri 🦄"}})
    (contact,) = await harness.rows("SELECT display_name FROM contacts")
    assert contact["display_name"] == "Erika Mustermann"


async def test_a_message_from_an_address_is_its_senders_though_it_names_a_status_page(harness):
    """Only the status page's own session is the case's contact by its token: a message from
    a real address that carries the token (a plugin threading by it) is filed under whoever
    has that address, which it gets as any sender does."""
    case = await harness.core.ingest(_form("f1", "jemand@example.org", None))
    mail = await harness.core.ingest({"channel": "email", "channel_message_id": "<m1@example.net>", "text": "Hallo",
                                      "thread": {"status_token": case.status_token},
                                      "sender": {"kind": "email", "address": "nachbar@example.net"}})
    (row,) = await harness.rows("SELECT contact_id FROM messages WHERE id = ?", (mail.message_id,))
    assert row["contact_id"] == await _contact_of(harness, "email", "nachbar@example.net")
    assert row["contact_id"] != await _contact_of(harness, "email", "jemand@example.org")


def test_a_national_number_written_as_digits_alone_is_read_in_the_default_region():
    """Only a long number without a leading 0 is international digits without the "+"."""
    assert normalize_phone("015112345678") == "+4915112345678"
    assert normalize_phone("4915112345678") == "+4915112345678"


def test_an_e_mail_address_longer_than_any_mailbox_is_refused():
    with pytest.raises(InvalidAddress):
        normalize_address("email", "a" * 320 + "@example.org")


async def test_an_account_id_named_where_the_sender_is_not_vouched_for_says_nothing(harness):
    """WhatsApp's user id says who a sender is only where the channel vouches for it: a form
    naming someone's user id beside a number is not filed under them, nor does their contact
    gain the number (which would send their answers to whoever typed it)."""
    await harness.core.ingest(_whatsapp("wamid.A1", "+4915111111111", "DE.777"))
    owner = await _contact_of(harness, "whatsapp_user", "DE.777")
    form = await harness.core.ingest({"channel": "webform", "channel_message_id": "f1", "text": "Hallo",
                                      "sender": {"kind": "phone", "address": "+4915199999999",
                                                 "other_identities": [{"kind": "whatsapp_user", "address": "DE.777"}]}})
    (row,) = await harness.rows("SELECT contact_id FROM messages WHERE id = ?", (form.message_id,))
    assert row["contact_id"] != owner
    assert await _contact_of(harness, "phone", "+4915199999999") != owner
    assert await _contact_of(harness, "whatsapp_user", "DE.777") == owner


def test_an_international_number_of_eleven_digits_without_a_plus_is_read_as_international():
    """A WhatsApp id or Twilio "From" without the plus: a US number has eleven digits."""
    assert normalize_phone("14155550123") == "+14155550123"


async def test_an_account_id_a_form_merely_named_does_not_say_who_writes_with_it(harness):
    """A form named a WhatsApp user id nobody had written with: that claim must not file the
    id's owner, writing with it and their number, under the one who typed it."""
    await harness.core.ingest({"channel": "webform", "channel_message_id": "f1", "text": "Hallo",
                               "sender": {"kind": "email", "address": "jemand@example.org",
                                          "other_identities": [{"kind": "whatsapp_user", "address": "DE.777"}]}})
    typist = await _contact_of(harness, "email", "jemand@example.org")
    owner = await harness.core.ingest(_whatsapp("wamid.W1", "+4915111111111", "DE.777"))
    (row,) = await harness.rows("SELECT contact_id FROM messages WHERE id = ?", (owner.message_id,))
    assert row["contact_id"] != typist
    assert await _contact_of(harness, "phone", "+4915111111111") != typist


async def test_a_number_a_form_named_works_again_once_its_owner_writes_from_it(harness):
    """A named number a provider had refused for good is its owner's, and good again, once
    they write from it."""
    await harness.core.ingest(_form("f1", "jemand@example.org", "+4915199999999"))
    await harness.core.store.write(lambda conn: conn.execute(
        "UPDATE identities SET failed_at = '2026-11-30T08:00:00.000000Z' WHERE kind = 'phone'"))
    await harness.core.ingest({"channel": "whatsapp", "channel_message_id": "wamid.F1", "text": "Hallo",
                               "sender": {"kind": "phone", "address": "+4915199999999"}})
    (number,) = await harness.rows("SELECT contact_id, claimed, failed_at FROM identities WHERE kind = 'phone'")
    assert number["contact_id"] != await _contact_of(harness, "email", "jemand@example.org")
    assert (number["claimed"], number["failed_at"]) == (0, None)


async def test_a_sender_whose_address_had_failed_makes_it_good_again_by_writing_from_it(harness):
    """A number a provider refused for good (a lapsed WhatsApp account) is used again once its
    contact writes from it: answers go there, not only to fallbacks."""
    await harness.core.ingest(_whatsapp("wamid.G1", "+4915111111111", None))
    await harness.core.store.write(lambda conn: conn.execute(
        "UPDATE identities SET failed_at = '2026-11-30T08:00:00.000000Z' WHERE kind = 'phone'"))
    await harness.core.ingest(_whatsapp("wamid.G2", "+4915111111111", None))
    (number,) = await harness.rows("SELECT failed_at FROM identities WHERE kind = 'phone'")
    assert number["failed_at"] is None


async def test_a_customer_found_in_the_directory_keeps_no_claim_beside_the_number_and_gains_none(harness):
    """A contact who first stated a number nobody could confirm, and then one the directory
    confirms, is that customer with no claim left beside; a number stated later that the
    directory does not confirm is no claim beside the confirmed one."""
    await harness.core.import_customers(lambda: [{"customer_number": "K-100", "name": "Erika Mustermann"}])
    sender = {"kind": "phone", "address": "+4915111111111", "display_name": "Erika Mustermann"}
    for message_id, number in (("wamid.K1", "K-999"), ("wamid.K2", "K-100"), ("wamid.K3", "K-555")):
        await harness.core.ingest({"channel": "whatsapp", "channel_message_id": message_id, "text": "Frage",
                                   "customer_number": number, "sender": sender})
        if message_id == "wamid.K1":
            (contact,) = await harness.rows("SELECT is_customer, customer_claim FROM contacts")
            assert (contact["is_customer"], contact["customer_claim"]) == (0, "K-999")
    (contact,) = await harness.rows("SELECT is_customer, customer_number, customer_claim FROM contacts")
    assert dict(contact) == {"is_customer": 1, "customer_number": "K-100", "customer_claim": None}


async def test_a_message_naming_the_contacts_own_user_id_after_anothers_stays_with_the_contact(harness):
    """Which of several account ids comes first does not matter: one of them the contact's own
    keeps the number where it is, though another contact holds the other."""
    await harness.core.ingest(_whatsapp("wamid.H1", "+4915111111111", "DE.111"))
    await harness.core.ingest(_whatsapp("wamid.H2", None, "DE.222"))
    first, other = await _contacts_of_messages(harness)
    await harness.core.ingest({**_whatsapp("wamid.H3", "+4915111111111", None), "sender": {
        "kind": "phone", "address": "+4915111111111",
        "other_identities": [{"kind": "whatsapp_user", "address": "DE.222"}, {"kind": "whatsapp_user", "address": "DE.111"}]}})
    assert (await _contacts_of_messages(harness))[-1] == first != other
    assert await _contact_of(harness, "phone", "+4915111111111") == first


async def test_a_merge_moves_the_others_messages_and_keeps_that_it_is_a_customer(harness):
    """Staff say two contacts are one person: every message is then the survivor's, and a
    customer number the directory confirmed for either makes the survivor that customer."""
    await harness.core.import_customers(lambda: [{"customer_number": "K-100", "name": "Erika Mustermann"}])
    await harness.core.ingest(_whatsapp("wamid.J1", "+4915111111111", None))
    await harness.core.ingest({"channel": "webform", "channel_message_id": "f1", "text": "Frage", "customer_number": "K-100",
                               "sender": {"kind": "email", "address": "erika@example.org", "display_name": "Erika Mustermann"}})
    survivor, other = await _contacts_of_messages(harness)
    await harness.core.merge_contacts(survivor, other, "staff")
    assert set(await _contacts_of_messages(harness)) == {survivor}
    (contact,) = await harness.rows("SELECT is_customer, customer_number FROM contacts WHERE id = ?", (survivor,))
    assert dict(contact) == {"is_customer": 1, "customer_number": "K-100"}


def test_the_directory_takes_a_street_only_with_its_postcode():
    """A street name alone (a Hauptstraße is in every town) proves nothing about a claim."""
    row = {"customer_number": "K-1", "name": "Bau GmbH", "email": None, "phone": None, "street": "Hauptstraße 1",
           "postcode": "12345"}

    def claim(postcode: str) -> CustomerClaim:
        return CustomerClaim(customer_number="K-1", name=None, email=None, phone=None, street="Hauptstrasse 1",
                             postcode=postcode, city=None)

    assert directory_match(row, claim("12345")) is not None
    assert directory_match(row, claim("99999")) is None
