"""The relay's SIP edge core (freecall.relay.sipedge): attach, forward for attached nodes only,
responses back along our Via, refusals of RFC 3261. Real parsed messages, signed records."""

from __future__ import annotations

from freecall.peering.nat import attach_proof
from freecall.peering.records import Address, AddrKind, Ext, NodeIdentity, NodeRecord, RelayVia
from freecall.relay.sipedge import SipEdge
from freecall.sip.flow import Flow
from freecall.sip.message import Request, Response, parse_message

RELAY = NodeIdentity.generate()
TLS_KEY = bytes(range(32))
HOST, PORT = "198.51.100.1", 5061
B = NodeIdentity.generate()
A_FLOW = Flow("tls", ("198.51.100.11", 40001), (HOST, PORT), 7)
B_FLOW = Flow("tls", ("198.51.100.12", 51234), (HOST, PORT), 9)
SDP = b"v=0\r\no=- 1 1 IN IP4 10.0.1.2\r\ns=-\r\nc=IN IP4 10.0.1.2\r\nt=0 0\r\n"


def _record(ident: NodeIdentity, via: bool = True) -> NodeRecord:
    extensions = ((Ext.VIA_RELAY, RelayVia(RELAY.node_id, TLS_KEY, HOST, PORT).encode()),) \
        if via else ()
    return ident.make_record(seq=1, expires=2**31, routes=("b.test", "bob@b.test"),
                             addresses=(Address(AddrKind.SIP_TLS, "10.0.2.2", 5061),),
                             extensions=extensions)


def _edge(records: dict[str, list[NodeRecord]] | None = None, **options: int) -> SipEdge:
    table = records if records is not None else {"bob@b.test": [_record(B)],
                                                 "b.test": [_record(B)]}
    by_id = {r.node_id: r for rs in table.values() for r in rs}
    return SipEdge(host=HOST, port=PORT, node_id=RELAY.node_id, tls_fingerprint=TLS_KEY,
                   secret=b"k" * 32, records_for=lambda route: table.get(route, []),
                   record_of=by_id.get, **options)  # type: ignore[arg-type]


def _parse(data: bytes) -> Request | Response:
    return parse_message(data, datagram=False)


def _register(ident: NodeIdentity, *, proof: str | None = None, expires: int = 600) -> Request:
    value = proof if proof is not None else attach_proof(ident, TLS_KEY, 1000.0)
    msg = _parse((
        f"REGISTER sip:{HOST}:{PORT};transport=tls SIP/2.0\r\n"
        "Via: SIP/2.0/TLS 10.0.2.2:5061;branch=z9hG4bKreg1\r\n"
        f"From: <sip:{ident.node_id.hex()}@{HOST}>;tag=1\r\n"
        f"To: <sip:{ident.node_id.hex()}@{HOST}>\r\n"
        f"Call-ID: reg1\r\nCSeq: 1 REGISTER\r\nExpires: {expires}\r\nMax-Forwards: 70\r\n"
        + (f"Freecall-Attach: {value}\r\n" if value else "") + "Content-Length: 0\r\n\r\n"
    ).encode())
    assert isinstance(msg, Request)
    return msg


def _invite(uri: str = "sip:bob@b.test", *, to_tag: str = "", route: str = "",
            max_forwards: int = 70) -> Request:
    msg = _parse((
        f"INVITE {uri} SIP/2.0\r\n"
        "Via: SIP/2.0/TLS 10.0.1.2:5061;branch=z9hG4bKcaller1;rport\r\n"
        + (f"Route: {route}\r\n" if route else "")
        + "From: <sip:alice@a.test>;tag=a1\r\n"
        f"To: <sip:bob@b.test>{';tag=' + to_tag if to_tag else ''}\r\n"
        f"Call-ID: call1\r\nCSeq: 1 INVITE\r\nMax-Forwards: {max_forwards}\r\n"
        "Contact: <sip:alice@10.0.1.2:5061;transport=tls>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n"
    ).encode() + SDP)
    assert isinstance(msg, Request)
    return msg


def _status(out: list[tuple[bytes, Flow]]) -> int:
    assert len(out) == 1
    response = _parse(out[0][0])
    assert isinstance(response, Response)
    return response.status


def _attached_edge() -> SipEdge:
    edge = _edge()
    out = edge.receive(_register(B), B_FLOW, 0.0, 1000.0)
    assert _status(out) == 200 and out[0][1] == B_FLOW
    return edge


def test_attach_needs_a_valid_proof_over_tls() -> None:
    edge = _edge()
    assert _status(edge.receive(_register(B, proof=""), B_FLOW, 0.0, 1000.0)) == 403
    bad = attach_proof(B, bytes(32), 1000.0)  # made for another relay's key
    assert _status(edge.receive(_register(B, proof=bad), B_FLOW, 0.0, 1000.0)) == 403
    udp = Flow("udp", B_FLOW.remote, B_FLOW.local)
    assert _status(edge.receive(_register(B), udp, 0.0, 1000.0)) == 403
    assert _status(edge.receive(_register(B), B_FLOW, 0.0, 5000.0)) == 403  # stale
    assert not edge.attached
    out = edge.receive(_register(B), B_FLOW, 0.0, 1000.0)
    reply = _parse(out[0][0])
    assert reply.get("Expires") is not None and int(str(reply.get("Expires"))) == 600
    assert edge.attached[B.node_id].flow == B_FLOW
    assert edge.get_timer() == 600.0
    assert edge.handle_timer(600.0) == [B.node_id] and not edge.attached


def test_the_table_is_bounded() -> None:
    edge = _edge(max_attached=1)
    assert _status(edge.receive(_register(B), B_FLOW, 0.0, 1000.0)) == 200
    other = NodeIdentity.generate()
    assert _status(edge.receive(_register(other), A_FLOW, 0.0, 1000.0)) == 503
    assert _status(edge.receive(_register(B), B_FLOW, 1.0, 1001.0)) == 200  # a renewal fits


def test_an_invite_for_an_attached_node_crosses_and_its_responses_come_back() -> None:
    edge = _attached_edge()
    out = edge.receive(_invite(), A_FLOW, 1.0, 1001.0)
    assert len(out) == 1 and out[0][1] == B_FLOW
    forwarded = _parse(out[0][0])
    assert isinstance(forwarded, Request) and str(forwarded.uri) == "sip:bob@b.test"
    assert forwarded.body == SDP  # untouched
    assert forwarded.max_forwards == 69
    vias = forwarded.vias
    assert vias[0].host == HOST and vias[0].port == PORT
    assert vias[1].received == "198.51.100.11"
    rr = forwarded.record_routes[0]
    assert f"fcn={B.node_id.hex()}" in str(rr)
    # the 200 goes back over A's connection, our Via removed
    answer = Response(200, "OK", list(forwarded.headers), b"")
    back = edge.receive(_parse(answer.to_bytes()), B_FLOW, 2.0, 1002.0)
    assert len(back) == 1 and back[0][1].conn == A_FLOW.conn
    assert back[0][1].remote == A_FLOW.remote
    assert [v.branch for v in _parse(back[0][0]).vias] == ["z9hG4bKcaller1"]
    # a response whose Via we did not make (or whose flow token was altered) goes nowhere
    raw = answer.to_bytes()
    at = raw.index(b"fcf=", raw.index(b"Via: SIP/2.0/TLS 198.51.100.1"))
    forged = raw[:at] + b"fcf=00" + raw[at + 4:]
    assert edge.receive(_parse(forged), B_FLOW, 2.0, 1002.0) == []
    # in-dialog: A's BYE to B's minted Contact reaches B; B's BYE to A's Contact goes on
    bye = _invite("sip:10.0.2.2:5061;transport=tls", to_tag="b1")
    assert edge.receive(bye, A_FLOW, 3.0, 1003.0)[0][1] == B_FLOW
    back_bye = _invite("sip:alice@198.51.100.11:5061;transport=tls", to_tag="b1")
    assert edge.receive(back_bye, B_FLOW, 3.0, 1003.0)[0][1] == Flow(
        "tls", ("198.51.100.11", 5061))
    # with the Record-Route honoured as a Route: to B, and from B back over A's connection
    routed = _invite("sip:10.0.2.2:5061", to_tag="b1", route=str(rr))
    assert edge.receive(routed, A_FLOW, 4.0, 1004.0)[0][1] == B_FLOW
    routed = _invite("sip:alice@10.0.1.2:5061", to_tag="b1", route=str(rr))
    assert edge.receive(routed, B_FLOW, 4.0, 1004.0)[0][1].conn == A_FLOW.conn


def test_never_an_open_relay() -> None:
    stranger = NodeIdentity.generate()
    edge = _edge({"c.test": [_record(stranger, via=False)], "bob@b.test": [_record(B)]})
    assert _status(edge.receive(_invite("sip:carol@c.test"), A_FLOW, 0.0, 1000.0)) == 403
    assert _status(edge.receive(_invite("sip:dave@d.test"), A_FLOW, 0.0, 1000.0)) == 403
    # B's record names us but B is not attached: 404
    assert _status(edge.receive(_invite(), A_FLOW, 0.0, 1000.0)) == 404
    edge.receive(_register(B), B_FLOW, 0.0, 1000.0)
    assert _status(edge.receive(_invite(max_forwards=0), A_FLOW, 0.0, 1000.0)) == 483
    # in-dialog from a stranger to an address that is no attached node's
    assert _status(edge.receive(_invite("sip:192.0.2.9:5060", to_tag="x"), A_FLOW, 0.0,
                                1000.0)) == 403
    # a Route that is not ours
    assert _status(edge.receive(_invite(route="<sip:192.0.2.9;lr>"), A_FLOW, 0.0,
                                1000.0)) == 403
    # B's connection closes: B is detached, calls get 404 again
    assert edge.flow_closed(B_FLOW) == [B.node_id]
    assert _status(edge.receive(_invite(), A_FLOW, 0.0, 1000.0)) == 404
    assert edge.forwarded == 0 and edge.refused >= 6
