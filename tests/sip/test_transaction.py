"""The RFC 3261 section 17 transaction state machines on virtual time (no sleeping)."""

from __future__ import annotations

import random

import pytest

from freecall.sip.flow import Flow
from freecall.sip.message import Request, Response, make_response, parse_message
from freecall.sip.transaction import (
    AckReceived,
    ClientTransaction,
    Event,
    RequestReceived,
    ResponseReceived,
    ServerTransaction,
    State,
    StrayResponse,
    TimerValues,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimedOut,
    new_branch,
)
from vectorlib import read

UDP = Flow("udp", ("192.0.2.20", 5060), ("192.0.2.10", 5060))
TCP = Flow("tcp", ("192.0.2.20", 5060), ("192.0.2.10", 5060), conn=7)


def request(
    method: str = "INVITE", branch: str = "z9hG4bKtest1", transport: str = "UDP"
) -> Request:
    data = (
        f"{method} sip:bob@biloxi.example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 192.0.2.10:5060;branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
        "To: Bob <sip:bob@biloxi.example.com>\r\n"
        "Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
        f"CSeq: 314159 {method}\r\n"
        "Contact: <sip:alice@192.0.2.10>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def drain(layer: TransactionLayer) -> list[Event]:
    out = []
    while (event := layer.next_event()) is not None:
        out.append(event)
    return out


def state_of(txn: ClientTransaction | ServerTransaction) -> State:
    """Read the state afresh (a helper, so the type checker does not narrow it)."""
    return txn.state


def server_txn(layer: TransactionLayer) -> ServerTransaction:
    event = drain(layer)[0]
    assert isinstance(event, RequestReceived)
    return event.transaction


def run_until(layer: TransactionLayer, end: float) -> list[tuple[float, bytes]]:
    """Step virtual time from timer to timer, recording when something was sent."""
    sent: list[tuple[float, bytes]] = []
    while (deadline := layer.get_timer()) is not None and deadline <= end:
        layer.handle_timer(deadline)
        sent.extend((deadline, data) for data, _ in layer.messages_to_send())
    return sent


def test_unanswered_invite_over_udp_retransmits_then_timer_b() -> None:
    layer = TransactionLayer()
    txn = layer.request(request(), UDP, now=0.0)
    first = layer.messages_to_send()
    assert len(first) == 1 and first[0][1] == UDP
    sent = run_until(layer, 100.0)
    assert [t for t, _ in sent] == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert all(data == first[0][0] for _, data in sent)
    events = drain(layer)
    assert isinstance(events[0], TransactionTimedOut) and events[0].transaction is txn
    assert isinstance(events[1], TransactionTerminated)
    assert state_of(txn) is State.TERMINATED and not layer.client
    assert layer.get_timer() is None


def test_unanswered_invite_timer_b_fires_at_exactly_64_t1() -> None:
    layer = TransactionLayer()
    layer.request(request(), UDP, now=100.0)
    layer.messages_to_send()
    deadlines = []
    while (deadline := layer.get_timer()) is not None:
        deadlines.append(deadline)
        layer.handle_timer(deadline)
    assert deadlines[-1] == 132.0  # Timer B = 64*T1 = 32 s after the first send
    assert deadlines == [100.5, 101.5, 103.5, 107.5, 115.5, 131.5, 132.0]


def test_invite_over_tcp_is_sent_once() -> None:
    layer = TransactionLayer()
    layer.request(request(transport="TCP"), TCP, now=0.0)
    assert len(layer.messages_to_send()) == 1
    assert run_until(layer, 100.0) == []
    assert isinstance(drain(layer)[0], TransactionTimedOut)


def test_non_invite_retransmissions_cap_at_t2_then_timer_f() -> None:
    layer = TransactionLayer()
    layer.request(request("OPTIONS"), UDP, now=0.0)
    layer.messages_to_send()
    sent = run_until(layer, 100.0)
    assert [t for t, _ in sent] == [
        0.5,
        1.5,
        3.5,
        7.5,
        11.5,
        15.5,
        19.5,
        23.5,
        27.5,
        31.5,
    ]
    assert isinstance(drain(layer)[0], TransactionTimedOut)


def test_non_invite_provisional_moves_retransmits_to_t2() -> None:
    layer = TransactionLayer()
    req = request("BYE")
    txn = layer.request(req, UDP, now=0.0)
    layer.messages_to_send()
    layer.handle_timer(0.5)
    assert len(layer.messages_to_send()) == 1
    layer.receive(make_response(req, 100), UDP, now=0.6)
    assert state_of(txn) is State.PROCEEDING
    sent = run_until(layer, 13.0)
    assert [t for t, _ in sent] == [1.5, 5.5, 9.5]  # the pending 2*T1, then every T2
    layer.receive(make_response(req, 200, to_tag="x"), UDP, now=13.0)
    assert state_of(txn) is State.COMPLETED
    events = drain(layer)
    assert [e.response.status for e in events if isinstance(e, ResponseReceived)] == [100, 200]
    layer.handle_timer(13.0 + 5.0)  # Timer K = T4
    assert state_of(txn) is State.TERMINATED


def test_invite_client_failure_response_is_acked_and_absorbed() -> None:
    layer = TransactionLayer()
    req = request()
    txn = layer.request(req, UDP, now=0.0)
    layer.messages_to_send()
    layer.receive(make_response(req, 180, to_tag="bob1"), UDP, now=0.1)
    assert state_of(txn) is State.PROCEEDING
    busy = make_response(req, 486, to_tag="bob1")
    layer.receive(busy, UDP, now=0.2)
    ((ack_bytes, flow),) = layer.messages_to_send()
    ack = parse_message(ack_bytes)
    assert isinstance(ack, Request) and ack.method == "ACK"
    assert ack.via.branch == req.via.branch and ack.to.tag == "bob1"
    assert (ack.cseq.number, ack.cseq.method) == (314159, "ACK")
    assert flow == UDP
    layer.receive(busy, UDP, now=1.0)  # a retransmitted 486: ACK again, TU not told
    assert [d for d, _ in layer.messages_to_send()] == [ack_bytes]
    statuses = [e.response.status for e in drain(layer) if isinstance(e, ResponseReceived)]
    assert statuses == [180, 486]
    assert run_until(layer, 40.0) == []
    assert state_of(txn) is State.TERMINATED  # Timer D (32 s) ended it


def test_invite_client_accepted_state_passes_every_2xx() -> None:
    """RFC 6026 section 7.2: 2xx retransmissions (and forked 2xx) reach the TU until Timer M."""
    layer = TransactionLayer()
    req = request()
    txn = layer.request(req, UDP, now=0.0)
    ok = make_response(req, 200, to_tag="bob1")
    layer.receive(ok, UDP, now=0.3)
    assert state_of(txn) is State.ACCEPTED
    layer.receive(ok, UDP, now=0.8)
    layer.receive(make_response(req, 200, to_tag="bob2"), UDP, now=0.9)
    assert [e.response.to.tag for e in drain(layer) if isinstance(e, ResponseReceived)] == [
        "bob1",
        "bob1",
        "bob2",
    ]
    layer.handle_timer(0.3 + 32.0)
    assert state_of(txn) is State.TERMINATED
    layer.receive(ok, UDP, now=40.0)
    assert isinstance(drain(layer)[-1], StrayResponse)  # not forwarded (RFC 6026 section 7.5)


def test_invite_server_failure_retransmits_until_ack() -> None:
    layer = TransactionLayer()
    req = request()
    layer.receive(req, UDP, now=0.0)
    (trying,) = layer.messages_to_send()
    assert parse_message(trying[0]).status == 100  # type: ignore[union-attr]
    (event,) = drain(layer)
    assert isinstance(event, RequestReceived)
    txn = event.transaction
    layer.receive(request(), UDP, now=0.4)  # retransmitted INVITE: the 100 again
    assert [d for d, _ in layer.messages_to_send()] == [trying[0]]
    assert drain(layer) == []
    txn.respond(make_response(req, 486, to_tag="b"), now=1.0)
    final = layer.messages_to_send()[0][0]
    sent = run_until(layer, 9.0)
    assert [t for t, _ in sent] == [1.5, 2.5, 4.5, 8.5]  # Timer G: T1 doubling, capped at T2
    ack = request("ACK")
    ack.set("To", ack.to.with_params(tag="b"))
    layer.receive(ack, UDP, now=9.0)
    assert state_of(txn) is State.CONFIRMED
    assert run_until(layer, 13.0) == []  # no more retransmissions once confirmed
    layer.handle_timer(14.0)  # Timer I = T4
    assert state_of(txn) is State.TERMINATED
    assert all(data == final for _, data in sent)


def test_invite_server_without_ack_times_out_with_timer_h() -> None:
    layer = TransactionLayer()
    layer.receive(request(), UDP, now=0.0)
    txn = server_txn(layer)
    txn.respond(make_response(txn.request, 500, to_tag="b"), now=0.0)
    run_until(layer, 100.0)
    kinds = [type(e) for e in drain(layer)]
    assert kinds == [TransactionTimedOut, TransactionTerminated]


def test_invite_server_accepted_absorbs_invites_and_passes_acks() -> None:
    layer = TransactionLayer()
    req = request()
    layer.receive(req, UDP, now=0.0)
    txn = server_txn(layer)
    layer.messages_to_send()
    ok = make_response(req, 200, to_tag="b")
    txn.respond(ok, now=0.5)
    assert state_of(txn) is State.ACCEPTED
    layer.messages_to_send()
    layer.receive(request(), UDP, now=0.6)
    assert layer.messages_to_send() == [] and drain(layer) == []
    txn.respond(ok, now=1.0)  # the TU (a UAS core or proxy) retransmits its 2xx
    assert len(layer.messages_to_send()) == 1
    ack = request("ACK", branch="z9hG4bKtest1")
    layer.receive(ack, UDP, now=1.1)
    assert isinstance(drain(layer)[0], AckReceived)
    layer.handle_timer(32.5)
    assert state_of(txn) is State.TERMINATED


def test_ack_for_2xx_with_its_own_branch_goes_to_the_tu() -> None:
    layer = TransactionLayer()
    layer.receive(request("ACK", branch="z9hG4bKother"), UDP, now=0.0)
    (event,) = drain(layer)
    assert isinstance(event, AckReceived)


def test_non_invite_server_retransmits_final_until_timer_j() -> None:
    layer = TransactionLayer()
    req = request("OPTIONS")
    layer.receive(req, UDP, now=0.0)
    txn = server_txn(layer)
    assert layer.messages_to_send() == []  # no 100 for non-INVITE (section 16.2)
    layer.receive(request("OPTIONS"), UDP, now=0.3)
    assert layer.messages_to_send() == []  # absorbed: nothing to repeat yet
    txn.respond(make_response(req, 200, to_tag="x"), now=0.5)
    ok = layer.messages_to_send()[0][0]
    layer.receive(request("OPTIONS"), UDP, now=1.0)
    assert [d for d, _ in layer.messages_to_send()] == [ok]
    layer.handle_timer(32.5)
    assert state_of(txn) is State.TERMINATED


def test_rfc2543_transactions_match_without_magic_cookie() -> None:
    """RFC 4475 section 3.4.1 (inv2543) and 3.2.1 (badbranch): fall back to RFC 2543 matching."""
    layer = TransactionLayer()
    inv = parse_message(read("rfc4475/inv2543.dat"))
    assert isinstance(inv, Request)
    src = Flow("udp", ("192.0.2.5", 5060))
    layer.receive(inv, src, now=0.0)
    txn = server_txn(layer)
    layer.receive(parse_message(read("rfc4475/inv2543.dat")), src, now=0.5)
    assert drain(layer) == [] and len(layer.server) == 1
    txn.respond(make_response(inv, 404, to_tag="t1"), now=1.0)
    ack = parse_message(read("rfc4475/inv2543.dat").replace(b"INVITE", b"ACK"))
    assert isinstance(ack, Request)
    ack.set("To", ack.to.with_params(tag="t1"))
    layer.receive(ack, src, now=1.2)
    assert state_of(txn) is State.CONFIRMED
    bad = parse_message(read("rfc4475/badbranch.dat"))
    assert isinstance(bad, Request)
    layer.receive(bad, src, now=2.0)
    assert isinstance(drain(layer)[0], RequestReceived)


def test_received_and_rport_are_stamped() -> None:
    layer = TransactionLayer()
    natted = Flow("udp", ("203.0.113.9", 40000))
    layer.receive(request("OPTIONS"), natted, now=0.0)
    txn = server_txn(layer)
    assert txn.request.via.received == "203.0.113.9" and txn.request.via.rport == 40000
    txn.respond(make_response(txn.request, 200, to_tag="x"), now=0.0)
    ((_, flow),) = layer.messages_to_send()
    assert flow.remote == ("203.0.113.9", 40000)  # symmetric response routing (RFC 3581)


def test_cancel_finds_its_invite() -> None:
    layer = TransactionLayer()
    layer.receive(request(), UDP, now=0.0)
    invite_txn = server_txn(layer)
    cancel = request("CANCEL")
    layer.receive(cancel, UDP, now=0.1)
    cancel_event = drain(layer)[0]
    assert isinstance(cancel_event, RequestReceived)
    assert layer.find_invite(cancel_event.request) is invite_txn


def test_overload_refuses_statelessly_with_503() -> None:
    layer = TransactionLayer(max_server_transactions=2)
    for i in range(3):
        layer.receive(request("OPTIONS", branch=f"z9hG4bK{i}x"), UDP, now=0.0)
    assert len(layer.server) == 2 and layer.overloaded == 1
    ((data, _),) = layer.messages_to_send()
    busy = parse_message(data)
    assert isinstance(busy, Response) and busy.status == 503 and busy.get("Retry-After") == "5"


@pytest.mark.parametrize("seed", range(20))
def test_two_layers_over_a_lossy_link_agree(seed: int) -> None:
    """Client and server layers in memory, 30 % of datagrams lost: the call still completes
    or times out cleanly, and the client sees exactly one final response per outcome."""
    rng = random.Random(seed)
    timers = TimerValues()
    uac, uas = TransactionLayer(timers), TransactionLayer(timers)
    a = Flow("udp", ("192.0.2.20", 5060))
    b = Flow("udp", ("192.0.2.10", 5060))
    req = request(branch=new_branch(rng))
    txn = uac.request(req, a, now=0.0)
    now = 0.0
    finals: list[int] = []
    answered = False
    while now < 70.0:
        for data, _ in uac.messages_to_send():
            if rng.random() > 0.3:
                uas.receive(parse_message(data), b, now)
        for data, _ in uas.messages_to_send():
            if rng.random() > 0.3:
                uac.receive(parse_message(data), a, now)
        for event in drain(uas):
            if isinstance(event, RequestReceived) and not answered:
                answered = True
                event.transaction.respond(make_response(event.request, 486, to_tag="b"), now)
        for event in drain(uac):
            if isinstance(event, ResponseReceived) and event.response.status >= 200:
                finals.append(event.response.status)
        deadlines = [d for d in (uac.get_timer(), uas.get_timer()) if d is not None]
        if not deadlines:
            break
        now = min(deadlines)
        uac.handle_timer(now)
        uas.handle_timer(now)
    assert finals in ([486], [])
    assert isinstance(txn, ClientTransaction) and state_of(txn) is State.TERMINATED
    assert not uac.client and not uas.server
    assert all(isinstance(t, ServerTransaction) for t in uas.server.values())
