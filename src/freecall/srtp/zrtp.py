"""The ZRTP protocol engine (RFC 6189), sans-I/O in the style of aioquic.

One `ZrtpSession` per media stream. Bytes and ``now`` go in (`receive`, `handle_timer`);
datagrams to send, events and the next deadline come out (`datagrams_to_send`, `next_event`,
`get_timer`). The constructor needs no clock; randomness is an injected ``urandom``. Both
sides run the same code: whoever sends the winning Commit becomes the initiator (section 4.2).

Flow (DH mode, section 4.1-4.6): Hello/HelloACK both ways, Commit (hash commitment hvi),
DHPart1, DHPart2, Confirm1, Confirm2, Conf2ACK. Multistream mode (section 4.4.3) skips the
DHParts and keys a further stream from the first stream's ZRTPSess. Preshared mode is not
offered; a Preshared Commit is answered with a DH Commit as section 4.4.2 suggests.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from freecall.srtp.keys import CachedSecrets, SecretCache
from freecall.srtp.sas import render_sas, sas_value
from freecall.srtp.zrtp_crypto import (
    AUTH_TAGS,
    CIPHER_KEY_BITS,
    HASHES,
    KEY_AGREEMENTS,
    MANDATORY,
    SAS_TYPES,
    DhError,
    HashAlgorithm,
    HashChain,
    KeyAgreement,
    cfb_decrypt,
    cfb_encrypt,
    choose_first,
    choose_key_agreement,
    ct_equal,
    implicit_hash,
    implicit_mac,
    kdf,
)
from freecall.srtp.zrtp_messages import (
    KA_MULTISTREAM,
    KA_PRESHARED,
    MAC_LEN,
    MAX_SIG_WORDS,
    PROTOCOL_VERSION,
    ClearAck,
    Commit,
    Conf2Ack,
    Confirm,
    ConfirmPlain,
    DHPart,
    Error,
    ErrorAck,
    ErrorCode,
    GoClear,
    Hello,
    HelloAck,
    Message,
    Ping,
    PingAck,
    RelayAck,
    SasRelay,
    SasRelayPlain,
    ZrtpError,
    decode_message,
    decode_packet,
    encode_packet,
    trim_openpgp_signature,
)

Urandom = Callable[[int], bytes]

SRTP_PROFILES = {b"HS80": "AES_CM_128_HMAC_SHA1_80", b"HS32": "AES_CM_128_HMAC_SHA1_32"}
CACHE_FOREVER = 0xFFFFFFFF


def _block(name: str) -> bytes:
    raw = name.encode("ascii")
    if not 1 <= len(raw) <= 4:
        raise ValueError(f"algorithm name {name!r} must be 1-4 ASCII characters")
    return raw.ljust(4)


def _name(block: bytes) -> str:
    return block.decode("ascii", "replace").rstrip()


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZrtpConfig:
    """Role-neutral settings of one endpoint. Timers default to section 6's values."""

    client_id: str = "freecall"
    hash_types: tuple[str, ...] = ("S256",)
    cipher_types: tuple[str, ...] = ("AES1",)
    auth_tag_types: tuple[str, ...] = ("HS80", "HS32")
    key_agreement_types: tuple[str, ...] = ("X255", "EC25", "DH3k")
    sas_types: tuple[str, ...] = ("B32", "B256")
    signature_capable: bool = False  # Hello S flag: we can parse and check SAS signatures
    sign_sas: bool = False  # ask the caller for a signature of sashash (section 7.2)
    signature_timeout: float = 2.0  # bounded wait for provide_signature
    passive: bool = False  # Hello P flag: never send Commit
    cache_expiration: int = CACHE_FOREVER  # seconds; 0 = cacheless (section 4.9.1)
    t1: float = 0.05
    t1_cap: float = 0.2
    hello_retries: int = 20
    hello_extended_span: float = 12.0  # keep sending Hello this long once a peer is known
    t2: float = 0.15
    t2_cap: float = 1.2
    t2_retries: int = 10
    responder_timeout: float = 10.0

    def __post_init__(self) -> None:
        checks = (
            (self.hash_types, HASHES, "hash"),
            (self.cipher_types, CIPHER_KEY_BITS, "cipher"),
            (self.auth_tag_types, AUTH_TAGS, "auth tag"),
            (self.key_agreement_types, KEY_AGREEMENTS, "key agreement"),
            (self.sas_types, SAS_TYPES, "SAS"),
        )
        for names, known, kind in checks:
            for name in names:
                if _block(name) not in known:
                    raise ValueError(f"unsupported {kind} type {name!r}")
            if len(set(names)) != len(names) or len(names) > 7:
                raise ValueError(f"{kind} list must hold at most 7 distinct entries")
        if not 0 <= self.cache_expiration <= CACHE_FOREVER:
            raise ValueError("cache_expiration must fit in 32 bits")

    def blocks(self, kind: str) -> tuple[bytes, ...]:
        """Our preference list as type blocks, mandatory algorithms appended (section 5.2)."""
        names = {
            "hash": self.hash_types,
            "cipher": self.cipher_types,
            "auth": self.auth_tag_types,
            "key_agreement": self.key_agreement_types,
            "sas": self.sas_types,
        }[kind]
        result = [_block(n) for n in names]
        for algo in MANDATORY[kind]:
            if algo not in result:
                result.append(algo)
        return tuple(result[:7])


# ---------------------------------------------------------------------------------------------
# Results and events
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SrtpMasterKey:
    """An SRTP master key and salt for one direction (section 4.5.3); repr hides both."""

    key: bytes = field(repr=False)
    salt: bytes = field(repr=False)

    @property
    def key_and_salt(self) -> bytes:
        """Key followed by salt, as libsrtp policies take them."""
        return self.key + self.salt


@dataclass(frozen=True)
class SessionKeys:
    """SRTP keys of this stream from our point of view: we send with outbound."""

    outbound: SrtpMasterKey
    inbound: SrtpMasterKey
    cipher: str
    auth_tag: str
    srtp_profile: str


@dataclass(eq=False)
class MultistreamContext:
    """What a further stream of the same call needs (section 4.4.3): ZRTPSess and choices.

    Shared by the sessions of one call; tracks used nonces (Error 0x80 on reuse).
    """

    zrtp_sess: bytes = field(repr=False)
    zid: bytes
    peer_zid: bytes
    hash_type: bytes
    cipher_type: bytes
    auth_tag_type: bytes
    sas: str | None
    sas_type: bytes
    sashash: bytes = field(repr=False)
    continuity: str
    sas_verified: bool = False
    used_nonces: set[bytes] = field(default_factory=set, repr=False)


@dataclass(frozen=True)
class HelloReceived:
    """The peer's Hello was accepted (section 5.2)."""

    peer_zid: bytes
    client_id: str
    version: str
    peer_hello_hash: str
    signature_capable: bool
    mitm: bool
    passive: bool


@dataclass(frozen=True)
class SasSignatureNeeded:
    """Sign sashash (section 7.2) and call `ZrtpSession.provide_signature`; Confirm waits."""

    sashash: bytes = field(repr=False)


@dataclass(frozen=True)
class PeerSignature:
    """The signature block from the peer's Confirm (section 7.2); verify it outside (GnuPG).

    For "PGP " the zero padding to a word boundary is removed when the packet parses.
    """

    sig_type: bytes
    sig_bytes: bytes
    sashash: bytes = field(repr=False)


@dataclass(frozen=True)
class SecurityWarning:
    """A security exception that did not end the session (dropped packet, refused request)."""

    reason: str


@dataclass(frozen=True)
class ProtocolError:
    """An Error message (section 5.9) that we sent (``local``) or received."""

    code: int
    local: bool

    @property
    def description(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return f"unknown error 0x{self.code:x}"


@dataclass(frozen=True)
class Failed:
    """The exchange ended without keys; the stream is not secure."""

    reason: str


@dataclass(frozen=True)
class SecureStateReached:
    """Keys agreed and confirmed (section 4.6): SRTP may flow in both directions.

    ``continuity`` is "match" (a retained secret matched), "new" (no unexpired secret cached
    for this peer) or "mismatch" (we had one and the peer did not: warn the user, section
    4.3.2). ``sas_verified`` is true only if both sides sent the V flag.
    """

    role: str
    sas: str | None
    sas_type: str
    sas_value: int
    sashash: bytes = field(repr=False)
    keys: SessionKeys = field(repr=False)
    hash: str = "S256"
    key_agreement: str = ""
    peer_zid: bytes = b""
    continuity: str = "new"
    sas_verified: bool = False
    local_sas_verified: bool = False
    peer_sas_verified: bool = False
    peer_disclosure: bool = False
    peer_pbx_enrollment: bool = False
    peer_allow_clear: bool = False
    peer_hello_hash: str = ""
    hello_hash_verified: bool = False
    cache_update_deferred: bool = False
    multistream: bool = False
    multistream_context: MultistreamContext | None = field(default=None, repr=False)
    exported_key: bytes | None = field(default=None, repr=False)

    @property
    def cipher(self) -> str:
        return self.keys.cipher

    @property
    def auth_tag(self) -> str:
        return self.keys.auth_tag


ZrtpEvent = (
    HelloReceived
    | SasSignatureNeeded
    | PeerSignature
    | SecurityWarning
    | ProtocolError
    | Failed
    | SecureStateReached
)


class State(Enum):
    """Where the session is in sections 4.1-4.6."""

    IDLE = "idle"
    DISCOVERY = "discovery"
    COMMIT_SENT = "commit-sent"  # initiator, waiting for DHPart1 (or Confirm1, Multistream)
    DHPART2_SENT = "dhpart2-sent"  # initiator, waiting for Confirm1
    INITIATOR_SIGNING = "initiator-signing"  # Confirm1 in, Confirm2 waits for the signature
    CONFIRM2_SENT = "confirm2-sent"  # initiator, waiting for Conf2ACK
    DHPART1_SENT = "dhpart1-sent"  # responder, waiting for DHPart2
    RESPONDER_SIGNING = "responder-signing"  # responder, Confirm1 waits for the signature
    CONFIRM1_SENT = "confirm1-sent"  # responder, waiting for Confirm2
    SECURE = "secure"
    FAILED = "failed"
    CLOSED = "closed"


class _Fatal(Exception):
    """Internal: end the exchange, optionally sending an Error with ``code``."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass
class _Retransmit:
    """One message on a section 6 schedule: interval doubles up to a cap, limited count."""

    message: bytes = field(repr=False)
    next_at: float
    interval: float
    cap: float
    retries_left: int
    started: float
    kind: str


@dataclass(frozen=True)
class _Keys:
    srtpkeyi: bytes
    srtpsalti: bytes
    srtpkeyr: bytes
    srtpsaltr: bytes
    mackeyi: bytes
    mackeyr: bytes
    zrtpkeyi: bytes
    zrtpkeyr: bytes

    def __repr__(self) -> str:
        return "_Keys(<hidden>)"


def _with_mac(encoded: bytes, key: bytes) -> bytes:
    """Replace the trailing 64-bit MAC of an encoded message by the implicit MAC (8.1.1)."""
    body = encoded[:-MAC_LEN]
    return body + implicit_mac(key, body)


def _mac_ok(raw: bytes, key: bytes) -> bool:
    return ct_equal(implicit_mac(key, raw[:-MAC_LEN]), raw[-MAC_LEN:])


def _len_prefixed(value: bytes | None) -> bytes:
    data = value or b""
    return len(data).to_bytes(4, "big") + data


# ---------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------


class ZrtpSession:
    """The ZRTP state machine for one media stream; see the module docstring."""

    def __init__(
        self,
        config: ZrtpConfig,
        zid: bytes,
        cache: SecretCache,
        *,
        ssrc: int,
        urandom: Urandom = os.urandom,
        expected_peer_hello_hash: str | bytes | None = None,
        multistream: MultistreamContext | None = None,
        offer_multistream: bool = False,
        aux_secret: bytes | None = None,
    ) -> None:
        if len(zid) != 12:
            raise ValueError("ZID must be 12 octets")
        if multistream is not None and multistream.zid != zid:
            raise ValueError("a Multistream session must use the first stream's ZID")
        self.config = config
        self._zid = bytes(zid)
        self._cache = cache
        self._ssrc = ssrc & 0xFFFFFFFF
        self._urandom = urandom
        self._ms = multistream
        self._aux = aux_secret
        self._expected_hello_hash = _parse_hash(expected_peer_hello_hash)
        self._chain = HashChain.generate(urandom)
        self._seq = int.from_bytes(urandom(2), "big")
        self._outbox: list[bytes] = []
        self._events: deque[ZrtpEvent] = deque()
        self.state = State.IDLE
        self.role: str | None = None
        self._our_lists = {
            kind: config.blocks(kind) for kind in ("hash", "cipher", "auth", "key_agreement", "sas")
        }
        if multistream is not None or offer_multistream:
            # A further stream lists Mult; the first stream's context may come later
            # (`attach_multistream`), since the Hello, and so a=zrtp-hash, is fixed now.
            self._our_lists["key_agreement"] = (
                *self._our_lists["key_agreement"][:6],
                KA_MULTISTREAM,
            )
        hello = Hello(
            version=PROTOCOL_VERSION,
            client_id=config.client_id.encode("ascii", "replace")[:16].ljust(16),
            h3=self._chain.h3,
            zid=self._zid,
            signature_capable=config.signature_capable,
            passive=config.passive,
            hash_types=self._our_lists["hash"],
            cipher_types=self._our_lists["cipher"],
            auth_tag_types=self._our_lists["auth"],
            key_agreement_types=self._our_lists["key_agreement"],
            sas_types=self._our_lists["sas"],
        )
        self._hello_raw = _with_mac(hello.encode(), self._chain.h2)
        # Peer and exchange state.
        self._peer_hello: Hello | None = None
        self._peer_hello_raw = b""
        self._hello_hash_verified = False
        self._hello_acked = False
        self._cached = CachedSecrets()
        self._hash: HashAlgorithm = HASHES[b"S256"]
        self._commit: Commit | None = None  # the Commit in force (ours or the peer's)
        self._commit_raw = b""
        self._our_commit_raw = b""
        self._ka: KeyAgreement | None = None
        self._dhpart_own_raw = b""  # DHPart2 (initiator) or DHPart1 (responder)
        self._dhpart_peer: DHPart | None = None
        self._dhpart_peer_raw = b""
        self._keys: _Keys | None = None
        self._kdf_context = b""
        self._s1_state = "new"
        self._new_rs1: bytes | None = None
        self._sashash: bytes | None = None
        self._zrtp_sess: bytes | None = None
        self._exported: bytes | None = None
        self._confirm_own_raw = b""
        self._confirm_peer_raw = b""
        self._peer_plain: ConfirmPlain | None = None
        self._local_v = False
        self._signature_wanted = False
        self._signature_done = False
        self._signature: tuple[bytes, bytes] | None = None
        self._signature_deadline: float | None = None
        self._inactivity_deadline: float | None = None
        self._discovery_deadline: float | None = None
        self._rtx: _Retransmit | None = None
        self._error_rtx: _Retransmit | None = None
        self._deferred_rs1: bytes | None = None
        self._result: SecureStateReached | None = None

    def __repr__(self) -> str:
        return f"ZrtpSession(state={self.state.value}, role={self.role})"

    # -- public API -----------------------------------------------------------------------------

    @property
    def local_hello_hash(self) -> str:
        """Hex SHA-256 of our Hello for ``a=zrtp-hash:1.10 <hash>`` (section 8.1)."""
        return hashlib.sha256(self._hello_raw).hexdigest()

    @property
    def zrtp_hash_attribute(self) -> str:
        """The value of our SDP ``a=zrtp-hash`` attribute."""
        return f"{PROTOCOL_VERSION.decode()} {self.local_hello_hash}"

    @property
    def is_secure(self) -> bool:
        return self.state is State.SECURE

    @property
    def result(self) -> SecureStateReached | None:
        """The outcome once secure (same object as the event)."""
        return self._result

    @property
    def keys(self) -> SessionKeys | None:
        """SRTP keys as soon as derived: lets an initiator check the responder's first SRTP
        packet before Conf2ACK and then call `srtp_media_received` (section 4.6)."""
        if self._keys is None or self._commit is None:
            return None
        return self._session_keys()

    def attach_multistream(self, context: MultistreamContext) -> None:
        """Key this stream from the call's first stream (section 4.4.3); call before `start`.

        Build every stream's session up front (each Hello hash goes into the SDP), start the
        first, and when it is secure attach its `SecureStateReached.multistream_context` to
        the others and start them: only one DH exchange runs at a time (section 4.4.1).
        """
        if context.zid != self._zid:
            raise ValueError("a Multistream session must use the first stream's ZID")
        if KA_MULTISTREAM not in self._our_lists["key_agreement"]:
            raise ValueError("create the session with offer_multistream=True")
        if self.state is not State.IDLE and self.state is not State.DISCOVERY:
            raise RuntimeError("too late to switch this stream to Multistream mode")
        if self._peer_hello is not None and self._peer_hello.zid != context.peer_zid:
            raise ValueError("this stream's peer is not the first stream's peer")
        self._ms = context

    def set_expected_peer_hello_hash(self, value: str | bytes, now: float) -> None:
        """The peer's a=zrtp-hash arrived by signalling (section 8.1): bind its Hello to it."""
        self._expected_hello_hash = _parse_hash(value)
        if self._peer_hello is not None and self.state not in (State.FAILED, State.CLOSED):
            if ct_equal(implicit_hash(self._peer_hello_raw), self._expected_hello_hash or b""):
                self._hello_hash_verified = True
            else:
                self._events.append(SecurityWarning("peer Hello does not match a=zrtp-hash"))
                self._fail("peer Hello does not match a=zrtp-hash", None, now)

    def start(self, now: float) -> None:
        """Send the first Hello and start T1 (section 6)."""
        if self.state is not State.IDLE:
            return
        self.state = State.DISCOVERY
        # HelloACK stops our Hellos (section 6); if no usable peer Hello follows (say it
        # fails a=zrtp-hash) this bounds the wait instead of idling forever.
        self._discovery_deadline = now + self.config.hello_extended_span + self.config.t1_cap
        self._send(self._hello_raw)
        self._rtx = _Retransmit(
            message=self._hello_raw,
            next_at=now + self.config.t1,
            interval=self.config.t1,
            cap=self.config.t1_cap,
            retries_left=self.config.hello_retries,
            started=now,
            kind="hello",
        )

    def receive(self, data: bytes, now: float) -> None:
        """Handle one datagram from the media port that `is_zrtp_packet` accepted."""
        if self.state is State.CLOSED:
            return
        if self.state is State.IDLE:
            self.start(now)
        try:
            packet = decode_packet(data)
        except ZrtpError:
            return  # section 5: bad CRC (or not ZRTP) is silently discarded
        try:
            message = decode_message(packet.message)
        except ZrtpError as exc:
            self._events.append(SecurityWarning(f"malformed ZRTP message dropped: {exc}"))
            return
        try:
            self._dispatch(message, packet.message, packet.ssrc, now)
        except _Fatal as fatal:
            self._fail(fatal.reason, fatal.code, now)

    def handle_timer(self, now: float) -> None:
        """Run every deadline that is due: retransmissions, signature wait, timeouts."""
        try:
            self._handle_timer(now)
        except _Fatal as fatal:
            self._fail(fatal.reason, fatal.code, now)

    def get_timer(self) -> float | None:
        """The earliest pending deadline (absolute, same clock as ``now``), or None."""
        deadlines = [
            t
            for t in (
                self._rtx.next_at if self._rtx else None,
                self._error_rtx.next_at if self._error_rtx else None,
                self._signature_deadline,
                self._inactivity_deadline,
                self._discovery_deadline if self.state is State.DISCOVERY else None,
            )
            if t is not None
        ]
        return min(deadlines) if deadlines else None

    def datagrams_to_send(self) -> list[bytes]:
        """ZRTP packets to put on the wire, oldest first; the list is handed over."""
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> ZrtpEvent | None:
        """The next event, or None when there is none."""
        return self._events.popleft() if self._events else None

    def provide_signature(self, sig_type: bytes, data: bytes | None, now: float) -> None:
        """Answer `SasSignatureNeeded`: a signature of sashash (``None`` = send unsigned).

        ``sig_type`` is the 4-octet Signature Type Block, b"PGP " or b"X509" (section 5.1.7).
        """
        if not self._signature_wanted or self._signature_done:
            return
        if data is not None:
            if len(sig_type) != 4:
                raise ValueError("signature type must be 4 octets")
            if 1 + (len(data) + 3) // 4 > MAX_SIG_WORDS:
                raise ValueError("signature longer than 2040 octets (section 7.2.1)")
            self._signature = (bytes(sig_type), bytes(data))
        self._signature_done = True
        self._signature_deadline = None
        try:
            self._release_confirm(now)
        except _Fatal as fatal:
            self._fail(fatal.reason, fatal.code, now)

    def srtp_media_received(self, now: float) -> None:
        """An SRTP packet from the responder authenticated: it stands for Conf2ACK (4.6)."""
        if self.state is State.CONFIRM2_SENT:
            self._complete_initiator(now)

    def mark_sas_verified(self, verified: bool = True) -> None:
        """The user compared the SAS (section 7.1): persist V and any delayed cache update."""
        if self.state is not State.SECURE or self._result is None:
            raise RuntimeError("the SAS can only be confirmed once the stream is secure")
        peer = self._result.peer_zid
        if verified and self._deferred_rs1 is not None:
            self._apply_cache_update(self._deferred_rs1)
            self._deferred_rs1 = None
        self._cache.set_verified(peer, verified)

    def peer_signature_verified(self) -> None:
        """The peer's SAS signature checked out: evidence that lifts a delayed cache update
        after a cache mismatch (section 4.6.1.1)."""
        if self.state is State.SECURE and self._deferred_rs1 is not None:
            self._apply_cache_update(self._deferred_rs1)
            self._deferred_rs1 = None

    def close(self) -> None:
        """End of the call for this stream: drop all key material (section 4.7.3)."""
        self.state = State.CLOSED
        self._keys = None
        self._ka = None
        self._zrtp_sess = None
        self._exported = None
        self._new_rs1 = None
        self._deferred_rs1 = None
        self._rtx = None
        self._error_rtx = None
        self._signature_deadline = None
        self._inactivity_deadline = None
        self._discovery_deadline = None

    # -- sending --------------------------------------------------------------------------------

    def _send(self, message: bytes) -> None:
        """Frame and queue; every packet, retransmissions too, gets the next sequence number."""
        self._outbox.append(encode_packet(message, self._seq, self._ssrc))
        self._seq = (self._seq + 1) & 0xFFFF

    def _start_t2(self, message: bytes, now: float, kind: str) -> None:
        self._send(message)
        self._rtx = _Retransmit(
            message=message,
            next_at=now + self.config.t2,
            interval=self.config.t2,
            cap=self.config.t2_cap,
            retries_left=self.config.t2_retries,
            started=now,
            kind=kind,
        )

    def _send_error(self, code: int, now: float) -> None:
        """Error (section 5.9), retransmitted on T2 until ErrorACK (section 6)."""
        message = Error(code).encode()
        self._send(message)
        self._error_rtx = _Retransmit(
            message=message,
            next_at=now + self.config.t2,
            interval=self.config.t2,
            cap=self.config.t2_cap,
            retries_left=self.config.t2_retries,
            started=now,
            kind="error",
        )
        self._events.append(ProtocolError(code, local=True))

    def _fail(self, reason: str, code: int | None, now: float) -> None:
        if self.state in (State.FAILED, State.CLOSED):
            return
        if code is not None:
            self._send_error(code, now)
        self.state = State.FAILED
        self._rtx = None
        self._signature_deadline = None
        self._inactivity_deadline = None
        self._discovery_deadline = None
        self._keys = None
        self._ka = None
        self._events.append(Failed(reason))

    # -- timers ---------------------------------------------------------------------------------

    def _handle_timer(self, now: float) -> None:
        rtx = self._rtx
        if rtx is not None and now >= rtx.next_at:
            if rtx.retries_left > 0 or self._hello_extended(rtx, now):
                rtx.retries_left -= 1
                self._send(rtx.message)
                rtx.interval = min(rtx.interval * 2, rtx.cap)
                rtx.next_at = now + rtx.interval
            else:
                self._rtx = None
                self._retransmissions_exhausted(rtx, now)
        err = self._error_rtx
        if err is not None and now >= err.next_at:
            if err.retries_left > 0:
                err.retries_left -= 1
                self._send(err.message)
                err.interval = min(err.interval * 2, err.cap)
                err.next_at = now + err.interval
            else:
                self._error_rtx = None
        if self._signature_deadline is not None and now >= self._signature_deadline:
            self._signature_deadline = None
            self._events.append(SecurityWarning("no SAS signature in time; sending unsigned"))
            self._signature_done = True
            self._release_confirm(now)
        if (
            self.state is State.DISCOVERY
            and self._discovery_deadline is not None
            and now >= self._discovery_deadline
        ):
            raise _Fatal("timeout: no usable Hello from the peer", None)
        if self._inactivity_deadline is not None and now >= self._inactivity_deadline:
            self._inactivity_deadline = None
            raise _Fatal(
                "responder timeout: no ZRTP message from the initiator", ErrorCode.PROTOCOL_TIMEOUT
            )

    def _hello_extended(self, rtx: _Retransmit, now: float) -> bool:
        """Section 6: with evidence of a ZRTP peer, keep sending Hello for 12 s or more."""
        evidence = self._peer_hello is not None or self._expected_hello_hash is not None
        return (
            rtx.kind == "hello" and evidence and now - rtx.started < self.config.hello_extended_span
        )

    def _retransmissions_exhausted(self, rtx: _Retransmit, now: float) -> None:
        if rtx.kind == "hello":
            reason = "no ZRTP peer answered" if self._peer_hello is None else "Hello not acked"
            raise _Fatal(f"timeout: {reason}", None)
        raise _Fatal(f"timeout waiting for the answer to {rtx.kind}", ErrorCode.PROTOCOL_TIMEOUT)

    # -- dispatch -------------------------------------------------------------------------------

    def _dispatch(self, msg: Message, raw: bytes, ssrc: int, now: float) -> None:
        if isinstance(msg, Ping):
            self._send(PingAck(PROTOCOL_VERSION, self._zid[:8], msg.endpoint_hash, ssrc).encode())
            return
        if isinstance(msg, ErrorAck):
            self._error_rtx = None
            return
        if isinstance(msg, Error):
            self._on_error(msg, now)
            return
        if isinstance(msg, PingAck | ClearAck | RelayAck):
            return
        if self.state in (State.FAILED, State.CLOSED):
            return
        if self._inactivity_deadline is not None:
            self._inactivity_deadline = now + self.config.responder_timeout
        if isinstance(msg, GoClear):
            self._on_goclear(msg, now)
        elif isinstance(msg, SasRelay):
            self._on_sasrelay(msg)
        elif isinstance(msg, Hello):
            self._on_hello(msg, raw, ssrc, now)
        elif isinstance(msg, HelloAck):
            self._on_hello_ack(now)
        elif isinstance(msg, Commit):
            self._on_commit(msg, raw, now)
        elif isinstance(msg, DHPart):
            if msg.part == 1:
                self._on_dhpart1(msg, raw, now)
            else:
                self._on_dhpart2(msg, raw, now)
        elif isinstance(msg, Confirm):
            if msg.part == 1:
                self._on_confirm1(msg, raw, now)
            else:
                self._on_confirm2(msg, raw, now)
        elif isinstance(msg, Conf2Ack) and self.state is State.CONFIRM2_SENT:
            self._complete_initiator(now)

    def _on_error(self, msg: Error, now: float) -> None:
        """Section 4.7.1: an Error ends an exchange in progress; always answer ErrorACK."""
        self._send(ErrorAck().encode())
        if self.state in (State.FAILED, State.CLOSED):
            return
        if self.state is State.SECURE:
            # Unauthenticated; once keys are confirmed it must not tear the stream down.
            self._events.append(SecurityWarning(f"Error 0x{msg.code:x} after secure state ignored"))
            return
        self._events.append(ProtocolError(msg.code, local=False))
        self._fail(f"peer sent Error 0x{msg.code:x}", None, now)

    def _on_goclear(self, msg: GoClear, now: float) -> None:
        """Section 4.7.2: we never set the A flag, so an authentic GoClear gets Error 0x100."""
        if self.state is not State.SECURE or self._keys is None:
            return
        peer_mackey = self._keys.mackeyr if self.role == "initiator" else self._keys.mackeyi
        expected = self._hash.hmac(peer_mackey, GoClear.TYPE)[:MAC_LEN]
        if not ct_equal(expected, msg.clear_mac):
            self._events.append(SecurityWarning("GoClear with a bad clear_mac ignored"))
            return
        self._events.append(SecurityWarning("GoClear refused: clear mode is not allowed"))
        self._send_error(ErrorCode.GOCLEAR_NOT_ALLOWED, now)

    def _on_sasrelay(self, msg: SasRelay) -> None:
        """Section 5.13/7.3: we trust no PBX, so a relayed SAS is acknowledged, never shown."""
        if self.state is not State.SECURE or self._keys is None:
            return
        initiator = self.role == "initiator"
        mackey = self._keys.mackeyr if initiator else self._keys.mackeyi
        zrtpkey = self._keys.zrtpkeyr if initiator else self._keys.zrtpkeyi
        if not ct_equal(self._hash.hmac(mackey, msg.encrypted)[:MAC_LEN], msg.mac):
            self._events.append(SecurityWarning("SASrelay with a bad MAC ignored"))
            return
        try:
            SasRelayPlain.decode(cfb_decrypt(zrtpkey, msg.iv, msg.encrypted))
        except ZrtpError:
            self._events.append(SecurityWarning("malformed SASrelay ignored"))
            return
        self._send(RelayAck().encode())
        self._events.append(SecurityWarning("relayed SAS from an untrusted MiTM not rendered"))

    # -- discovery (section 4.1) ---------------------------------------------------------------

    def _on_hello(self, msg: Hello, raw: bytes, ssrc: int, now: float) -> None:
        if self._peer_hello is not None:
            if raw == self._peer_hello_raw:
                self._send(HelloAck().encode())
            return  # a different Hello later in the exchange is not used
        if msg.version[:3] != PROTOCOL_VERSION[:3]:
            if msg.version[:3] > PROTOCOL_VERSION[:3]:
                # Section 4.1.1: ignore a higher version; it falls back when it sees ours.
                self._send(HelloAck().encode())
                return
            raise _Fatal(f"unsupported ZRTP version {msg.version!r}", ErrorCode.UNSUPPORTED_VERSION)
        if self._expected_hello_hash is not None:
            if not ct_equal(implicit_hash(raw), self._expected_hello_hash):
                self._events.append(SecurityWarning("Hello not matching a=zrtp-hash dropped"))
                return
            self._hello_hash_verified = True
        if msg.zid == self._zid:
            raise _Fatal("peer uses our ZID", ErrorCode.EQUAL_ZIDS)
        if ssrc == self._ssrc:
            raise _Fatal("SSRC collision", ErrorCode.SSRC_COLLISION)
        if self._ms is not None and msg.zid != self._ms.peer_zid:
            raise _Fatal("Multistream peer changed ZID", ErrorCode.HELLO_COMPONENTS_MISMATCH)
        self._peer_hello = msg
        self._peer_hello_raw = raw
        self._cached = self._cache.lookup(msg.zid) if self._ms is None else CachedSecrets()
        self._events.append(
            HelloReceived(
                peer_zid=msg.zid,
                client_id=msg.client_id.decode("ascii", "replace").rstrip(" \x00"),
                version=msg.version.decode("ascii", "replace"),
                peer_hello_hash=implicit_hash(raw).hex(),
                signature_capable=msg.signature_capable,
                mitm=msg.mitm,
                passive=msg.passive,
            )
        )
        self._send(HelloAck().encode())
        self._maybe_commit(now)

    def _on_hello_ack(self, now: float) -> None:
        if self.state is not State.DISCOVERY:
            return
        self._hello_acked = True
        if self._rtx is not None and self._rtx.kind == "hello":
            self._rtx = None
        self._maybe_commit(now)

    def _maybe_commit(self, now: float) -> None:
        """Commit once Hello went both ways (section 5.4), unless we are passive."""
        if (
            self.state is not State.DISCOVERY
            or self._peer_hello is None
            or not self._hello_acked
            or self.config.passive
        ):
            return
        if self._ms is not None:
            self._commit_multistream(now)
        else:
            self._commit_dh(now)

    def _negotiate(self) -> tuple[bytes, bytes, bytes, bytes]:
        """Initiator's choice of hash, cipher, auth tag, SAS among those in common (4.1.2)."""
        assert self._peer_hello is not None
        peer = self._peer_hello
        hash_type = choose_first(self._our_lists["hash"], peer.hash_types, "hash")
        cipher = choose_first(self._our_lists["cipher"], peer.cipher_types, "cipher")
        auth = choose_first(self._our_lists["auth"], peer.auth_tag_types, "auth")
        sas = choose_first(self._our_lists["sas"], peer.sas_types, "sas")
        if hash_type is None or cipher is None or auth is None or sas is None:
            raise _Fatal("no algorithms in common", ErrorCode.HELLO_COMPONENTS_MISMATCH)
        return hash_type, cipher, auth, sas

    def _commit_dh(self, now: float) -> None:
        """Section 4.4.1.1: key pair, DHPart2, hvi = hash(DHPart2 || responder's Hello)."""
        assert self._peer_hello is not None
        hash_type, cipher, auth, sas = self._negotiate()
        ka_type = choose_key_agreement(
            self._our_lists["key_agreement"], self._peer_hello.key_agreement_types
        )
        if ka_type is None:
            raise _Fatal("no key agreement in common", ErrorCode.KEY_EXCHANGE_NOT_SUPPORTED)
        self._hash = HASHES[hash_type]
        self._ka = KEY_AGREEMENTS[ka_type](self._urandom)
        self._dhpart_own_raw = self._build_dhpart(2)
        hvi = self._hash.hash(self._dhpart_own_raw + self._peer_hello_raw)[:32]
        commit = Commit(
            h2=self._chain.h2,
            zid=self._zid,
            hash_type=hash_type,
            cipher_type=cipher,
            auth_tag_type=auth,
            key_agreement_type=ka_type,
            sas_type=sas,
            hvi=hvi,
        )
        self._send_commit(commit, now)

    def _commit_multistream(self, now: float) -> None:
        """Section 4.4.3.1: same algorithms as the first stream, a fresh 128-bit nonce."""
        assert self._peer_hello is not None and self._ms is not None
        if KA_MULTISTREAM not in self._peer_hello.key_agreement_types:
            raise _Fatal("peer does not offer Multistream", ErrorCode.KEY_EXCHANGE_NOT_SUPPORTED)
        nonce = self._urandom(16)
        while nonce in self._ms.used_nonces:
            nonce = self._urandom(16)
        self._ms.used_nonces.add(nonce)
        self._hash = HASHES[self._ms.hash_type]
        commit = Commit(
            h2=self._chain.h2,
            zid=self._zid,
            hash_type=self._ms.hash_type,
            cipher_type=self._ms.cipher_type,
            auth_tag_type=self._ms.auth_tag_type,
            key_agreement_type=KA_MULTISTREAM,
            sas_type=self._ms.sas_type,
            nonce=nonce,
        )
        self._send_commit(commit, now)

    def _send_commit(self, commit: Commit, now: float) -> None:
        raw = _with_mac(commit.encode(), self._chain.h1)
        self._commit, self._commit_raw, self._our_commit_raw = commit, raw, raw
        self.role = "initiator"
        self.state = State.COMMIT_SENT
        self._start_t2(raw, now, "Commit")
        if not commit.is_dh:
            self._derive_non_dh()

    # -- commit and contention (sections 4.2, 4.4) ---------------------------------------------

    def _on_commit(self, msg: Commit, raw: bytes, now: float) -> None:
        if self._peer_hello is None:
            return  # cannot check its hash chain yet; the initiator will retransmit
        if self.state in (State.DHPART1_SENT, State.CONFIRM1_SENT, State.RESPONDER_SIGNING):
            if raw == self._commit_raw:
                # Retransmitted Commit: our answer to it was lost (section 6).
                if self.state is State.DHPART1_SENT:
                    self._send(self._dhpart_own_raw)
                elif self.state is State.CONFIRM1_SENT and self._ms is not None:
                    self._send(self._confirm_own_raw)
            return
        if self.state is State.COMMIT_SENT:
            assert self._commit is not None
            if raw == self._our_commit_raw:
                return
            if not self._peer_commit_wins(self._commit, msg):
                return  # ours stands; the peer becomes responder when it sees it
        elif self.state is not State.DISCOVERY:
            return
        self._become_responder(msg, raw, now)

    def _peer_commit_wins(self, ours: Commit, theirs: Commit) -> bool:
        """Section 4.2: DH beats Preshared; else the larger hvi (or nonce) is the initiator."""
        if ours.is_dh != theirs.is_dh:
            if KA_MULTISTREAM in (ours.key_agreement_type, theirs.key_agreement_type):
                raise _Fatal(
                    "Multistream and DH Commits crossed", ErrorCode.CRITICAL_SOFTWARE_ERROR
                )
            return theirs.is_dh
        if ours.is_dh:
            mine, other = ours.hvi or b"", theirs.hvi or b""
        else:
            mine, other = ours.nonce or b"", theirs.nonce or b""
        return int.from_bytes(other, "big") > int.from_bytes(mine, "big")

    def _become_responder(self, msg: Commit, raw: bytes, now: float) -> None:
        assert self._peer_hello is not None
        if msg.zid != self._peer_hello.zid:
            raise _Fatal("Commit ZID differs from Hello ZID", ErrorCode.HELLO_COMPONENTS_MISMATCH)
        # Hash chain (section 9): H2 from the Commit must hash to the H3 of its Hello ...
        if not ct_equal(implicit_hash(msg.h2), self._peer_hello.h3):
            self._events.append(SecurityWarning("Commit with a wrong hash image dropped"))
            return
        # ... and now the Hello's MAC, keyed by H2, can be checked (section 8.1.1).
        if not _mac_ok(self._peer_hello_raw, msg.h2):
            raise _Fatal(
                "Hello MAC does not verify: Hello was altered", ErrorCode.HELLO_COMPONENTS_MISMATCH
            )
        if msg.key_agreement_type == KA_PRESHARED:
            # Section 4.4.2.2: without Preshared support answer with a DH Commit, which wins.
            if self.state is State.DISCOVERY and not self.config.passive:
                self._hello_acked = True
                self._rtx = None
                self._commit_dh(now)
                return
            raise _Fatal("Preshared mode not supported", ErrorCode.NO_SHARED_SECRET)
        self._check_commit_algorithms(msg)
        # A Commit also acknowledges our Hello (section 6).
        self._hello_acked = True
        self._rtx = None
        self.role = "responder"
        self._commit, self._commit_raw = msg, raw
        self._hash = HASHES[msg.hash_type]
        self._inactivity_deadline = now + self.config.responder_timeout
        if msg.is_dh:
            if self._ka is None or self._ka.block != msg.key_agreement_type:
                # Section 4.2: keep our key pair only if it has the initiator's type.
                self._ka = KEY_AGREEMENTS[msg.key_agreement_type](self._urandom)
            self._dhpart_own_raw = self._build_dhpart(1)
            self.state = State.DHPART1_SENT
            self._send(self._dhpart_own_raw)
            return
        assert self._ms is not None and msg.nonce is not None
        if msg.nonce in self._ms.used_nonces:
            raise _Fatal("Multistream nonce reused", ErrorCode.NONCE_REUSE)
        self._ms.used_nonces.add(msg.nonce)
        self._derive_non_dh()
        self._after_keys_responder(now)

    def _check_commit_algorithms(self, msg: Commit) -> None:
        """The initiator may only pick what we offered (section 4.1.2, error codes 5.9)."""
        checks = (
            (msg.hash_type, "hash", ErrorCode.HASH_NOT_SUPPORTED),
            (msg.cipher_type, "cipher", ErrorCode.CIPHER_NOT_SUPPORTED),
            (msg.auth_tag_type, "auth", ErrorCode.AUTH_TAG_NOT_SUPPORTED),
            (msg.key_agreement_type, "key_agreement", ErrorCode.KEY_EXCHANGE_NOT_SUPPORTED),
            (msg.sas_type, "sas", ErrorCode.SAS_NOT_SUPPORTED),
        )
        for value, kind, code in checks:
            if value not in self._our_lists[kind]:
                raise _Fatal(f"Commit chose unsupported {kind} {value!r}", code)
        if msg.key_agreement_type == KA_MULTISTREAM and self._ms is None:
            # Mult offered, but this stream has no ZRTPSess yet (section 4.4.3.1).
            raise _Fatal(
                "Multistream Commit before the first stream is secure", ErrorCode.NO_SHARED_SECRET
            )
        if self._ms is not None:
            if msg.key_agreement_type != KA_MULTISTREAM:
                raise _Fatal(
                    "only Multistream is possible on a further stream",
                    ErrorCode.KEY_EXCHANGE_NOT_SUPPORTED,
                )
            if msg.hash_type != self._ms.hash_type:
                raise _Fatal(
                    "Multistream must keep the first stream's hash", ErrorCode.HASH_NOT_SUPPORTED
                )

    # -- DH exchange (section 4.4.1) -----------------------------------------------------------

    def _secret_ids(self, role: str) -> tuple[bytes, bytes, bytes, bytes]:
        """rs1ID, rs2ID, auxsecretID, pbxsecretID for our DHPart (section 4.3.1).

        A missing secret gets a random ID so an observer cannot tell which ones exist.
        """
        label = b"Initiator" if role == "initiator" else b"Responder"

        def mac_or_random(secret: bytes | None, data: bytes) -> bytes:
            if secret is None:
                return self._urandom(8)
            return self._hash.hmac(secret, data)[:MAC_LEN]

        return (
            mac_or_random(self._cached.rs1, label),
            mac_or_random(self._cached.rs2, label),
            mac_or_random(self._aux, self._chain.h3),
            self._urandom(8),  # no PBX secrets: we never enroll (section 7.3.1)
        )

    def _build_dhpart(self, part: int) -> bytes:
        assert self._ka is not None
        rs1, rs2, aux, pbx = self._secret_ids("initiator" if part == 2 else "responder")
        dhpart = DHPart(
            part=part,
            h1=self._chain.h1,
            rs1_id=rs1,
            rs2_id=rs2,
            aux_id=aux,
            pbx_id=pbx,
            pv=self._ka.public_value,
        )
        return _with_mac(dhpart.encode(), self._chain.h0)

    def _on_dhpart1(self, msg: DHPart, raw: bytes, now: float) -> None:
        """Initiator (section 4.4.1.3): check pvr, compute s0, send DHPart2."""
        if self.state is not State.COMMIT_SENT or self._commit is None or not self._commit.is_dh:
            return
        assert self._peer_hello is not None and self._ka is not None
        h2 = implicit_hash(msg.h1)
        if not ct_equal(implicit_hash(h2), self._peer_hello.h3):
            self._events.append(SecurityWarning("DHPart1 with a wrong hash image dropped"))
            return
        if not _mac_ok(self._peer_hello_raw, h2):
            raise _Fatal(
                "Hello MAC does not verify: Hello was altered", ErrorCode.HELLO_COMPONENTS_MISMATCH
            )
        dh_result = self._dh_result(msg.pv)
        self._dhpart_peer, self._dhpart_peer_raw = msg, raw
        total_hash = self._hash.hash(
            self._peer_hello_raw + self._commit_raw + raw + self._dhpart_own_raw
        )
        self._derive_dh(dh_result, total_hash, msg, initiator=True)
        self.state = State.DHPART2_SENT
        self._start_t2(self._dhpart_own_raw, now, "DHPart2")
        self._request_signature(now)

    def _on_dhpart2(self, msg: DHPart, raw: bytes, now: float) -> None:
        """Responder (section 4.4.1.2): check pvi and hvi, compute s0, send Confirm1."""
        if self.state is State.CONFIRM1_SENT and raw == self._dhpart_peer_raw:
            self._send(self._confirm_own_raw)  # Confirm1 was lost
            return
        if self.state is not State.DHPART1_SENT or self._commit is None:
            return
        assert self._ka is not None
        if not ct_equal(implicit_hash(msg.h1), self._commit.h2):
            self._events.append(SecurityWarning("DHPart2 with a wrong hash image dropped"))
            return
        if not _mac_ok(self._commit_raw, msg.h1):
            raise _Fatal(
                "Commit MAC does not verify: Commit was altered", ErrorCode.BAD_CONFIRM_MAC
            )
        dh_result = self._dh_result(msg.pv)
        hvi = self._hash.hash(raw + self._hello_raw)[:32]
        if not ct_equal(hvi, self._commit.hvi or b""):
            raise _Fatal("hvi does not match DHPart2: possible MiTM", ErrorCode.HVI_MISMATCH)
        self._dhpart_peer, self._dhpart_peer_raw = msg, raw
        total_hash = self._hash.hash(
            self._hello_raw + self._commit_raw + self._dhpart_own_raw + raw
        )
        self._derive_dh(dh_result, total_hash, msg, initiator=False)
        self._after_keys_responder(now)

    def _dh_result(self, peer_pv: bytes) -> bytes:
        assert self._ka is not None
        try:
            return self._ka.shared_secret(peer_pv)
        except DhError as exc:
            raise _Fatal(str(exc), ErrorCode.BAD_DH_PUBLIC_VALUE) from exc

    def _match_s1(self, peer: DHPart, initiator: bool) -> bytes | None:
        """Section 4.3: s1 is the initiator's rs1 if either cached secret of the responder
        matches it, else the initiator's rs2 likewise, else null. Each side compares the
        IDs it received against IDs computed from its own secrets with the peer's label."""
        label = b"Responder" if initiator else b"Initiator"
        ours = [s for s in (self._cached.rs1, self._cached.rs2) if s is not None]
        ids = {s: self._hash.hmac(s, label)[:MAC_LEN] for s in ours}
        if initiator:
            # Our rs1 is the initiator's rs1: try it first, then our rs2.
            for secret in ours:
                if any(ct_equal(ids[secret], got) for got in (peer.rs1_id, peer.rs2_id)):
                    return secret
            return None
        # We are responder: the peer's rs1ID first, then its rs2ID, against our rs1 and rs2.
        for got in (peer.rs1_id, peer.rs2_id):
            for secret in ours:
                if ct_equal(ids[secret], got):
                    return secret
        return None

    def _derive_dh(
        self, dh_result: bytes, total_hash: bytes, peer: DHPart, initiator: bool
    ) -> None:
        """s0 (section 4.4.1.4), then ZRTPSess, SAS and the other keys (4.5.2, 4.5.3)."""
        assert self._peer_hello is not None
        zid_i, zid_r = (
            (self._zid, self._peer_hello.zid) if initiator else (self._peer_hello.zid, self._zid)
        )
        s1 = self._match_s1(peer, initiator)
        s2 = None
        if self._aux is not None:
            # auxsecretID is keyed with the sender's H3 (section 4.3.1).
            expected = self._hash.hmac(self._aux, self._peer_hello.h3)[:MAC_LEN]
            s2 = self._aux if ct_equal(expected, peer.aux_id) else None
            if s2 is None:
                # Section 4.3.2: visible to whoever has auxsecret; not fatal.
                self._events.append(SecurityWarning("auxsecret does not match the peer's"))
        if s1 is not None:
            self._s1_state = "match"
        elif self._cached.rs1 is not None:
            self._s1_state = "mismatch"
        else:
            self._s1_state = "new"
        self._kdf_context = zid_i + zid_r + total_hash
        s0 = self._hash.hash(
            (1).to_bytes(4, "big")
            + dh_result
            + b"ZRTP-HMAC-KDF"
            + zid_i
            + zid_r
            + total_hash
            + _len_prefixed(s1)
            + _len_prefixed(s2)
            + _len_prefixed(None)  # s3: pbxsecret, never shared
        )
        bits = self._hash.digest_size * 8
        ctx = self._kdf_context
        self._zrtp_sess = kdf(s0, b"ZRTP Session Key", ctx, bits, self._hash)
        self._sashash = kdf(s0, b"SAS", ctx, 256, self._hash)
        self._exported = kdf(s0, b"Exported key", ctx, bits, self._hash)
        self._new_rs1 = kdf(s0, b"retained secret", ctx, 256, self._hash)
        self._derive_stream_keys(s0)
        # V goes out only if our cache vouches for this peer and continuity held (7.1).
        self._local_v = (
            self._cached.verified
            and self._s1_state == "match"
            and self.config.cache_expiration != 0
        )

    def _derive_non_dh(self) -> None:
        """Multistream s0 = KDF(ZRTPSess, "ZRTP MSK", KDF_Context, hash length) (4.4.3.2)."""
        assert self._ms is not None and self._peer_hello is not None
        initiator = self.role == "initiator"
        zid_i, zid_r = (
            (self._zid, self._peer_hello.zid) if initiator else (self._peer_hello.zid, self._zid)
        )
        hello_r = self._peer_hello_raw if initiator else self._hello_raw
        total_hash = self._hash.hash(hello_r + self._commit_raw)
        self._kdf_context = zid_i + zid_r + total_hash
        bits = self._hash.digest_size * 8
        s0 = kdf(self._ms.zrtp_sess, b"ZRTP MSK", self._kdf_context, bits, self._hash)
        self._sashash = self._ms.sashash
        self._s1_state = self._ms.continuity
        self._local_v = self._ms.sas_verified
        self._derive_stream_keys(s0)

    def _derive_stream_keys(self, s0: bytes) -> None:
        """Section 4.5.3: SRTP keys and salts per direction, MAC keys, Confirm keys."""
        assert self._commit is not None
        ctx = self._kdf_context
        h = self._hash
        key_bits = CIPHER_KEY_BITS[self._commit.cipher_type]
        mac_bits = h.digest_size * 8
        self._keys = _Keys(
            srtpkeyi=kdf(s0, b"Initiator SRTP master key", ctx, key_bits, h),
            srtpsalti=kdf(s0, b"Initiator SRTP master salt", ctx, 112, h),
            srtpkeyr=kdf(s0, b"Responder SRTP master key", ctx, key_bits, h),
            srtpsaltr=kdf(s0, b"Responder SRTP master salt", ctx, 112, h),
            mackeyi=kdf(s0, b"Initiator HMAC key", ctx, mac_bits, h),
            mackeyr=kdf(s0, b"Responder HMAC key", ctx, mac_bits, h),
            zrtpkeyi=kdf(s0, b"Initiator ZRTP key", ctx, key_bits, h),
            zrtpkeyr=kdf(s0, b"Responder ZRTP key", ctx, key_bits, h),
        )
        # s0 goes out of scope here (section 4.6.1: erase after use).

    # -- signing hook (section 7.2) ------------------------------------------------------------

    def _request_signature(self, now: float) -> None:
        """Ask for a SAS signature when configured and the peer can check it (S flag)."""
        assert self._peer_hello is not None
        if (
            self.config.sign_sas
            and self._peer_hello.signature_capable
            and self._ms is None
            and self._sashash is not None
            and not self._signature_wanted
        ):
            self._signature_wanted = True
            self._signature_deadline = now + self.config.signature_timeout
            self._events.append(SasSignatureNeeded(self._sashash))

    def _signature_pending(self) -> bool:
        return self._signature_wanted and not self._signature_done

    def _release_confirm(self, now: float) -> None:
        """The signature arrived (or timed out): send the Confirm that was held."""
        if self.state is State.RESPONDER_SIGNING:
            self._send_confirm1(now)
        elif self.state is State.INITIATOR_SIGNING:
            self._send_confirm2(now)

    # -- confirmation (section 4.6) -------------------------------------------------------------

    def _after_keys_responder(self, now: float) -> None:
        self._request_signature(now)
        if self._signature_pending():
            self.state = State.RESPONDER_SIGNING
            return
        self._send_confirm1(now)

    def _build_confirm(self, part: int) -> bytes:
        assert self._keys is not None
        sig_type, sig = self._signature if self._signature is not None else (None, b"")
        multistream = self._ms is not None
        plain = ConfirmPlain(
            h0=self._chain.h0,
            sas_verified=self._local_v,
            allow_clear=False,  # GoClear is refused (section 4.7.2)
            disclosure=False,
            cache_expiration=CACHE_FOREVER if multistream else self.config.cache_expiration,
            signature_type=None if multistream else sig_type,
            signature=b"" if multistream else sig,
        )
        initiator = part == 2
        zrtpkey = self._keys.zrtpkeyi if initiator else self._keys.zrtpkeyr
        mackey = self._keys.mackeyi if initiator else self._keys.mackeyr
        iv = self._urandom(16)
        encrypted = cfb_encrypt(zrtpkey, iv, plain.encode())
        mac = self._hash.hmac(mackey, encrypted)[:MAC_LEN]
        return Confirm(part=part, confirm_mac=mac, iv=iv, encrypted=encrypted).encode()

    def _send_confirm1(self, now: float) -> None:
        self._confirm_own_raw = self._build_confirm(1)
        self.state = State.CONFIRM1_SENT
        self._send(self._confirm_own_raw)  # the responder does not retransmit (section 6)

    def _send_confirm2(self, now: float) -> None:
        self._confirm_own_raw = self._build_confirm(2)
        self.state = State.CONFIRM2_SENT
        self._start_t2(self._confirm_own_raw, now, "Confirm2")

    def _open_confirm(self, msg: Confirm, peer_is_initiator: bool) -> ConfirmPlain:
        """Check confirm_mac (Error 0x70 if bad), then decrypt (section 5.7)."""
        assert self._keys is not None
        mackey = self._keys.mackeyi if peer_is_initiator else self._keys.mackeyr
        zrtpkey = self._keys.zrtpkeyi if peer_is_initiator else self._keys.zrtpkeyr
        expected = self._hash.hmac(mackey, msg.encrypted)[:MAC_LEN]
        if not ct_equal(expected, msg.confirm_mac):
            raise _Fatal("Confirm MAC does not verify", ErrorCode.BAD_CONFIRM_MAC)
        try:
            return ConfirmPlain.decode(cfb_decrypt(zrtpkey, msg.iv, msg.encrypted))
        except ZrtpError as exc:
            raise _Fatal(f"malformed Confirm: {exc}", ErrorCode.MALFORMED_PACKET) from exc

    def _accept_peer_confirm(self, plain: ConfirmPlain) -> None:
        self._peer_plain = plain
        if plain.signature_type is not None and self._sashash is not None:
            sig = plain.signature
            if plain.signature_type == b"PGP ":
                sig = trim_openpgp_signature(sig)
            self._events.append(PeerSignature(plain.signature_type, sig, self._sashash))
        if plain.disclosure:
            self._events.append(SecurityWarning("peer discloses its session keys (D flag)"))

    def _check_dhpart_chain(self, h0: bytes, h1: bytes, confirm: str, dhpart: str) -> None:
        """The peer's H0 from its Confirm hashes to the H1 of its DHPart, and H0 keys that
        DHPart's MAC (RFC 6189 section 9: the hash chain authenticates the earlier message)."""
        assert self._dhpart_peer is not None
        if not ct_equal(h1, self._dhpart_peer.h1):
            raise _Fatal(f"{confirm} H0 does not hash to {dhpart}'s H1", ErrorCode.BAD_CONFIRM_MAC)
        if not _mac_ok(self._dhpart_peer_raw, h0):
            raise _Fatal(f"{dhpart} MAC does not verify", ErrorCode.BAD_CONFIRM_MAC)

    def _on_confirm1(self, msg: Confirm, raw: bytes, now: float) -> None:
        """Initiator: authenticate Confirm1, close the hash chain, send Confirm2."""
        expected_state = State.DHPART2_SENT if self._ms is None else State.COMMIT_SENT
        if self.state is not expected_state or self._keys is None:
            return
        assert self._peer_hello is not None
        plain = self._open_confirm(msg, peer_is_initiator=False)
        h1 = implicit_hash(plain.h0)
        if self._ms is None:
            self._check_dhpart_chain(plain.h0, h1, "Confirm1", "DHPart1")
        else:
            h2 = implicit_hash(h1)
            if not ct_equal(implicit_hash(h2), self._peer_hello.h3):
                raise _Fatal("Confirm1 H0 does not lead to Hello's H3", ErrorCode.BAD_CONFIRM_MAC)
            if not _mac_ok(self._peer_hello_raw, h2):
                raise _Fatal("Hello MAC does not verify", ErrorCode.HELLO_COMPONENTS_MISMATCH)
        self._confirm_peer_raw = raw
        self._rtx = None
        self._accept_peer_confirm(plain)
        if self._signature_pending():
            self.state = State.INITIATOR_SIGNING
            return
        self._send_confirm2(now)

    def _on_confirm2(self, msg: Confirm, raw: bytes, now: float) -> None:
        """Responder: authenticate Confirm2, send Conf2ACK, update the cache, go secure."""
        if self.state is State.SECURE and raw == self._confirm_peer_raw:
            self._send(Conf2Ack().encode())  # Conf2ACK was lost
            return
        if self.state is not State.CONFIRM1_SENT or self._keys is None or self._commit is None:
            return
        plain = self._open_confirm(msg, peer_is_initiator=True)
        h1 = implicit_hash(plain.h0)
        if self._ms is None:
            self._check_dhpart_chain(plain.h0, h1, "Confirm2", "DHPart2")
        else:
            if not ct_equal(implicit_hash(h1), self._commit.h2):
                raise _Fatal("Confirm2 H0 does not lead to Commit's H2", ErrorCode.BAD_CONFIRM_MAC)
            if not _mac_ok(self._commit_raw, h1):
                raise _Fatal("Commit MAC does not verify", ErrorCode.BAD_CONFIRM_MAC)
        self._confirm_peer_raw = raw
        self._inactivity_deadline = None
        self._accept_peer_confirm(plain)
        self._send(Conf2Ack().encode())
        self._go_secure()

    def _complete_initiator(self, now: float) -> None:
        self._rtx = None
        self._go_secure()

    # -- completion -----------------------------------------------------------------------------

    def _session_keys(self) -> SessionKeys:
        assert self._keys is not None and self._commit is not None
        k = self._keys
        mine_i = self.role == "initiator"
        initiator_key = SrtpMasterKey(k.srtpkeyi, k.srtpsalti)
        responder_key = SrtpMasterKey(k.srtpkeyr, k.srtpsaltr)
        return SessionKeys(
            outbound=initiator_key if mine_i else responder_key,
            inbound=responder_key if mine_i else initiator_key,
            cipher=_name(self._commit.cipher_type),
            auth_tag=_name(self._commit.auth_tag_type),
            srtp_profile=SRTP_PROFILES[self._commit.auth_tag_type],
        )

    def _go_secure(self) -> None:
        assert self._commit is not None and self._peer_hello is not None
        assert self._sashash is not None and self._peer_plain is not None
        self.state = State.SECURE
        deferred = False
        context: MultistreamContext | None = None
        sas: str | None
        if self._ms is None:
            deferred = self._update_cache()
            sas = render_sas(self._commit.sas_type, self._sashash)
            assert self._zrtp_sess is not None
            context = MultistreamContext(
                zrtp_sess=self._zrtp_sess,
                zid=self._zid,
                peer_zid=self._peer_hello.zid,
                hash_type=self._commit.hash_type,
                cipher_type=self._commit.cipher_type,
                auth_tag_type=self._commit.auth_tag_type,
                sas=sas,
                sas_type=self._commit.sas_type,
                sashash=self._sashash,
                continuity=self._s1_state,
                sas_verified=self._local_v,
            )
        else:
            sas = self._ms.sas
        peer = self._peer_plain
        self._result = SecureStateReached(
            role=self.role or "",
            sas=sas,
            sas_type=_name(self._commit.sas_type),
            sas_value=sas_value(self._sashash),
            sashash=self._sashash,
            keys=self._session_keys(),
            hash=_name(self._commit.hash_type),
            key_agreement=_name(self._commit.key_agreement_type),
            peer_zid=self._peer_hello.zid,
            continuity=self._s1_state,
            sas_verified=self._local_v and peer.sas_verified,
            local_sas_verified=self._local_v,
            peer_sas_verified=peer.sas_verified,
            peer_disclosure=peer.disclosure,
            peer_pbx_enrollment=peer.pbx_enrollment,
            peer_allow_clear=peer.allow_clear and not peer.pbx_enrollment,
            peer_hello_hash=implicit_hash(self._peer_hello_raw).hex(),
            hello_hash_verified=self._hello_hash_verified,
            cache_update_deferred=deferred,
            multistream=self._ms is not None,
            multistream_context=context,
            exported_key=self._exported,
        )
        self._events.append(self._result)
        self._ka = None

    def _update_cache(self) -> bool:
        """Section 4.6.1: store the new rs1 (old rs1 becomes rs2); returns True if delayed.

        After a cache mismatch the update waits for `mark_sas_verified` or
        `peer_signature_verified` (section 4.6.1.1); if neither comes, the cache is untouched.
        """
        new_rs1, self._new_rs1 = self._new_rs1, None
        if new_rs1 is None:
            return False
        if self._s1_state == "mismatch":
            self._deferred_rs1 = new_rs1
            return True
        self._apply_cache_update(new_rs1)
        return False

    def _apply_cache_update(self, new_rs1: bytes) -> None:
        assert self._peer_hello is not None and self._peer_plain is not None
        interval = min(self.config.cache_expiration, self._peer_plain.cache_expiration)
        self._cache.update(self._peer_hello.zid, new_rs1, interval, keep_old_as_rs2=True)


def _parse_hash(value: str | bytes | None) -> bytes | None:
    """Accept an a=zrtp-hash value ("1.10 <hex>" or bare hex) or raw digest bytes."""
    if value is None:
        return None
    if isinstance(value, bytes):
        if len(value) != 32:
            raise ValueError("Hello hash must be 32 octets")
        return value
    text = value.strip().split()[-1]
    digest = bytes.fromhex(text)
    if len(digest) != 32:
        raise ValueError("Hello hash must be 64 hex digits")
    return digest


__all__ = [
    "Failed",
    "HelloReceived",
    "MultistreamContext",
    "PeerSignature",
    "ProtocolError",
    "SasSignatureNeeded",
    "SecureStateReached",
    "SecurityWarning",
    "SessionKeys",
    "SrtpMasterKey",
    "State",
    "ZrtpConfig",
    "ZrtpEvent",
    "ZrtpSession",
]
