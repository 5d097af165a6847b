"""Inputs that once crashed or hung the daemon (tests/vectors/regressions/, found by the wire
fuzzer, tests/interop/test_wire_fuzz.py): each parses, or fails with a SIP error, at once."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from freecall.sip.errors import SipParseError
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
