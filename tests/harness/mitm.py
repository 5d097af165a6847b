"""An active man in the middle between two freecall nodes: the attack issue 7 must detect.

The attacker sits on the signalling path and terminates ZRTP on both media legs::

    node A <--SIP--> [Mitm sip port] <--SIP--> node B
    node A <--ZRTP/SRTP leg A--> [stream_A | plain RTP | stream_B] <--ZRTP/SRTP leg B--> node B

* **Signalling** (UDP only, one socket): a datagram from A goes to B's public address and one
  from B to A's; which side sent it is told by its source. The daemons' Via carries ``rport``
  (RFC 3581), so responses come back to the socket that relayed the request; in-dialog requests
  follow the dialog's Record-Route straight to the other node and bypass the attacker (calls
  still set up and end; media timeouts free the attacker's streams).
* **SDP**: every body it relays gets the attacker's own media leg facing the receiver (``c=``,
  ``m=`` port, and ``a=zrtp-hash`` replaced by the hash of the attacker's Hello on that leg), so
  the hello-hash binding of RFC 6189 section 8.1 passes on both nodes: it only binds Hello to
  signalling, and the attacker owns the signalling.
* **Media**: freecall's own `MediaEngine`, two streams per call whose plain sides face each
  other, so each leg has its own DH exchange and keys and the SAS differs per leg (section 7).
* **SAS signatures** (section 7.2), the ``mode``:

  - ``strip``: not signature capable (no S flag in Hello, section 5.2), so the nodes never sign
    and see no signature: the best an attacker without keys can do against TOFU/voice checks;
  - ``forward``: signature capable; the signature a node puts in its Confirm on one leg is given
    unchanged as the attacker's signature on the other leg (it covers the wrong sashash, which
    the receiving node must notice). A leg that has to sign before the other leg delivered
    waits up to ``signature_timeout`` and then goes unsigned (the ZRTP core's own bound);
  - ``own``: signs each leg's sashash with a GnuPG key given to it (a valid signature by a key
    the victim should not accept for that address).

* **The key a node offers in SDP** (session-level ``a=freecall-openpgp:<base64 key>``, issue 7's
  first-contact key), ``offered_key``: ``relay`` it unchanged, ``strip`` it, or replace it by the
  attacker's ``own`` public key (the signing key of mode ``own``): the attack on trust on
  first use.

Run as a process (``python -m harness.mitm --help``), managed by the test's `Harness` through
`Mitm`; `MitmMedia` and `SipRelay` also run in-process (the mode checks do that). It logs one
line per event; the tests read ``call CALLID leg A secure SAS xxxx (B32)`` and friends.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

from freecall import sdp
from freecall.sdp import SdpError, ZrtpHash
from freecall.sip.errors import SipParseError
from freecall.sip.message import Request, parse_message
from freecall.srtp import zrtp as z
from freecall.srtp.bridge import (
    MediaEngine,
    MediaEvent,
    MediaStream,
    MediaTimeout,
    SasSignatureNeeded,
    StreamInsecure,
    StreamSecure,
    ZrtpFailure,
    ZrtpWarning,
)
from freecall.srtp.calls import OPENPGP_ATTRIBUTE
from freecall.srtp.keys import RetainedSecrets

from .baresip import Baresip
from .daemon import FreecallDaemon
from .proc import ManagedProcess, wait_port, wait_until
from .wav import assert_tone

log = logging.getLogger("mitm")

Mode = Literal["strip", "forward", "own"]
MODES: Final[tuple[Mode, ...]] = ("strip", "forward", "own")
KeyOffer = Literal["relay", "strip", "own"]
KEY_OFFERS: Final[tuple[KeyOffer, ...]] = ("relay", "strip", "own")
Side = Literal["A", "B"]
Addr = tuple[str, int]
PGP: Final = b"PGP "  # Signature Type Block (RFC 6189 section 5.1.7)

_OTHER: Final[dict[Side, Side]] = {"A": "B", "B": "A"}
_POLL: Final = 0.005  # seconds between looks for the other leg's signature (forward mode)
LEG_SECURE: Final = r"call (\S+) leg ([AB]) secure SAS (\w+) \((B32|B256)\)"


# ---------------------------------------------------------------------------------------------
# Signing (mode "own")
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpgSigner:
    """Detached binary OpenPGP signature over sashash by the real gpg (RFC 6189 section 7.2:
    signature type "PGP ", the signed data is the 256-bit sashash)."""

    homedir: Path
    fingerprint: str
    timeout: float = 10.0

    def public_key_b64(self) -> str:
        """The key as ``a=freecall-openpgp`` carries it: base64 of the binary export."""
        result = subprocess.run(
            ["gpg", "--homedir", str(self.homedir), "--batch", "--no-tty", "--export",
             self.fingerprint], capture_output=True, timeout=self.timeout, check=True)
        if not result.stdout:
            raise RuntimeError(f"gpg --export {self.fingerprint}: no such key")
        return base64.b64encode(result.stdout).decode()

    def sign(self, data: bytes) -> bytes:
        result = subprocess.run(
            ["gpg", "--homedir", str(self.homedir), "--batch", "--yes", "--no-tty",
             "--pinentry-mode", "loopback", "--passphrase", "",
             "--detach-sign", "--digest-algo", "SHA256", "-u", self.fingerprint],
            input=data, capture_output=True, timeout=self.timeout, check=False,
        )
        if result.returncode != 0 or not result.stdout:
            raise RuntimeError(f"gpg --detach-sign failed ({result.returncode}): "
                               f"{result.stderr.decode(errors='replace')[-400:]}")
        return result.stdout


def make_gpg_key(home: Path, uid: str) -> str:
    """A fresh unprotected Ed25519 signing key for ``uid`` in GnuPG home ``home`` (created,
    mode 0700); its fingerprint. Stop the agent afterwards with `stop_gpg_agent`."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--no-tty"]
    subprocess.run([*gpg, "--passphrase", "", "--quick-generate-key", uid, "ed25519", "sign",
                    "never"], check=True, capture_output=True, timeout=30)
    listing = subprocess.run([*gpg, "--with-colons", "--list-secret-keys", uid], check=True,
                             capture_output=True, text=True, timeout=30).stdout
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


def stop_gpg_agent(home: Path) -> None:
    """The agent of a temporary GnuPG home outlives gpg; end it with the test."""
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False,
                   capture_output=True, timeout=30)


# ---------------------------------------------------------------------------------------------
# Media: ZRTP terminated on both legs
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Leg:
    """One side of one call: the attacker's stream facing that node, and what it learnt."""

    side: Side
    stream: MediaStream
    remote_known: bool = False
    sas: str | None = None
    sas_type: str = ""
    peer_signature: z.PeerSignature | None = None  # the node's signature block on this leg
    signature_wanted: bytes | None = None  # sashash this leg asked us to sign, if any
    signature_sent: str = ""  # how it was answered: "forwarded", "own", "unsigned", "timeout"


@dataclass(eq=False)
class CallLegs:
    """One call through the attacker (keyed by Call-ID)."""

    call_id: str
    legs: dict[Side, Leg]
    started: bool = False
    poller: asyncio.TimerHandle | None = None

    def other(self, leg: Leg) -> Leg:
        return self.legs[_OTHER[leg.side]]


def _node_signature(stream: MediaStream) -> z.PeerSignature | None:
    """The signature block the node sent in its Confirm, as soon as the ZRTP core parsed it.

    `StreamSecure.peer_signature` carries it too, but only once the leg is secure: on a leg
    where we are the initiator that is after our own Confirm2, which in ``forward`` mode may be
    waiting for exactly this block from the other leg. The bridge keeps it in a private slot
    until then and raises no event for it, so the attacker looks there.
    """
    return stream._peer_signature


def _both_responders_signing(call: CallLegs) -> bool:
    """Both legs are responder and hold Confirm1 for a signature (RFC 6189 section 4.6: the
    responder signs first). The ZRTP session is private to the stream; the attacker peeks."""
    for leg in call.legs.values():
        session = leg.stream._zrtp
        if session is None or session.state is not z.State.RESPONDER_SIGNING:
            return False
    return True


class MitmMedia:
    """The attacker's media: per call two bridge streams back to back, and the signature mode.

    ``address`` is the attacker's media address (what the rewritten SDP names). Streams of a
    call are freed on the call's media timeout (``rtp_timeout``: the BYE bypasses the attacker),
    on ZRTP failure, or by `release`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        address: str,
        port_range: tuple[int, int],
        mode: Mode = "strip",
        signer: GpgSigner | None = None,
        signature_timeout: float = 2.0,
        rtp_timeout: float | None = 3.0,
        zrtp_timeout: float = 10.0,
        client_id: str = "freecall",
        retained_secrets: RetainedSecrets | None = None,
        offered_key: KeyOffer = "relay",
    ) -> None:
        if mode not in MODES or offered_key not in KEY_OFFERS:
            raise ValueError(f"mode must be one of {MODES}, offered_key one of {KEY_OFFERS}")
        if (mode == "own" or offered_key == "own") and signer is None:
            raise ValueError("mode or offered_key 'own' needs a signer (a GnuPG home and key)")
        self.loop = loop
        self.mode: Mode = mode
        self.signer = signer
        self.offered_key: KeyOffer = offered_key
        self._own_key = signer.public_key_b64() if signer and offered_key == "own" else None
        capable = mode != "strip"
        self.engine = MediaEngine(
            loop,
            address=address,
            loopback_host=address,  # the plain sides stay on the attacker's own address
            port_range=port_range,
            retained_secrets=retained_secrets or RetainedSecrets(None),
            zrtp_config=z.ZrtpConfig(
                client_id=client_id,
                signature_capable=capable,  # S flag in Hello (section 5.2)
                sign_sas=capable,  # SasSignatureNeeded when the node is capable too
                signature_timeout=signature_timeout,
            ),
            policy="require",
            rtp_timeout=rtp_timeout,
            zrtp_timeout=zrtp_timeout,
            on_event=self._on_event,
        )
        self.calls: dict[str, CallLegs] = {}
        self.ended: list[CallLegs] = []  # released calls, oldest first (what each leg saw)
        self._by_stream: dict[int, tuple[CallLegs, Leg]] = {}

    # -- calls -------------------------------------------------------------------------------

    def call(self, call_id: str) -> CallLegs:
        """The call's two legs, allocated on first use with their plain sides back to back."""
        found = self.calls.get(call_id)
        if found is not None:
            return found
        while self.calls and (len(self.calls) + 2) * 2 > self.engine.max_streams:
            # Ended calls only go at their media timeout (their BYE bypasses us): the oldest
            # makes room, so back-to-back runs never meet a full port range. One call's room
            # stays free: the loop closes released sockets a turn later, and the range hands
            # out the pairs freed longest ago first.
            self.release(next(iter(self.calls)), "evicted by a new call")
        stream_a = self.engine.allocate_now(label=f"{call_id}/A")
        stream_b = self.engine.allocate_now(label=f"{call_id}/B")
        # A's media, decrypted by stream_A, goes to stream_B's plain side and is re-encrypted
        # there for B; and back.
        stream_a.set_softphone_target(stream_b.local_softphone_rtp, stream_b.local_softphone_rtcp)
        stream_b.set_softphone_target(stream_a.local_softphone_rtp, stream_a.local_softphone_rtcp)
        call = CallLegs(call_id, {"A": Leg("A", stream_a), "B": Leg("B", stream_b)})
        self.calls[call_id] = call
        for leg in call.legs.values():
            self._by_stream[leg.stream.id] = (call, leg)
        log.info("call %s: legs allocated (A faces %s:%d, B faces %s:%d)", call_id,
                 *stream_a.local_network_rtp, *stream_b.local_network_rtp)
        return call

    def rewrite_sdp(self, call_id: str, sender: Side, body: bytes) -> bytes:
        """An SDP from node ``sender``: its address and Hello hash go to our leg facing it; the
        receiver gets our other leg's address and Hello hash (section 8.1)."""
        description = sdp.parse(body)
        call = self.call(call_id)
        near, far = call.legs[sender], call.legs[_OTHER[sender]]
        ports: list[tuple[int, int] | None] = []
        audio = -1
        for index, media in enumerate(description.media):
            live = not media.is_rejected and media.media_line.is_rtp
            if not live or audio >= 0:
                if not media.is_rejected:
                    media.reject()  # one bridged stream per call is all this attacker needs
                ports.append(None)
                continue
            audio = index
            connection = description.effective_connection(index)
            if connection is None:
                raise SdpError(f"m-line {index} has no address")
            hashes = media.zrtp_hashes or description.zrtp_hashes
            rtcp = media.rtcp
            near.stream.set_remote(
                (connection.address, media.port),
                (rtcp.connection.address if rtcp.connection else connection.address, rtcp.port)
                if rtcp is not None else None,
                zrtp_hash=hashes[0].render() if hashes else None,
            )
            near.remote_known = True
            port = far.stream.local_network_rtp[1]
            ports.append((port, port + 1))
            media.remove_attribute("rtcp-mux")
        if audio < 0:
            return body
        description.remove_attribute("zrtp-hash")
        if self.offered_key != "relay":
            offered = sum(section.remove_attribute(OPENPGP_ATTRIBUTE)
                          for section in (description, *description.media))
            if offered and self._own_key is not None:  # session level, as the nodes put it
                description.set_attribute(OPENPGP_ATTRIBUTE, self._own_key)
        description.rewrite_endpoints(far.stream.local_network_rtp[0], ports)
        value = far.stream.zrtp_hash_attribute
        description.media[audio].set_zrtp_hash(ZrtpHash.parse(value) if value else None)
        log.info("call %s: SDP from %s relayed, now naming leg %s %s:%d", call_id, sender,
                 far.side, *far.stream.local_network_rtp)
        if not call.started and all(leg.remote_known for leg in call.legs.values()):
            call.started = True  # offer and answer seen: both legs send Hello (section 4.1)
            for leg in call.legs.values():
                leg.stream.start()
        return description.to_bytes()

    def release(self, call_id: str, why: str) -> None:
        call = self.calls.pop(call_id, None)
        if call is None:
            return
        if call.poller is not None:
            call.poller.cancel()
        self.ended.append(call)
        for leg in call.legs.values():
            self._by_stream.pop(leg.stream.id, None)
            leg.stream.release()
        log.info("call %s: released (%s)", call_id, why)

    def close(self) -> None:
        for call_id in list(self.calls):
            self.release(call_id, "shutdown")
        self.engine.close()

    # -- events ------------------------------------------------------------------------------

    def _on_event(self, event: MediaEvent) -> None:
        found = self._by_stream.get(event.stream.id)
        if found is None:
            return
        call, leg = found
        tag = f"call {call.call_id} leg {leg.side}"
        if isinstance(event, StreamSecure):
            leg.sas, leg.sas_type = event.sas, event.sas_type
            if event.peer_signature is not None:
                leg.peer_signature = event.peer_signature
            sig = leg.peer_signature
            log.info("%s secure SAS %s (%s), continuity %s, peer %r, node signature %s; "
                     "ours %s", tag, event.sas, event.sas_type, event.continuity,
                     event.peer_client_id,
                     f"{sig.sig_type.decode(errors='replace')!r} {len(sig.sig_bytes)} octets"
                     if sig is not None else "none", leg.signature_sent or "not asked")
            self._forward_ready(call)
        elif isinstance(event, SasSignatureNeeded):
            leg.signature_wanted = event.sashash
            self._sign(call, leg, event.sashash)
        elif isinstance(event, ZrtpFailure):
            log.warning("%s failed: %s", tag, event.reason)
            self.release(call.call_id, f"leg {leg.side} failed")
        elif isinstance(event, MediaTimeout):
            self.release(call.call_id, f"no media on leg {leg.side} for {event.idle:.1f} s")
        elif isinstance(event, StreamInsecure):
            log.warning("%s insecure: %s", tag, event.reason)
        elif isinstance(event, ZrtpWarning):
            if "no SAS signature in time" in event.reason and not leg.signature_sent:
                leg.signature_sent = "timeout"
            log.warning("%s ZRTP warning: %s", tag, event.reason)

    def _sign(self, call: CallLegs, leg: Leg, sashash: bytes) -> None:
        """Answer the ZRTP core's request for a signature over this leg's sashash (7.2)."""
        if self.mode == "strip":  # not reached: without the S flag no node asks
            leg.signature_sent = "unsigned"
            leg.stream.provide_signature(PGP, None)
        elif self.mode == "own":
            self.loop.create_task(self._sign_own(call, leg, sashash))
        else:
            self._forward_ready(call)

    async def _sign_own(self, call: CallLegs, leg: Leg, sashash: bytes) -> None:
        signer = self.signer
        assert signer is not None
        try:
            signature = await asyncio.to_thread(signer.sign, sashash)  # gpg forks and blocks
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            log.warning("call %s leg %s: own signature failed: %s", call.call_id, leg.side, exc)
            leg.signature_sent = "unsigned"
            leg.stream.provide_signature(PGP, None)
            return
        leg.signature_sent = "own"
        log.info("call %s leg %s: signing with own key %s (%d octets)", call.call_id, leg.side,
                 signer.fingerprint, len(signature))
        leg.stream.provide_signature(PGP, signature)

    def _forward_ready(self, call: CallLegs) -> None:
        """``forward``: give each waiting leg the other node's signature block once it is in."""
        if self.mode != "forward" or self.calls.get(call.call_id) is not call:
            return
        call.poller = None
        waiting = False
        for leg in call.legs.values():
            if leg.signature_wanted is None or leg.signature_sent:
                continue
            source = call.other(leg)
            node_sig = source.peer_signature or _node_signature(source.stream)
            if node_sig is None:
                waiting = leg.stream.state in ("new", "securing")
                continue
            source.peer_signature = node_sig
            leg.signature_sent = "forwarded"
            log.info("call %s leg %s: forwarding node %s's signature (%s, %d octets)",
                     call.call_id, leg.side, source.side,
                     node_sig.sig_type.decode(errors="replace"), len(node_sig.sig_bytes))
            leg.stream.provide_signature(node_sig.sig_type, node_sig.sig_bytes)
        if waiting and _both_responders_signing(call):
            # Each leg holds its Confirm1 for the other node's signature, and each node waits
            # for Confirm1: no block will come. Leg B goes unsigned now (not after the timeout),
            # node B answers with a signed Confirm2, and that block goes to node A.
            leg = call.legs["B"]
            leg.signature_sent = "unsigned (both legs responder)"
            log.info("call %s leg B: unsigned, both legs wait as responder", call.call_id)
            leg.stream.provide_signature(PGP, None)
        if waiting:  # the ZRTP core sends unsigned at its signature_timeout; we stop then
            call.poller = self.loop.call_later(_POLL, self._forward_ready, call)


# ---------------------------------------------------------------------------------------------
# Signalling
# ---------------------------------------------------------------------------------------------


class SipRelay(asyncio.DatagramProtocol):
    """Relays SIP datagrams between the two nodes (who sent it is told by its source) and
    rewrites their SDP through `MitmMedia`."""

    def __init__(self, media: MitmMedia, node_a: Addr, node_b: Addr) -> None:
        self.media = media
        self.nodes: dict[Side, Addr] = {"A": node_a, "B": node_b}
        self.transport: asyncio.DatagramTransport | None = None
        self.relayed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def _sender(self, addr: Addr) -> Side | None:
        for side, node in self.nodes.items():
            if (addr[0], addr[1]) == node:
                return side
        for side, node in self.nodes.items():
            if addr[0] == node[0] and self.nodes[_OTHER[side]][0] != node[0]:
                return side
        return None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        sender = self._sender((addr[0], addr[1]))
        if sender is None or self.transport is None:
            log.warning("datagram from %s:%d, neither node: dropped", addr[0], addr[1])
            return
        out = data
        if data.strip():  # CRLF keep-alives (RFC 5626 section 4.4.1) pass as they are
            try:
                out = self._rewrite(data, sender)
            except (SipParseError, SdpError, ValueError, RuntimeError) as exc:
                # Fail closed: an SDP relayed unchanged would take the media around the
                # attacker and make a test of the attack pass or fail for the wrong reason.
                log.error("from %s: dropped, not rewritten (%s: %s)", sender,
                          type(exc).__name__, exc)
                return
        self.transport.sendto(out, self.nodes[_OTHER[sender]])
        self.relayed += 1

    def _rewrite(self, data: bytes, sender: Side) -> bytes:
        message = parse_message(data)
        what = (message.method if isinstance(message, Request)
                else f"{message.status} {message.cseq.method}")
        log.debug("from %s: %s (Call-ID %s)", sender, what, message.call_id)
        if not message.body or message.content_type != "application/sdp":
            return data
        message.body = self.media.rewrite_sdp(message.call_id, sender, message.body)
        return message.to_bytes()  # Content-Length follows the new body


# ---------------------------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------------------------


def _addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _ports(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    return int(first), int(last)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.mitm", description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=_addr, required=True, help="HOST:PORT, the SIP socket")
    p.add_argument("--node-a", type=_addr, required=True, help="node A's public SIP HOST:PORT")
    p.add_argument("--node-b", type=_addr, required=True, help="node B's public SIP HOST:PORT")
    p.add_argument("--media-ports", type=_ports, required=True, help="FIRST-LAST")
    p.add_argument("--mode", choices=MODES, default="strip")
    p.add_argument("--offered-key", choices=KEY_OFFERS, default="relay",
                   help="what becomes of a=freecall-openpgp in the SDP it relays")
    p.add_argument("--gpg-home", type=Path, help="GnuPG home for --mode own")
    p.add_argument("--gpg-key", help="fingerprint of the signing key for --mode own")
    p.add_argument("--signature-timeout", type=float, default=2.0)
    p.add_argument("--rtp-timeout", type=float, default=3.0)
    p.add_argument("--client-id", default="freecall")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> None:
    """Run the attacker until ``stop`` is set (or SIGTERM/SIGINT when run as a process)."""
    loop = asyncio.get_running_loop()
    signer = None
    if args.mode == "own" or args.offered_key == "own":
        if args.gpg_home is None or not args.gpg_key:
            raise SystemExit("'own' needs --gpg-home and --gpg-key")
        signer = GpgSigner(args.gpg_home, args.gpg_key)
    media = MitmMedia(loop, address=args.listen[0], port_range=args.media_ports,
                      mode=args.mode, signer=signer, signature_timeout=args.signature_timeout,
                      rtp_timeout=args.rtp_timeout, client_id=args.client_id,
                      offered_key=args.offered_key)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: SipRelay(media, args.node_a, args.node_b), local_addr=args.listen)
    if stop is None:
        stop = asyncio.Event()
        for sig in (2, 15):  # SIGINT, SIGTERM
            loop.add_signal_handler(sig, stop.set)
    log.info("mitm listening on %s:%d, A=%s:%d B=%s:%d, media %d-%d, mode %s, offered key %s",
             *args.listen, *args.node_a, *args.node_b, *args.media_ports, args.mode,
             args.offered_key)
    try:
        await stop.wait()
    finally:
        transport.close()
        media.close()
        await asyncio.sleep(0)  # let the loop close the sockets
        log.info("mitm stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    asyncio.run(serve(args))
    return 0


# ---------------------------------------------------------------------------------------------
# The harness side
# ---------------------------------------------------------------------------------------------

_TESTS_DIR: Final = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LegResult:
    """One ``leg X secure`` line of the attacker's log."""

    call_id: str
    side: Side
    sas: str
    sas_type: str


class Mitm:
    """The attacker process of one test (`python -m harness.mitm`), stopped with the harness.

    Build it after the two daemons (``start=False``) and before starting them: its ports are
    known at construction, so ``route_uri`` can go into both nodes' ``routes`` (see
    `point_routes`). ``harness`` is the test's `harness.Harness`.
    """

    def __init__(
        self,
        harness: Any,
        a: FreecallDaemon,
        b: FreecallDaemon,
        *,
        mode: Mode = "strip",
        host: str = "127.0.0.9",
        gpg_home: Path | None = None,
        gpg_key: str | None = None,
        signature_timeout: float = 2.0,
        rtp_timeout: float = 3.0,
        offered_key: KeyOffer = "relay",
        name: str = "mitm",
    ) -> None:
        if mode not in MODES or offered_key not in KEY_OFFERS:
            raise ValueError(f"mode must be one of {MODES}, offered_key one of {KEY_OFFERS}")
        if (mode == "own" or offered_key == "own") and (gpg_home is None or not gpg_key):
            raise ValueError("'own' needs gpg_home and gpg_key")
        self.harness = harness
        self.a, self.b = a, b
        self.mode: Mode = mode
        self.host = host
        self.name = name
        self.sip_port = harness.pool.port()
        # 16 port pairs: 8 streams, 4 calls at once (an ended call's legs go at rtp_timeout)
        self.media_ports = harness.pool.block().take_range(32, align=2)
        self.argv = [
            sys.executable, "-m", "harness.mitm",
            "--listen", f"{host}:{self.sip_port}",
            "--node-a", f"{a.public_host}:{a.public_port}",
            "--node-b", f"{b.public_host}:{b.public_port}",
            "--media-ports", f"{self.media_ports[0]}-{self.media_ports[1]}",
            "--mode", mode,
            "--offered-key", offered_key,
            "--signature-timeout", f"{signature_timeout:g}",
            "--rtp-timeout", f"{rtp_timeout:g}",
        ]
        if gpg_home is not None and gpg_key:
            self.argv += ["--gpg-home", str(gpg_home), "--gpg-key", gpg_key]
        self.process: ManagedProcess | None = None

    @property
    def route_uri(self) -> str:
        """What both nodes' ``routes`` must name for the other's domain."""
        return f"sip:{self.host}:{self.sip_port}"

    def point_routes(self, a_domain: str, b_domain: str) -> None:
        """Node A reaches ``b_domain`` and node B reaches ``a_domain`` through the attacker."""
        self.a.extra_config.setdefault("routes", {})[b_domain] = self.route_uri
        self.b.extra_config.setdefault("routes", {})[a_domain] = self.route_uri

    def start(self, timeout: float = 10.0) -> Mitm:
        path = os.pathsep.join(p for p in (str(_TESTS_DIR), os.environ.get("PYTHONPATH")) if p)
        self.process = self.harness.process(self.name, self.argv,
                                            env={**os.environ, "PYTHONPATH": path})
        wait_port(self.sip_port, "udp", timeout, self.process)
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        return self.process.stop(timeout) if self.process is not None else None

    def log_text(self) -> str:
        return self.process.log_text() if self.process is not None else ""

    def legs(self) -> list[LegResult]:
        return [LegResult(m.group(1), cast(Side, m.group(2)), m.group(3), m.group(4))
                for m in re.finditer(LEG_SECURE, self.log_text())]

    def wait_legs(self, count: int, timeout: float = 10.0) -> list[LegResult]:
        """Wait until ``count`` legs in all were secure; all of them, oldest first."""
        return wait_until(lambda: (legs := self.legs()) and len(legs) >= count and legs,
                          timeout, message=f"{count} secure legs in the {self.name} log")


# ---------------------------------------------------------------------------------------------
# Two nodes with the attacker between them, and one call through it
# ---------------------------------------------------------------------------------------------

USERS_A: Final = {"alice": "alice-pw"}
USERS_B: Final = {"bob": "bob-pw"}
SECURE: Final = r"call (\w+): media secure, SAS (\w+) \((B32|B256)\)"


@dataclass
class MitmNodes:
    """Node A (127.0.0.2, a.test, alice), node B (127.0.0.3, b.test, bob), the attacker."""

    a: FreecallDaemon
    b: FreecallDaemon
    mitm: Mitm
    run_dir: Path


def start_mitm_nodes(
    harness: Any,
    mode: Mode = "strip",
    *,
    config_a: dict[str, Any] | None = None,
    config_b: dict[str, Any] | None = None,
    **mitm_options: Any,
) -> MitmNodes:
    """Both daemons routed to each other through a started `Mitm` (``mitm_options``: gpg_home,
    gpg_key, offered_key, signature_timeout, rtp_timeout, host). ``config_a``/``config_b`` go
    into the daemons' configuration (keys, policy)."""
    a = harness.daemon("a", users=USERS_A, domains=["a.test"], public_host="127.0.0.2",
                       start=False, config=config_a)
    b = harness.daemon("b", users=USERS_B, domains=["b.test"], public_host="127.0.0.3",
                       start=False, config=config_b)
    mitm = Mitm(harness, a, b, mode=mode, **mitm_options)
    mitm.point_routes("a.test", "b.test")
    mitm.start()
    for node in (a, b):
        node.extra_config.setdefault("dns", {"servers": ["127.0.0.1:9"], "timeout": "1s"})
        harness.started.append(node)
        node.start()
    return MitmNodes(a, b, mitm, harness.run_dir)


def secure_lines(node: FreecallDaemon) -> list[tuple[str, str]]:
    """(call, SAS) of each ``media secure`` line of a daemon's log."""
    return [(m.group(1), m.group(2)) for m in re.finditer(SECURE, node.log_text())]


@dataclass
class AttackResult:
    """One call through the attacker: the SAS each node showed and each attacker leg had."""

    sas_a: str
    sas_b: str
    leg_a: LegResult
    leg_b: LegResult
    seconds: float  # dial to both phones closed
    logs: dict[str, str] = field(repr=False, default_factory=dict)  # a, b, mitm: this call's part


def heard(ua: Baresip, hz: float, *, min_active_s: float, timeout: float = 2.0) -> None:
    """`assert_tone` on the last call's WAV, once sndfile has finished writing it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert_tone(ua.last_decoded_wav(), hz, min_active_s=min_active_s)
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def attack_call(
    nodes: MitmNodes,
    alice: Baresip,
    bob: Baresip,
    *,
    talk: float = 1.0,
    alice_hears: int | None = 880,
    bob_hears: int | None = 440,
    hang_up: bool = True,
    timeout: float = 15.0,
) -> AttackResult:
    """alice (node A) calls bob (node B) through the attacker; both secure; ``talk`` seconds of
    tone after both nodes reported secure, then alice hangs up (``hang_up=False``: a node is
    expected to end the call, within ``timeout``). The phones stay registered for the next
    call. Tones are checked when given (None for a call that a node ends at once)."""
    cursors = {"a": len(nodes.a.log_text()), "b": len(nodes.b.log_text()),
               "mitm": len(nodes.mitm.log_text())}
    before_a, before_b = len(secure_lines(nodes.a)), len(secure_lines(nodes.b))
    legs_before = len(nodes.mitm.legs())
    stats_before = len(alice.rtp_stats()), len(bob.rtp_stats())
    start = time.monotonic()
    alice.mark()
    bob.mark()
    alice.dial("sip:bob@b.test")
    alice.wait_event("CALL_ESTABLISHED", timeout)
    bob.wait_event("CALL_ESTABLISHED", 5)
    wait_until(lambda: len(secure_lines(nodes.a)) > before_a
               and len(secure_lines(nodes.b)) > before_b, timeout,
               message="both nodes to report the call secure")
    legs = nodes.mitm.wait_legs(legs_before + 2, 5)[legs_before:]
    if hang_up:
        time.sleep(talk)
        alice.hangup()
    alice.wait_event("CALL_CLOSED", 5 if hang_up else timeout)
    bob.wait_event("CALL_CLOSED", 5)
    seconds = time.monotonic() - start
    # baresip prints its stats after the call's WAV dumps are closed: wait for them before
    # reading a WAV (right at CALL_CLOSED it may still be empty)
    for ua, before in zip((alice, bob), stats_before, strict=True):
        ua.wait_rtp_stats(before + 1)
    for ua, hz in ((alice, alice_hears), (bob, bob_hears)):
        if hz is not None:
            heard(ua, hz, min_active_s=talk / 2)
    by_side = {leg.side: leg for leg in legs}
    assert set(by_side) == {"A", "B"}, f"legs of more than one call: {legs}"
    return AttackResult(
        sas_a=secure_lines(nodes.a)[before_a][1],
        sas_b=secure_lines(nodes.b)[before_b][1],
        leg_a=by_side["A"],
        leg_b=by_side["B"],
        seconds=seconds,
        logs={"a": nodes.a.log_text()[cursors["a"]:], "b": nodes.b.log_text()[cursors["b"]:],
              "mitm": nodes.mitm.log_text()[cursors["mitm"]:]},
    )


__all__ = [
    "KEY_OFFERS",
    "LEG_SECURE",
    "MODES",
    "OPENPGP_ATTRIBUTE",
    "AttackResult",
    "CallLegs",
    "GpgSigner",
    "KeyOffer",
    "Leg",
    "LegResult",
    "Mitm",
    "MitmMedia",
    "MitmNodes",
    "Mode",
    "SipRelay",
    "attack_call",
    "heard",
    "main",
    "make_gpg_key",
    "secure_lines",
    "serve",
    "start_mitm_nodes",
    "stop_gpg_agent",
]

if __name__ == "__main__":
    sys.exit(main())
