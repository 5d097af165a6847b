"""URIs: parsing of every form, and the RFC 3261 section 19.1.4 comparison examples."""

from __future__ import annotations

import pytest

from freecall.sip.errors import SipParseError
from freecall.sip.uri import AbsoluteUri, TelUri, parse_sip_uri, parse_uri

# RFC 3261 section 19.1.4: "The URIs within each of the following sets are equivalent"
EQUIVALENT = [
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
    ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;security=on"),
    (
        "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
        "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
    ),
    (
        "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
        "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
    ),
]
# "The URIs within each of the following sets are not equivalent"
NOT_EQUIVALENT = [
    ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
    ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
    ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;security=off"),
    ("sip:alice@atlanta.com", "sips:alice@atlanta.com"),
]


@pytest.mark.parametrize(("a", "b"), EQUIVALENT)
def test_equivalent(a: str, b: str) -> None:
    assert parse_uri(a) == parse_uri(b)
    assert parse_uri(b) == parse_uri(a)
    assert hash(parse_uri(a)) == hash(parse_uri(b))


@pytest.mark.parametrize(("a", "b"), NOT_EQUIVALENT)
def test_not_equivalent(a: str, b: str) -> None:
    assert parse_uri(a) != parse_uri(b)


def test_sip_uri_parts() -> None:
    uri = parse_sip_uri("sips:alice:secret@[2001:db8::1]:5061;transport=tls;lr?subject=hi")
    assert (uri.scheme, uri.user, uri.password) == ("sips", "alice", "secret")
    assert (uri.host, uri.bare_host, uri.port) == ("[2001:db8::1]", "2001:db8::1", 5061)
    assert uri.transport == "tls" and uri.lr and uri.secure
    assert uri.headers == "subject=hi"
    assert str(uri) == "sips:alice:secret@[2001:db8::1]:5061;transport=tls;lr?subject=hi"


def test_modification_renders_from_parts_and_keeps_the_original() -> None:
    uri = parse_sip_uri("sip:Bob@Example.COM;Transport=UDP")
    changed = uri.with_params(lr=None).replace(port=5070)
    assert str(uri) == "sip:Bob@Example.COM;Transport=UDP"
    assert str(changed) == "sip:Bob@Example.COM:5070;transport=UDP;lr"
    assert str(changed.without_params("transport")) == "sip:Bob@Example.COM:5070;lr"
    assert uri.aor == "Bob@example.com"
    with pytest.raises(TypeError):
        uri.replace(nonsense=1)


def test_tel_and_opaque() -> None:
    tel = parse_uri("tel:+1-201-555-0123;phone-context=example.com")
    assert isinstance(tel, TelUri) and tel.is_global and tel.digits == "+12015550123"
    assert tel == parse_uri("tel:+1.201.555.0123;Phone-Context=EXAMPLE.com")
    opaque = parse_uri("urn:service:sos")
    assert isinstance(opaque, AbsoluteUri) and str(opaque) == "urn:service:sos"
    assert opaque.scheme == "urn"


@pytest.mark.parametrize(
    "text",
    [
        "sip:2001:db8::10",  # IPv6 without brackets (RFC 5118 section 4.2)
        "sip:alice@host:99999",  # port out of range
        "sip:alice@host;lr;lr",  # a parameter twice (RFC 3261 section 19.1.1)
        "sip:alice@ho st",
        "sip:",
        "<sip:alice@host>",
        "tel:",
        "",
        "no-scheme",
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_uri(text)


def test_non_sip_where_sip_is_required() -> None:
    with pytest.raises(SipParseError) as info:
        parse_sip_uri("mailto:alice@example.com")
    assert info.value.status == 416
