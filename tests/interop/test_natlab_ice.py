"""ICE through real NATs: the lab of harness.natlab (network namespaces, nftables full-cone and
symmetric NAT), the real relay daemon (``freecall run --role relay``) on the public segment,
and one ICE agent (harness/iceprobe.py, freecall.srtp.ice on a real socket) in each home.

Cone NATs connect directly (server-reflexive or peer-reflexive addresses, nothing relayed);
two symmetric NATs connect only through the relay. Media probes cross in both directions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from freecall.relay.credentials import node_credentials
from harness.natlab import RELAY_ADDRESS, NatLab, relayed_packets, start_relay

pytestmark = [pytest.mark.interop]

PROBE = Path(__file__).resolve().parent.parent / "harness" / "iceprobe.py"
SRC = Path(__file__).resolve().parents[2] / "src"


def _probe(lab: NatLab, home: int, secret: str, *, controlling: bool) -> subprocess.Popen[str]:
    user, password = node_credentials(secret, f"node{home}", time.time(), 600)
    argv = [*lab.run(f"h{home}"), sys.executable, str(PROBE), "--bind", lab.host_address(home),
            "--name", f"h{home}", "--stun", f"{RELAY_ADDRESS}:3478",
            "--turn", f"{RELAY_ADDRESS}:3478", "--user", user, "--password", password]
    if controlling:
        argv.append("--controlling")
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})


def _line(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        assert process.stderr is not None
        raise AssertionError(f"probe ended: {process.stderr.read()[-2000:]}")
    result: dict[str, Any] = json.loads(line)
    return result


def _call(lab: NatLab, tmp_path: Path) -> tuple[list[dict[str, Any]], int]:
    relay, state = start_relay(lab, tmp_path)
    probes: list[subprocess.Popen[str]] = []
    try:
        secret = (state / "relay-secret").read_text().strip()
        probes = [_probe(lab, 1, secret, controlling=True),
                  _probe(lab, 2, secret, controlling=False)]
        params = [_line(p)["params"] for p in probes]
        for probe, theirs in zip(probes, reversed(params), strict=True):
            assert probe.stdin is not None
            probe.stdin.write(json.dumps(theirs) + "\n")
            probe.stdin.flush()
        results = []
        for probe in probes:
            selected = _line(probe)
            assert "selected" in selected, selected
            results.append({**selected["selected"], **_line(probe)})
            probe.wait(10)
        for kinds, p in zip(params, probes, strict=True):
            assert p.returncode == 0
            assert {c.split()[7] for c in kinds["candidates"]} == {"host", "srflx", "relay"}
    finally:
        for probe in probes:
            if probe.poll() is None:
                probe.kill()
        relay.stop(5)
    return results, relayed_packets(relay.log_text())


def test_full_cone_nats_carry_media_directly(tmp_path: Path) -> None:
    with NatLab(("full-cone", "full-cone")) as lab:
        results, relayed = _call(lab, tmp_path)
    assert relayed < 50, relayed  # checks through the relay candidates; media would add 100
    for mine, theirs_wan in zip(results, ("198.51.100.12", "198.51.100.11"), strict=True):
        assert not mine["relayed"], results
        assert mine["remote"].split()[4] == theirs_wan, results  # the other router's address
        assert mine["received"] >= 45, results  # 50 sent, 20 ms apart
        assert all("via direct" in s and s.startswith(theirs_wan) for s in mine["sources"])


def test_symmetric_nats_carry_media_through_the_relay(tmp_path: Path) -> None:
    with NatLab(("symmetric", "symmetric")) as lab:
        results, relayed = _call(lab, tmp_path)
    assert any(r["relayed"] for r in results), results
    for mine in results:
        assert mine["received"] >= 45, results
        assert all(s.startswith(RELAY_ADDRESS) or f"via {RELAY_ADDRESS}" in s
                   for s in mine["sources"]), results  # every packet came off the relay
    assert relayed >= 90, relayed  # the media of both directions


def test_symmetric_to_full_cone_needs_no_relay(tmp_path: Path) -> None:
    with NatLab(("symmetric", "full-cone")) as lab:
        results, relayed = _call(lab, tmp_path)
    assert relayed < 50, relayed
    assert not any(r["relayed"] for r in results), results
    assert all(r["received"] >= 45 for r in results), results
