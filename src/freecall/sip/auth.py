"""SIP digest authentication, server and client side.

RFC 3261 section 22 (and the header fields of sections 20.7, 20.27, 20.28, 20.44), with the
digest computation of RFC 2617 / RFC 7616 and the algorithms of RFC 8760 (MD5, SHA-256,
SHA-512-256, and their ``-sess`` variants).  Everything works on header field *values*
(``str``) and on method and Request-URI strings, so it does not depend on the message classes.

Parsing: :func:`parse_challenge` / :func:`parse_credentials` read one ``WWW-Authenticate`` /
``Proxy-Authenticate`` / ``Authorization`` / ``Proxy-Authorization`` value (in SIP each field
value holds exactly one challenge or credentials, RFC 3261 section 25.1, so the message layer
must not split these fields on commas).  Unknown schemes are kept, with their auth-params or
token68.  Errors raise :class:`AuthError`.

Server: :class:`DigestServer` issues stateless nonces (an HMAC over a timestamp, the realm and
random bytes, keyed by the server secret), so neither a restart nor a flood of requests can
exhaust memory; only *successful* authentications are remembered, in a bounded LRU of
nonce-counts that rejects a replayed ``nc``.  Unknown users and wrong passwords run the same
code and return the same result (a digest is computed against a secret dummy password).

Client: :class:`DigestClient` answers a challenge and keeps the nonce-count per nonce.

Interop decisions (all from real tools):

- sipsak sends ``username="alice@"`` (and some clients ``user@realm``).  The server first looks
  up the username exactly as sent; when that finds nothing and the part after the first ``@``
  is empty or equals the realm (case-insensitively), it looks up the part before it.  The
  digest is always computed over the username *as sent* (that is what the client hashed), and
  the authenticated account is the one found.  Both look-ups always run, so the time taken
  does not reveal which one succeeded.  Any other domain part is a different user and fails.
- sipvicious' svcrack sends ``qop=auth`` without ``cnonce``/``nc``: rejected as MALFORMED.
- Clients that answer without ``qop`` (RFC 2069 style, e.g. RFC 3665's examples) are accepted
  when ``allow_rfc2069`` is set, but such a nonce is good for one request only: without a
  nonce-count there is no other replay protection.
- baresip, Linphone and SIPp's ``[authentication]`` use MD5 with ``qop=auth``: a server that
  must serve SIPp should list ``"MD5"`` (SIPp reads only the first challenge).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "ALGORITHMS",
    "AuthError",
    "AuthParam",
    "AuthResult",
    "AuthStatus",
    "Challenge",
    "Credentials",
    "DigestClient",
    "DigestServer",
    "choose_challenge",
    "digest_response",
    "parse_challenge",
    "parse_credentials",
]

MAX_VALUE_LENGTH = 8192
"""Longest header field value we parse; real ones are a few hundred characters."""
MAX_PARAMS = 64
"""Most auth-params in one value; Digest defines about a dozen."""


class AuthError(ValueError):
    """A malformed authentication header value, or a challenge we cannot answer."""


# -- auth-param syntax (RFC 3261 section 25.1, RFC 7235 section 2.1) -----------------------

# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
# Unquoted parameter values: RFC 3261 says token, but deployed clients send things like
# nc=00000001, algorithm=SHA-256 and, now and then, an unquoted URI; anything without white
# space, comma, double quote or backslash is accepted and rendered back as it was.
_BARE_VALUE_RE = re.compile(r'[^\x00-\x20\x7f,"\\]+')
# token68 = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=" (RFC 7235 s2.1)
_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# LWS = [*WSP CRLF] 1*WSP: a folded line is white space (RFC 3261 section 25.1).
_FOLD_RE = re.compile(r"\r?\n(?=[ \t])")
_WS = " \t"


@dataclass(frozen=True, slots=True)
class AuthParam:
    """One ``name=value`` auth-param; ``value`` is unescaped, ``quoted`` says how it was sent.

    Names compare case-insensitively (RFC 7235 section 2.1); the spelling is kept for
    rendering.  Construction validates, so every AuthParam renders to parseable text.
    """

    name: str
    value: str
    quoted: bool = True

    def __post_init__(self) -> None:
        if not _TOKEN_RE.fullmatch(self.name):
            raise AuthError(f"auth-param name {self.name[:40]!r} is not a token")
        if "\r" in self.value or "\n" in self.value or "\x00" in self.value:
            raise AuthError(f"auth-param {self.name} contains CR, LF or NUL")
        if not self.quoted and not _BARE_VALUE_RE.fullmatch(self.value):
            raise AuthError(f"auth-param {self.name} must be quoted")

    def render(self) -> str:
        if not self.quoted:
            return f"{self.name}={self.value}"
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.name}="{escaped}"'


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _read_quoted(text: str, pos: int) -> tuple[str, int]:
    """Read a quoted-string starting at the opening quote; return (unescaped value, end)."""
    out: list[str] = []
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == '"':
            return "".join(out), pos + 1
        if char == "\\":
            # quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F); we accept any char but CR/LF.
            if pos + 1 >= len(text):
                break
            out.append(text[pos + 1])
            pos += 2
            continue
        out.append(char)
        pos += 1
    raise AuthError("unterminated quoted-string")


def _parse_value(value: str, what: str) -> tuple[str, tuple[AuthParam, ...], str | None]:
    """Split ``scheme [token68 | auth-param *(, auth-param)]``; linear in the input."""
    if not isinstance(value, str):
        raise AuthError(f"{what} must be a str")
    if len(value) > MAX_VALUE_LENGTH:
        raise AuthError(f"{what} longer than {MAX_VALUE_LENGTH} characters")
    text = _FOLD_RE.sub(" ", value)
    if "\r" in text or "\n" in text or "\x00" in text:
        raise AuthError(f"{what} contains CR, LF or NUL")
    pos = _skip_ws(text, 0)
    match = _TOKEN_RE.match(text, pos)
    if match is None:
        raise AuthError(f"{what} does not start with an auth-scheme")
    scheme = match.group()
    pos = match.end()
    rest = text[pos:].strip(_WS)
    if not rest:
        return scheme, (), None
    if pos >= len(text) or text[pos] not in _WS:
        raise AuthError(f"{what}: white space expected after the scheme {scheme!r}")
    if _TOKEN68_RE.fullmatch(rest):
        return scheme, (), rest
    params: list[AuthParam] = []
    seen: set[str] = set()
    pos = _skip_ws(text, pos)
    while True:
        # RFC 7230 section 7: a recipient accepts empty list elements ("a=1,,b=2").
        while pos < len(text) and text[pos] in _WS + ",":
            pos += 1
        if pos >= len(text):
            break
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise AuthError(f"{what}: auth-param name expected at {text[pos : pos + 20]!r}")
        name = match.group()
        pos = _skip_ws(text, match.end())
        if pos >= len(text) or text[pos] != "=":
            raise AuthError(f"{what}: '=' expected after {name!r}")
        pos = _skip_ws(text, pos + 1)
        if pos < len(text) and text[pos] == '"':
            param_value, pos = _read_quoted(text, pos)
            quoted = True
        else:
            bare = _BARE_VALUE_RE.match(text, pos)
            if bare is None:
                raise AuthError(f"{what}: value expected for {name!r}")
            param_value, pos, quoted = bare.group(), bare.end(), False
        key = name.lower()
        if key in seen:
            raise AuthError(f"{what}: parameter {name!r} appears twice")
        seen.add(key)
        params.append(AuthParam(name, param_value, quoted))
        if len(params) > MAX_PARAMS:
            raise AuthError(f"{what}: more than {MAX_PARAMS} parameters")
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] != ",":
            raise AuthError(f"{what}: ',' expected at {text[pos : pos + 20]!r}")
    if not params:
        raise AuthError(f"{what}: no parameters after the scheme")
    return scheme, tuple(params), None


@dataclass(frozen=True, slots=True)
class _AuthValue:
    """Common shape of challenges and credentials: a scheme and auth-params (or token68)."""

    scheme: str
    params: tuple[AuthParam, ...] = ()
    token68: str | None = None

    def __post_init__(self) -> None:
        if not _TOKEN_RE.fullmatch(self.scheme):
            raise AuthError(f"auth-scheme {self.scheme[:40]!r} is not a token")
        object.__setattr__(self, "params", tuple(self.params))
        if self.token68 is not None:
            if self.params:
                raise AuthError("token68 and auth-params are exclusive")
            if not _TOKEN68_RE.fullmatch(self.token68):
                raise AuthError("malformed token68")
        names = [p.name.lower() for p in self.params]
        if len(set(names)) != len(names):
            raise AuthError("an auth-param appears twice")

    @property
    def is_digest(self) -> bool:
        return self.scheme.lower() == "digest"

    def param(self, name: str) -> str | None:
        """The value of auth-param ``name`` (case-insensitive), or None."""
        key = name.lower()
        for param in self.params:
            if param.name.lower() == key:
                return param.value
        return None

    def render(self) -> str:
        """The header field value (without the header name)."""
        if self.token68 is not None:
            return f"{self.scheme} {self.token68}"
        if not self.params:
            return self.scheme
        rendered = ", ".join(p.render() for p in self.params)
        if _TOKEN68_RE.fullmatch(rendered):
            # One bare param such as ``a==`` also reads as token68 (RFC 7235 section 2.1),
            # and recipients try token68 first; the optional white space around "=" (BWS)
            # keeps it an auth-param.
            only = self.params[0]
            rendered = f"{only.name} = {only.value}"
        return f"{self.scheme} {rendered}"

    __str__ = render


@dataclass(frozen=True, slots=True)
class Challenge(_AuthValue):
    """A ``WWW-Authenticate`` / ``Proxy-Authenticate`` value (RFC 3261 s20.44, s20.27)."""

    @property
    def realm(self) -> str | None:
        return self.param("realm")

    @property
    def nonce(self) -> str | None:
        return self.param("nonce")

    @property
    def opaque(self) -> str | None:
        return self.param("opaque")

    @property
    def algorithm(self) -> str:
        """As sent; "MD5" when absent (RFC 2617 section 3.2.1)."""
        return self.param("algorithm") or "MD5"

    @property
    def qop_options(self) -> tuple[str, ...]:
        """The offered qop values, lower-cased; empty for an RFC 2069 challenge."""
        qop = self.param("qop")
        if qop is None:
            return ()
        return tuple(v.strip(_WS).lower() for v in qop.split(",") if v.strip(_WS))

    @property
    def stale(self) -> bool:
        """``stale=TRUE`` (case-insensitive): retry with the new nonce, same password."""
        return (self.param("stale") or "").lower() == "true"

    @classmethod
    def digest(
        cls,
        realm: str,
        nonce: str,
        *,
        algorithm: str | None = None,
        qop: Sequence[str] = ("auth",),
        opaque: str | None = None,
        stale: bool = False,
    ) -> Challenge:
        """Build a Digest challenge with the usual quoting (RFC 3261 section 25.1)."""
        params = [AuthParam("realm", realm), AuthParam("nonce", nonce)]
        if opaque is not None:
            params.append(AuthParam("opaque", opaque))
        if stale:
            params.append(AuthParam("stale", "TRUE", quoted=False))
        if algorithm is not None:
            params.append(AuthParam("algorithm", algorithm, quoted=False))
        if qop:
            params.append(AuthParam("qop", ",".join(qop)))
        return cls("Digest", tuple(params))


@dataclass(frozen=True, slots=True)
class Credentials(_AuthValue):
    """An ``Authorization`` / ``Proxy-Authorization`` value (RFC 3261 s20.7, s20.28)."""

    @property
    def username(self) -> str | None:
        return self.param("username")

    @property
    def realm(self) -> str | None:
        return self.param("realm")

    @property
    def nonce(self) -> str | None:
        return self.param("nonce")

    @property
    def uri(self) -> str | None:
        return self.param("uri")

    @property
    def response(self) -> str | None:
        return self.param("response")

    @property
    def algorithm(self) -> str:
        """As sent; "MD5" when absent (RFC 2617 section 3.2.2)."""
        return self.param("algorithm") or "MD5"

    @property
    def cnonce(self) -> str | None:
        return self.param("cnonce")

    @property
    def nc(self) -> str | None:
        return self.param("nc")

    @property
    def qop(self) -> str | None:
        return self.param("qop")

    @property
    def opaque(self) -> str | None:
        return self.param("opaque")


def parse_challenge(value: str) -> Challenge:
    """Parse one ``WWW-Authenticate`` / ``Proxy-Authenticate`` field value."""
    return Challenge(*_parse_value(value, "challenge"))


def parse_credentials(value: str) -> Credentials:
    """Parse one ``Authorization`` / ``Proxy-Authorization`` field value."""
    return Credentials(*_parse_value(value, "credentials"))


# -- the digest computation (RFC 2617 section 3.2.2, RFC 7616 section 3.4) ----------------


def _sha512_256(data: bytes) -> str:
    try:
        return hashlib.new("sha512_256", data).hexdigest()
    except ValueError:  # an OpenSSL without SHA-512/256: use the cryptography package
        from cryptography.hazmat.primitives import hashes  # noqa: PLC0415

        digest = hashes.Hash(hashes.SHA512_256())
        digest.update(data)
        return digest.finalize().hex()


_HASHES: dict[str, Callable[[bytes], str]] = {
    # MD5 is what the protocol specifies for old clients, not a choice of ours.
    "MD5": lambda data: hashlib.md5(data, usedforsecurity=False).hexdigest(),
    "SHA-256": lambda data: hashlib.sha256(data).hexdigest(),
    "SHA-512-256": _sha512_256,
}
_HEX_LENGTH = {"MD5": 32, "SHA-256": 64, "SHA-512-256": 64}
ALGORITHMS: tuple[str, ...] = tuple(
    name for base in ("SHA-512-256", "SHA-256", "MD5") for name in (base, f"{base}-sess")
)
"""Every algorithm we compute, canonical spelling (RFC 7616 section 6.1 registry)."""
_CANONICAL = {name.lower(): name for name in ALGORITHMS}


def canonical_algorithm(name: str | None) -> str:
    """The canonical spelling of a digest algorithm (None means MD5); AuthError if unknown."""
    if name is None:
        return "MD5"
    try:
        return _CANONICAL[name.lower()]
    except KeyError:
        raise AuthError(f"unsupported digest algorithm {name[:40]!r}") from None


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def digest_response(
    *,
    algorithm: str | None,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The ``response`` value a client sends (lower-case hex).

    RFC 7616 section 3.4.1: with qop, response = KD(H(A1), nonce:nc:cnonce:qop:H(A2));
    without (RFC 2069 compatibility, RFC 2617 section 3.2.2.1), KD(H(A1), nonce:H(A2)).
    A1 = username:realm:password, or for ``-sess`` H(that):nonce:cnonce (section 3.4.2);
    A2 = method:uri, and for ``auth-int`` method:uri:H(body) (section 3.4.3).
    """
    name = canonical_algorithm(algorithm)
    session = name.endswith("-sess")
    hash_hex = _HASHES[name.removesuffix("-sess")]
    if qop is not None:
        qop = qop.lower()
        if qop not in ("auth", "auth-int"):
            raise AuthError(f"unsupported qop {qop[:20]!r}")
        if nc is None or cnonce is None:
            raise AuthError("qop needs nc and cnonce")
    if session and cnonce is None:
        raise AuthError(f"{name} needs a cnonce")
    ha1 = hash_hex(_utf8(f"{username}:{realm}:{password}"))
    if session:
        ha1 = hash_hex(_utf8(f"{ha1}:{nonce}:{cnonce}"))
    a2 = f"{method}:{uri}"
    if qop == "auth-int":
        a2 += ":" + hash_hex(body)
    ha2 = hash_hex(_utf8(a2))
    if qop is None:
        return hash_hex(_utf8(f"{ha1}:{nonce}:{ha2}"))
    return hash_hex(_utf8(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}"))


# -- server ---------------------------------------------------------------------------------


class AuthStatus(Enum):
    """What :meth:`DigestServer.verify` concluded, and so what to answer.

    OK: proceed.  MISSING: no usable credentials (none, another scheme, another realm):
    challenge.  MALFORMED: broken or inconsistent credentials: 400 Bad Request (RFC 2617
    s3.2.2.5 for a wrong digest-uri) or a fresh challenge.  INVALID: wrong password or unknown
    user (deliberately indistinguishable): challenge again, and count failures.  STALE and
    REPLAYED: the digest was right but the nonce is expired, foreign, forgotten or already
    used with that nonce-count: challenge with ``stale=TRUE`` (RFC 2617 section 3.2.1).
    """

    OK = "ok"
    MISSING = "missing"
    MALFORMED = "malformed"
    INVALID = "invalid"
    STALE = "stale"
    REPLAYED = "replayed"


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The outcome of one verification; ``user`` is the authenticated account when OK."""

    status: AuthStatus
    user: str | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is AuthStatus.OK

    @property
    def stale(self) -> bool:
        """True when the answer is a challenge with ``stale=TRUE``."""
        return self.status in (AuthStatus.STALE, AuthStatus.REPLAYED)


_NONCE_TAG = b"freecall digest nonce v1\x00"
_NONCE_RANDOM = 16
_NONCE_MAC = 16
_NONCE_RAW = 8 + _NONCE_RANDOM + _NONCE_MAC
_NONCE_TEXT_RE = re.compile(rf"[A-Za-z0-9_\-]{{{(_NONCE_RAW * 8 + 5) // 6}}}")
_NC_RE = re.compile(r"[0-9A-Fa-f]{8}")
_HEX_RE = re.compile(r"[0-9A-Fa-f]+")
_WINDOW = 64  # nonce-counts remembered below the highest seen, per nonce
_WINDOW_MASK = (1 << _WINDOW) - 1


@dataclass(slots=True)
class _NonceUse:
    """What one authenticated nonce has been used for: a sliding window of nonce-counts."""

    issued_ms: int
    highest: int
    window: int = 1  # bit i set: nonce-count (highest - i) was used

    def accept(self, nc: int) -> bool:
        """Record ``nc``; False if it was used already or is too far below the highest."""
        if nc > self.highest:
            shift = nc - self.highest
            # Cap the shift: nc may jump by 2**32, which must not build a huge int.
            window = 0 if shift >= _WINDOW else (self.window << shift) & _WINDOW_MASK
            self.window = window | 1
            self.highest = nc
            return True
        offset = self.highest - nc
        if offset >= _WINDOW or (self.window >> offset) & 1:
            return False
        self.window |= 1 << offset
        return True


@dataclass(slots=True)
class _Check:
    """What the syntax checks found: a MALFORMED reason, or the parsed qop/nc/algorithm."""

    status: AuthStatus | None = None
    reason: str = ""
    nc: int = 0
    qop: str | None = None
    algorithm: str = "MD5"

    def fail(self, reason: str) -> _Check:
        self.status, self.reason = AuthStatus.MALFORMED, reason
        return self


def _has(creds: Credentials, name: str) -> bool:
    return creds.param(name) is not None


class DigestServer:
    """The registrar/proxy side of digest authentication for one realm.

    ``secret`` keys the nonce MAC and the dummy passwords (at least 16 bytes; keep it across
    restarts so that outstanding nonces stay valid, or accept that clients see one
    ``stale=TRUE`` after a restart).  ``algorithms`` are challenged in that order, most
    preferred first (RFC 8760 section 2.4).  ``replay_cache_size`` bounds the nonces whose
    nonce-counts are remembered; when one is evicted, every nonce issued before it is treated
    as stale, so eviction can never reopen a replay.  Size it above the number of nonces in
    use within ``nonce_ttl``.

    ``now`` (seconds) is passed to every call; use wall-clock time (``time.time()``) so that
    nonces stay valid across a restart (a monotonic clock restarts from another origin).
    Instances hold the replay cache: one per realm and role (registrar, proxy), not shared
    between threads without a lock.
    """

    def __init__(
        self,
        realm: str,
        secret: bytes,
        *,
        nonce_ttl: float = 300.0,
        algorithms: Sequence[str] = ("SHA-256", "MD5"),
        qop: Sequence[str] = ("auth",),
        allow_rfc2069: bool = True,
        replay_cache_size: int = 4096,
        opaque: str | None = None,
        urandom: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the server secret must be at least 16 bytes")
        if nonce_ttl <= 0:
            raise ValueError("nonce_ttl must be positive")
        if replay_cache_size < 1:
            raise ValueError("replay_cache_size must be at least 1")
        if not algorithms:
            raise ValueError("at least one algorithm is needed")
        qop_values = tuple(q.lower() for q in qop)
        if not set(qop_values) <= {"auth", "auth-int"}:
            raise ValueError(f"unsupported qop in {qop!r}")
        if not qop_values and not allow_rfc2069:
            raise ValueError("without qop, RFC 2069 answers must be allowed")
        self.realm = realm
        self.nonce_ttl = nonce_ttl
        self.algorithms = tuple(canonical_algorithm(a) for a in algorithms)
        self.qop = qop_values
        self.allow_rfc2069 = allow_rfc2069
        self.opaque = opaque
        self._urandom = urandom
        self._nonce_key = hmac.new(secret, b"nonce-key", hashlib.sha256).digest()
        self._dummy_key = hmac.new(secret, b"dummy-password-key", hashlib.sha256).digest()
        self._realm_bytes = _utf8(realm)
        self._uses: OrderedDict[str, _NonceUse] = OrderedDict()
        self._capacity = replay_cache_size
        self._forgotten_before_ms = -1

    # -- nonces ---------------------------------------------------------------------------

    def _mac(self, issued: bytes, random: bytes) -> bytes:
        message = _NONCE_TAG + self._realm_bytes + b"\x00" + issued + random
        return hmac.new(self._nonce_key, message, hashlib.sha256).digest()[:_NONCE_MAC]

    def new_nonce(self, now: float) -> str:
        """A fresh nonce: base64url(issued-ms || 16 random bytes || MAC), 54 characters."""
        issued = struct.pack(">Q", max(0, int(now * 1000)))
        random = self._urandom(_NONCE_RANDOM)
        if len(random) != _NONCE_RANDOM:
            raise ValueError("urandom returned the wrong number of bytes")
        raw = issued + random + self._mac(issued, random)
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def _nonce_issued_ms(self, nonce: str) -> int | None:
        """When this server issued ``nonce`` (ms), or None if it did not (MAC checked)."""
        if not _NONCE_TEXT_RE.fullmatch(nonce):
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "==")
        except (binascii.Error, ValueError):
            return None
        if len(raw) != _NONCE_RAW:
            return None
        issued, random, mac = raw[:8], raw[8 : 8 + _NONCE_RANDOM], raw[8 + _NONCE_RANDOM :]
        if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != nonce:
            return None  # a non-canonical spelling of the same bytes
        if not hmac.compare_digest(mac, self._mac(issued, random)):
            return None
        return int(struct.unpack(">Q", issued)[0])

    # -- challenges -----------------------------------------------------------------------

    def challenges(self, now: float, *, stale: bool = False) -> list[Challenge]:
        """One challenge per algorithm, most preferred first, each with its own nonce."""
        return [
            Challenge.digest(
                self.realm,
                self.new_nonce(now),
                algorithm=algorithm,
                qop=self.qop,
                opaque=self.opaque,
                stale=stale,
            )
            for algorithm in self.algorithms
        ]

    def challenge(self, now: float, stale: bool = False) -> list[str]:
        """``WWW-Authenticate`` / ``Proxy-Authenticate`` values, one field per algorithm."""
        return [c.render() for c in self.challenges(now, stale=stale)]

    # -- verification ---------------------------------------------------------------------

    def _dummy_password(self, username: str) -> str:
        # Per username and secret, so that no password can be guessed to match it (96 bits);
        # about as long as a real password, so the hashing takes about as long.
        return hmac.new(self._dummy_key, _utf8(username), hashlib.sha256).hexdigest()[:24]

    def _candidates(self, username: str) -> list[str]:
        """Account names to try for ``username`` (see the module docstring on ``user@``)."""
        local, at, domain = username.partition("@")
        if at and local and (not domain or domain.lower() == self.realm.lower()):
            return [username, local]
        return [username]

    def _syntax(self, creds: Credentials, request_uri: str | None) -> _Check:
        """Every check that depends only on the credentials' form, never on the account."""
        check = _Check()
        missing = [
            n for n in ("username", "realm", "nonce", "uri", "response") if not _has(creds, n)
        ]
        if missing:
            return check.fail(f"missing {', '.join(missing)}")
        try:
            check.algorithm = canonical_algorithm(creds.param("algorithm"))
        except AuthError as error:
            return check.fail(str(error))
        if check.algorithm not in self.algorithms:
            return check.fail("algorithm was not offered")
        qop, nc_text, cnonce = creds.qop, creds.nc, creds.cnonce
        if qop is None:
            if not self.allow_rfc2069:
                return check.fail("qop is required")
            if nc_text is not None or cnonce is not None:
                return check.fail("nc/cnonce without qop")
            if check.algorithm.endswith("-sess"):
                return check.fail("-sess needs qop")
        else:
            check.qop = qop.lower()
            if check.qop not in self.qop:
                return check.fail("qop was not offered")
            if nc_text is None or cnonce is None:
                # sipvicious' svcrack: qop=auth without cnonce/nc.
                return check.fail("qop without nc and cnonce")
            if not _NC_RE.fullmatch(nc_text) or int(nc_text, 16) == 0:
                return check.fail("nc must be 8 hex digits, not 00000000")
            check.nc = int(nc_text, 16)
        response = creds.response or ""
        if len(response) != _HEX_LENGTH[check.algorithm.removesuffix("-sess")] or not (
            _HEX_RE.fullmatch(response)
        ):
            return check.fail("response is not a digest of the right length")
        if request_uri is not None and creds.uri != request_uri:
            # RFC 2617 section 3.2.2.5 / RFC 7616 section 3.4.6: answer 400.
            return check.fail("uri is not the Request-URI")
        if self.opaque and creds.opaque != self.opaque:
            return check.fail("opaque was not echoed")
        return check

    def verify(
        self,
        credentials: Credentials | str | None,
        method: str,
        now: float,
        lookup_password: Callable[[str], str | None],
        *,
        request_uri: str | None = None,
        body: bytes = b"",
    ) -> AuthResult:
        """Check one ``Authorization`` / ``Proxy-Authorization`` value for ``method``.

        ``lookup_password(account)`` returns the plain password or None.  ``request_uri``,
        when given, must equal the digest-uri.  ``body`` is needed only for ``qop=auth-int``.
        Never raises on hostile input: everything maps to an :class:`AuthStatus`.
        """
        if credentials is None or (isinstance(credentials, str) and not credentials.strip()):
            return AuthResult(AuthStatus.MISSING, reason="no credentials")
        if isinstance(credentials, str):
            try:
                creds = parse_credentials(credentials)
            except AuthError as error:
                return AuthResult(AuthStatus.MALFORMED, reason=str(error))
        else:
            creds = credentials
        if not creds.is_digest:
            return AuthResult(AuthStatus.MISSING, reason=f"scheme {creds.scheme} not supported")
        if creds.realm != self.realm:
            return AuthResult(AuthStatus.MISSING, reason="credentials for another realm")
        check = self._syntax(creds, request_uri)
        if check.status is not None:
            return AuthResult(check.status, reason=check.reason)

        username = creds.username or ""
        nonce = creds.nonce or ""
        issued_ms = self._nonce_issued_ms(nonce)

        # From here on, known and unknown users run exactly the same statements.
        candidates = self._candidates(username)
        found = [lookup_password(name) for name in candidates]
        dummy = self._dummy_password(username)
        account, password = next(
            ((name, pw) for name, pw in zip(candidates, found, strict=True) if pw is not None),
            (None, dummy),
        )
        expected = digest_response(
            algorithm=check.algorithm,
            username=username,
            realm=self.realm,
            password=password,
            method=method,
            uri=creds.uri or "",
            nonce=nonce,
            qop=check.qop,
            nc=creds.nc,
            cnonce=creds.cnonce,
            body=body,
        )
        matches = hmac.compare_digest(expected, (creds.response or "").lower())
        if not matches or account is None:
            return AuthResult(AuthStatus.INVALID, reason="wrong username or password")

        # The client knows the password; now decide whether this nonce may still be used.
        if issued_ms is None:
            return AuthResult(AuthStatus.STALE, reason="nonce not issued by this server")
        age = now - issued_ms / 1000
        if age > self.nonce_ttl or age < -1.0:
            return AuthResult(AuthStatus.STALE, reason="nonce expired")
        entry = self._uses.get(nonce)
        if entry is None:
            if issued_ms <= self._forgotten_before_ms:
                return AuthResult(AuthStatus.STALE, reason="nonce state forgotten")
            self._remember(nonce, _NonceUse(issued_ms, check.nc))
        else:
            self._uses.move_to_end(nonce)
            # RFC 2069 answers carry no nonce-count: a nonce serves one request only.
            if check.qop is None or not entry.accept(check.nc):
                return AuthResult(AuthStatus.REPLAYED, reason="nonce-count already used")
        return AuthResult(AuthStatus.OK, user=account, reason="ok")

    def _remember(self, nonce: str, use: _NonceUse) -> None:
        self._uses[nonce] = use
        while len(self._uses) > self._capacity:
            _, evicted = self._uses.popitem(last=False)
            self._forgotten_before_ms = max(self._forgotten_before_ms, evicted.issued_ms)

    @property
    def remembered_nonces(self) -> int:
        """How many nonces the replay cache holds (never more than ``replay_cache_size``)."""
        return len(self._uses)


# -- client ---------------------------------------------------------------------------------


def choose_challenge(
    values: Iterable[Challenge | str], *, realm: str | None = None
) -> Challenge | None:
    """The topmost Digest challenge we can answer (RFC 8760 section 2.5), or None.

    Unparsable values, other schemes and unknown algorithms are skipped ("the client MUST
    ignore any challenge it does not support"); ``realm`` restricts the choice.
    """
    for value in values:
        try:
            challenge = parse_challenge(value) if isinstance(value, str) else value
            canonical_algorithm(challenge.param("algorithm"))
        except AuthError:
            continue
        if not challenge.is_digest or challenge.nonce is None or challenge.realm is None:
            continue
        if realm is not None and challenge.realm != realm:
            continue
        if challenge.qop_options and not {"auth", "auth-int"} & set(challenge.qop_options):
            continue
        return challenge
    return None


class DigestClient:
    """The UAC side: answers challenges and counts requests per nonce (RFC 7616 s3.4).

    ``urandom`` supplies the cnonce; ``max_nonces`` bounds the nonce-count table.
    """

    def __init__(
        self, *, urandom: Callable[[int], bytes] = os.urandom, max_nonces: int = 64
    ) -> None:
        self._urandom = urandom
        self._max_nonces = max(1, max_nonces)
        self._counts: OrderedDict[str, int] = OrderedDict()

    def _next_nc(self, nonce: str) -> int:
        count = self._counts.pop(nonce, 0) + 1
        self._counts[nonce] = count
        while len(self._counts) > self._max_nonces:
            self._counts.popitem(last=False)
        return count

    def credentials(
        self,
        challenge: Challenge | str,
        method: str,
        uri: str,
        username: str,
        password: str,
        *,
        body: bytes = b"",
        cnonce: str | None = None,
    ) -> Credentials:
        """Typed credentials answering ``challenge`` for a request ``method uri``."""
        chal = parse_challenge(challenge) if isinstance(challenge, str) else challenge
        if not chal.is_digest:
            raise AuthError(f"cannot answer a {chal.scheme} challenge")
        realm, nonce = chal.realm, chal.nonce
        if realm is None or nonce is None:
            raise AuthError("challenge without realm or nonce")
        algorithm_param = chal.param("algorithm")
        algorithm = canonical_algorithm(algorithm_param)
        options = chal.qop_options
        qop: str | None
        if not options:
            qop = None
        elif "auth" in options:
            qop = "auth"
        elif "auth-int" in options:
            qop = "auth-int"
        else:
            raise AuthError(f"no supported qop in {options!r}")
        nc: str | None = None
        if qop is not None or algorithm.endswith("-sess"):
            cnonce = cnonce if cnonce is not None else self._urandom(16).hex()
        else:
            cnonce = None
        if qop is not None:
            nc = f"{self._next_nc(nonce):08x}"
        response = digest_response(
            algorithm=algorithm,
            username=username,
            realm=realm,
            password=password,
            method=method,
            uri=uri,
            nonce=nonce,
            qop=qop,
            nc=nc,
            cnonce=cnonce,
            body=body,
        )
        params = [
            AuthParam("username", username),
            AuthParam("realm", realm),
            AuthParam("nonce", nonce),
            AuthParam("uri", uri),
            AuthParam("response", response),
        ]
        if algorithm_param is not None:
            params.append(AuthParam("algorithm", algorithm, quoted=False))
        if cnonce is not None:
            params.append(AuthParam("cnonce", cnonce))
        if chal.opaque is not None:
            params.append(AuthParam("opaque", chal.opaque))
        if qop is not None and nc is not None:
            params.append(AuthParam("qop", qop, quoted=False))
            params.append(AuthParam("nc", nc, quoted=False))
        return Credentials("Digest", tuple(params))

    def authorization(
        self,
        challenge: Challenge | str,
        method: str,
        uri: str,
        username: str,
        password: str,
        *,
        body: bytes = b"",
        cnonce: str | None = None,
    ) -> str:
        """The ``Authorization`` / ``Proxy-Authorization`` value answering ``challenge``."""
        return self.credentials(
            challenge, method, uri, username, password, body=body, cnonce=cnonce
        ).render()
