"""RFC 4475 and RFC 5118 torture messages: one test per message, driven by the MANIFEST.

Each message's verdict below paraphrases what the RFC asks of a parser (the expected.json
"expected" text quotes it).  Semantic messages (RFC 4475 sections 3.2-3.4) are well formed: the
parser must accept them and the application decides (the daemon's tests check those answers);
the three that are not well formed (insuf, multi01, mcl01) are rejected here already.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from freecall.sip.errors import SipParseError
from freecall.sip.headers import Address
from freecall.sip.message import (
    Request,
    Response,
    make_error_response,
    parse_message,
)
from freecall.sip.uri import SipUri, unescape
from vectorlib import read, rfc4475_messages, rfc5118_messages, wire


@dataclass(frozen=True)
class Verdict:
    kind: str  # "accept", "reject" (answer with status) or "drop" (no answer)
    status: int | None = None


ACCEPT = Verdict("accept")
DROP = Verdict("drop")


def reject(status: int) -> Verdict:
    return Verdict("reject", status)


RFC4475 = {
    # 3.1.1 valid messages: must parse
    "wsinv": ACCEPT,
    "intmeth": ACCEPT,
    "esc01": ACCEPT,
    "escnull": ACCEPT,
    "esc02": ACCEPT,
    "lwsdisp": ACCEPT,
    "longreq": ACCEPT,
    "dblreq": ACCEPT,
    "semiuri": ACCEPT,
    "transports": ACCEPT,
    "mpart01": ACCEPT,
    "unreason": ACCEPT,
    "noreason": ACCEPT,
    # 3.1.2 invalid messages: the status the RFC names; responses are dropped
    "badinv01": reject(400),
    "clerr": reject(400),
    "ncl": reject(400),
    "scalar02": reject(400),
    "scalarlg": DROP,
    "quotbal": reject(400),
    "ltgtruri": reject(400),
    "lwsruri": reject(400),
    "lwsstart": reject(400),
    "trws": reject(400),
    "escruri": reject(400),
    "baddate": reject(400),
    "regbadct": reject(400),
    "badaspec": reject(400),
    "baddn": reject(400),
    "badvers": reject(505),
    "mismatch01": reject(400),
    # 3.1.2.18: "501 Not Implemented (400 also acceptable; 501 preferred)"
    "mismatch02": reject(501),
    "bigcode": DROP,
    # 3.2 transaction layer: parses; the transaction layer falls back to RFC 2543 matching
    "badbranch": ACCEPT,
    # 3.3 application layer: well formed except insuf (no Call-ID/From/To), multi01 (several
    # values of single-valued headers) and mcl01 (two Content-Length values)
    "insuf": reject(400),
    "unkscm": ACCEPT,
    "novelsc": ACCEPT,
    "unksm2": ACCEPT,
    "bext01": ACCEPT,
    "invut": ACCEPT,
    "regaut01": ACCEPT,
    "multi01": reject(400),
    "mcl01": reject(400),
    "bcast": ACCEPT,
    "zeromf": ACCEPT,
    "cparam01": ACCEPT,
    "cparam02": ACCEPT,
    "regescrt": ACCEPT,
    "sdp01": ACCEPT,
    # 3.4.1: a legal RFC 2543 message, accepted for backward compatibility
    "inv2543": ACCEPT,
    # the archive's 50th file, described by no section: its request line has no SIP-Version
    "test": reject(400),
}

RFC5118 = {
    "ipv6-good": ACCEPT,
    "ipv6-bad": reject(400),  # 4.2: an IPv6 address in a SIP URI needs its brackets
    "port-ambiguous": ACCEPT,  # 4.3: well formed; [2001:db8::10:5070] is one address
    "port-unambiguous": ACCEPT,
    "via-received-param-with-delim": ACCEPT,
    "via-received-param-no-delim": ACCEPT,
    "ipv6-in-sdp": ACCEPT,
    "mult-ip-in-header": ACCEPT,
    "mult-ip-in-sdp": ACCEPT,
    "ipv4-mapped-ipv6": ACCEPT,
    # 4.10 is disputed (ersip rejects it).  RFC 5118 section 4.10 says: "Following the
    # Robustness Principle [RFC1122], an implementation must tolerate both of the above
    # constructs", so we follow the RFC text and accept the three-colon form.
    "ipv6-bug-abnf-3-colons": ACCEPT,
    "ipv6-correct-abnf-2-colons": ACCEPT,
}


def equivalent_views(msg: Request | Response) -> tuple[object, ...]:
    start = (msg.method, str(msg.uri)) if isinstance(msg, Request) else (msg.status, msg.reason)
    return start, [(h.key, str(h.value)) for h in msg.headers], msg.body


def check_verdict(data: bytes, verdict: Verdict) -> Request | Response | None:
    if verdict.kind == "accept":
        msg = parse_message(data)
        wire_bytes = msg.to_bytes()
        again = parse_message(wire_bytes)
        assert equivalent_views(again) == equivalent_views(msg)
        assert again.to_bytes() == wire_bytes  # serialisation is stable
        return msg
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    error = info.value
    answer = make_error_response(error)
    if verdict.kind == "drop":
        assert error.drop
        assert answer is None
    else:
        assert error.status == verdict.status, str(error)
        if not any(key == "via" for key, _ in error.raw_headers):
            assert answer is None  # nowhere to send an answer without a Via
            return None
        assert answer is not None
        # The answer copies Via, From, To, Call-ID and CSeq as received (section 8.2.6.2), even
        # when those are what was malformed, so only its own framing is checked here.
        assert answer.startswith(f"SIP/2.0 {verdict.status} ".encode())
        assert answer.endswith(b"\r\nContent-Length: 0\r\n\r\n")
        assert answer.count(b"\r\n\r\n") == 1
    return None


def test_every_rfc4475_message_has_a_verdict() -> None:
    names = {m["name"] for m in rfc4475_messages()}
    assert names == set(RFC4475)
    assert len(names) == 50


def test_every_rfc5118_message_has_a_verdict() -> None:
    assert {m["name"] for m in rfc5118_messages()} == set(RFC5118)


@pytest.mark.parametrize("entry", rfc4475_messages(), ids=lambda m: m["name"])
def test_rfc4475(entry: dict[str, str]) -> None:
    check_verdict(read(entry["file"]), RFC4475[entry["name"]])


def test_rfc4475_baddn_variant_with_final_crlf() -> None:
    check_verdict(read("rfc4475/variants/baddn.with-final-crlf.dat"), reject(400))


@pytest.mark.parametrize("entry", rfc5118_messages(), ids=lambda m: m["name"])
def test_rfc5118_archive_on_the_wire(entry: dict[str, object]) -> None:
    archive = entry["archive_lf"]
    assert isinstance(archive, dict)
    check_verdict(wire(read(archive["file"])), RFC5118[str(entry["name"])])


@pytest.mark.parametrize("entry", rfc5118_messages(), ids=lambda m: m["name"])
def test_rfc5118_ersip_crlf_copies(entry: dict[str, object]) -> None:
    copy = entry["ersip_crlf"]
    assert isinstance(copy, dict)
    check_verdict(read(copy["file"]), RFC5118[str(entry["name"])])


def test_rfc5118_archive_bare_lf_is_tolerated() -> None:
    """The archive's bare-LF form parses too (message 4.1 has no body to mis-frame)."""
    msg = parse_message(read("rfc5118/archive-lf/ipv6-good.dat"))
    assert isinstance(msg, Request)
    assert str(msg.uri) == "sip:[2001:db8::10]"


# -- what the RFC says each valid message means ---------------------------------------------
def parsed(name: str) -> Request | Response:
    return parse_message(read(f"rfc4475/{name}.dat"))


def test_wsinv_fields() -> None:
    msg = parsed("wsinv")
    assert isinstance(msg, Request)
    assert isinstance(msg.uri, SipUri)
    assert msg.uri.user == "vivekg" and "unknownparam" in msg.uri.params
    assert msg.to.tag == "1918181833n"
    assert msg.from_.tag == "98asjd8"
    assert msg.from_.display_name == 'J Rosenberg \\"'
    assert msg.max_forwards == 68
    assert (msg.cseq.number, msg.cseq.method) == (9, "INVITE")
    assert [(v.transport, v.host, v.branch) for v in msg.vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert msg.get("Subject") == ""
    assert msg.get("NewFangledHeader") == "newfangled value continued newfangled value"
    # "must be parsed as an opaque value; proxies forward it unchanged"
    assert msg.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert b"UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n" in msg.to_bytes()
    route = msg.routes[0].sip_uri
    assert route is not None and route.lr and route.params["unknownwith"] == "value"
    (contact,) = msg.contacts
    assert contact.display_name == 'Quoted string ""'
    assert contact.params["newparam"] == "newvalue"
    assert "secondparam" in contact.params and contact.q == 0.33
    assert len(msg.body) == 150


def test_intmeth_fields() -> None:
    msg = parsed("intmeth")
    assert isinstance(msg, Request)
    assert msg.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert isinstance(msg.uri, SipUri)
    assert msg.uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert msg.uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert msg.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert msg.from_.display == "token1~` token2'+_ token3*%!.-"
    assert msg.from_.tag == "_token~1'+`*%!-."
    assert msg.from_.params["fromparam''~+*_!.-%"] is not None
    assert msg.has("extensionHeader-!.%*+_`'~")


def test_esc01_escapes_kept_and_unescaped_once() -> None:
    msg = parsed("esc01")
    assert isinstance(msg, Request) and isinstance(msg.uri, SipUri)
    assert msg.uri.user == "sips%3Auser%40example.com"
    assert unescape(msg.uri.user) == "sips:user@example.com"
    assert msg.uri.host == "example.net"
    to_uri = msg.to.sip_uri
    assert to_uri is not None and to_uri.user is not None and unescape(to_uri.user) == "user"
    contact_uri = msg.contacts[0].sip_uri
    assert contact_uri is not None
    assert contact_uri.params["n%61me"] == "v%61lue%25%34%31"
    assert unescape("v%61lue%25%34%31") == "value%41"  # no recursive unescaping
    assert str(msg.uri) in msg.to_bytes().decode()


def test_escnull_keeps_nul_escapes_distinct() -> None:
    msg = parsed("escnull")
    users = [c.sip_uri.user for c in msg.contacts if c.sip_uri is not None]
    assert users == ["%00", "%00%00"]
    assert {unescape(u) for u in users if u} == {"\x00", "\x00\x00"}


def test_esc02_percent_is_not_an_escape_outside_uris() -> None:
    msg = parsed("esc02")
    assert isinstance(msg, Request)
    assert msg.method == "RE%47IST%45R" and msg.method != "REGISTER"
    assert msg.to.display == '"%Z%45"'
    assert len(msg.contacts) == 2  # C%6Fntact is an unknown header
    assert msg.get("C%6Fntact") == "<sip:alias2@host2.example.com>"


def test_lwsdisp_semiuri_transports() -> None:
    assert parsed("lwsdisp").from_.display == "caller"
    semi = parsed("semiuri")
    assert isinstance(semi, Request) and isinstance(semi.uri, SipUri)
    assert (semi.uri.user, semi.uri.host) == ("user;par=u%40example.net", "example.com")
    assert [v.transport for v in parsed("transports").vias] == [
        "UDP",
        "SCTP",
        "TLS",
        "UNKNOWN",
        "TCP",
    ]


def test_longreq_and_dblreq() -> None:
    long = parsed("longreq")
    assert len(long.vias) == 34
    assert long.to.display is not None and "extremeextreme" in long.to.display
    dbl = parsed("dblreq")
    assert isinstance(dbl, Request) and dbl.method == "REGISTER"
    assert dbl.body == b""  # the trailing INVITE-looking octets are ignored (18.3)
    assert b"INVITE" not in dbl.to_bytes()


def test_mpart01_binary_body_framed_by_content_length() -> None:
    msg = parsed("mpart01")
    assert len(msg.body) == 553
    assert msg.to_bytes().endswith(msg.body)


def test_unusual_and_empty_reason_phrases() -> None:
    unreason = parsed("unreason")
    assert isinstance(unreason, Response) and unreason.status == 200
    assert "простое" in unreason.reason
    noreason = parsed("noreason")
    assert isinstance(noreason, Response) and noreason.status == 100
    assert noreason.reason == ""


def test_semantic_messages_parse_to_what_the_application_needs() -> None:
    assert str(parsed("unkscm").uri) == "nobodyKnowsThisScheme:totallyopaquecontent"  # type: ignore[union-attr]
    assert str(parsed("novelsc").uri) == "soap.beep://192.0.2.103:3002"  # type: ignore[union-attr]
    unksm2 = parsed("unksm2")
    assert unksm2.to.sip_uri is None and str(unksm2.to.uri) == "isbn:2983792873"
    assert parsed("zeromf").max_forwards == 0
    inv2543 = parsed("inv2543")
    assert inv2543.max_forwards is None and not inv2543.via.rfc3261_branch
    assert not parsed("badbranch").via.rfc3261_branch  # branch is exactly the magic cookie
    cparam01 = parsed("cparam01").contacts[0]
    assert "unknownparam" in cparam01.params  # a contact parameter (no brackets)
    assert cparam01.sip_uri is not None and "unknownparam" not in cparam01.sip_uri.params
    cparam02 = parsed("cparam02").contacts[0]
    assert cparam02.sip_uri is not None and "unknownparam" in cparam02.sip_uri.params
    regescrt = parsed("regescrt").contacts[0].sip_uri
    assert regescrt is not None and regescrt.headers == "Route=%3Csip:sip.example.com%3E"
    assert parsed("bcast").vias[1].host == "255.255.255.255"


def test_error_response_copies_what_it_can() -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(read("rfc4475/insuf.dat"))
    answer = make_error_response(info.value)
    assert answer is not None
    # insuf lacks Call-ID, From and To; what it has (Via, CSeq) is copied as written.
    assert answer.startswith(b"SIP/2.0 400 Bad Request\r\n")
    assert b"Via: SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf" in answer
    assert b"CSeq: 193942 INVITE" in answer


def test_address_round_trip_keeps_text() -> None:
    text = '"J Rosenberg \\\\\\""       <sip:jdrosen@example.com>  ;  tag = 98asjd8'
    assert str(Address.parse(text)) == text
