"""An active man in the middle between two freecall nodes (issue 7's attacker).

The attacker (tests/harness/mitm.py) relays SIP between node A (127.0.0.2, a.test, alice) and
node B (127.0.0.3, b.test, bob), rewrites each SDP to its own media legs with its own
``a=zrtp-hash`` (RFC 6189 section 8.1 cannot stop it: it owns the signalling), and terminates
ZRTP on both legs, relaying the media between them. So the call works and is "secure" on both
nodes, but each leg has its own keys and the two SAS differ (section 7): only a SAS compared by
voice, or a SAS signature checked against the right key (section 7.2), can tell.

The mode checks at the end run the attacker's media in-process against two bridge engines that
play the nodes (they sign with a stub), without SIP or softphones.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from freecall import sdp
from freecall.srtp import zrtp as z
from freecall.srtp.bridge import (
    SECURE,
    MediaEngine,
    MediaEvent,
    MediaStream,
    SasSignatureNeeded,
    StreamSecure,
)
from freecall.srtp.keys import RetainedSecrets
from harness import Baresip, Harness
from harness.calls import phone
from harness.keys import exchange_keys, wait_outcomes
from harness.mitm import (
    OPENPGP_ATTRIBUTE,
    USERS_A,
    USERS_B,
    AttackResult,
    GpgSigner,
    KeyOffer,
    MitmMedia,
    MitmNodes,
    Mode,
    attack_call,
    make_gpg_key,
    start_mitm_nodes,
    stop_gpg_agent,
)
from harness.ports import PortAllocator

MitmNodesFactory = Callable[..., MitmNodes]


@pytest.fixture
def mitm_nodes(harness: Harness) -> MitmNodesFactory:
    """``mitm_nodes(mode="strip", config_a=..., config_b=..., gpg_home=..., gpg_key=...)``: the
    two daemons routed to each other through a started attacker (`harness.mitm.MitmNodes`)."""

    def make(mode: Mode = "strip", **options: Any) -> MitmNodes:
        return start_mitm_nodes(harness, mode, **options)

    return make


def phones(baresip: Callable[..., Baresip], nodes: MitmNodes) -> tuple[Baresip, Baresip]:
    """alice on node A (440 Hz), bob on node B (880 Hz), registered; reusable across calls."""
    alice = phone(baresip, nodes.a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, nodes.b, "bob", USERS_B["bob"], "b.test", 880)
    return alice, bob


def check_split(result: AttackResult) -> None:
    """Each node's SAS is the one of the attacker's leg facing it, and the two differ."""
    assert result.sas_a == result.leg_a.sas, result
    assert result.sas_b == result.leg_b.sas, result
    assert result.sas_a != result.sas_b, f"same SAS on both sides through the attacker: {result}"


def test_the_attacker_splits_the_call_into_two_secure_legs_with_different_sas(
    mitm_nodes: MitmNodesFactory, baresip: Callable[..., Baresip]
) -> None:
    """Stripped of signatures (no S flag, RFC 6189 section 7.2), the nodes cannot tell: both
    say secure, tones cross, the SAS differ. Three calls with the same registered phones
    measure one run of the attack."""
    nodes = mitm_nodes("strip")
    alice, bob = phones(baresip, nodes)
    results = [attack_call(nodes, alice, bob) for _ in range(3)]
    for result in results:
        check_split(result)
        assert "legs allocated" in result.logs["mitm"]
    assert "dropped" not in nodes.mitm.log_text()  # it failed closed on nothing
    # the nodes' media went to the attacker, never to each other
    for node, other in ((nodes.a, nodes.b), (nodes.b, nodes.a)):
        assert f"media to ('{other.public_host}'" not in node.log_text()
        assert f"c=IN IP4 {nodes.mitm.host}" in node.log_text()  # the SDP it got (sip_trace)
    print("\nattack runs (s):", ", ".join(f"{r.seconds:.2f}" for r in results))


@pytest.mark.parametrize("mode", ["forward", "own"])
def test_the_signing_attacker_modes_run_against_the_nodes(
    mitm_nodes: MitmNodesFactory, baresip: Callable[..., Baresip], mode: Mode, tmp_path: Path
) -> None:
    """The attacker process in the signature-capable modes (S flag in its Hello): the call
    splits into two secure legs. Whether a node then ends it is issue 7's to assert (so no
    tone is required here: a node that detects the attacker hangs up at once)."""
    home = tmp_path / "mallory"
    options: dict[str, Any] = {}
    if mode == "own":
        options = {"gpg_home": home, "gpg_key": make_gpg_key(home, "bob@b.test")}
    try:
        nodes = mitm_nodes(mode, **options)
        alice, bob = phones(baresip, nodes)
        check_split(attack_call(nodes, alice, bob, alice_hears=None, bob_hears=None))
        assert f"mode {mode}" in nodes.mitm.log_text()
    finally:
        stop_gpg_agent(home)


# ---------------------------------------------------------------------------------------------
# Issue 7: the daemons detect the attacker by the OpenPGP signatures over the SAS hash
# ---------------------------------------------------------------------------------------------

RUNS = 20


@pytest.mark.parametrize("mode", ["forward", "strip", "own"])
def test_daemons_with_each_others_keys_detect_the_attacker_every_time(
    mitm_nodes: MitmNodesFactory, baresip: Callable[..., Baresip], mode: Mode, tmp_path: Path
) -> None:
    """Keys exchanged beforehand (the CLI). Whatever the attacker does with the signatures
    (forwards the far end's, which is over the other leg's hash; strips them; signs with
    his own key carrying bob's user ID), both daemons say ``mitm-suspected`` on every run.
    With ``forward`` the default policy (``on_mitm: hangup``) ends every call for both
    softphones. With the others the first daemon to see the attack may end the call before
    the far daemon's leg completes ZRTP, so those runs use ``on_mitm: warn`` to let both
    daemons report, and alice hangs up."""
    home = tmp_path / "mallory"
    options: dict[str, Any] = {}
    if mode == "own":
        options = {"gpg_home": home, "gpg_key": make_gpg_key(home, "bob@b.test")}
    ends = mode == "forward"
    if not ends:
        warn = {"security": {"on_mitm": "warn"}}
        options.update(config_a=warn, config_b=warn)
    try:
        nodes = mitm_nodes(mode, **options)
        exchange_keys(nodes.a, nodes.b)
        alice, bob = phones(baresip, nodes)
        runs = RUNS if ends else 5
        results = [attack_call(nodes, alice, bob, alice_hears=None, bob_hears=None,
                               hang_up=not ends, talk=0.3) for _ in range(runs)]
        for result in results:
            check_split(result)
        for node in (nodes.a, nodes.b):
            found = [o[1] for o in wait_outcomes(node, runs)]
            assert found == ["mitm-suspected"] * runs, (node.name, found)
            if ends:
                assert node.log_text().count("man in the middle suspected") >= runs
        print(f"\n{mode}: {runs} runs, all mitm-suspected on both daemons; per run (s):",
              " ".join(f"{r.seconds:.2f}" for r in results))
    finally:
        stop_gpg_agent(home)


def test_with_no_keys_the_attacker_leaves_the_calls_unverified_never_verified(
    mitm_nodes: MitmNodesFactory, baresip: Callable[..., Baresip]
) -> None:
    """No keys known on either side and no signatures through the attacker: the daemons can
    only say ``unverified`` and show the SAS, which differs between the two sides (a voice
    check would catch him)."""
    nodes = mitm_nodes("strip")
    alice, bob = phones(baresip, nodes)
    runs = 5
    results = [attack_call(nodes, alice, bob) for _ in range(runs)]
    for node, sas in ((nodes.a, [r.sas_a for r in results]), (nodes.b, [r.sas_b for r in results])):
        found = wait_outcomes(node, runs)
        assert [o[1] for o in found] == ["unverified"] * runs, (node.name, found)
        assert [o[3] for o in found] == sas
    assert all(r.sas_a != r.sas_b for r in results)


# ---------------------------------------------------------------------------------------------
# The signature modes, in-process: the attacker's media between two engines playing the nodes
# ---------------------------------------------------------------------------------------------


class FakeNode:
    """A bridge engine playing a signing node: signs with fixed bytes tagged with its name and
    the sashash it was asked for, so a test can tell whose signature went where."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, ports: tuple[int, int],
                 host: str, *, capable: bool = True) -> None:
        self.name = name
        self.events: list[MediaEvent] = []
        self.signed: list[bytes] = []
        self.engine = MediaEngine(
            loop, address=host, loopback_host=host, port_range=ports,
            retained_secrets=RetainedSecrets(None),
            zrtp_config=z.ZrtpConfig(signature_capable=capable, sign_sas=capable,
                                     signature_timeout=1.0),
            policy="require", rtp_timeout=None, on_event=self._on_event)
        self.stream: MediaStream | None = None

    def _on_event(self, event: MediaEvent) -> None:
        self.events.append(event)
        if isinstance(event, SasSignatureNeeded):
            signature = self.signature(event.sashash)
            self.signed.append(event.sashash)
            event.stream.provide_signature(b"PGP ", signature)

    def signature(self, sashash: bytes) -> bytes:
        return b"sig" + self.name.encode() + sashash  # not OpenPGP (only compared); 36 octets

    @property
    def secure(self) -> StreamSecure | None:
        return next((e for e in self.events if isinstance(e, StreamSecure)), None)


@dataclass
class Attack:
    """What the in-process attack produced: the two nodes, the attacker, the relayed SDP."""

    a: FakeNode
    b: FakeNode
    mitm: MitmMedia
    relayed_offer: str
    relayed_answer: str


async def _run_attack(mode: Mode, block: tuple[int, int], signer: GpgSigner | None,
                      offered_key: KeyOffer) -> Attack:
    """Node A offers, node B answers, both through `MitmMedia.rewrite_sdp`; ZRTP to the end."""
    loop = asyncio.get_running_loop()
    first = block[0]
    a = FakeNode("A", loop, (first, first + 7), "127.0.0.2")
    b = FakeNode("B", loop, (first + 8, first + 15), "127.0.0.3")
    mitm = MitmMedia(loop, address="127.0.0.9", port_range=(first + 16, first + 31),
                     mode=mode, signer=signer, signature_timeout=1.0, rtp_timeout=None,
                     offered_key=offered_key)
    try:
        sa = a.stream = await a.engine.allocate()
        sb = b.stream = await b.engine.allocate()
        phone_a, phone_b = ("127.0.0.2", first + 40), ("127.0.0.3", first + 42)
        sa.set_softphone_target(phone_a)
        sb.set_softphone_target(phone_b)
        offer = _sdp(sa)
        relayed_offer = mitm.rewrite_sdp("call-1", "A", offer).decode()
        assert "127.0.0.2" not in relayed_offer
        assert str(sa.zrtp_hash_attribute) not in relayed_offer
        _set_remote(sb, relayed_offer)
        answer = _sdp(sb)
        relayed_answer = mitm.rewrite_sdp("call-1", "B", answer).decode()
        assert "127.0.0.3" not in relayed_answer
        _set_remote(sa, relayed_answer)
        sa.start()
        sb.start()
        deadline = loop.time() + 8
        while not (a.secure and b.secure and all(
                leg.sas for leg in mitm.calls["call-1"].legs.values())):
            assert loop.time() < deadline, (a.events, b.events)
            await asyncio.sleep(0.01)
        assert sa.state == sb.state == SECURE
        return Attack(a, b, mitm, relayed_offer, relayed_answer)
    finally:
        await asyncio.sleep(0.01)
        mitm.close()
        a.engine.close()
        b.engine.close()
        await asyncio.sleep(0.01)


def _sdp(stream: MediaStream) -> bytes:
    host, port = stream.local_network_rtp
    return (f"v=0\r\no=- 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
            f"a={OPENPGP_ATTRIBUTE}:{_key_of(host)}\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=zrtp-hash:{stream.zrtp_hash_attribute}\r\n").encode()


def _key_of(host: str) -> str:
    """The stand-in for a node's offered OpenPGP key (base64)."""
    return base64.b64encode(f"key of {host}".encode()).decode()


def _set_remote(stream: MediaStream, text: str) -> None:
    """What a node does with the SDP it got: the address and the Hello hash (8.1)."""
    description = sdp.parse(text.encode())
    connection = description.effective_connection(0)
    assert connection is not None
    [zrtp_hash] = description.media[0].zrtp_hashes
    stream.set_remote((connection.address, description.media[0].port),
                      zrtp_hash=zrtp_hash.render())


@pytest.fixture
def port_block() -> Iterator[tuple[int, int]]:
    allocator = PortAllocator()
    block = allocator.block(32)
    yield block.first, block.last
    allocator.release_all()


def test_strip_mode_sends_no_s_flag_so_no_node_signs_or_sees_a_signature(
    port_block: tuple[int, int]
) -> None:
    attack = asyncio.run(_capture_legs("strip", port_block, None, "strip"))
    a, b = attack.a, attack.b
    assert OPENPGP_ATTRIBUTE not in attack.relayed_offer + attack.relayed_answer
    assert a.signed == [] and b.signed == []
    assert a.secure is not None and b.secure is not None
    assert a.secure.peer_signature is None and b.secure.peer_signature is None
    assert a.secure.sas != b.secure.sas


def test_forward_mode_hands_each_node_the_other_nodes_signature_over_another_sashash(
    port_block: tuple[int, int]
) -> None:
    attack = asyncio.run(_capture_legs("forward", port_block, None, "relay"))
    a, b = attack.a, attack.b
    assert _key_of("127.0.0.2") in attack.relayed_offer  # relayed as it was
    assert _key_of("127.0.0.3") in attack.relayed_answer
    [call] = attack.mitm.ended
    print("\nforward:", {leg.side: leg.signature_sent for leg in call.legs.values()})
    assert a.secure is not None and b.secure is not None
    assert len(a.signed) == len(b.signed) == 1
    assert a.signed[0] != b.signed[0]  # each leg has its own sashash
    got_a, got_b = a.secure.peer_signature, b.secure.peer_signature
    # At least the leg that signs second gets the other node's signature unchanged; a leg that
    # had to sign first may have timed out to unsigned (both legs responder: deadlock by design).
    forwarded = [(node, got, other) for node, got, other in ((a, got_a, b), (b, got_b, a))
                 if got is not None]
    assert forwarded, "no signature forwarded on either leg"
    for node, got, other in forwarded:
        assert got.sig_type == b"PGP "
        assert got.sig_bytes == other.signature(other.signed[0])
        assert got.sashash == node.signed[0] != other.signed[0]


def test_own_mode_signs_each_legs_sashash_with_its_gnupg_key(
    port_block: tuple[int, int], tmp_path: Path
) -> None:
    home = tmp_path / "g"
    fpr = make_gpg_key(home, "mallory@evil.test")
    gpg = ["gpg", "--homedir", str(home), "--batch", "--no-tty"]
    try:
        signer = GpgSigner(home, fpr)
        attack = asyncio.run(_capture_legs("own", port_block, signer, "own"))
        own_key = f"a={OPENPGP_ATTRIBUTE}:{signer.public_key_b64()}\r\n"
        assert own_key in attack.relayed_offer and own_key in attack.relayed_answer
        assert "key of" not in attack.relayed_offer + attack.relayed_answer
        for node in (attack.a, attack.b):
            secure = node.secure
            assert secure is not None and secure.peer_signature is not None
            sig = secure.peer_signature
            assert sig.sig_type == b"PGP "
            (tmp_path / "sashash").write_bytes(sig.sashash)
            (tmp_path / "sig").write_bytes(sig.sig_bytes)
            check = subprocess.run([*gpg, "--status-fd", "1", "--verify", str(tmp_path / "sig"),
                                    str(tmp_path / "sashash")], capture_output=True, text=True,
                                   check=False)
            assert check.returncode == 0 and f"VALIDSIG {fpr}" in check.stdout, check.stderr
    finally:
        stop_gpg_agent(home)


async def _capture_legs(mode: Mode, block: tuple[int, int], signer: GpgSigner | None,
                        offered_key: KeyOffer) -> Attack:
    start = time.monotonic()
    attack = await _run_attack(mode, block, signer, offered_key)
    assert time.monotonic() - start < 8
    return attack
