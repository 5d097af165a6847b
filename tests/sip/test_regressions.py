"""Inputs that once crashed or hung the daemon (tests/vectors/regressions/, found by the wire
fuzzer, tests/interop/test_wire_fuzz.py): each parses, or fails with a SIP error, at once."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from freecall.sip.errors import SipParseError
from freecall.sip.framer import StreamFramer
from freecall.sip.grammar import FOLD_RE
from freecall.sip.message import parse_message

REGRESSIONS = sorted((Path(__file__).parents[1] / "vectors" / "regressions").glob("*.sip"))


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.name)
@pytest.mark.parametrize("datagram", [True, False])
def test_regression_vector_is_handled_quickly(path: Path, datagram: bool) -> None:
    started = time.perf_counter()
    with contextlib.suppress(SipParseError):
        parse_message(path.read_bytes(), datagram=datagram)
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize("blank", [" ", "\t"])
def test_folding_is_linear_in_a_blank_run(blank: str) -> None:
    """RFC 3261 section 7.3.1 folding, and no quadratic retry over a run without a line end."""
    assert FOLD_RE.sub(" ", f"a{blank * 3}\r\n{blank}b") == "a b"
    assert FOLD_RE.sub(" ", "a\r\n\tb\n c") == "a b c"
    text = "x" + blank * 200_000 + "y"
    started = time.perf_counter()
    assert FOLD_RE.sub(" ", text) == text
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.name)
def test_regression_vector_through_the_stream_framer(path: Path) -> None:
    """Over TCP and TLS a message meets the framer first: it may refuse it, never crash."""
    framer = StreamFramer()
    framer.feed(path.read_bytes())
    with contextlib.suppress(SipParseError):
        while (item := framer.next_message()) is not None:
            if isinstance(item, bytes):
                with contextlib.suppress(SipParseError):
                    parse_message(item, datagram=False)


def test_huge_numbers_are_refused_or_capped_not_raised() -> None:
    """int() raises ValueError past 4300 digits: every 1*DIGIT field is bounded first."""
    data = (REGRESSIONS[0].parent / "huge-numbers-4400-digits.sip").read_bytes()
    framer = StreamFramer()
    framer.feed(data)
    with pytest.raises(SipParseError) as refused:
        framer.next_message()
    assert refused.value.status == 413
    head = data.replace(b"Content-Length: " + b"8" * 4400, b"Content-Length: 0")
    message = parse_message(head, datagram=True)
    assert message.via.rport is None
    assert message.contacts[0].expires == 2**32 - 1
    padded = head.replace(b"Content-Length: 0", b"Content-Length: " + b"0" * 4400 + b"5")
    framer = StreamFramer()
    framer.feed(padded + b"12345")
    assert isinstance(framer.next_message(), bytes)  # leading zeros are still a number
