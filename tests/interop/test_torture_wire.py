"""Every RFC 4475 torture message, over UDP and over TCP, to a running daemon.

Each gets the answer the MANIFEST names for it (tests/vectors/rfc4475/expected.json), as the
daemon is a proxy and registrar for example.com: well-formed requests are routed (404: no such
registered user, or no route for another domain), invalid ones get the parser's status, and
responses are dropped.  The daemon must then still carry a normal call.  The source is
configured as trusted (no digest), so the RFC's verdicts are not hidden behind 407s.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from freecall.sip.errors import SipParseError
from freecall.sip.message import Request, parse_message
from harness import FreecallDaemon, Sipp
from vectorlib import read, rfc4475_messages

NOT_FOUND = 404  # a well-formed request for a user with no registration or a domain we do not route
DROP = None

# name: (answer over UDP, answer over TCP) with what the RFC says in the comment
EXPECTED: dict[str, tuple[int | None, int | None]] = {
    "wsinv": (NOT_FOUND, NOT_FOUND),  # well formed; another domain: no route
    "intmeth": (NOT_FOUND, NOT_FOUND),  # "proxy forwards if URI known, else 404"
    "esc01": (NOT_FOUND, NOT_FOUND),
    "escnull": (NOT_FOUND, NOT_FOUND),  # the AOR with %00 is kept whole: no such account
    "esc02": (NOT_FOUND, NOT_FOUND),  # an unknown method, proxied (501 is an endpoint's)
    "lwsdisp": (NOT_FOUND, NOT_FOUND),
    "longreq": (NOT_FOUND, NOT_FOUND),
    "dblreq": (200, 200),  # the REGISTER is handled, the trailing octets ignored
    "semiuri": (NOT_FOUND, NOT_FOUND),
    "transports": (NOT_FOUND, NOT_FOUND),
    "mpart01": (NOT_FOUND, NOT_FOUND),
    "unreason": (DROP, DROP),  # responses matching no transaction (RFC 6026 7.5)
    "noreason": (DROP, DROP),
    "badinv01": (400, 400),
    "clerr": (400, DROP),  # UDP: 400; TCP: wait for the rest of the body
    "ncl": (400, 400),  # TCP: 400 and close
    "scalar02": (400, 400),
    "scalarlg": (DROP, DROP),
    "quotbal": (400, 400),
    "ltgtruri": (400, 400),
    "lwsruri": (400, 400),
    "lwsstart": (400, 400),
    "trws": (400, 400),
    "escruri": (400, 400),
    "baddate": (400, 400),
    "regbadct": (400, 400),
    "badaspec": (400, 400),
    "baddn": (400, DROP),  # no empty line: a datagram ends, a stream waits for more
    "badvers": (505, 505),
    "mismatch01": (400, 400),
    "mismatch02": (501, 501),
    "bigcode": (DROP, DROP),
    "badbranch": (NOT_FOUND, NOT_FOUND),  # matched by the RFC 2543 rules, then routed
    "insuf": (400, 400),
    "unkscm": (416, 416),
    "novelsc": (416, 416),
    "unksm2": (400, 400),  # a registrar needs a SIP AOR in To
    "bext01": (420, 420),  # Proxy-Require: noProxiesSupportThis, nothingSupportedHere
    "invut": (NOT_FOUND, NOT_FOUND),  # a proxy processes it normally (415 is an endpoint's)
    "regaut01": (200, 200),  # the unknown Authorization scheme is ignored (trusted source)
    "multi01": (400, 400),
    "mcl01": (400, 400),
    "bcast": (DROP, DROP),
    "zeromf": (483, 483),
    "cparam01": (200, 200),
    "cparam02": (200, 200),
    "regescrt": (200, 200),
    "sdp01": (NOT_FOUND, NOT_FOUND),  # a proxy does not apply Accept (406 is an endpoint's)
    "inv2543": (NOT_FOUND, NOT_FOUND),
    "test": (DROP, DROP),  # 400, but without a Via there is nowhere to send it
}
QUIET = 0.4  # how long "no answer" is waited for


STATUS_LINE = re.compile(rb"SIP/2\.0 ([1-6][0-9][0-9]) ")
T1 = 0.01  # short transactions: 64*T1 after its answer a transaction is gone (see below)


def final_status(replies: list[bytes]) -> int | None:
    """The first final status among the replies (read from the status line: an error
    response copies the malformed headers it answers, so it may not parse itself)."""
    for data in replies:
        for m in STATUS_LINE.finditer(data):
            if m.start() == 0 or data[m.start() - 2 : m.start()] == b"\r\n":
                status = int(m.group(1))
                if status >= 200:
                    return status
    return None


def transaction_key(data: bytes) -> bytes:
    """Branch and sent-by of the top Via: the vectors reuse them (z9hG4bKkdjuw ...)."""
    try:
        msg = parse_message(data)
    except SipParseError:
        return b""
    return str(msg.via).encode() if isinstance(msg, Request) else b""


def over_udp(port: int, data: bytes) -> int | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.sendto(data, ("127.0.0.1", port))
        return final_status(collect(sock, lambda s: s.recv(65535)))


def over_tcp(port: int, data: bytes) -> int | None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(data)
        received = b"".join(collect(sock, lambda s: s.recv(65535)))
    replies = [part + b"\r\n\r\n" for part in received.split(b"\r\n\r\n") if part.strip()]
    return final_status(replies)


def collect(sock: socket.socket, read: Callable[[socket.socket], bytes]) -> list[bytes]:
    """Replies until a final response or a quiet spell."""
    replies: list[bytes] = []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        sock.settimeout(QUIET)
        try:
            data = read(sock)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        replies.append(data)
        if final_status(replies) is not None:
            break
    return replies


def test_every_message_has_an_expected_answer() -> None:
    assert set(EXPECTED) == {m["name"] for m in rfc4475_messages()}


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_torture_messages_over_the_wire(
    transport: str, freecall_daemon: Callable[..., FreecallDaemon], sipp: Sipp
) -> None:
    node = freecall_daemon(
        users={"j.user": "pw", "watson": "pw", "user": "pw", "bob": "bob-pw"},
        domains=["example.com"],
        config={"sip": {"trusted": ["127.0.0.0/8"], "timers": {"t1": "10ms"}}},
    )
    port = node.sip_addr.port
    send = over_udp if transport == "udp" else over_tcp
    messages = rfc4475_messages()
    # REGISTERs last, so that their bindings do not change where earlier requests go
    messages.sort(key=lambda m: read(m["file"]).startswith(b"REGISTER"))
    answers: dict[str, int | None] = {}
    seen: set[bytes] = set()
    for entry in messages:
        data = read(entry["file"])
        key = transaction_key(data)
        if key and key in seen:
            # The same branch within 64*T1 is a retransmission of the earlier request and
            # rightly gets the earlier answer: wait until that transaction is gone.
            time.sleep(64 * T1 + 0.1)
        seen.add(key)
        answers[entry["name"]] = send(port, data)
    wanted = {name: pair[0 if transport == "udp" else 1] for name, pair in EXPECTED.items()}
    assert answers == wanted
    assert "Traceback" not in node.log_text()
    # ... and a normal call still goes through (SIPp uac -> daemon -> SIPp uas as bob)
    uas = sipp.start("uas", service="bob", time_limit=20, calls=10)
    reg = sipp.run(
        Path(__file__).parent / "scenarios" / "register_trusted.xml", str(node.sip_addr),
        service="bob",
        variables={"contact_port": str(uas.port)}, time_limit=10,
    )
    assert reg.successful == 1
    call = sipp.run("uac", str(node.sip_addr), service="bob", calls=1, time_limit=10)
    assert call.successful == 1 and call.failed == 0
    uas.stop()
