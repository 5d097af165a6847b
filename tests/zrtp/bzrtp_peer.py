"""Drive the system's libbzrtp (Belledonne, as used by linphone) through ctypes.

An independent ZRTP implementation in the same process: every byte our session sends is
parsed, hashed, MAC-checked and decrypted by bzrtp and the other way round, so CRC, MACs, KDF,
hvi, Confirm CFB and SAS must all match RFC 6189 for the exchange to finish. Cacheless (no
ZID cache given), so continuity is not exercised here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass, field
from typing import Any

LIB_NAMES = ("libbzrtp.so.0", "libbzrtp.so")

KEY_AGREEMENT_TYPE = 0x08
KA_IDS = {"DH3k": 0x45, "X255": 0x42, "EC25": 0x43, "DH2k": 0x41, "X448": 0x44}
AUTH_TYPE = 0x04
AUTH_IDS = {"HS32": 0x31, "HS80": 0x32}
SAS_TYPE = 0x10
SAS_IDS = {"B32": 0x51, "B256": 0x52}
CHANNEL_SECURE = 0x1004


class SrtpSecrets(ctypes.Structure):
    _fields_ = (
        ("selfSrtpKey", ctypes.POINTER(ctypes.c_uint8)),
        ("selfSrtpKeyLength", ctypes.c_uint8),
        ("selfSrtpSalt", ctypes.POINTER(ctypes.c_uint8)),
        ("selfSrtpSaltLength", ctypes.c_uint8),
        ("peerSrtpKey", ctypes.POINTER(ctypes.c_uint8)),
        ("peerSrtpKeyLength", ctypes.c_uint8),
        ("peerSrtpSalt", ctypes.POINTER(ctypes.c_uint8)),
        ("peerSrtpSaltLength", ctypes.c_uint8),
        ("cipherAlgo", ctypes.c_uint8),
        ("cipherKeyLength", ctypes.c_uint8),
        ("authTagAlgo", ctypes.c_uint8),
        ("sas", ctypes.c_char_p),
        ("sasLength", ctypes.c_uint8),
        ("hashAlgo", ctypes.c_uint8),
        ("keyAgreementAlgo", ctypes.c_uint8),
        ("sasAlgo", ctypes.c_uint8),
        ("cacheMismatch", ctypes.c_uint8),
        ("auxSecretMismatch", ctypes.c_uint8),
    )


STATUS_CB = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_uint8, ctypes.c_uint8, ctypes.c_char_p
)
SEND_CB = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_uint16
)
SECRETS_CB = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(SrtpSecrets), ctypes.c_uint8
)
START_CB = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(SrtpSecrets), ctypes.c_int32
)
EXPORT_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint8)


class Callbacks(ctypes.Structure):
    _fields_ = (
        ("statusMessage", STATUS_CB),
        ("messageLevel", ctypes.c_int),
        ("sendData", SEND_CB),
        ("srtpSecretsAvailable", SECRETS_CB),
        ("startSrtpSession", START_CB),
        ("contextReadyForExportedKeys", EXPORT_CB),
    )


def load_library() -> Any | None:
    for name in LIB_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _bytes(pointer: Any, length: int) -> bytes:
    return bytes(pointer[:length]) if length else b""


@dataclass
class BzrtpResult:
    sas: str
    self_key: bytes
    self_salt: bytes
    peer_key: bytes
    peer_salt: bytes
    auth_tag: int
    key_agreement: int
    verified: int
    cache_mismatch: int


@dataclass
class BzrtpPeer:
    """One bzrtp context with one channel (our SSRC), driven on a millisecond clock."""

    lib: Any
    ssrc: int
    key_agreements: tuple[str, ...] = ()
    auth_tags: tuple[str, ...] = ()
    sas_types: tuple[str, ...] = ()
    cache_path: str | None = None  # a sqlite3 ZID cache: retained secrets across calls
    outbox: list[bytes] = field(default_factory=list)
    result: BzrtpResult | None = None
    status: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        lib = self.lib
        self._db: Any = None
        lib.bzrtp_createBzrtpContext.restype = ctypes.c_void_p
        lib.bzrtp_initBzrtpContext.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
        lib.bzrtp_setCallbacks.argtypes = (ctypes.c_void_p, ctypes.POINTER(Callbacks))
        lib.bzrtp_setClientData.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)
        lib.bzrtp_startChannelEngine.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
        lib.bzrtp_iterate.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64)
        lib.bzrtp_processMessage.argtypes = (
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.POINTER(ctypes.c_uint8),
            ctypes.c_uint16,
        )
        lib.bzrtp_getChannelStatus.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
        lib.bzrtp_destroyBzrtpContext.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
        lib.bzrtp_setSupportedCryptoTypes.argtypes = (
            ctypes.c_void_p,
            ctypes.c_uint8,
            ctypes.POINTER(ctypes.c_uint8),
            ctypes.c_uint8,
        )
        lib.bzrtp_getSelfHelloHash.argtypes = (
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_char_p,
            ctypes.c_size_t,
        )
        lib.bzrtp_setPeerHelloHash.argtypes = (
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_char_p,
            ctypes.c_size_t,
        )
        self.ctx = lib.bzrtp_createBzrtpContext()
        # Keep the C callbacks alive as long as the context.
        self._callbacks = Callbacks(
            STATUS_CB(self._on_status),
            3,
            SEND_CB(self._on_send),
            SECRETS_CB(self._on_secrets),
            START_CB(self._on_start),
            EXPORT_CB(lambda *_: 0),
        )
        lib.bzrtp_setCallbacks(self.ctx, ctypes.byref(self._callbacks))
        if self.cache_path is not None:
            self._open_cache(self.cache_path)
        for algo_type, names, ids in (
            (KEY_AGREEMENT_TYPE, self.key_agreements, KA_IDS),
            (AUTH_TYPE, self.auth_tags, AUTH_IDS),
            (SAS_TYPE, self.sas_types, SAS_IDS),
        ):
            if names:
                values = (ctypes.c_uint8 * 7)(*[ids[n] for n in names])
                lib.bzrtp_setSupportedCryptoTypes(self.ctx, algo_type, values, len(names))
        if lib.bzrtp_initBzrtpContext(self.ctx, self.ssrc) != 0:
            raise RuntimeError("bzrtp_initBzrtpContext failed")
        lib.bzrtp_setClientData(self.ctx, self.ssrc, None)

    def _open_cache(self, path: str) -> None:
        sqlite = ctypes.CDLL("libsqlite3.so.0")
        db = ctypes.c_void_p()
        if sqlite.sqlite3_open(path.encode(), ctypes.byref(db)) != 0:
            raise RuntimeError("cannot open the bzrtp cache")
        self._sqlite, self._db = sqlite, db
        self.lib.bzrtp_initCache_lock.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
        self.lib.bzrtp_setZIDCache_lock.argtypes = (
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_void_p,
        )
        self.lib.bzrtp_initCache_lock(db, None)
        self.lib.bzrtp_setZIDCache_lock(self.ctx, db, b"sip:bzrtp@test", b"sip:ours@test", None)

    def _on_status(self, _client: Any, level: int, message_id: int, text: bytes | None) -> int:
        self.status.append(f"{level}/{message_id}: {text.decode() if text else ''}")
        return 0

    def _on_send(self, _client: Any, packet: Any, length: int) -> int:
        self.outbox.append(bytes(packet[:length]))
        return 0

    def _on_secrets(self, _client: Any, _secrets: Any, _part: int) -> int:
        return 0

    def _on_start(self, _client: Any, secrets_ptr: Any, verified: int) -> int:
        s = secrets_ptr.contents
        self.result = BzrtpResult(
            sas=(s.sas or b"").decode(),
            self_key=_bytes(s.selfSrtpKey, s.selfSrtpKeyLength),
            self_salt=_bytes(s.selfSrtpSalt, s.selfSrtpSaltLength),
            peer_key=_bytes(s.peerSrtpKey, s.peerSrtpKeyLength),
            peer_salt=_bytes(s.peerSrtpSalt, s.peerSrtpSaltLength),
            auth_tag=s.authTagAlgo,
            key_agreement=s.keyAgreementAlgo,
            verified=verified,
            cache_mismatch=s.cacheMismatch,
        )
        return 0

    @property
    def hello_hash(self) -> str:
        buf = ctypes.create_string_buffer(70)
        self.lib.bzrtp_getSelfHelloHash(self.ctx, self.ssrc, buf, 70)
        return buf.value.decode()

    def set_peer_hello_hash(self, value: str) -> int:
        raw = value.encode()
        return int(self.lib.bzrtp_setPeerHelloHash(self.ctx, self.ssrc, raw, len(raw)))

    def start(self) -> None:
        self.lib.bzrtp_startChannelEngine(self.ctx, self.ssrc)

    def iterate(self, now_ms: int) -> None:
        self.lib.bzrtp_iterate(self.ctx, self.ssrc, now_ms)

    def receive(self, packet: bytes) -> int:
        buf = (ctypes.c_uint8 * len(packet)).from_buffer_copy(packet)
        return int(self.lib.bzrtp_processMessage(self.ctx, self.ssrc, buf, len(packet)))

    @property
    def secure(self) -> bool:
        return bool(self.lib.bzrtp_getChannelStatus(self.ctx, self.ssrc) == CHANNEL_SECURE)

    def sas_verified(self) -> None:
        self.lib.bzrtp_SASVerified.argtypes = (ctypes.c_void_p,)
        self.lib.bzrtp_SASVerified(self.ctx)

    def close(self) -> None:
        self.lib.bzrtp_destroyBzrtpContext(self.ctx, self.ssrc)
        if self._db is not None:
            self._sqlite.sqlite3_close(self._db)
            self._db = None
