"""A deterministic mutation fuzzer for SIP over the wire (issue 11, item 3).

Seeds are real messages: the RFC 4475 torture messages, the RFC 5118 IPv6 messages and the
RFC 3665 call flows in tests/vectors, plus copies of the call-flow requests retargeted at the
node under test (so that mutants reach its proxy and registrar, not only the parser).  Each
mutant is one seed passed through one to three mutations chosen by a seeded
:class:`random.Random`: the same seed gives the same messages, so a failure can be replayed
(``Mutator(seeds, seed).take(n)``).

Mutations are the classic ones of boofuzz-style fuzzers, adapted to SIP: bit and byte flips,
truncation, header duplication, huge values, CRLF games (bare LF, bare CR, folded lines, blank
lines, no header end), random splicing of two seeds, Content-Length lies, deleted and shuffled
header lines, separator runs, NUL and UTF-8 injection, and random method and status tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import vectorlib

MAX_DATAGRAM = 65_000  # what one UDP datagram on loopback carries (and sip.max_message_size)


def seed_messages(domain: str = "b.test", host: str = "127.0.0.3", port: int = 5062,
                  user: str = "carol") -> list[bytes]:
    """Every vector message, and call-flow requests retargeted at ``user@domain`` on
    ``host:port`` (an existing user who is not in the call under test)."""
    seeds: list[bytes] = []
    seeds.extend(path.read_bytes() for path in sorted((vectorlib.VECTORS / "rfc4475").glob(
        "*.dat")))
    for entry in vectorlib.rfc5118_messages():
        for form in ("ersip_crlf", "archive_lf"):
            if form in entry:
                seeds.append(vectorlib.read(entry[form]["file"]))
    regressions = vectorlib.VECTORS / "regressions"
    seeds.extend(path.read_bytes() for path in sorted(regressions.glob("*.sip")))
    flows = [path.read_bytes() for path in vectorlib.callflow_messages()]
    seeds.extend(flows)
    for data in flows:
        if not re.match(rb"[A-Z]+ sip", data):
            continue  # responses stay as they are: they reach us as stray responses
        target = re.sub(rb"^([A-Z]+) sips?:([^@\s]+@)?[^\s;>]+",
                        lambda m: m.group(1) + b" sip:" + (user.encode() + b"@" if m.group(2)
                                                          else b"") + domain.encode(),
                        data, count=1)
        target = re.sub(rb"(?m)^(To:[^<\r\n]*<)sips?:[^@>]+@[^>;]+",
                        lambda m: m.group(1) + b"sip:" + user.encode() + b"@" + domain.encode(),
                        target, count=1)
        seeds.append(target.replace(b"biloxi.example.com", f"{host}:{port}".encode()))
    return seeds


Mutation = Callable[[bytes, random.Random, list[bytes]], bytes]


def _lines(data: bytes) -> tuple[list[bytes], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body if sep else b""


def _join(lines: list[bytes], body: bytes) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def flip_bits(data: bytes, rng: random.Random, _: list[bytes]) -> bytes:
    out = bytearray(data)
    for _i in range(rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def replace_bytes(data: bytes, rng: random.Random, _: list[bytes]) -> bytes:
    out = bytearray(data)
    specials = b"\x00\r\n :;,<>\"\\@%\xff\x7f="
    for _i in range(rng.randint(1, 6)):
        if out:
            out[rng.randrange(len(out))] = rng.choice(specials + bytes([rng.randrange(256)]))
    return bytes(out)


def truncate(data: bytes, rng: random.Random, _: list[bytes]) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def duplicate_header(data: bytes, rng: random.Random, _: list[bytes]) -> bytes:
    lines, body = _lines(data)
    if len(lines) < 2:
        return data
    index = rng.randrange(1, len(lines))
    copies = rng.choice([1, 2, 10, 100, 1000])
    lines[index + 1:index + 1] = [lines[index]] * copies
    return _join(lines, body)[:MAX_DATAGRAM]


def huge_value(data: bytes, rng: random.Random, _: list[bytes]) -> bytes:
    lines, body = _lines(data)
    size = rng.choice([256, 1024, 8192, 40_000, 60_000])
    filler = rng.choice([b"a", b"9", b";x=", b",", b"%41", b" ", b"\"", b"<sip:a@b>,"])
    value = (filler * (size // len(filler) + 1))[:size]
    if len(lines) < 2 or rng.random() < 0.2:
        lines[0] = lines[0][:8] + value + lines[0][8:]  # request line or status line
    else:
        index = rng.randrange(1, len(lines))
        name = lines[index].split(b":", 1)[0]
        lines[index] = name + b": " + value
    return _join(lines, body)[:MAX_DATAGRAM]


def crlf_games(data: bytes, rng: random.Random, _: list[bytes]) -> bytes:
    choice = rng.randrange(8)
    if choice == 0:
        return data.replace(b"\r\n", b"\n")
    if choice == 1:
        return data.replace(b"\r\n", b"\r")
    if choice == 2:
        return data.replace(b"\r\n\r\n", b"\r\n", 1)  # no end of the header section
    if choice == 3:
        return b"\r\n" * rng.randint(1, 50) + data  # keep-alive CRLFs first (RFC 5626)
    if choice == 4:
        lines, body = _lines(data)
        index = rng.randrange(len(lines))
        lines[index] = lines[index] + b"\r\n " + lines[index][-10:]  # a folded continuation
        return _join(lines, body)
    if choice == 5:
        positions = [m.start() for m in re.finditer(rb"\r\n", data)]
        if positions:
            cut = rng.choice(positions)
            return data[:cut] + b"\r\n\r\n" + data[cut + 2:]  # an early blank line
        return data
    if choice == 6:
        return data + b"\r\n" * rng.randint(1, 20)
    return data.replace(b": ", b"\r\n : ", rng.randint(1, 3))


def splice(data: bytes, rng: random.Random, seeds: list[bytes]) -> bytes:
    other = rng.choice(seeds)
    return data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1):]


def content_length_lie(data: bytes, rng: random.Random, _: list[bytes]) -> bytes:
    value = rng.choice([b"-1", b"0", b"1", b"99999999", b"4294967296", b"18446744073709551617",
                        b"abc", b"", b"1e3", b" 5 ", b"0x10", b"65535", b"-0",
                        str(max(0, len(data) - rng.randrange(1, 200))).encode(),
                        str(len(data) + rng.randrange(1, 200)).encode()])
    if re.search(rb"(?im)^(Content-Length|l)\s*:", data):
        return re.sub(rb"(?im)^(Content-Length|l)\s*:[^\r\n]*", lambda m: m.group(1) + b": " +
                      value, data, count=1)
    lines, body = _lines(data)
    lines.append(b"Content-Length: " + value)
    return _join(lines, body)


def delete_or_shuffle(data: bytes, rng: random.Random, _: list[bytes]) -> bytes:
    lines, body = _lines(data)
    if len(lines) < 3:
        return data
    if rng.random() < 0.5:
        del lines[rng.randrange(1, len(lines))]
    else:
        rest = lines[1:]
        rng.shuffle(rest)
        lines = [lines[0], *rest]
    return _join(lines, body)


def separators(data: bytes, rng: random.Random, _: list[bytes]) -> bytes:
    lines, body = _lines(data)
    index = rng.randrange(len(lines))
    run = rng.choice([b";", b",", b";;;,,,", b"<", b">", b"\"", b"=", b"@", b"%", b"[", b"]"])
    line = lines[index]
    at = rng.randrange(len(line) + 1)
    lines[index] = line[:at] + run * rng.randint(1, 50) + line[at:]
    return _join(lines, body)


def inject(data: bytes, rng: random.Random, _: list[bytes]) -> bytes:
    piece = rng.choice([b"\x00", b"\xc3\xa9", b"\xe2\x80\xae", b"\xff\xfe", b"%00", b"\t",
                        b"\x1b[2J", b"\xf0\x9f\x98\x80", b"%%", b"\\", b"\x80"])
    at = rng.randrange(len(data) + 1)
    return data[:at] + piece * rng.randint(1, 8) + data[at:]


def first_line(data: bytes, rng: random.Random, _: list[bytes]) -> bytes:
    lines, body = _lines(data)
    forms = [b"INVITE sip:carol@b.test SIP/2.0", b"FOO sip:x SIP/2.0", b"SIP/2.0 999 X",
             b"SIP/2.0 180", b"SIP/3.0 200 OK", b"INVITE  SIP/2.0", b"OPTIONS * SIP/2.0",
             b"REGISTER sip:b.test SIP/2.0", b"ACK sip:carol@b.test SIP/2.0",
             b"BYE sip:carol@b.test SIP/2.0", b"CANCEL sip:carol@b.test SIP/2.0",
             b"SIP/2.0 -1 X", b"SIP/2.0 00200 OK", b"INVITE sip:%00@b.test SIP/2.0",
             b"INVITE tel:+1-(555) SIP/2.0", b"INVITE sips:[::1 SIP/2.0",
             b"INVITE sip:carol@b.test;maddr=127.0.0.1;transport=udp SIP/2.0"]
    lines[0] = rng.choice(forms)
    return _join(lines, body)


MUTATIONS: tuple[Mutation, ...] = (
    flip_bits, replace_bytes, truncate, duplicate_header, huge_value, crlf_games, splice,
    content_length_lie, delete_or_shuffle, separators, inject, first_line,
)


@dataclass
class Mutant:
    index: int
    names: tuple[str, ...]
    data: bytes


class Mutator:
    """Mutants of ``seeds``, reproducible from ``seed``."""

    def __init__(self, seeds: list[bytes], seed: int) -> None:
        self.seeds = seeds
        self.rng = random.Random(seed)
        self.count = 0

    def next(self) -> Mutant:
        rng = self.rng
        data = rng.choice(self.seeds)
        names = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            mutation = rng.choice(MUTATIONS)
            data = mutation(data, rng, self.seeds)
            names.append(mutation.__name__)
        self.count += 1
        return Mutant(self.count - 1, tuple(names), data[:MAX_DATAGRAM])

    def take(self, n: int) -> Iterator[Mutant]:
        for _ in range(n):
            yield self.next()
