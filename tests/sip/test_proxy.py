"""The proxy core (RFC 3261 section 16) on virtual time, with an in-memory location service."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import pytest

from freecall.sip.auth import DigestClient, DigestServer, parse_challenge
from freecall.sip.flow import Flow
from freecall.sip.headers import Address
from freecall.sip.message import Request, Response, parse_message
from freecall.sip.proxy import (
    CallAnswered,
    CallEnded,
    CallStarted,
    Listener,
    MediaHook,
    Proxy,
    ProxyEvent,
    ProxySettings,
    Registered,
    Resolution,
    Side,
    Target,
    choose_best,
)
from freecall.sip.ratelimit import AuthLockout
from freecall.sip.transaction import TransactionLayer
from freecall.sip.uri import Uri, parse_uri

SOFT = Listener("udp", "127.0.0.1", 5060, Side.SOFTPHONE)
PUBLIC = Listener("udp", "192.0.2.10", 5062, Side.PUBLIC)
ALICE = Flow("udp", ("127.0.0.1", 5081), ("127.0.0.1", 5060))
BOB1 = Flow("udp", ("127.0.0.1", 5083), ("127.0.0.1", 5060))
BOB2 = Flow("udp", ("127.0.0.1", 5085), ("127.0.0.1", 5060))
REMOTE = Flow("udp", ("198.51.100.7", 5062), ("192.0.2.10", 5062))
PASSWORDS = {"alice": "alicepw", "bob": "bobpw"}


@dataclass
class Binding:
    contact: Address
    flow: Flow
    q: float = 1.0

    @property
    def next_hop(self) -> Flow:
        return self.flow

    @property
    def target_uri(self) -> Uri:
        return self.contact.uri


@dataclass
class Location:
    bindings: dict[str, list[Binding]] = field(default_factory=dict)

    def lookup(self, aor: str, now: float) -> list[Binding]:
        return self.bindings.get(aor, [])

    def exists(self, user: str) -> bool:
        return user in PASSWORDS


class Resolver:
    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []
        self.answer: Resolution | None = Resolution(status=404, reason="Not Found")

    def resolve(self, uri: Uri, request: Request, ticket: int) -> Resolution | None:
        self.asked.append((str(uri), ticket))
        return self.answer


class Node:
    """A transaction layer and a proxy, pumped like the daemon pumps them."""

    def __init__(self, *, trusted: bool = False, lockout: AuthLockout | None = None,
                 server_name: str = "freecall", calls_per_source: int = 0,
                 media: MediaHook | None = None) -> None:
        import ipaddress

        self.layer = TransactionLayer()
        self.location = Location()
        self.resolver = Resolver()
        settings = ProxySettings(
            domains=frozenset({"a.test"}),
            listeners=(SOFT, PUBLIC),
            secret=b"k" * 32,
            realm="a.test",
            trusted=(ipaddress.ip_network("127.0.0.0/8"),) if trusted else (),
            server_name=server_name,
            calls_per_source=calls_per_source,
        )
        self.proxy = Proxy(
            self.layer,
            settings,
            self.location,
            resolver=self.resolver,
            digest=DigestServer("a.test", b"s" * 32, algorithms=("MD5",)),
            password_of=PASSWORDS.get,
            side_of=lambda flow: (
                Side.PUBLIC if flow.local == ("192.0.2.10", 5062) else Side.SOFTPHONE
            ),
            rng=random.Random(1),
            lockout=lockout,
            media=media,
        )
        self.events: list[ProxyEvent] = []
        self.now = 0.0

    def feed(
        self, msg: Request | Response | bytes, flow: Flow
    ) -> list[tuple[Request | Response, Flow]]:
        if isinstance(msg, bytes):
            parsed = parse_message(msg)
        else:
            parsed = parse_message(msg.to_bytes())
        self.layer.receive(parsed, flow, self.now)
        return self.pump()

    def pump(self) -> list[tuple[Request | Response, Flow]]:
        while (event := self.layer.next_event()) is not None:
            self.proxy.handle_event(event, self.now)
        while (pevent := self.proxy.next_event()) is not None:
            self.events.append(pevent)
        return [(parse_message(data), flow) for data, flow in self.layer.messages_to_send()]

    def advance(self, to: float) -> list[tuple[Request | Response, Flow]]:
        out = []
        while True:
            deadlines = [
                d for d in (self.layer.get_timer(), self.proxy.get_timer()) if d is not None
            ]
            if not deadlines or min(deadlines) > to:
                break
            self.now = min(deadlines)
            self.layer.handle_timer(self.now)
            self.proxy.handle_timer(self.now)
            out.extend(self.pump())
        self.now = to
        return out


def invite(
    to: str = "sip:bob@a.test",
    *,
    branch: str = "z9hG4bKalice1",
    frm: str = "<sip:alice@a.test>;tag=al1",
    cseq: int = 1,
    extra: str = "",
    method: str = "INVITE",
    via_host: str = "127.0.0.1:5081",
) -> Request:
    data = (
        f"{method} {to} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {via_host};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: {frm}\r\n"
        f"To: <{to}>\r\n"
        "Call-ID: call-1@127.0.0.1\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"Contact: <sip:alice@127.0.0.1:5081>\r\n{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def authorize(node: Node, request: Request, challenge: Response, user: str = "alice") -> Request:
    header = "Proxy-Authenticate" if challenge.status == 407 else "WWW-Authenticate"
    value = DigestClient(urandom=lambda n: b"\x01" * n).authorization(
        parse_challenge(str(challenge.get(header))),
        request.method,
        str(request.uri),
        user,
        PASSWORDS[user],
    )
    request.append("Proxy-Authorization" if challenge.status == 407 else "Authorization", value)
    via = request.via
    request.replace_first("via", via.with_params(branch=(via.branch or "") + "x"))
    request.set("CSeq", f"{request.cseq.number + 1} {request.method}")
    return parse_message(request.to_bytes())  # type: ignore[return-value]


def responses(sent: list[tuple[Request | Response, Flow]]) -> list[int]:
    return [m.status for m, _ in sent if isinstance(m, Response)]


def requests(sent: list[tuple[Request | Response, Flow]]) -> list[tuple[Request, Flow]]:
    return [(m, f) for m, f in sent if isinstance(m, Request)]


def reply(
    req: Request, status: int, tag: str | None = "bob-tag", contact: str | None = None
) -> Response:
    from freecall.sip.message import make_response

    response = make_response(req, status, to_tag=tag if status > 100 else None)
    if contact:
        response.append("Contact", Address.parse(f"<{contact}>"))
    return response


def authenticated_invite(
    node: Node, **kwargs: object
) -> tuple[Request, list[tuple[Request | Response, Flow]]]:
    first = invite(**kwargs)  # type: ignore[arg-type]
    challenge = node.feed(first, ALICE)
    assert responses(challenge) == [100, 407]  # the INVITE transaction's 100, then the challenge
    second = authorize(node, first, challenge[-1][0])  # type: ignore[arg-type]
    return second, node.feed(second, ALICE)


def register_bob(node: Node) -> None:
    node.location.bindings["bob@a.test"] = [
        Binding(Address.parse("<sip:bob@127.0.0.1:5083>"), BOB1, 1.0),
        Binding(Address.parse("<sip:bob@127.0.0.1:5085>"), BOB2, 0.5),
    ]


def test_register_is_challenged_then_accepted() -> None:
    node = Node()
    reg = invite("sip:a.test", method="REGISTER", frm="<sip:alice@a.test>;tag=r1")
    reg.set("To", Address.parse("<sip:alice@a.test>"))
    out = node.feed(reg, ALICE)
    assert responses(out) == [401]
    challenge = out[0][0]
    assert isinstance(challenge, Response) and challenge.get("WWW-Authenticate")
    node.feed(authorize(node, reg, challenge), ALICE)
    registered = [e for e in node.events if isinstance(e, Registered)]
    assert len(registered) == 1 and registered[0].user == "alice"


def test_register_from_a_non_loopback_source_is_refused() -> None:
    node = Node()
    reg = invite("sip:a.test", method="REGISTER")
    out = node.feed(reg, Flow("udp", ("10.1.2.3", 5060), ("127.0.0.1", 5060)))
    assert responses(out) == [403]


def test_call_forks_to_every_device_with_record_route() -> None:
    node = Node()
    register_bob(node)
    request, out = authenticated_invite(node)
    assert responses(out) == [100]
    forwarded = requests(out)
    assert [f for _, f in forwarded] == [BOB1, BOB2]
    for fwd, _ in forwarded:
        assert fwd.max_forwards == 69
        rr = fwd.record_routes[0].sip_uri
        assert rr is not None and rr.lr and rr.host_port == "127.0.0.1:5060" and rr.params["fc"]
        assert fwd.via.sent_by == "127.0.0.1:5060" and fwd.vias[1].branch == request.via.branch
    assert str(forwarded[0][0].uri) == "sip:bob@127.0.0.1:5083"
    assert any(isinstance(e, CallStarted) for e in node.events)


def test_first_2xx_wins_other_branch_is_cancelled() -> None:
    node = Node()
    register_bob(node)
    _, out = authenticated_invite(node)
    (fwd1, _), (fwd2, _) = requests(out)
    up = node.feed(reply(fwd1, 180, "d1"), BOB1)
    assert responses(up) == [180]
    assert up[0][1] == ALICE and len(up[0][0].vias) == 1  # our Via removed
    ok = reply(fwd2, 200, "d2", contact="sip:bob@127.0.0.1:5085")
    up = node.feed(ok, BOB2)
    assert responses(up) == [200]
    cancels = [r for r, f in requests(up) if r.method == "CANCEL"]
    assert len(cancels) == 1 and cancels[0].via.branch == fwd1.via.branch
    answered = [e for e in node.events if isinstance(e, CallAnswered)]
    assert answered and answered[0].call.to_tag == "d2"
    # the cancelled branch answers 487: absorbed, nothing more goes upstream
    up = node.feed(reply(fwd1, 487, "d1"), BOB1)
    assert responses(up) == []


def test_all_busy_gives_one_best_final() -> None:
    node = Node()
    register_bob(node)
    _, out = authenticated_invite(node)
    (fwd1, _), (fwd2, _) = requests(out)
    assert responses(node.feed(reply(fwd1, 486, "d1"), BOB1)) == []
    up = node.feed(reply(fwd2, 480, "d2"), BOB2)
    assert responses(up) == [480]  # 4xx ranked by code: 480 < 486
    ended = [e for e in node.events if isinstance(e, CallEnded)]
    assert ended and ended[0].call.outcome == "failed 480"


def test_cancel_before_answer() -> None:
    node = Node()
    register_bob(node)
    request, out = authenticated_invite(node)
    (fwd1, _), (fwd2, _) = requests(out)
    node.feed(reply(fwd1, 180, "d1"), BOB1)
    cancel = invite(branch=request.via.branch or "", method="CANCEL", cseq=request.cseq.number)
    out = node.feed(cancel, ALICE)
    assert responses(out) == [200]
    assert [r.via.branch for r, _ in requests(out)] == [fwd1.via.branch]
    # the branch that has not answered yet is cancelled once it sends a provisional
    out = node.feed(reply(fwd2, 180, "d2"), BOB2)
    assert [r.method for r, _ in requests(out)] == ["CANCEL"]
    node.feed(reply(fwd1, 487, "d1"), BOB1)
    up = node.feed(reply(fwd2, 487, "d2"), BOB2)
    assert 487 in responses(up)
    ended = [e for e in node.events if isinstance(e, CallEnded)]
    assert ended[0].call.outcome == "cancelled"


def test_timer_c_cancels_a_ringing_branch() -> None:
    node = Node()
    node.location.bindings["bob@a.test"] = [
        Binding(Address.parse("<sip:bob@127.0.0.1:5083>"), BOB1)
    ]
    _, out = authenticated_invite(node)
    ((fwd, _),) = requests(out)
    node.feed(reply(fwd, 180, "d1"), BOB1)
    sent = node.advance(179.0)
    assert not [r for r, _ in requests(sent) if r.method == "CANCEL"]
    sent = node.advance(181.0)
    cancels = requests(sent)  # the CANCEL, and its UDP retransmission at T1
    assert {r.method for r, _ in cancels} == {"CANCEL"}
    assert {r.via.branch for r, _ in cancels} == {fwd.via.branch}


def test_in_dialog_bye_needs_our_route_token() -> None:
    node = Node()
    register_bob(node)
    _request, out = authenticated_invite(node)
    (fwd1, _), _ = requests(out)
    rr = fwd1.record_routes[0]
    node.feed(reply(fwd1, 200, "d1", contact="sip:bob@127.0.0.1:5083"), BOB1)
    bye = invite("sip:bob@127.0.0.1:5083", method="BYE", branch="z9hG4bKbye1", cseq=3)
    bye.set("To", Address.parse("<sip:bob@a.test>;tag=d1"))
    bye.append("Route", rr)
    out = node.feed(bye, ALICE)
    fwd = requests(out)
    assert len(fwd) == 1 and fwd[0][1].remote == ("127.0.0.1", 5083) and not fwd[0][0].routes
    ended = [e for e in node.events if isinstance(e, CallEnded)]
    assert ended and ended[0].call.outcome == "hung up by caller"
    forged = invite("sip:victim@203.0.113.5", method="BYE", branch="z9hG4bKbye2", cseq=4)
    forged.set("To", Address.parse("<sip:bob@a.test>;tag=d1"))
    forged.append("Route", Address.parse("<sip:127.0.0.1:5060;lr;fc=aaaaaaaaaaaaaaaa>"))
    assert responses(node.feed(forged, ALICE)) == [403]


def test_ack_for_2xx_is_forwarded_along_the_route() -> None:
    node = Node()
    register_bob(node)
    _, out = authenticated_invite(node)
    (fwd1, _), _ = requests(out)
    node.feed(reply(fwd1, 200, "d1", contact="sip:bob@127.0.0.1:5083"), BOB1)
    ack = invite("sip:bob@127.0.0.1:5083", method="ACK", branch="z9hG4bKack1", cseq=2)
    ack.set("To", Address.parse("<sip:bob@a.test>;tag=d1"))
    ack.append("Route", fwd1.record_routes[0])
    out = node.feed(ack, ALICE)
    ((fwd_ack, flow),) = requests(out)
    assert fwd_ack.method == "ACK" and flow.remote == ("127.0.0.1", 5083)
    assert len(fwd_ack.vias) == 2


def test_not_an_open_relay() -> None:
    node = Node()
    # from another node to a foreign domain: refused
    out = node.feed(invite("sip:carol@elsewhere.test", via_host="198.51.100.7:5062",
                           frm="<sip:dave@b.test>;tag=d1"), REMOTE)
    assert responses(out)[-1] == 403
    # from another node to a local user: allowed without digest (404: bob is offline)
    out = node.feed(
        invite("sip:bob@a.test", branch="z9hG4bKr2", via_host="198.51.100.7:5062",
               frm="<sip:carol@b.test>;tag=c2"), REMOTE
    )
    assert responses(out) == [100, 404]
    # an authenticated local user may call out: the resolver is asked (and answers 404 here)
    _, out = authenticated_invite(node, to="sip:carol@elsewhere.test", branch="z9hG4bKout")
    assert responses(out) == [100, 404]
    assert node.resolver.asked and node.resolver.asked[0][0] == "sip:carol@elsewhere.test"


def test_unknown_and_offline_users_get_the_same_answer() -> None:
    node = Node()
    _, out1 = authenticated_invite(node, to="sip:nobody@a.test", branch="z9hG4bKe1")
    _, out2 = authenticated_invite(node, to="sip:bob@a.test", branch="z9hG4bKe2")
    assert responses(out1) == responses(out2) == [100, 404]


def test_asynchronous_resolution_forwards_later() -> None:
    node = Node()
    node.resolver.answer = None
    _, out = authenticated_invite(node, to="sip:carol@b.test", branch="z9hG4bKasync")
    assert responses(out) == [100] and not requests(out)
    ticket = node.resolver.asked[0][1]
    carol = Flow("udp", ("198.51.100.9", 5062))
    node.proxy.resolved(
        ticket, Resolution((Target(parse_uri("sip:carol@b.test"), (carol,), "dns"),)), node.now
    )
    ((fwd, flow),) = requests(node.pump())
    assert flow.remote == carol.remote and flow.local == ("192.0.2.10", 5062)
    assert fwd.via.sent_by == "192.0.2.10:5062"


def test_transport_failure_fails_over_to_the_next_flow() -> None:
    node = Node()
    node.resolver.answer = Resolution(
        (
            Target(
                parse_uri("sip:carol@b.test"),
                (Flow("tcp", ("198.51.100.8", 5062)), Flow("udp", ("198.51.100.9", 5062))),
                "dns",
            ),
        )
    )
    _, out = authenticated_invite(node, to="sip:carol@b.test", branch="z9hG4bKfo")
    ((_first, flow),) = requests(out)
    node.layer.transport_failed(flow)
    ((_second, flow2),) = requests(node.pump())
    assert flow2.remote == ("198.51.100.9", 5062)


@pytest.mark.parametrize(
    ("request_text", "status"),
    [
        (b"OPTIONS sip:a.test SIP/2.0\r\nMax-Forwards: 70\r\n", 200),
        (b"OPTIONS sip:bob@elsewhere.test SIP/2.0\r\nMax-Forwards: 0\r\n", 483),
        (b"OPTIONS sip:bob@a.test SIP/2.0\r\nProxy-Require: foo\r\nMax-Forwards: 70\r\n", 420),
        (b"OPTIONS nobody:opaque SIP/2.0\r\nMax-Forwards: 70\r\n", 416),
        (b"OPTIONS sip:a.test SIP/2.0\r\nAccept: text/nonsense\r\nMax-Forwards: 70\r\n", 406),
    ],
)
def test_validation_before_anything_else(request_text: bytes, status: int) -> None:
    node = Node(trusted=True)
    data = request_text + (
        b"Via: SIP/2.0/UDP 127.0.0.1:5081;branch=z9hG4bKv1\r\nFrom: <sip:alice@a.test>;tag=1\r\n"
        b"To: <sip:x@a.test>\r\nCall-ID: v1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    out = node.feed(data, ALICE)
    assert responses(out) == [status]
    if status == 420:
        assert out[0][0].get("Unsupported") == "foo"


def test_loop_is_detected() -> None:
    node = Node(trusted=True)
    register_bob(node)
    node.location.bindings["bob@a.test"] = [
        Binding(Address.parse("<sip:bob@a.test>"), Flow("udp", ("127.0.0.1", 5060)))
    ]
    out = node.feed(invite(branch="z9hG4bKloop"), ALICE)
    ((fwd, _),) = requests(out)
    # the forwarded request comes back to us unchanged: 482
    out = node.feed(fwd, Flow("udp", ("127.0.0.1", 5060), ("127.0.0.1", 5060)))
    assert 482 in responses(out)


def test_hang_up_sends_bye_both_ways() -> None:
    node = Node()
    register_bob(node)
    _, out = authenticated_invite(node)
    (fwd1, _), _ = requests(out)
    node.feed(reply(fwd1, 200, "d1", contact="sip:bob@127.0.0.1:5083"), BOB1)
    assert node.proxy.hang_up_all(node.now) == 1
    byes = [(r, f) for r, f in requests(node.pump()) if r.method == "BYE"]
    assert {f.remote for _, f in byes} == {("127.0.0.1", 5081), ("127.0.0.1", 5083)}
    to_alice = next(r for r, f in byes if f.remote == ("127.0.0.1", 5081))
    assert to_alice.from_.tag == "d1" and to_alice.to.tag == "al1"


def test_choose_best() -> None:
    def resp(status: int) -> Response:
        return Response(status)

    assert choose_best([resp(486), resp(603), resp(200)]).status == 603  # type: ignore[union-attr]
    assert choose_best([resp(486), resp(404), resp(302)]).status == 302  # type: ignore[union-attr]
    assert choose_best([resp(486), resp(407), resp(404)]).status == 407  # type: ignore[union-attr]
    assert choose_best([resp(503), resp(504)]).status == 503  # type: ignore[union-attr]
    assert choose_best([]) is None


def test_503_becomes_500_and_challenges_are_aggregated() -> None:
    node = Node(trusted=True)
    register_bob(node)
    out = node.feed(invite(branch="z9hG4bKagg"), ALICE)
    (fwd1, _), (fwd2, _) = requests(out)
    node.feed(reply(fwd1, 503, "d1"), BOB1)
    up = node.feed(reply(fwd2, 503, "d2"), BOB2)
    assert responses(up) == [500]
    out = node.feed(invite(branch="z9hG4bKagg2", frm="<sip:alice@a.test>;tag=al9"), ALICE)
    (g1, _), (g2, _) = requests(out)
    c1 = reply(g1, 401, "d1")
    c1.append("WWW-Authenticate", 'Digest realm="one", nonce="1"')
    c2 = reply(g2, 407, "d2")
    c2.append("Proxy-Authenticate", 'Digest realm="two", nonce="2"')
    node.feed(c1, BOB1)
    up = node.feed(c2, BOB2)
    best = up[-1][0]
    assert isinstance(best, Response) and best.status == 401
    assert best.get("Proxy-Authenticate") and best.get("WWW-Authenticate")


def test_in_dialog_requests_of_a_ua_ignoring_record_route() -> None:
    """SIPp's built-in uac sends ACK and BYE to the callee's AOR with no Route: they are
    routed to the callee's registered device like initial requests to a local user."""
    node = Node(trusted=True)
    node.location.bindings["bob@a.test"] = [
        Binding(Address.parse("<sip:bob@127.0.0.1:5083>"), BOB1)
    ]
    out = node.feed(invite(branch="z9hG4bKsipp"), ALICE)
    ((fwd, _),) = requests(out)
    node.feed(reply(fwd, 200, "d1", contact="sip:bob@127.0.0.1:5083"), BOB1)
    ack = invite(method="ACK", branch="z9hG4bKsippack", cseq=1)
    ack.set("To", Address.parse("<sip:bob@a.test>;tag=d1"))
    ((fwd_ack, flow),) = requests(node.feed(ack, ALICE))
    assert fwd_ack.method == "ACK" and flow == BOB1
    assert str(fwd_ack.uri) == "sip:bob@127.0.0.1:5083"
    bye = invite(method="BYE", branch="z9hG4bKsippbye", cseq=2)
    bye.set("To", Address.parse("<sip:bob@a.test>;tag=d1"))
    ((fwd_bye, flow),) = requests(node.feed(bye, ALICE))
    assert fwd_bye.method == "BYE" and flow == BOB1
    assert any(isinstance(e, CallEnded) for e in node.events)
    # a forged token is still refused
    bye2 = invite(method="BYE", branch="z9hG4bKsippbye2", cseq=3)
    bye2.set("To", Address.parse("<sip:bob@a.test>;tag=d1"))
    bye2.append("Route", Address.parse("<sip:127.0.0.1:5060;lr;fc=zzzzzzzzzzzzzzzz>"))
    assert responses(node.feed(bye2, ALICE)) == [403]


def test_a_uas_answering_with_the_cancel_vias_still_ends_the_branch() -> None:
    """A UAS that builds its 487 from our CANCEL (our Via only) must not hang the call."""
    node = Node(trusted=True)
    node.location.bindings["bob@a.test"] = [
        Binding(Address.parse("<sip:bob@127.0.0.1:5083>"), BOB1)
    ]
    request = invite(branch="z9hG4bKsloppy")
    ((fwd, _),) = requests(node.feed(request, ALICE))
    node.feed(reply(fwd, 180, "d1"), BOB1)
    cancel = invite(branch="z9hG4bKsloppy", method="CANCEL")
    out = node.feed(cancel, ALICE)
    (our_cancel,) = [r for r, _ in requests(out) if r.method == "CANCEL"]
    sloppy = reply(our_cancel, 487, "d1")
    sloppy.set("CSeq", f"{fwd.cseq.number} INVITE")
    up = node.feed(sloppy, BOB1)
    (final,) = [m for m, _ in up if isinstance(m, Response) and m.status == 487]
    assert final.via.branch == "z9hG4bKsloppy" and final.cseq.method == "INVITE"


def test_cancel_racing_a_2xx_changes_nothing() -> None:
    """RFC 3261 section 9.2: a CANCEL after the final response has no effect on the call
    (it gets its 200, the INVITE stays answered, no CANCEL goes downstream)."""
    node = Node(trusted=True)
    node.location.bindings["bob@a.test"] = [
        Binding(Address.parse("<sip:bob@127.0.0.1:5083>"), BOB1)
    ]
    request = invite(branch="z9hG4bKrace")
    ((fwd, _),) = requests(node.feed(request, ALICE))
    up = node.feed(reply(fwd, 200, "d1", contact="sip:bob@127.0.0.1:5083"), BOB1)
    assert responses(up) == [200]
    out = node.feed(invite(branch="z9hG4bKrace", method="CANCEL"), ALICE)
    assert responses(out) == [200]
    assert not requests(out)
    assert any(isinstance(e, CallAnswered) for e in node.events)
    assert not any(isinstance(e, CallEnded) for e in node.events)


def test_retransmitted_invite_is_absorbed_not_forked_again() -> None:
    node = Node(trusted=True)
    register_bob(node)
    request = invite(branch="z9hG4bKretx")
    first = node.feed(request, ALICE)
    assert len(requests(first)) == 2
    again = node.feed(request, ALICE)  # a UDP retransmission of the same INVITE
    assert responses(again) == [100] and not requests(again)


def test_503_and_silence_fail_over_to_the_next_address() -> None:
    """RFC 3263 section 4.3: on a 503, or no response at all, try the next address."""
    node = Node()
    flows = (
        Flow("udp", ("198.51.100.8", 5062)),
        Flow("udp", ("198.51.100.9", 5062)),
        Flow("udp", ("198.51.100.10", 5062)),
    )
    node.resolver.answer = Resolution((Target(parse_uri("sip:carol@b.test"), flows, "dns"),))
    _, out = authenticated_invite(node, to="sip:carol@b.test", branch="z9hG4bKfo503")
    ((first, flow),) = requests(out)
    assert flow.remote == flows[0].remote
    out = node.feed(reply(first, 503, "x"), flow)
    acks = [f for m, f in requests(out) if m.method == "ACK"]
    assert [f.remote for f in acks] == [flows[0].remote]  # the 503 is acknowledged
    ((_second, flow2),) = [(m, f) for m, f in requests(out) if m.method == "INVITE"]
    assert flow2.remote == flows[1].remote and 503 not in responses(out)
    sent = node.advance(node.now + 40.0)  # the second address never answers: Timer B
    third = [(m, f) for m, f in requests(sent) if f.remote == flows[2].remote]
    assert third and third[0][0].method == "INVITE"


def test_a_call_to_another_node_carries_only_public_addresses() -> None:
    """Issue 4: Via, Record-Route and Contact of what leaves the node point at its public
    address; the caller's softphone sees its own side; in-dialog requests come back."""
    node = Node()
    carol = Flow("udp", ("198.51.100.9", 5062))
    node.resolver.answer = Resolution((Target(parse_uri("sip:carol@b.test"), (carol,), "dns"),))
    request, out = authenticated_invite(node, to="sip:carol@b.test", branch="z9hG4bKedge")
    ((fwd, flow),) = requests(out)
    wire = fwd.to_bytes().replace(b"call-1@127.0.0.1", b"")  # the phone's own Call-ID
    assert b"127.0.0.1" not in wire, wire.decode()
    assert not fwd.has("Proxy-Authorization")  # our realm's credentials stay here
    assert [v.sent_by for v in fwd.vias] == ["192.0.2.10:5062"]  # ours only: topology hidden
    rr = fwd.record_routes[0].sip_uri
    assert rr is not None and rr.host_port == "192.0.2.10:5062" and rr.params["fc"]
    contact = fwd.contacts[0].sip_uri
    assert contact is not None and contact.host_port == "192.0.2.10:5062"
    assert contact.user == "alice"
    # the 200 from the far node: Vias restored, our Record-Route names the loopback side
    ok = reply(fwd, 200, "c1", contact="sip:carol@198.51.100.9:5062")
    ok.set("Record-Route", fwd.record_routes[0])
    up = node.feed(ok, flow)
    ((answer, to_alice),) = [(m, f) for m, f in up if isinstance(m, Response)]
    assert to_alice.remote == ALICE.remote
    assert [v.branch for v in answer.vias] == [request.via.branch]
    up_rr = answer.record_routes[0].sip_uri
    assert up_rr is not None and up_rr.host_port == "127.0.0.1:5060"
    assert up_rr.params["fc"] == rr.params["fc"]
    # the far node hangs up: its BYE reaches alice's own contact
    bye = invite(f"{contact}", method="BYE", branch="z9hG4bKfar", cseq=7,
                 frm="<sip:carol@b.test>;tag=c1", via_host="198.51.100.9:5062")
    bye.set("To", Address.parse("<sip:alice@a.test>;tag=al1"))
    bye.append("Route", fwd.record_routes[0])
    out = node.feed(bye, REMOTE)
    ((to_softphone, hop),) = requests(out)
    assert str(to_softphone.uri) == "sip:alice@127.0.0.1:5081" and hop.remote == ALICE.remote
    # a forged contact token does not turn us into a relay
    forged = invite(
        "sip:alice@192.0.2.10:5062;fcc=c2lwOnZpY3RpbUAyMDMuMC4xMTMuNQ.aaaaaaaaaaaaaaaa",
        method="BYE", branch="z9hG4bKforged", cseq=8, frm="<sip:carol@b.test>;tag=c1",
        via_host="198.51.100.9:5062",
    )
    forged.set("To", Address.parse("<sip:alice@a.test>;tag=al1"))
    forged.append("Route", fwd.record_routes[0])
    out = node.feed(forged, REMOTE)
    assert not requests(out) and responses(out)[-1] >= 400


def test_a_loopback_from_leaves_as_the_users_public_address() -> None:
    node = Node()
    carol = Flow("udp", ("198.51.100.9", 5062))
    node.resolver.answer = Resolution((Target(parse_uri("sip:carol@b.test"), (carol,), "dns"),))
    _, out = authenticated_invite(
        node, to="sip:carol@b.test", branch="z9hG4bKfrom", frm="<sip:alice@127.0.0.1>;tag=x1"
    )
    ((fwd, _),) = requests(out)
    assert str(fwd.from_.uri) == "sip:alice@a.test" and fwd.from_.tag == "x1"


def test_an_incoming_call_answers_with_a_public_contact() -> None:
    node = Node()
    node.location.bindings["bob@a.test"] = [
        Binding(Address.parse("<sip:bob@127.0.0.1:5083>"), BOB1)
    ]
    inbound = invite("sip:bob@a.test", branch="z9hG4bKin", via_host="198.51.100.7:5062",
                     frm="<sip:carol@b.test>;tag=c9")
    inbound.set("Contact", Address.parse("<sip:carol@198.51.100.7:5062>"))
    ((fwd, _),) = requests(node.feed(inbound, REMOTE))
    assert len(fwd.vias) == 2  # toward our own softphone nothing is hidden
    loopback_rr = fwd.record_routes[0].sip_uri
    assert loopback_rr is not None and loopback_rr.host_port == "127.0.0.1:5060"
    ok = reply(fwd, 200, "b1", contact="sip:bob@127.0.0.1:5083")
    ok.set("Record-Route", fwd.record_routes[0])  # a UAS echoes Record-Route
    up = node.feed(ok, BOB1)
    ((answer, flow),) = [(m, f) for m, f in up if isinstance(m, Response)]
    assert flow.remote == REMOTE.remote
    assert b"127.0.0.1" not in answer.to_bytes().replace(b"call-1@127.0.0.1", b"")
    public_rr = answer.record_routes[0].sip_uri
    assert public_rr is not None and public_rr.host_port == "192.0.2.10:5062"
    contact = answer.contacts[0].sip_uri
    assert contact is not None and contact.host_port == "192.0.2.10:5062"


def test_hanging_up_a_call_from_another_node_follows_each_route_set() -> None:
    """BYEs from the middle (shutdown, media failure): toward the caller's node with its
    Record-Route as Route; toward our softphone to its own Contact, not the public stand-in
    the caller's node was given. That node, receiving an in-dialog request for a Contact it
    minted itself, delivers it to its softphone."""
    node = Node()
    node.location.bindings["bob@a.test"] = [
        Binding(Address.parse("<sip:bob@127.0.0.1:5083>"), BOB1)
    ]
    inbound = invite("sip:bob@a.test", branch="z9hG4bKrs", via_host="198.51.100.7:5062",
                     frm="<sip:carol@b.test>;tag=c9")
    inbound.set("Contact", Address.parse("<sip:carol@198.51.100.7:5062;fcc=x.y>"))
    inbound.set("Record-Route", Address.parse("<sip:198.51.100.7:5062;lr;fc=tok>"))
    ((fwd, _),) = requests(node.feed(inbound, REMOTE))
    ok = reply(fwd, 200, "b1", contact="sip:bob@127.0.0.1:5083")
    node.feed(ok, BOB1)
    assert node.proxy.hang_up_all(node.now) == 1
    byes = {f.remote: r for r, f in requests(node.pump()) if r.method == "BYE"}
    to_carol, to_bob = byes[REMOTE.remote], byes[BOB1.remote]
    assert [str(r) for r in to_carol.routes] == ["<sip:198.51.100.7:5062;lr;fc=tok>"]
    assert str(to_carol.uri) == "sip:carol@198.51.100.7:5062;fcc=x.y"
    assert str(to_bob.uri) == "sip:bob@127.0.0.1:5083" and not to_bob.routes



def test_an_in_dialog_request_to_a_minted_contact_without_route_is_delivered() -> None:
    """A node that ends a call from the middle may send its BYE straight to the Contact we
    gave out (no Route): the Contact's own token is enough to deliver it, and a forged one
    is refused."""
    node = Node()
    carol = Flow("udp", ("198.51.100.9", 5062))
    node.resolver.answer = Resolution((Target(parse_uri("sip:carol@b.test"), (carol,), "dns"),))
    _, out = authenticated_invite(node, to="sip:carol@b.test", branch="z9hG4bKmint")
    ((fwd, flow),) = requests(out)
    contact = fwd.contacts[0].sip_uri
    node.feed(reply(fwd, 200, "c1", contact="sip:carol@198.51.100.9:5062"), flow)
    for uri, delivered in ((f"{contact}", True),
                           ("sip:alice@192.0.2.10:5062;fcc=c2lwOnZpY3RpbUAyMDMuMC4xMTMuNQ.aaaa",
                            False)):
        bye = invite(uri, method="BYE", branch=f"z9hG4bK{delivered}", cseq=7,
                     frm="<sip:carol@b.test>;tag=c1", via_host="198.51.100.9:5062")
        bye.set("To", Address.parse("<sip:alice@a.test>;tag=al1"))
        out = node.feed(bye, REMOTE)
        if delivered:
            ((to_softphone, hop),) = requests(out)
            assert str(to_softphone.uri) == "sip:alice@127.0.0.1:5081"
            assert hop.remote == ALICE.remote
        else:
            assert not requests(out) and responses(out)[-1] >= 400


def test_an_ack_to_a_minted_contact_without_route_reaches_the_softphone() -> None:
    """A UAS that does not echo Record-Route (SIPp's) leaves the dialog with no route set:
    the caller's ACK for the 2xx comes straight to the Contact we gave out. It must reach
    the softphone and confirm the call, or the answer is retransmitted and the call, never
    confirmed, counts against its source's cap and is ended after 64*T1."""
    node = Node()
    node.proxy.settings = replace(node.proxy.settings, calls_per_source=5)
    node.location.bindings["bob@a.test"] = [
        Binding(Address.parse("<sip:bob@127.0.0.1:5083>"), BOB1)
    ]
    inbound = invite("sip:bob@a.test", branch="z9hG4bKnorr", via_host="198.51.100.7:5062",
                     frm="<sip:carol@b.test>;tag=c9")
    inbound.set("Contact", Address.parse("<sip:carol@198.51.100.7:5062>"))
    ((fwd, _),) = requests(node.feed(inbound, REMOTE))
    assert node.proxy.calls_in_progress == 1
    # SIPp's Contact has no user part; and no Record-Route echoed
    ok = reply(fwd, 200, "b1", contact="sip:127.0.0.1:5083")
    ((answer, _),) = [(m, f) for m, f in node.feed(ok, BOB1) if isinstance(m, Response)]
    assert not answer.record_routes
    contact = answer.contacts[0].sip_uri
    assert contact is not None and "fcc" in contact.params
    for uri, delivered in ((f"{contact}", True),
                           ("sip:192.0.2.10:5062;fcc=c2lwOnZpY3RpbUAyMDMuMC4xMTMuNQ.aaaa", False)):
        ack = invite(uri, method="ACK", branch=f"z9hG4bKack{delivered}",
                     frm="<sip:carol@b.test>;tag=c9", via_host="198.51.100.7:5062")
        ack.set("To", Address.parse("<sip:bob@a.test>;tag=b1"))
        out = node.feed(ack, REMOTE)
        if delivered:
            ((to_bob, hop),) = requests(out)
            assert to_bob.method == "ACK" and str(to_bob.uri) == "sip:127.0.0.1:5083"
            assert hop.remote == BOB1.remote
            assert node.proxy.calls_in_progress == 0  # confirmed: off the source's cap
        else:
            assert not requests(out)  # a forged token: dropped (ACKs are never answered)


# -- issue 11: scanners ---------------------------------------------------------------------------


def _probe(node: Node, method: str, user: str, n: int, frm: str | None = None) -> Response:
    """What a scanner (sipvicious svwar) gets back for ``user`` from another node."""
    request = invite(f"sip:{user}@a.test", method=method, branch=f"z9hG4bKscan{n}",
                     via_host="198.51.100.7:5062",
                     frm=frm or f'"{user}" <sip:{user}@a.test>;tag=s{n}')
    final = [m for m, _ in node.feed(request, REMOTE) if isinstance(m, Response)]
    return final[-1]


def _shape(response: Response) -> tuple[int, str, tuple[str, ...]]:
    """Status, reason and header names: what must not differ between users."""
    return response.status, response.reason, tuple(h.name for h in response.headers)


@pytest.mark.parametrize("method", ["INVITE", "OPTIONS", "REGISTER", "MESSAGE"])
def test_scanner_gets_one_answer_for_registered_offline_and_unknown_users(method: str) -> None:
    """svwar puts the probed user in From at our own domain: refused before any lookup, so a
    registered user (bob), an offline one (alice) and a missing one look the same: 404 (as
    for an unknown user), and 403 for every REGISTER from outside."""
    node = Node()
    register_bob(node)
    shapes = {_shape(_probe(node, method, user, i))
              for i, user in enumerate(["bob", "alice", "nobody", "100"])}
    assert len(shapes) == 1, shapes
    assert next(iter(shapes))[0] == (403 if method == "REGISTER" else 404)
    assert not requests(node.feed(invite(method=method, branch="z9hG4bKx"), REMOTE))


def test_a_foreign_caller_sees_offline_and_unknown_users_alike() -> None:
    node = Node()
    shapes = {_shape(_probe(node, "INVITE", user, i, frm=f"<sip:x@b.test>;tag=f{i}"))
              for i, user in enumerate(["alice", "nobody"])}
    assert len(shapes) == 1 and next(iter(shapes))[0] == 404, shapes


def test_no_version_in_server_and_none_when_configured_empty() -> None:
    response = _probe(Node(), "OPTIONS", "nobody", 1)
    assert response.get("Server") == "freecall"
    quiet = Node(server_name="").feed(invite("sip:a.test", method="OPTIONS"), ALICE)[-1][0]
    assert isinstance(quiet, Response) and quiet.status == 200 and not quiet.has("Server")


def _register_with(node: Node, flow: Flow, password: str, n: int) -> int:
    """One REGISTER answered by a challenge, then with ``password``: the final status."""
    reg = invite("sip:a.test", method="REGISTER", frm=f"<sip:alice@a.test>;tag=r{n}",
                 branch=f"z9hG4bKreg{n}", via_host=f"{flow.remote[0]}:{flow.remote[1]}")
    reg.set("To", Address.parse("<sip:alice@a.test>"))
    challenge = node.feed(reg, flow)[-1][0]
    assert isinstance(challenge, Response) and challenge.status == 401
    saved = PASSWORDS["alice"]
    PASSWORDS["alice"] = password
    try:
        answer = authorize(node, reg, challenge)
    finally:
        PASSWORDS["alice"] = saved
    before = len([e for e in node.events if isinstance(e, Registered)])
    out = node.feed(answer, flow)
    if len([e for e in node.events if isinstance(e, Registered)]) > before:
        return 200  # the registrar (the daemon) answers a Registered event
    return responses(out)[-1]


def test_password_guessing_is_locked_out_per_source() -> None:
    lockout = AuthLockout(3, 60.0, 300.0)
    node = Node(lockout=lockout)
    cracker = Flow("udp", ("127.0.0.66", 5070), ("127.0.0.1", 5060))
    phone = Flow("udp", ("127.0.0.7", 5071), ("127.0.0.1", 5060))
    assert [_register_with(node, cracker, f"guess{i}", i) for i in range(3)] == [401] * 3
    assert lockout.lockouts_total == 1
    # locked: the right password gets exactly what a wrong one gets
    assert _register_with(node, cracker, PASSWORDS["alice"], 10) == 401
    assert _register_with(node, cracker, "guess10", 11) == 401
    # another source (the user's real softphone) registers meanwhile
    assert _register_with(node, phone, PASSWORDS["alice"], 20) == 200
    # the lockout expires
    node.advance(301.0)
    assert _register_with(node, cracker, PASSWORDS["alice"], 30) == 200


# -- floods that never ACK (issue 11) -------------------------------------------------------------

def _inbound(n: int, source: Flow) -> Request:
    """An INVITE from another node to bob, the n-th of its Call-ID series."""
    host = f"{source.remote[0]}:{source.remote[1]}"
    request = invite("sip:bob@a.test", branch=f"z9hG4bKflood{n}", via_host=host,
                     frm=f"<sip:x@b.test>;tag=f{n}")
    request.set("Call-ID", f"flood-{n}")
    request.set("Contact", Address.parse(f"<sip:x@{host}>"))
    return request


def test_calls_in_progress_are_capped_per_source() -> None:
    """The (cap+1)-th INVITE from one public source without an ACKed answer gets 503 with
    Retry-After (RFC 3261 sections 21.5.4, 20.33); other sources are not affected; an ACK
    or the end of a call frees its place."""
    node = Node(calls_per_source=2)
    node.location.bindings["bob@a.test"] = [
        Binding(Address.parse("<sip:bob@127.0.0.1:5083>"), BOB1)]
    forwarded = [requests(node.feed(_inbound(n, REMOTE), REMOTE)) for n in range(2)]
    assert all(len(f) == 1 for f in forwarded)
    refused = node.feed(_inbound(2, REMOTE), REMOTE)
    assert not requests(refused)
    answer = refused[-1][0]
    assert isinstance(answer, Response) and answer.status == 503
    assert answer.get("Retry-After") == "32"
    assert node.proxy.overload_refused["calls_per_source"] == 1
    assert node.proxy.capped_sources == 1 and node.proxy.calls_in_progress == 2
    other = Flow("udp", ("198.51.100.8", 5062), ("192.0.2.10", 5062))
    assert len(requests(node.feed(_inbound(3, other), other))) == 1
    # the first call is answered and ACKed: confirmed, it no longer counts
    ((fwd0, _),) = forwarded[0]
    answered = reply(fwd0, 200, "b0", contact="sip:bob@127.0.0.1:5083")
    answered.set("Record-Route", fwd0.record_routes[0])  # a UAS echoes Record-Route
    up = node.feed(answered, BOB1)
    ok = next(m for m, _ in up if isinstance(m, Response) and m.status == 200)
    ack = invite(str(ok.contacts[0].uri), method="ACK", branch="z9hG4bKfack0",
                 frm="<sip:x@b.test>;tag=f0", via_host="198.51.100.7:5062")
    ack.set("Call-ID", "flood-0")
    ack.set("To", ok.to)
    ack.append("Route", ok.record_routes[0])
    assert [r.method for r, _ in requests(node.feed(ack, REMOTE))] == ["ACK"]
    assert node.proxy.capped_sources == 0
    assert len(requests(node.feed(_inbound(4, REMOTE), REMOTE))) == 1
    # the second is refused by the phone: ended, it no longer counts either
    ((fwd1, _),) = forwarded[1]
    node.feed(reply(fwd1, 486, "b1"), BOB1)
    assert node.proxy.calls_in_progress == 2  # #3 (other source) and #4
    assert len(requests(node.feed(_inbound(5, REMOTE), REMOTE))) == 1
    assert responses(node.feed(_inbound(6, REMOTE), REMOTE))[-1] == 503
    # the softphone side is never capped
    assert Node(calls_per_source=1).proxy._capped_source(ALICE, Side.SOFTPHONE) is None


def test_an_answer_never_acknowledged_ends_the_call_after_64_t1() -> None:
    """RFC 3261 section 13.3.1.4: no ACK within 64*T1 of the 2xx ends the call; the proxy
    sends BYE both ways, so the media is freed (CallEnded) even if the UAS never does."""
    node = Node(calls_per_source=5)
    node.location.bindings["bob@a.test"] = [
        Binding(Address.parse("<sip:bob@127.0.0.1:5083>"), BOB1)]
    ((fwd, _),) = requests(node.feed(_inbound(0, REMOTE), REMOTE))
    node.feed(reply(fwd, 200, "b0", contact="sip:bob@127.0.0.1:5083"), BOB1)
    assert node.proxy.calls_in_progress == 1
    out = node.advance(31.9)
    assert not any(r.method == "BYE" for r, _ in requests(out))
    out = node.advance(32.1)
    byes = {f.remote for r, f in requests(out) if r.method == "BYE"}
    assert byes == {REMOTE.remote, BOB1.remote}
    [ended] = [e.call for e in node.events if isinstance(e, CallEnded)]
    assert ended.outcome == "no ACK for the answer" and ended.ended == pytest.approx(32.0)
    assert node.proxy.calls_in_progress == 0 and node.proxy.unacknowledged_total == 1
    assert node.proxy.get_timer() is None or node.proxy.get_timer() > 33  # type: ignore[operator]


def test_an_acknowledged_call_outlives_64_t1() -> None:
    node = Node()
    register_bob(node)
    _, out = authenticated_invite(node)
    (fwd1, _), _ = requests(out)
    node.feed(reply(fwd1, 200, "d1", contact="sip:bob@127.0.0.1:5083"), BOB1)
    ack = invite("sip:bob@127.0.0.1:5083", method="ACK", branch="z9hG4bKack1", cseq=2)
    ack.set("To", Address.parse("<sip:bob@a.test>;tag=d1"))
    ack.append("Route", fwd1.record_routes[0])
    node.feed(ack, ALICE)
    out = node.advance(200.0)
    assert not any(r.method == "BYE" for r, _ in requests(out))
    assert not any(isinstance(e, CallEnded) for e in node.events)


class _NoPorts:
    """A media hook whose port pool is empty (srtp/calls.py answers 503)."""

    def crossing(self, message: Request | Response, key: tuple[str, str], ingress: Side,
                 egress: Side) -> int | None:
        return 503 if isinstance(message, Request) else None


def test_no_media_ports_is_answered_503_with_retry_after() -> None:
    """Our own capacity (not a downstream 503, which becomes 500 by 16.7 step 6)."""
    node = Node(media=_NoPorts())
    register_bob(node)
    inbound = _inbound(0, REMOTE)
    inbound.body = b"v=0\r\n"
    inbound.set("Content-Type", "application/sdp")
    out = node.feed(inbound, REMOTE)
    assert not requests(out)
    answer = out[-1][0]
    assert isinstance(answer, Response) and answer.status == 503
    assert answer.get("Retry-After") == "32"
    assert node.proxy.overload_refused["media_ports"] == 2  # both of bob's devices
    [ended] = [e.call for e in node.events if isinstance(e, CallEnded)]
    assert ended.outcome == "failed 503"
