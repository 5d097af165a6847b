"""The registrar and location service (RFC 3261 section 10) on virtual time, fed real messages."""

from __future__ import annotations

import json

import pytest

from freecall.sip.flow import Flow
from freecall.sip.headers import Address
from freecall.sip.message import Request, Response, parse_message
from freecall.sip.proxy import Location
from freecall.sip.registrar import (
    Binding,
    BindingAdded,
    BindingRefreshed,
    BindingRemoved,
    Registrar,
    RegistrarEvent,
)
from freecall.sip.uri import SipUri, parse_uri
from vectorlib import VECTORS, read

DOMAIN = "example.org"
PHONE1 = Flow("udp", ("127.0.0.1", 5062), ("127.0.0.1", 5060))
PHONE2 = Flow("udp", ("127.0.0.1", 5064), ("127.0.0.1", 5060))
PHONE3 = Flow("udp", ("127.0.0.1", 5066), ("127.0.0.1", 5060))
TCP7 = Flow("tcp", ("127.0.0.1", 40001), ("127.0.0.1", 5060), conn=7)
TCP8 = Flow("tcp", ("127.0.0.1", 40002), ("127.0.0.1", 5060), conn=8)
FLOWS_3665 = VECTORS / "callflows/rfc3665/messages"


def reg(
    *contacts: str,
    user: str = "alice",
    call_id: str = "boot1@127.0.0.1",
    cseq: int = 1,
    expires: int | str | None = None,
    headers: tuple[str, ...] = (),
    ruri: str = f"sip:{DOMAIN}",
    to: str | None = None,
) -> Request:
    """A REGISTER as a softphone writes it, parsed from text."""
    to_value = to or f"<sip:{user}@{DOMAIN}>"
    lines = [
        f"REGISTER {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK{call_id[:4]}{cseq};rport",
        "Max-Forwards: 70",
        f"From: {to_value};tag=f{cseq}",
        f"To: {to_value}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        *[f"Contact: {c}" for c in contacts],
        *([f"Expires: {expires}"] if expires is not None else []),
        *headers,
        "Content-Length: 0",
    ]
    msg = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


def parse_request(data: bytes) -> Request:
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def wire(response: Response) -> Response:
    """The response as the peer sees it: serialised and parsed again."""
    again = parse_message(response.to_bytes())
    assert isinstance(again, Response)
    return again


def listed(response: Response) -> list[tuple[str, int | None]]:
    """(URI, expires) of every Contact of a 200, read from the wire form."""
    return [(str(c.uri), c.expires) for c in wire(response).contacts]


def drain(registrar: Registrar) -> list[RegistrarEvent]:
    out = []
    while (event := registrar.next_event()) is not None:
        out.append(event)
    return out


def kinds(events: list[RegistrarEvent]) -> list[str]:
    return [
        f"removed:{e.reason}" if isinstance(e, BindingRemoved) else type(e).__name__ for e in events
    ]


@pytest.fixture
def registrar() -> Registrar:
    return Registrar([DOMAIN, "127.0.0.1"], canonical_domain=DOMAIN)


# -- RFC 3665 section 2: registration call flows -------------------------------------------------


def biloxi() -> Registrar:
    return Registrar(["biloxi.example.com", "ss2.biloxi.example.com"])


def flow_message(flow: str, name: str) -> Request:
    return parse_request((FLOWS_3665 / flow / name).read_bytes())


def expected_contacts(flow: str, name: str) -> list[str]:
    msg = parse_message((FLOWS_3665 / flow / name).read_bytes())
    return [str(c.uri) for c in msg.contacts]


BOB_TLS = Flow("tls", ("192.0.2.201", 5061), ("192.0.2.4", 5061), conn=1)


def test_rfc3665_2_1_new_registration() -> None:
    r = biloxi()
    response = r.register(
        flow_message("2.01_sip-client-new-registration", "F03.sip"), "bob", BOB_TLS, 0.0
    )
    f04 = parse_message((FLOWS_3665 / "2.01_sip-client-new-registration/F04.sip").read_bytes())
    assert response.status == 200
    assert listed(response) == [(str(c.uri), c.expires) for c in f04.contacts]  # expires=3600
    assert response.to.tag is not None and response.call_id == f04.call_id
    assert response.get("Date") == "Thu, 01 Jan 1970 00:00:00 GMT"
    (binding,) = r.lookup("bob@biloxi.example.com", 0.0)
    assert binding.flow == BOB_TLS and binding.cseq == 2 and binding.user == "bob"
    assert kinds(drain(r)) == ["BindingAdded"]


def test_rfc3665_2_2_to_2_4_chained_on_one_registrar() -> None:
    """The four flows of section 2 in order on one registrar.  2.2 adds a mailto: contact
    (any scheme may be registered, section 10.2.1) and 2.3 queries.  2.4's REGISTER reuses the
    Call-ID of the registrations with a lower CSeq, so section 10.3 step 6 keeps the bindings:
    the RFC 3665 examples are independent, and run together they show the ordering rule."""
    r = biloxi()
    r.register(flow_message("2.01_sip-client-new-registration", "F03.sip"), "bob", BOB_TLS, 0.0)
    update = r.register(
        flow_message("2.02_update-of-contact-list", "F01.sip"), "bob", BOB_TLS, 10.0
    )
    assert update.status == 200
    assert sorted(uri for uri, _ in listed(update)) == sorted(
        expected_contacts("2.02_update-of-contact-list", "F02.sip")
    )
    # The RFC shows expires=4294967295 for the mailto: binding; ours is capped at max_expires.
    assert dict(listed(update)) == {
        "sips:bob@client.biloxi.example.com": 3590,
        "mailto:bob@biloxi.example.com": 3600,
    }
    query = r.register(
        flow_message("2.03_request-for-current-contact-list", "F01.sip"), "bob", BOB_TLS, 20.0
    )
    assert sorted(uri for uri, _ in listed(query)) == sorted(
        expected_contacts("2.03_request-for-current-contact-list", "F02.sip")
    )
    assert kinds(drain(r)) == ["BindingAdded", "BindingAdded"]  # the query changed nothing
    stale = r.register(
        flow_message("2.04_cancellation-of-registration", "F01.sip"), "bob", BOB_TLS, 30.0
    )
    assert stale.status == 200 and len(listed(stale)) == 2
    assert drain(r) == []


def test_rfc3665_2_4_cancellation() -> None:
    r = biloxi()
    earlier_boot = reg(
        "<sips:bob@client.biloxi.example.com>", user="bob", call_id="earlier-boot", cseq=7
    )
    earlier_boot.uri = parse_uri("sips:ss2.biloxi.example.com")
    earlier_boot.set("To", Address.parse("Bob <sips:bob@biloxi.example.com>"))
    assert r.register(earlier_boot, "bob", BOB_TLS, 0.0).status == 200
    response = r.register(
        flow_message("2.04_cancellation-of-registration", "F01.sip"), "bob", BOB_TLS, 5.0
    )
    f02 = parse_message((FLOWS_3665 / "2.04_cancellation-of-registration/F02.sip").read_bytes())
    assert response.status == 200 and listed(response) == [] and f02.contacts == []
    assert kinds(drain(r)) == ["BindingAdded", "removed:unregistered"]
    assert r.lookup("bob@biloxi.example.com", 5.0) == [] and r.aor_count == 0


# -- RFC 4475 registrar messages -----------------------------------------------------------------


def torture(name: str) -> Request:
    return parse_request(read(f"rfc4475/{name}.dat"))


def example_com() -> Registrar:
    return Registrar(["example.com"])


def test_rfc4475_cparam01_contact_param_is_not_a_uri_param() -> None:
    r = example_com()
    response = r.register(torture("cparam01"), "watson", PHONE1, 0.0)
    assert response.status == 200
    (binding,) = r.lookup("watson@example.com", 0.0)
    assert "unknownparam" in binding.contact.params
    assert isinstance(binding.contact.uri, SipUri) and binding.contact.uri.params == {}
    (contact,) = wire(response).contacts
    assert str(contact.uri) == "sip:+19725552222@gw1.example.net"
    assert "unknownparam" in contact.params and contact.expires == 3600


def test_rfc4475_cparam02_uri_param_survives() -> None:
    r = example_com()
    response = r.register(torture("cparam02"), "watson", PHONE1, 0.0)
    assert response.status == 200
    (contact,) = wire(response).contacts
    assert str(contact.uri) == "sip:+19725552222@gw1.example.net;unknownparam"
    assert "unknownparam" not in contact.params and contact.expires == 3600


def test_rfc4475_cparam01_then_cparam02_is_one_binding() -> None:
    """Section 19.1.4: a URI parameter present in only one URI is ignored, so the two contacts
    are equal; cparam02 (another Call-ID) updates cparam01's binding."""
    r = example_com()
    r.register(torture("cparam01"), "watson", PHONE1, 0.0)
    response = r.register(torture("cparam02"), "watson", PHONE1, 1.0)
    assert listed(response) == [("sip:+19725552222@gw1.example.net;unknownparam", 3600)]
    assert kinds(drain(r)) == ["BindingAdded", "BindingRefreshed"]


def test_rfc4475_regescrt_escaped_route_kept_never_a_header() -> None:
    r = example_com()
    response = r.register(torture("regescrt"), "user", PHONE1, 0.0)
    assert response.status == 200
    (binding,) = r.lookup("user@example.com", 0.0)
    assert isinstance(binding.contact.uri, SipUri)
    assert binding.contact.uri.headers == "Route=%3Csip:sip.example.com%3E"
    assert str(binding.target_uri) == "sip:user@example.com"  # what a proxy may send to
    seen = wire(response)
    assert seen.routes == [] and "Route" not in seen
    assert str(seen.contacts[0].uri) == "sip:user@example.com?Route=%3Csip:sip.example.com%3E"


def test_rfc4475_unksm2_to_must_be_sip() -> None:
    r = example_com()
    response = r.register(torture("unksm2"), "anyone", PHONE1, 0.0)
    assert response.status == 400 and r.binding_count == 0


def test_rfc4475_escnull_two_distinct_contacts() -> None:
    r = example_com()
    response = r.register(torture("escnull"), "null-\x00-null", PHONE1, 0.0)
    assert response.status == 200
    assert len(r.lookup("null-\x00-null@example.com", 0.0)) == 2
    assert len(r.lookup("sip:null-%00-null@example.com", 0.0)) == 2


# -- section 10.3 steps 1-5 ----------------------------------------------------------------------


def test_request_uri_of_another_domain(registrar: Registrar) -> None:
    request = reg("<sip:alice@127.0.0.1:5062>", ruri="sip:provider.example.net")
    assert not registrar.serves(request)  # the daemon proxies it instead
    assert registrar.register(request, "alice", PHONE1, 0.0).status == 404
    tel = reg("<sip:alice@127.0.0.1:5062>", ruri="tel:+15555550100")
    assert registrar.register(tel, "alice", PHONE1, 0.0).status == 416
    assert registrar.serves(reg("<sip:alice@127.0.0.1:5062>", ruri="sip:EXAMPLE.org:5060"))


def test_require_unsupported_is_420(registrar: Registrar) -> None:
    request = reg("<sip:alice@127.0.0.1:5062>", headers=("Require: gruu, outbound",))
    response = registrar.register(request, "alice", PHONE1, 0.0)
    assert response.status == 420 and response.get("Unsupported") == "gruu, outbound"
    assert registrar.binding_count == 0


def test_user_may_register_only_their_own_aor(registrar: Registrar) -> None:
    request = reg("<sip:bob@127.0.0.1:5062>", user="bob")
    assert registrar.register(request, "alice", PHONE1, 0.0).status == 403
    assert registrar.register(request, "bob@example.org", PHONE1, 0.0).status == 200
    other = reg("<sip:carol@127.0.0.1:5064>", user="carol", call_id="c2")
    assert registrar.register(other, "carol@elsewhere.test", PHONE2, 0.0).status == 403
    assert registrar.register(other, None, PHONE2, 0.0).status == 200  # trusted, no auth


def test_to_in_another_domain_is_404(registrar: Registrar) -> None:
    request = reg("<sip:alice@127.0.0.1:5062>", to="<sip:alice@elsewhere.test>")
    assert registrar.register(request, None, PHONE1, 0.0).status == 404


def test_local_names_share_one_namespace(registrar: Registrar) -> None:
    """A softphone whose domain is 127.0.0.1 registers alice@127.0.0.1: the same user."""
    request = reg("<sip:alice@127.0.0.1:5062>", ruri="sip:127.0.0.1", to="<sip:alice@127.0.0.1>")
    assert registrar.register(request, "alice", PHONE1, 0.0).status == 200
    assert len(registrar.lookup("alice@example.org", 0.0)) == 1
    assert len(registrar.lookup("sips:alice@EXAMPLE.ORG", 0.0)) == 1
    assert registrar.lookup(parse_uri("sip:alice@127.0.0.1;user=ip"), 0.0)
    assert registrar.lookup("alice@elsewhere.test", 0.0) == []
    assert registrar.exists("alice") and not registrar.exists("bob")


def test_not_a_register() -> None:
    r = Registrar([DOMAIN])
    invite = reg("<sip:alice@127.0.0.1>")
    invite.method = "INVITE"
    with pytest.raises(ValueError):
        r.register(invite, "alice", PHONE1, 0.0)


# -- bindings: several devices, q, refresh, expiry -----------------------------------------------


def test_several_devices_ordered_by_q_then_recency(registrar: Registrar) -> None:
    registrar.register(reg("<sip:alice@127.0.0.1:5062>;q=0.5", call_id="a"), "alice", PHONE1, 0.0)
    registrar.register(reg("<sip:alice@127.0.0.1:5064>", call_id="b"), "alice", PHONE2, 1.0)
    registrar.register(reg("<sip:alice@127.0.0.1:5066>;q=0.5", call_id="c"), "alice", PHONE3, 2.0)
    order = [b.flow for b in registrar.lookup("alice@example.org", 3.0)]
    assert order == [PHONE2, PHONE3, PHONE1]
    response = registrar.register(reg(call_id="query"), "alice", PHONE1, 3.0)
    assert [uri for uri, _ in listed(response)] == [
        "sip:alice@127.0.0.1:5064",
        "sip:alice@127.0.0.1:5066",
        "sip:alice@127.0.0.1:5062",
    ]
    assert [e for _, e in listed(response)] == [3598, 3599, 3597]


def test_refresh_keeps_registration_time(registrar: Registrar) -> None:
    contact = '<sip:alice@127.0.0.1:5062;transport=udp>;+sip.instance="<urn:uuid:A>"'
    registrar.register(reg(contact, expires=600), "alice", PHONE1, 0.0)
    response = registrar.register(reg(contact, cseq=2, expires=900), "alice", PHONE1, 500.0)
    assert listed(response) == [("sip:alice@127.0.0.1:5062;transport=udp", 900)]
    added, refreshed = drain(registrar)
    assert isinstance(added, BindingAdded) and isinstance(refreshed, BindingRefreshed)
    assert refreshed.previous.expires_at == 600.0
    assert refreshed.binding.registered_at == 0.0 and refreshed.binding.updated_at == 500.0
    assert refreshed.binding.expires_at == 1400.0 and refreshed.binding.cseq == 2


def test_expiry_on_virtual_time(registrar: Registrar) -> None:
    registrar.register(reg("<sip:alice@127.0.0.1:5062>", expires=120), "alice", PHONE1, 0.0)
    registrar.register(
        reg("<sip:alice@127.0.0.1:5064>", call_id="b", expires=300), "alice", PHONE2, 10.0
    )
    drain(registrar)
    assert registrar.get_timer() == 120.0
    registrar.handle_timer(119.9)
    assert drain(registrar) == [] and registrar.binding_count == 2
    assert len(registrar.lookup("alice@example.org", 120.0)) == 1  # already not live at 120
    registrar.handle_timer(120.0)
    (expired,) = drain(registrar)
    assert isinstance(expired, BindingRemoved) and expired.reason == "expired"
    assert expired.binding.flow == PHONE1
    assert registrar.get_timer() == 310.0
    # a refresh moves the deadline; the old heap entry is skipped
    registrar.register(
        reg("<sip:alice@127.0.0.1:5064>", call_id="b", cseq=2, expires=300), "alice", PHONE2, 200.0
    )
    assert registrar.get_timer() == 500.0
    registrar.handle_timer(500.0)
    assert kinds(drain(registrar)) == ["BindingRefreshed", "removed:expired"]
    assert registrar.get_timer() is None and registrar.aor_count == 0


def test_register_reaps_expired_bindings_first(registrar: Registrar) -> None:
    registrar.register(reg("<sip:alice@127.0.0.1:5062>", expires=60), "alice", PHONE1, 0.0)
    response = registrar.register(reg(call_id="query"), "alice", PHONE1, 61.0)
    assert listed(response) == []
    assert kinds(drain(registrar)) == ["BindingAdded", "removed:expired"]


# -- expiry values and 423 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("contact", "header", "granted"),
    [
        ("<sip:alice@127.0.0.1:5062>", None, 3600),  # the default
        ("<sip:alice@127.0.0.1:5062>", 300, 300),  # the Expires header
        ("<sip:alice@127.0.0.1:5062>;expires=120", 300, 120),  # the parameter wins
        ("<sip:alice@127.0.0.1:5062>;expires=86400", None, 3600),  # capped at max_expires
        ("<sip:alice@127.0.0.1:5062>;expires=280297596632815", None, 3600),  # > 2**32-1
        ("<sip:alice@127.0.0.1:5062>", "soon", 3600),  # malformed: as if absent
        ("<sip:alice@127.0.0.1:5062>;expires=60", None, 60),  # exactly the minimum
    ],
)
def test_expiry_value(
    registrar: Registrar, contact: str, header: int | str | None, granted: int
) -> None:
    response = registrar.register(reg(contact, expires=header), "alice", PHONE1, 0.0)
    assert response.status == 200 and listed(response)[0][1] == granted


def test_configured_bounds() -> None:
    r = Registrar([DOMAIN], min_expires=300, max_expires=1800)  # default clamped to 1800
    assert listed(r.register(reg("<sip:alice@127.0.0.1:5062>"), "alice", PHONE1, 0.0)) == [
        ("sip:alice@127.0.0.1:5062", 1800)
    ]
    brief = r.register(reg("<sip:alice@127.0.0.1:5064>", expires=120), "alice", PHONE2, 0.0)
    assert brief.status == 423 and brief.get("Min-Expires") == "300"
    with pytest.raises(ValueError):
        Registrar([DOMAIN], min_expires=7200, max_expires=86400)  # 423 only below one hour
    with pytest.raises(ValueError):
        Registrar([" "])


def test_interval_too_brief_is_423_and_changes_nothing(registrar: Registrar) -> None:
    request = reg("<sip:alice@127.0.0.1:5064>", "<sip:alice@127.0.0.1:5062>;expires=30")
    response = registrar.register(request, "alice", PHONE1, 0.0)
    assert response.status == 423 and response.get("Min-Expires") == "60"
    assert registrar.binding_count == 0 and drain(registrar) == []
    header = registrar.register(reg("<sip:alice@127.0.0.1:5062>", expires=59), "alice", PHONE1, 0)
    assert header.status == 423


def test_expires_zero_removes_one_binding(registrar: Registrar) -> None:
    registrar.register(
        reg("<sip:alice@127.0.0.1:5062>", "<sip:alice@127.0.0.1:5064>"), "alice", PHONE1, 0.0
    )
    response = registrar.register(
        reg("<sip:alice@127.0.0.1:5064>;expires=0", cseq=2), "alice", PHONE1, 1.0
    )
    assert listed(response) == [("sip:alice@127.0.0.1:5062", 3599)]
    assert kinds(drain(registrar)) == ["BindingAdded", "BindingAdded", "removed:unregistered"]
    # removing a binding that does not exist is no error
    gone = reg("<sip:alice@127.0.0.1:9>;expires=0", cseq=3)
    assert registrar.register(gone, "alice", PHONE1, 2.0).status == 200


# -- Contact: * ----------------------------------------------------------------------------------


def test_star_removes_every_binding(registrar: Registrar) -> None:
    registrar.register(reg("<sip:alice@127.0.0.1:5062>", call_id="a"), "alice", PHONE1, 0.0)
    registrar.register(reg("<sip:alice@127.0.0.1:5064>", call_id="b"), "alice", PHONE2, 0.0)
    drain(registrar)
    response = registrar.register(reg("*", call_id="a", cseq=2, expires=0), "alice", PHONE1, 1.0)
    assert response.status == 200 and listed(response) == []
    assert kinds(drain(registrar)) == ["removed:unregistered", "removed:unregistered"]


@pytest.mark.parametrize(
    ("contacts", "expires"),
    [
        (("*",), None),  # no Expires
        (("*",), 3600),
        (("*", "<sip:alice@127.0.0.1:5062>"), 0),
        (("*", "*"), 0),
    ],
)
def test_star_misuse_is_400(
    registrar: Registrar, contacts: tuple[str, ...], expires: int | None
) -> None:
    registrar.register(reg("<sip:alice@127.0.0.1:5062>"), "alice", PHONE1, 0.0)
    request = reg(*contacts, cseq=2, expires=expires)
    assert registrar.register(request, "alice", PHONE1, 1.0).status == 400
    assert registrar.binding_count == 1


def test_star_keeps_a_binding_newer_than_the_request(registrar: Registrar) -> None:
    registrar.register(reg("<sip:alice@127.0.0.1:5062>", cseq=5), "alice", PHONE1, 0.0)
    registrar.register(reg("<sip:alice@127.0.0.1:5064>", call_id="b"), "alice", PHONE2, 0.0)
    response = registrar.register(reg("*", cseq=4, expires=0), "alice", PHONE1, 1.0)
    assert listed(response) == [("sip:alice@127.0.0.1:5062", 3599)]


# -- section 10.3 step 7: Call-ID and CSeq ordering ----------------------------------------------


def test_same_call_id_lower_or_equal_cseq_is_ignored(registrar: Registrar) -> None:
    contact = "<sip:alice@127.0.0.1:5062>"
    registrar.register(reg(contact, cseq=5, expires=600), "alice", PHONE1, 0.0)
    drain(registrar)
    delayed = registrar.register(reg(contact + ";expires=0", cseq=4), "alice", PHONE1, 1.0)
    assert delayed.status == 200 and listed(delayed) == [("sip:alice@127.0.0.1:5062", 599)]
    repeated = registrar.register(reg(contact, cseq=5, expires=3600), "alice", PHONE1, 2.0)
    assert listed(repeated) == [("sip:alice@127.0.0.1:5062", 598)]
    assert drain(registrar) == []
    newer = registrar.register(reg(contact, cseq=6, expires=3600), "alice", PHONE1, 3.0)
    assert listed(newer) == [("sip:alice@127.0.0.1:5062", 3600)]


def test_other_call_id_updates_whatever_its_cseq(registrar: Registrar) -> None:
    contact = "<sip:alice@127.0.0.1:5062>"
    registrar.register(reg(contact, call_id="boot1", cseq=90), "alice", PHONE1, 0.0)
    response = registrar.register(
        reg(contact, call_id="boot2", cseq=1, expires=300), "alice", PHONE1, 1.0
    )
    assert listed(response) == [("sip:alice@127.0.0.1:5062", 300)]
    (binding,) = registrar.lookup("alice@example.org", 1.0)
    assert (binding.call_id, binding.cseq) == ("boot2", 1)


# -- RFC 5626 / 5627 instance-id, reg-id, and restarts on one flow --------------------------------

INSTANCE = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"'


def test_same_instance_with_new_contact_uri_replaces(registrar: Registrar) -> None:
    registrar.register(reg(f"<sip:alice@127.0.0.1:5062>;{INSTANCE}"), "alice", PHONE1, 0.0)
    moved = reg(f"<sip:alice@127.0.0.1:5064>;{INSTANCE.lower()}", call_id="boot2", user="alice")
    response = registrar.register(moved, "alice", PHONE2, 10.0)
    assert listed(response) == [("sip:alice@127.0.0.1:5064", 3600)]
    events = drain(registrar)
    assert kinds(events) == ["BindingAdded", "removed:replaced", "BindingAdded"]
    assert events[2].binding.instance == "urn:uuid:00000000-0000-1000-8000-aabbccddeeff"


def test_linphone_move_with_old_contact_expires_zero(registrar: Registrar) -> None:
    """Linphone sends the new Contact and the old one with expires=0, same +sip.instance."""
    registrar.register(reg(f"<sip:alice@127.0.0.1:39934>;{INSTANCE}"), "alice", TCP7, 0.0)
    both = reg(
        f"<sip:alice@127.0.0.1:39936;transport=tcp>;{INSTANCE}",
        f"<sip:alice@127.0.0.1:39934;transport=tcp>;{INSTANCE};expires=0",
        cseq=2,
    )
    response = registrar.register(both, "alice", TCP8, 5.0)
    assert listed(response) == [("sip:alice@127.0.0.1:39936;transport=tcp", 3600)]
    (binding,) = registrar.lookup("alice@example.org", 5.0)
    assert binding.flow == TCP8


def test_outbound_reg_id_separates_flows() -> None:
    r = Registrar([DOMAIN], outbound=True)
    first = reg(
        f"<sip:alice@127.0.0.1:40001;transport=tcp>;{INSTANCE};reg-id=1",
        headers=("Supported: path, outbound",),
    )
    second = reg(
        f"<sip:alice@127.0.0.1:40002;transport=tcp>;{INSTANCE};reg-id=2",
        call_id="boot1b",
        headers=("Supported: outbound",),
    )
    one = r.register(first, "alice", TCP7, 0.0)
    assert one.status == 200 and one.get("Require") == "outbound"
    assert r.register(second, "alice", TCP8, 1.0).status == 200
    assert [(b.reg_id, b.flow) for b in r.lookup("alice@example.org", 1.0)] == [
        (2, TCP8),
        (1, TCP7),
    ]
    # a new flow for reg-id 1 replaces the first flow's binding
    again = reg(
        f"<sip:alice@127.0.0.1:40003;transport=tcp>;{INSTANCE};reg-id=1",
        call_id="boot1c",
        headers=("Supported: outbound",),
    )
    r.register(again, "alice", Flow("tcp", ("127.0.0.1", 40003), None, 9), 2.0)
    assert sorted(b.reg_id or 0 for b in r.lookup("alice@example.org", 2.0)) == [1, 2]
    two = reg(
        f"<sip:alice@127.0.0.1:1;transport=tcp>;{INSTANCE};reg-id=3",
        f"<sip:alice@127.0.0.1:2;transport=tcp>;{INSTANCE};reg-id=4",
        call_id="x",
        headers=("Supported: outbound",),
    )
    assert r.register(two, "alice", TCP7, 3.0).status == 400
    bad = reg(
        f"<sip:alice@127.0.0.1:1>;{INSTANCE};reg-id=0",
        call_id="y",
        headers=("Supported: outbound",),
    )
    assert r.register(bad, "alice", TCP7, 3.0).status == 400


def test_reg_id_ignored_without_outbound(registrar: Registrar) -> None:
    for n, flow in ((1, TCP7), (2, TCP8)):
        request = reg(
            f"<sip:alice@127.0.0.1:4000{n};transport=tcp>;{INSTANCE};reg-id={n}",
            call_id=f"c{n}",
            headers=("Supported: outbound",),
        )
        response = registrar.register(request, "alice", flow, float(n))
        assert response.status == 200 and "Require" not in response
    (binding,) = registrar.lookup("alice@example.org", 3.0)  # one instance, one binding
    assert binding.reg_id is None and binding.flow == TCP8


def test_restart_on_the_same_flow_replaces_stale_contacts(registrar: Registrar) -> None:
    """Zoiper-style: a new rinstance and a new Call-ID after a crash, same source port."""
    registrar.register(
        reg("<sip:alice@127.0.0.1:5062;rinstance=aa>", call_id="boot1"), "alice", PHONE1, 0.0
    )
    registrar.register(reg("<sip:alice@127.0.0.1:5064>", call_id="other"), "alice", PHONE2, 0.0)
    restarted = reg("<sip:alice@127.0.0.1:5062;rinstance=bb>", call_id="boot2")
    response = registrar.register(restarted, "alice", PHONE1, 10.0)
    assert sorted(uri for uri, _ in listed(response)) == [
        "sip:alice@127.0.0.1:5062;rinstance=bb",
        "sip:alice@127.0.0.1:5064",
    ]
    assert kinds(drain(registrar))[-2:] == ["BindingAdded", "removed:replaced"]
    # the same Call-ID adding a second contact keeps the first (";line=2" alone would not do:
    # a parameter present in one URI only is ignored by section 19.1.4, so it would match)
    more = reg("<sip:alice@127.0.0.1:5062;rinstance=cc>", call_id="boot2", cseq=2)
    assert len(listed(registrar.register(more, "alice", PHONE1, 11.0))) == 3


# -- caps ----------------------------------------------------------------------------------------


def test_too_many_bindings_for_one_aor_is_refused() -> None:
    r = Registrar([DOMAIN], max_bindings_per_aor=3)
    for port in (5062, 5064, 5066):
        flow = Flow("udp", ("127.0.0.1", port))
        request = reg(f"<sip:alice@127.0.0.1:{port}>", call_id=f"c{port}")
        assert r.register(request, "alice", flow, 0.0).status == 200
    fourth = reg("<sip:alice@127.0.0.1:5068>", call_id="c5068")
    response = r.register(fourth, "alice", Flow("udp", ("127.0.0.1", 5068)), 1.0)
    assert response.status == 403 and r.binding_count == 3
    # refreshing an existing binding still works at the cap
    refresh = reg("<sip:alice@127.0.0.1:5062>", call_id="c5062", cseq=2)
    assert r.register(refresh, "alice", Flow("udp", ("127.0.0.1", 5062)), 2.0).status == 200
    many = reg(*[f"<sip:alice@127.0.0.1:{p}>" for p in range(6000, 6004)], call_id="m")
    assert r.register(many, "alice", PHONE1, 3.0).status == 403


def test_flood_of_aors_is_bounded() -> None:
    r = Registrar([DOMAIN], max_aors=50)
    statuses = [
        r.register(
            reg(f"<sip:u{i}@127.0.0.1:{10000 + i}>", user=f"u{i}", call_id=f"c{i}"),
            None,
            Flow("udp", ("127.0.0.1", 10000 + i)),
            0.0,
        )
        for i in range(500)
    ]
    assert [s.status for s in statuses].count(200) == 50
    refused = statuses[-1]
    assert refused.status == 503 and refused.get("Retry-After") == "300"
    assert r.aor_count == 50 and r.binding_count == 50
    # a known AOR is still served when the table is full
    again = reg("<sip:u0@127.0.0.1:10000>", user="u0", call_id="c0", cseq=2)
    assert r.register(again, None, Flow("udp", ("127.0.0.1", 10000)), 1.0).status == 200


def test_overlong_contact_and_call_id(registrar: Registrar) -> None:
    long_contact = "<sip:alice@127.0.0.1:5062;pn-prid=" + "a" * 3000 + ">"
    assert registrar.register(reg(long_contact), "alice", PHONE1, 0.0).status == 400
    long_call_id = "x" * 1000
    ok = registrar.register(
        reg("<sip:alice@127.0.0.1:5062>", call_id=long_call_id), "alice", PHONE1, 0.0
    )
    assert ok.status == 200
    (binding,) = registrar.lookup("alice@example.org", 0.0)
    assert len(binding.call_id) < 100
    repeated = reg("<sip:alice@127.0.0.1:5062>;expires=0", call_id=long_call_id)  # CSeq 1 again
    assert listed(registrar.register(repeated, "alice", PHONE1, 1.0)) != []  # still matched


# -- flows: routing and closed connections --------------------------------------------------------


def test_routing_goes_to_the_flow_not_the_contact(registrar: Registrar) -> None:
    behind_nat = Flow("udp", ("198.51.100.4", 61000), ("127.0.0.1", 5060))
    request = reg(
        "<sip:alice@192.168.1.20:5062>",
        "<mailto:alice@example.org>",
        headers=("User-Agent: Zoiper rv2.10",),
    )
    registrar.register(request, "alice", behind_nat, 0.0)
    mail, sip = sorted(registrar.lookup("alice@example.org", 0.0), key=lambda b: str(b.contact.uri))
    assert mail.next_hop is None  # listed, but not routable
    assert sip.next_hop == behind_nat and not sip.contact_matches_source
    assert sip.user_agent == "Zoiper rv2.10"
    local = Registrar([DOMAIN])
    local.register(reg("<sip:alice@127.0.0.1:5062>"), "alice", PHONE1, 0.0)
    assert local.lookup("alice@example.org", 0.0)[0].contact_matches_source


def test_closed_connection_removes_its_bindings(registrar: Registrar) -> None:
    registrar.register(reg("<sip:alice@127.0.0.1:40001;transport=tcp>"), "alice", TCP7, 0.0)
    registrar.register(reg("<sip:alice@127.0.0.1:5064>", call_id="b"), "alice", PHONE2, 0.0)
    registrar.register(reg("<sip:bob@127.0.0.1:40001;transport=tcp>", user="bob"), "bob", TCP7, 0.0)
    drain(registrar)
    assert registrar.remove_flow(TCP7) == 2
    events = drain(registrar)
    assert kinds(events) == ["removed:flow-closed", "removed:flow-closed"]
    assert [b.flow for b in registrar.bindings(1.0)] == [PHONE2]
    assert registrar.remove_flow(TCP7) == 0


def test_refresh_over_a_new_connection_moves_the_binding(registrar: Registrar) -> None:
    contact = "<sip:alice@127.0.0.1:40001;transport=tcp>"
    registrar.register(reg(contact), "alice", TCP7, 0.0)
    registrar.register(reg(contact, cseq=2), "alice", TCP8, 10.0)
    assert registrar.remove_flow(TCP7) == 0
    assert registrar.lookup("alice@example.org", 11.0)[0].flow == TCP8


# -- events, control API, proxy interface --------------------------------------------------------


def test_events_make_log_lines_and_api_rows(registrar: Registrar) -> None:
    request = reg("<sip:alice@127.0.0.1:5062>", headers=("User-Agent: baresip v3.10.1",))
    registrar.register(request, "alice", PHONE1, 0.0)
    (event,) = drain(registrar)
    assert str(event) == (
        "registered alice@example.org at sip:alice@127.0.0.1:5062 via udp:127.0.0.1:5062 "
        "(baresip v3.10.1), expires in 3600 s"
    )
    row = registrar.bindings(100.0)[0].describe(100.0)
    assert row["user"] == "alice" and row["expires_s"] == 3500
    assert row["source"] == "udp:127.0.0.1:5062" and row["contact"] == "<sip:alice@127.0.0.1:5062>"


def test_satisfies_the_proxy_location_interface(registrar: Registrar) -> None:
    location: Location = registrar  # checked by mypy against freecall.sip.proxy.Location
    registrar.register(reg("<sip:alice@127.0.0.1:5062>;q=0.7"), "alice", PHONE1, 0.0)
    (binding,) = location.lookup(f"alice@{min(registrar.domains)}", 0.0)
    assert binding.q == 0.7 and binding.next_hop == PHONE1


def test_date_header_uses_the_wall_clock_offset() -> None:
    r = Registrar([DOMAIN], wall_offset=1_700_000_000.0)
    response = r.register(reg("<sip:alice@127.0.0.1:5062>"), "alice", PHONE1, 42.0)
    assert wire(response).get("Date") == "Tue, 14 Nov 2023 22:14:02 GMT"


# -- snapshot ------------------------------------------------------------------------------------


def test_snapshot_round_trip_across_a_restart() -> None:
    before = Registrar([DOMAIN], wall_offset=1_700_000_000.0)
    before.register(
        reg(
            f"<sip:alice@127.0.0.1:5062>;q=0.5;{INSTANCE}",
            expires=600,
            headers=("User-Agent: Linphone 5.2",),
        ),
        "alice",
        PHONE1,
        100.0,
    )
    before.register(
        reg("<sip:alice@127.0.0.1:5064>", call_id="b", expires=60), "alice", PHONE2, 100.0
    )
    before.register(reg("<sip:bob@127.0.0.1:40001;transport=tcp>", user="bob"), "bob", TCP7, 100.0)
    snapshot = before.to_json()
    # the new process: its monotonic clock restarted; 200 s of wall time passed
    after = Registrar([DOMAIN], wall_offset=1_700_000_000.0 + 300.0)
    assert after.from_json(snapshot, now=0.0) == 1  # PHONE2 expired, TCP connection gone
    (binding,) = after.lookup("alice@example.org", 0.0)
    assert binding.expires_in(0.0) == 400 and binding.q == 0.5
    assert binding.instance == "urn:uuid:00000000-0000-1000-8000-aabbccddeeff"
    assert binding.user_agent == "Linphone 5.2" and binding.flow == PHONE1
    assert after.get_timer() == 400.0 and drain(after) == []
    # the restored binding behaves like any other: the device refreshes it
    refresh = reg(f"<sip:alice@127.0.0.1:5062>;{INSTANCE}", cseq=2)
    after.register(refresh, "alice", PHONE1, 10.0)
    assert kinds(drain(after)) == ["BindingRefreshed"]
    assert after.from_json(snapshot, now=0.0) == 0  # already present


def test_snapshot_restore_is_defensive() -> None:
    r = Registrar([DOMAIN])
    with pytest.raises(ValueError):
        r.from_json("not json", 0.0)
    with pytest.raises(ValueError):
        r.from_json('{"version": 99, "bindings": []}', 0.0)
    good = {
        "aor": "alice@example.org",
        "contact": "<sip:alice@127.0.0.1:5062>",
        "expires_at": 100.0,
        "call_id": "c",
        "cseq": 1,
        "flow": {"transport": "udp", "remote": ["127.0.0.1", 5062], "local": None},
        "registered_at": 0.0,
        "updated_at": 0.0,
    }
    entries = [
        good,
        {**good, "contact": "<sip:alice@127.0.0.1:5062"},  # malformed
        {**good, "aor": "mallory@elsewhere.test"},  # not our domain any more
        {**good, "flow": "udp"},
        {**good, "expires_at": "never"},
        {**good, "registered_at": float("nan")},
        "junk",
    ]
    text = json.dumps({"version": 1, "bindings": entries})
    assert r.from_json(text, 0.0) == 1 and r.binding_count == 1


def test_binding_is_immutable() -> None:
    binding = Binding(
        "alice@example.org",
        Address.parse("<sip:alice@127.0.0.1>"),
        10.0,
        1.0,
        "c",
        1,
        PHONE1,
        0.0,
        0.0,
    )
    with pytest.raises(AttributeError):
        binding.cseq = 2  # type: ignore[misc]


def test_next_hop_follows_the_contact_port_on_the_same_address(registrar: Registrar) -> None:
    """UDP, same address as the source: the device listens on its Contact's port (SIPp sends
    its REGISTER from another port); another address means a NAT: the source flow wins."""
    registrar.register(reg("<sip:bob@127.0.0.1:6000>", user="bob"), "bob", PHONE1, 0.0)
    (binding,) = registrar.lookup(f"bob@{DOMAIN}", 0.0)
    assert binding.next_hop == Flow("udp", ("127.0.0.1", 6000), PHONE1.local)
    natted = Flow("udp", ("203.0.113.7", 40000), ("192.0.2.1", 5060))
    registrar.register(
        reg("<sip:carol@192.168.1.20:5060>", user="carol", call_id="c1"), "carol", natted, 0.0
    )
    (binding,) = registrar.lookup(f"carol@{DOMAIN}", 0.0)
    assert binding.next_hop == natted
    registrar.register(
        reg("<sip:dave@127.0.0.1:7000;transport=tcp>", user="dave", call_id="d1"), "dave",
        TCP7, 0.0,
    )
    (binding,) = registrar.lookup(f"dave@{DOMAIN}", 0.0)
    assert binding.next_hop == TCP7  # streams: back over the registering connection
