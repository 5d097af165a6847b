"""Parse and serialise rates of the SIP core, against sipmessage and aiovoip in the same run.

    .venv/bin/python bench/parse.py            # installs sipmessage and aiovoip if missing

"Typed parse" means: request or status line, every Via (branch), From and To (tag), Call-ID,
CSeq (number and method), Contact (URI), Content-Length and body, read back after parsing, for
each library the same bytes and the same reads.  freecall is measured three ways:

* cold: ``parse_message(data)`` with no cache: every header line is parsed from scratch;
* flow: a daemon's real traffic, distinct calls (unique Call-ID, tags, branches) parsed with the
  daemon's HeaderCache: lines that repeat between calls (Contact, To, Request-URI) hit, the rest
  miss;
* warm: the same bytes again with the cache (a retransmission, or the lines a response repeats).

Each figure is the best of several rounds (messages per second on one core).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from freecall.sip.message import HeaderCache, Request, Response, parse_message

INVITE = (
    "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK{branch};rport\r\n"
    "Max-Forwards: 70\r\n"
    'From: "Alice" <sip:alice@atlanta.example.com>;tag={ftag}\r\n'
    "To: Bob <sip:bob@biloxi.example.com>\r\n"
    "Call-ID: {callid}@pc33.atlanta.example.com\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:alice@pc33.atlanta.example.com:5060;transport=udp>\r\n"
    "Allow: INVITE,ACK,BYE,CANCEL,OPTIONS,NOTIFY,SUBSCRIBE,INFO,MESSAGE,UPDATE,REFER\r\n"
    "Supported: replaces,norefersub\r\n"
    "User-Agent: baresip v1.0.0 (x86_64/linux)\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: {length}\r\n\r\n"
)
OK_200 = (
    "SIP/2.0 200 OK\r\n"
    "Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK{branch};rport=5060;"
    "received=192.0.2.101\r\n"
    'From: "Alice" <sip:alice@atlanta.example.com>;tag={ftag}\r\n'
    "To: Bob <sip:bob@biloxi.example.com>;tag={ttag}\r\n"
    "Call-ID: {callid}@pc33.atlanta.example.com\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:bob@192.0.2.4:5060;transport=udp>\r\n"
    "Allow: INVITE,ACK,BYE,CANCEL,OPTIONS,NOTIFY,SUBSCRIBE,INFO,MESSAGE,UPDATE,REFER\r\n"
    "Supported: replaces,norefersub\r\n"
    "User-Agent: baresip v1.0.0 (x86_64/linux)\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: {length}\r\n\r\n"
)
SDP = (
    "v=0\r\n"
    "o=alice 2890844526 2890844526 IN IP4 192.0.2.101\r\n"
    "s=-\r\n"
    "c=IN IP4 192.0.2.101\r\n"
    "t=0 0\r\n"
    "m=audio 49172 RTP/AVP 0 8 101\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=sendrecv\r\n"
)


def message(template: str, i: int) -> bytes:
    return (
        template.format(
            branch=f"{i:08x}a7f3",
            ftag=f"9fxced{i:06d}",
            ttag=f"8321{i:06d}",
            callid=f"3848276298220188{i:06d}",
            length=len(SDP),
        )
        + SDP
    ).encode()


# -- typed reads, the same for every library ----------------------------------------------------
def freecall_read(msg: Request | Response) -> object:
    branches = [v.branch for v in msg.vias]
    return (
        msg.method if isinstance(msg, Request) else msg.status,
        branches,
        msg.from_.tag,
        msg.to.tag,
        msg.call_id,
        msg.cseq.number,
        msg.cseq.method,
        msg.contacts[0].sip_uri.host if msg.contacts and msg.contacts[0].sip_uri else None,
        len(msg.body),
    )


def sipmessage_parse(data: bytes) -> object:
    import sipmessage

    msg = sipmessage.Message.parse(data)
    first = msg.method if hasattr(msg, "method") else msg.code
    return (
        first,
        [v.parameters.get("branch") for v in msg.via],
        msg.from_address.parameters.get("tag"),
        msg.to_address.parameters.get("tag"),
        msg.call_id,
        msg.cseq.sequence,
        msg.cseq.method,
        msg.contact[0].uri.host,
        msg.content_length,
        len(msg.body),
    )


def aiovoip_parse(data: bytes) -> object:
    from aiovoip.message import Message
    from aiovoip.via import Via

    head, _, body = data.partition(b"\r\n\r\n")
    msg = Message.from_raw_headers(head)
    vias = msg.headers.getall("Via")
    return (
        getattr(msg, "method", None),
        [Via.from_header(v)["params"]["branch"] for v in vias],
        msg.from_details["params"].get("tag"),
        msg.to_details["params"].get("tag"),
        msg.headers["Call-ID"],
        msg.cseq,
        msg.method,
        msg.contact_details["uri"]["host"],
        int(msg.headers["Content-Length"]),
        len(body),
    )


# -- timing -------------------------------------------------------------------------------------
def rate(run: Callable[[], int], rounds: int) -> float:
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        count = run()
        elapsed = time.perf_counter() - start
        best = max(best, count / elapsed)
    return best


def ensure(packages: list[str], install: bool) -> dict[str, bool]:
    have = {}
    for name in packages:
        try:
            importlib.import_module(name)
            have[name] = True
        except ImportError:
            have[name] = False
    missing = [n for n, ok in have.items() if not ok]
    if missing and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=False)
        importlib.invalidate_caches()
        for name in missing:
            try:
                importlib.import_module(name)
                have[name] = True
            except ImportError:
                pass
    return have


def measure(template: str, n: int, rounds: int, have: dict[str, bool]) -> dict[str, float]:
    """Every parser and serialiser on one kind of message."""
    same = message(template, 1)
    distinct = [message(template, i) for i in range(n)]
    row: dict[str, float] = {}

    def cold() -> int:
        for _ in range(n):
            freecall_read(parse_message(same))
        return n

    def warm() -> int:
        cache = HeaderCache()
        for _ in range(n):
            freecall_read(parse_message(same, cache=cache))
        return n

    def flow() -> int:
        cache = HeaderCache()
        for data in distinct:
            freecall_read(parse_message(data, cache=cache))
        return n

    row["freecall cold"] = rate(cold, rounds)
    row["freecall flow"] = rate(flow, rounds)
    row["freecall warm"] = rate(warm, rounds)
    if have.get("sipmessage"):
        sipmessage_parse(same)

        def sm() -> int:
            for _ in range(n // 4):
                sipmessage_parse(same)
            return n // 4

        row["sipmessage"] = rate(sm, rounds)
    if have.get("aiovoip"):
        aiovoip_parse(same)

        def av() -> int:
            for _ in range(n // 2):
                aiovoip_parse(same)
            return n // 2

        row["aiovoip"] = rate(av, rounds)
    parsed = parse_message(same)

    def ser() -> int:
        for _ in range(n):
            parsed.to_bytes()
        return n

    row["freecall serialise"] = rate(ser, rounds)
    if have.get("sipmessage"):
        import sipmessage

        sm_msg: Any = sipmessage.Message.parse(same)

        def sm_ser() -> int:
            for _ in range(n // 4):
                bytes(sm_msg)
            return n // 4

        row["sipmessage serialise"] = rate(sm_ser, rounds)
    if have.get("aiovoip"):
        from aiovoip.message import Message

        av_msg: Any = Message.from_raw_headers(same.partition(b"\r\n\r\n")[0])

        def av_ser() -> int:
            for _ in range(n // 2):
                av_msg.encode()
            return n // 2

        row["aiovoip serialise"] = rate(av_ser, rounds)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-install", action="store_true")
    args = parser.parse_args()
    have = ensure(["sipmessage", "aiovoip"], not args.no_install)
    n = args.n
    print(f"python {sys.version.split()[0]}, {n} messages per round, best of {args.rounds}")
    results = {
        label: measure(template, n, args.rounds, have)
        for label, template in (("INVITE with SDP", INVITE), ("200 OK with SDP", OK_200))
    }
    for label, row in results.items():
        print(f"\n{label}")
        for name, value in row.items():
            ratios = []
            if not name.endswith("serialise"):
                for peer in ("sipmessage", "aiovoip"):
                    if peer in row and not name.startswith(peer):
                        ratios.append(f"{value / row[peer]:5.1f}x {peer}")
            else:
                for peer in ("sipmessage serialise", "aiovoip serialise"):
                    if peer in row and name != peer:
                        ratios.append(f"{value / row[peer]:5.1f}x {peer.split()[0]}")
            print(f"  {name:22} {value:>10,.0f} msg/s  {'  '.join(ratios)}")


if __name__ == "__main__":
    main()
