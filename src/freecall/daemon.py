"""The composition root: one asyncio daemon wiring the transport edge to the pure cores.

Data path: the transport frames bytes into messages and calls :meth:`Daemon._on_message`, which
parses (with the daemon's :class:`HeaderCache`), feeds the transaction layer, and then pumps
every core once (:meth:`Daemon._pump`): transaction events go to the proxy, proxy events to the
registrar and the logs, and what the transaction layer wants sent goes back to the transport.
One timer, re-armed after every pump from the earliest ``get_timer()`` of the cores, drives
every retransmission and timeout.  Nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .config import AutoUser, Config, ConfigError, SecurityConfig, ensure_auto_user, load_config
from .control.model import CallRecord
from .control.service import ControlService
from .gpgverify.gpg import normalise_address
from .gpgverify.service import KeyPaths, SasKeys
from .gpgverify.verdict import Outcome, Verdict, with_voice_check
from .netaddr import own_address
from .ops.callrecords import RECORDS_FILE, CallRecordLog, record_of
from .ops.reload import effective_config, plan_reload
from .ops.sdnotify import Notifier
from .peering.gossip import GossipConfig
from .peering.nat import NatView
from .peering.natservice import NatService
from .peering.records import Address, AddrKind, NodeIdentity, NodeRecord
from .peering.service import PeeringService, RecordKey, announcement_for
from .routing.dns import AsyncDns
from .routing.router import Router, parse_routes
from .sip.auth import DigestServer
from .sip.errors import SipParseError
from .sip.flow import Flow
from .sip.message import HeaderCache, Request, make_error_response, parse_message
from .sip.proxy import (
    Call,
    CallAnswered,
    CallEnded,
    CallStarted,
    Listener,
    Proxy,
    ProxyEvent,
    ProxySettings,
    Refused,
    Registered,
    Resolution,
    Side,
)
from .sip.ratelimit import AuthLockout, Decision, SourceLimiter
from .sip.registrar import Registrar
from .sip.transaction import TimerValues, TransactionLayer
from .srtp.bridge import (
    NATIVE_AVAILABLE,
    IceServers,
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
from .srtp.calls import DialogKey, MediaCalls
from .srtp.iceservers import ice_servers, mesh_relays, prefer
from .srtp.keys import RetainedSecrets
from .srtp.zrtp import ZrtpConfig
from .storage import atomic_write
from .tls import certificate_fingerprint, client_context, make_self_signed, server_context
from .transport import SipTransport, Timer, TransportOptions, framing_error_response

log = logging.getLogger("freecall")

SECRET_FILE = "secret.key"  # noqa: S105 -- a file name, not a secret
ZRTP_CACHE_FILE = "zrtp-cache"
REGISTRATIONS_FILE = "registrations.json"
REGISTRATIONS_SAVE_INTERVAL = 5.0
"""Bindings are saved this often when they changed (and at stop): after a crash or a restart
(an upgrade, ``systemctl restart``) UDP softphones are reachable at once, without waiting for
their next REGISTER."""
WILDCARDS = ("0.0.0.0", "::")  # noqa: S104 -- compared against, never bound here


def load_secret(state_dir: Path) -> bytes:
    """The node's local secret (digest nonces, Record-Route tokens), kept across restarts."""
    path = state_dir / SECRET_FILE
    try:
        secret = path.read_bytes()
        if len(secret) >= 32:
            return secret
    except FileNotFoundError:
        pass
    secret = os.urandom(32)
    atomic_write(path, secret)
    return secret


KNOWN_METHODS = frozenset({"INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "INFO",
                           "UPDATE", "PRACK", "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE",
                           "PUBLISH"})
"""Methods counted by name in the metrics; any other counts as ``other`` (bounded labels)."""


@dataclass
class Stats:
    started: float = 0.0
    parse_errors: int = 0
    messages_in: int = 0
    calls_total: int = 0
    requests_in: dict[str, int] = field(default_factory=dict)
    """Requests received by method (``other`` for unknown ones)."""
    responses_in: dict[str, int] = field(default_factory=dict)
    """Responses received by class (``1xx`` ... ``6xx``)."""
    calls_ended: dict[tuple[str, str], int] = field(default_factory=dict)
    """Finished calls by (outcome, verification)."""
    reloads: int = 0
    state_write_failures: int = 0
    """Failed writes of state files (disk full, read-only): logged once a streak, counted."""
    reload_failures: int = 0
    limiter: SourceLimiter | None = None
    """Per-source rate limit on the public listeners (``security.rate_limit``); its counters
    are the metrics ``freecall_ratelimit_blocked_total`` and ``..._dropped_total``."""
    lockout: AuthLockout | None = None
    """Password-guessing lockout (``security.auth_failures``): ``freecall_auth_lockouts_total``."""


class Daemon:
    """One freecall node (see the module docstring)."""

    def __init__(self, config: Config, *, auto_user: AutoUser | None = None,
                 config_path: str | None = None,
                 overrides: dict[str, object] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.auto_user = auto_user
        self.config_path = config_path
        """Where a reload re-reads the configuration (None: the embedded defaults)."""
        self.overrides = dict(overrides or {})
        self.notifier = notifier or Notifier()
        """systemd's notification socket (``Type=notify``), a no-op outside systemd."""
        self.records: CallRecordLog | None = None
        """``calls.jsonl``: one line per finished call (issue 10)."""
        self.stats = Stats()
        self._apply_limits(config.security)
        self.cache = HeaderCache()
        self.passwords = {name: user.password for name, user in config.users.items()}
        self.state_dir = config.state_dir
        self.transport: SipTransport | None = None
        self.layer: TransactionLayer | None = None
        self.proxy: Proxy | None = None
        self.registrar: Registrar | None = None
        self.router: Router | None = None
        self.peering: PeeringService | None = None
        self.dns: AsyncDns | None = None
        self.nat: NatService | None = None
        """Node-level STUN and the connection kept to a relay behind NAT (issue 9)."""
        self.nat_view = NatView()
        """The one "behind NAT?" verdict: node-level STUN's answer, else the media gathering's
        (freecall.peering.nat.NatView); the record, the relay link, the mesh TURN choice and
        /api/status read it."""
        self.media_engine: MediaEngine | None = None
        self._relay_list: tuple[float, list[NodeRecord]] | None = None
        """Relay records of the host cache and when they were listed (for ICE servers)."""
        self.media: MediaCalls | None = None
        self.media_state: dict[DialogKey, str] = {}
        """Each live call's media state (secure, insecure, failed) for its end-of-call log line;
        the details live in the control API's call records."""
        self.keys: SasKeys | None = None
        """OpenPGP: our key, SAS signatures, the peer's verification (issue 7)."""
        self._remote_sdp: dict[DialogKey, asyncio.Event] = {}
        """Verifications waiting for the far end's SDP (its key offer) to cross."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: Timer | None = None
        self._stopping = asyncio.Event()
        self._registrations_dirty = False
        self._registrations_failing = False
        self._sides: dict[tuple[str, int], Side] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.control: ControlService | None = None
        """The control API, the event stream and the dashboard (issue 8)."""

    # -- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        self._loop = loop
        for sig in (signal.SIGINT, signal.SIGTERM):  # first: a signal during start-up is clean
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stopping.set)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The slow part of a first start (making the OpenPGP key) comes before the SIP sockets
        # open: a request arriving once they are bound is answered at once.
        self.keys = await self._start_openpgp()
        secret = load_secret(self.state_dir)
        specs = [(lst, Side.SOFTPHONE) for lst in config.sip.listen] + [
            (lst, Side.PUBLIC) for lst in config.sip.public
        ]
        server_ssl = client_ssl = None
        tls = config.sip.tls
        tls_key: bytes | None = None
        if any(lst.transport == "tls" for lst, _ in specs):
            certificate = make_self_signed(tls.certificate, tls.private_key, config.node.name)
            tls_key = bytes.fromhex(certificate_fingerprint(certificate))
            server_ssl = server_context(
                tls.certificate,
                tls.private_key,
                ca_file=tls.ca_file or None,
                verify_peer=tls.verify_peer,
            )
        client_ssl = client_context(
            tls.certificate if Path(tls.certificate).exists() else None,
            tls.private_key if Path(tls.private_key).exists() else None,
            ca_file=tls.ca_file or None,
            verify_peer=tls.verify_peer,
        )
        transport = SipTransport(
            [lst for lst, _ in specs],
            self._on_message,
            on_transport_error=self._on_transport_error,
            on_framing_error=self._on_framing_error,
            on_flow_closed=self._on_flow_closed,
            server_ssl=server_ssl,
            client_ssl=client_ssl,
            options=TransportOptions(max_message_size=config.sip.max_message_size),
        )
        bound = await transport.start()
        self.transport = transport
        listeners: list[Listener] = []
        advertise = self._advertise()
        for (spec, side), lst in zip(specs, bound, strict=True):
            self._sides[(lst.transport, lst.port)] = side
            host = lst.host
            if host in WILDCARDS:
                if side is Side.PUBLIC and advertise is not None:
                    host = advertise
                else:
                    host = config.sip.advertise or ("127.0.0.1" if host == "0.0.0.0" else "::1")  # noqa: S104
            listeners.append(Listener(lst.transport, host, lst.port, side))
            del spec
        wall_offset = time.time() - loop.time()
        domains = self._domains(listeners)
        canonical = config.sip.domains[0] if config.sip.domains else config.node.name
        timers = config.sip.timers
        self.layer = TransactionLayer(
            TimerValues(timers.t1, timers.t2, timers.t4),
            server_header=config.sip.user_agent or None,
        )
        reg = config.sip.registration
        self.registrar = Registrar(
            domains,
            canonical_domain=canonical,
            min_expires=reg.min_expires,
            max_expires=reg.max_expires,
            default_expires=reg.default_expires,
            max_bindings_per_aor=reg.max_contacts,
            wall_offset=wall_offset,
        )
        self._load_registrations(loop.time())
        servers = [(server.host, server.port) for server in config.dns.servers] or None
        self.dns = AsyncDns(servers, timeout=config.dns.timeout)
        advertise_ip = await _an_ip(advertise, config.dns.timeout) if advertise else None
        self._start_media(loop, advertise_ip)
        if config.peering.listen is not None and config.sip.public:
            self.peering = await self._start_peering(listeners, advertise, advertise_ip, tls_key)
            transport.peer_key_check = self.peering.tls_key_ok
            self.nat = await self._start_nat(listeners, self.peering)
        elif config.peering.listen is not None:
            log.info("peering is off: no sip.public listener (a node other nodes cannot reach "
                     "opens nothing beyond loopback)")
        if self.media_engine is not None:
            self.media_engine.start_pool()  # ICE servers may come from the host cache
        self.router = Router.from_config(
            config, self._on_resolved, peers=self.peering, dns=self.dns
        )
        self.proxy = Proxy(
            self.layer,
            ProxySettings(
                domains=frozenset(domains),
                listeners=tuple(listeners),
                secret=secret,
                realm=config.sip.realm,
                timer_c=timers.timer_c,
                trusted=tuple(config.sip.trusted),
                allow_register_from=tuple(config.sip.allow_register_from),
                server_name=config.sip.user_agent,
                wall_offset=wall_offset,
                canonical_domain=canonical,
                calls_per_source=config.security.calls_per_source,
                cap_exempt=tuple(config.security.rate_exempt),
                ack_wait=64 * timers.t1,
            ),
            self.registrar,
            resolver=self.router,
            digest=DigestServer(
                config.sip.realm, secret, algorithms=tuple(config.sip.digest_algorithms)
            ),
            password_of=self.passwords.get,
            side_of=self._side_of,
            media=self.media,
            lockout=self.stats.lockout,
        )
        self._timer = Timer(loop, self._on_timer)
        self.stats.started = loop.time()
        # The cores free finished calls by reference counting (no cycles are left behind), so
        # the cyclic collector only needs to run rarely; its full passes over every live
        # transaction stalled the loop long enough to cause retransmissions under load.
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
        self._spawn(self._save_registrations_periodically())
        if config.log.call_records:
            self.records = CallRecordLog(self.state_dir / RECORDS_FILE,
                                         max_bytes=config.log.call_records_max_size,
                                         keep=config.log.call_records_keep, loop=loop)
        await self._start_control()
        log.info(
            "freecall %s node %s listening on %s; domains: %s",
            __version__,
            config.node.name,
            ", ".join(str(lst) for lst in bound),
            ", ".join(sorted(domains)),
        )
        # Type=notify: systemd starts units ordered after us only now, with every socket bound.
        self.notifier.ready(f"serving {len(self.passwords)} user(s) on "
                            + ", ".join(str(lst) for lst in bound))
        self.notifier.start_watchdog(loop)

    def _advertise(self) -> str | None:
        """The address other nodes reach this node on (``sip.advertise``'s documented order)."""
        config = self.config
        if config.sip.advertise:
            return config.sip.advertise
        for lst in config.sip.public:
            if lst.host not in WILDCARDS:
                return lst.host
        return own_address()

    def _start_media(self, loop: asyncio.AbstractEventLoop, advertise_ip: str | None) -> None:
        """The media bridge: streams on ``media.address`` (default: the advertised address)
        and loopback, ZRTP with the retained secrets of the state directory."""
        config = self.config
        address = config.media.address or advertise_ip or "127.0.0.1"
        secrets = RetainedSecrets(self.state_dir / ZRTP_CACHE_FILE)
        if secrets.load_error:
            log.warning("ZRTP cache: %s (set aside; starting a new one)", secrets.load_error)
        local = _is_local_address(address)
        self.media_engine = MediaEngine(
            loop,
            address=address,
            port_range=config.media.ports,
            retained_secrets=secrets,
            bind_host=None if local else ("::" if ":" in address else "0.0.0.0"),  # noqa: S104
            zrtp_config=ZrtpConfig(client_id=f"freecall {__version__}"[:16],
                                   sign_sas=self.keys is not None,
                                   signature_capable=self.keys is not None),
            policy=config.security.policy,
            rtp_timeout=config.media.rtp_timeout,
            zrtp_timeout=config.security.zrtp_timeout,
            on_event=self._on_media_event,
            ice=config.media.ice,
            ice_servers=self._ice_servers,
            ice_pool=config.media.ice_pool,
            nat_view=self.nat_view,
            native=config.media.native != "off",
            phone_socket=config.media.phone_socket,
        )
        self.media = MediaCalls(self.media_engine,
                                key_offer=self.keys.offer if self.keys is not None else None,
                                on_remote_sdp=self._remote_sdp_crossed)
        shared = self.media_engine.shared_phone_port
        log.info("media on %s, ports %d-%d, security policy %s, secure per-packet path in %s, "
                 "softphone side on %s",
                 address, config.media.ports.first, config.media.ports.last,
                 config.security.policy,
                 "C" if self.media_engine.native and NATIVE_AVAILABLE else "Python",
                 "a port pair per stream" if shared is None
                 else f"one shared port pair {shared}-{shared + 1}")

    def _ice_servers(self) -> IceServers:
        """STUN and TURN for the next media stream: configured ones and the mesh's relays
        (freecall.srtp.iceservers), the relay list refreshed every 30 s (2 s while empty)."""
        now = time.monotonic()
        listed = self._relay_list
        if listed is None or now - listed[0] > (30.0 if listed[1] else 2.0):
            peering = self.peering
            relays = (mesh_relays(peering.records(), peering.identity.node_id)
                      if peering is not None else [])
            listed = self._relay_list = (now, relays)
        config = self.config
        relays = listed[1]
        preferred = self.nat.preferred_relay() if self.nat is not None else None
        # the relay our signalling is attached to first: one relay sees our traffic
        relays = prefer(relays, preferred)
        return ice_servers(
            stun=config.media.stun, turn=config.media.turn, relays=relays,
            identity=self.peering.identity if self.peering is not None else None,
            wall_now=time.time(), behind_nat=self.nat_view.behind_nat)

    async def _start_openpgp(self) -> SasKeys | None:
        """Our OpenPGP key (made on first start, naming every user of every domain we
        serve), or None when signing is off or GnuPG does not work (calls then end
        ``unverified``; the SAS can still be compared by voice)."""
        config = self.config
        if not config.openpgp.sign or config.security.policy == "off":
            return None
        served = list(config.sip.domains) or [config.node.name]
        addresses = [f"{user}@{domain}" for domain in served for user in config.users]
        keys = SasKeys(
            KeyPaths.for_state(self.state_dir, config.openpgp.home or None),
            binary=config.openpgp.binary,
            key=config.openpgp.key,
            name=f"freecall {config.node.name}",
            addresses=addresses or [f"freecall@{served[0] if served else config.node.name}"],
            passphrase_file=config.openpgp.passphrase_file or None,
        )
        try:
            fingerprint = await keys.start()
        except (OSError, RuntimeError, ValueError) as exc:
            log.error("OpenPGP is off: %s (calls cannot be verified by signature)", exc)
            await keys.close()
            return None
        log.info("OpenPGP key %s signs the SAS of our calls", fingerprint)
        return keys

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """A background task the daemon keeps a reference to (and cancels at stop)."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_peering(
        self, listeners: list[Listener], advertise: str | None, ip: str | None,
        tls_key: bytes | None,
    ) -> PeeringService:
        """Join the mesh: announce our public SIP addresses, domains and users."""
        config = self.config
        listen = config.peering.listen
        assert listen is not None
        gossip_host = ip if listen.host in WILDCARDS else listen.host
        sip: list[Address] = []
        for lst in listeners:
            host = ip if lst.host == advertise else lst.host
            if lst.side is Side.PUBLIC and host is not None:
                sip.append(Address(_SIP_KIND[lst.transport], host, lst.port))
        served = list(config.sip.domains) or [config.node.name]
        routes = [*served, *(f"{user}@{served[0]}" for user in config.users)]
        identity = NodeIdentity.load_or_create(self.state_dir)
        gossip_address = None
        if gossip_host is not None:
            gossip_address = Address(AddrKind.GOSSIP, gossip_host, listen.port)
        announcement = announcement_for(
            identity, gossip=gossip_address, sip=sip, routes=routes, tls_key=tls_key,
            name=config.node.name, openpgp_key=self._record_openpgp_key(),
        )
        peering = config.peering
        service = PeeringService(
            identity,
            announcement,
            listen=(listen.host, listen.port),
            state_dir=self.state_dir,
            config=GossipConfig(
                interval=peering.interval, group_bits=peering.group_bits,
                capacity=peering.capacity,
            ),
            seeds=[(seed.host, seed.port) for seed in peering.seeds],
            srv_domain=peering.srv_domain,
            mdns=peering.mdns,
            dns=self.dns,
            dns_timeout=config.dns.timeout,
        )
        await service.start()
        return service

    async def _start_nat(self, listeners: list[Listener], peering: PeeringService
                         ) -> NatService | None:
        """STUN and, behind NAT, the relay link (``nat.*``); off without a TLS listener on
        the node side (the relay link is TLS) or when there is nothing to do."""
        config = self.config
        nat = config.nat
        tls = next((lst for lst in listeners
                    if lst.side is Side.PUBLIC and lst.transport == "tls"), None)
        if not nat.stun and nat.attach == "never":
            return None
        stun: list[tuple[str, int]] = []
        for server in config.media.stun:
            ip = await _an_ip(server.host, config.dns.timeout)
            if ip is not None:
                stun.append((ip, server.port))
        assert self.transport is not None
        sent_by = tls.sent_by if tls is not None else "invalid.invalid:5061"
        service = NatService(nat if tls is not None else dataclasses.replace(
                                 nat, attach="never"),
                             transport=self.transport, peering=peering,
                             identity=peering.identity, stun=stun,
                             is_local=_is_local_address, sent_by=sent_by, view=self.nat_view)
        service.start()
        return service

    def _record_openpgp_key(self) -> bytes | None:
        """The fingerprint our node record names: the key that signs our SAS hashes, if it
        can (a record naming a key that does not sign would make peers suspect an attack)."""
        keys = self.keys
        if keys is None or keys.fingerprint is None or not keys.can_sign:
            return None
        return bytes.fromhex(keys.fingerprint)

    async def _start_control(self) -> None:
        """The control API (HTTP with the token, and the Unix socket) and the dashboard."""
        self.control = ControlService(self, keys=self.keys)
        bound = await self.control.start()
        if bound:
            log.info("control API on %s", ", ".join(bound))

    def hang_up(self, key: DialogKey, reason: str) -> bool:
        """End an answered call from the middle (control API); False if it is not up."""
        proxy, loop = self.proxy, self._loop
        call = proxy.calls.get(key) if proxy is not None else None
        if call is None or loop is None or proxy is None:
            return False
        if not proxy.hang_up(call, loop.time(), reason):
            return False
        self._pump()
        return True

    # -- registrations across restarts ----------------------------------------------------
    def _load_registrations(self, now: float) -> None:
        registrar = self.registrar
        path = self.state_dir / REGISTRATIONS_FILE
        if registrar is None or not path.exists():
            return
        try:
            restored = registrar.from_json(path.read_text(encoding="utf-8"), now)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            log.warning("%s: %s (set aside; softphones register again)", path.name, error)
            with contextlib.suppress(OSError):
                path.replace(path.with_name(path.name + ".bad"))
            return
        for aor in {b.aor for b in registrar.bindings(now)}:
            user = aor.rpartition("@")[0]
            if user not in self.passwords:  # the account went while we were down
                registrar.remove_user(user, now)
        while registrar.next_event() is not None:
            pass
        if restored:
            log.info("%d registration(s) restored from %s", registrar.binding_count, path.name)

    def _registrations_snapshot(self) -> bytes | None:
        """The bindings as JSON if they changed since the last snapshot (taken on the loop)."""
        if self.registrar is None or not self._registrations_dirty:
            return None
        self._registrations_dirty = False
        return self.registrar.to_json().encode()

    def _save_registrations(self) -> None:
        data = self._registrations_snapshot()
        if data is not None:
            self._write_registrations(data)

    def _write_registrations(self, data: bytes) -> None:
        """Atomic write; a failure (disk full) is logged once until a write works again."""
        try:
            atomic_write(self.state_dir / REGISTRATIONS_FILE, data)
        except OSError as error:
            self._registrations_dirty = True
            self.stats.state_write_failures += 1
            if not self._registrations_failing:
                log.error("cannot save the registrations: %s (retrying; calls go on)", error)
            self._registrations_failing = True
        else:
            if self._registrations_failing:
                log.info("registrations saved again")
            self._registrations_failing = False

    async def _save_registrations_periodically(self) -> None:
        """The snapshot is taken on the loop, written (and fsynced) in a worker thread."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(REGISTRATIONS_SAVE_INTERVAL)
            data = self._registrations_snapshot()
            if data is not None:
                await loop.run_in_executor(None, self._write_registrations, data)

    # -- reload (SIGHUP, POST /api/reload) ------------------------------------------------
    def _on_sighup(self) -> None:
        """``systemctl reload freecall``: re-read the configuration; errors keep the old one."""
        with contextlib.suppress(ConfigError):  # reload() logged it
            self.reload()

    def reload(self) -> dict[str, Any]:
        """Re-read the configuration and apply what can change live (freecall.ops.reload);
        every call in progress stays up. Raises ConfigError (and changes nothing) on a bad
        file."""
        self.notifier.reloading()
        try:
            loaded = load_config(self.config_path, overrides=self.overrides)
            loaded, _ = ensure_auto_user(loaded)
        except ConfigError as error:
            self.stats.reload_failures += 1
            log.error("reload: the configuration has errors; keeping the running one: %s",
                      error)
            self.notifier.ready("serving (the last reload failed)")
            raise
        self.stats.reloads += 1
        plan = plan_reload(self.config, loaded)
        new = effective_config(self.config, loaded, plan)
        self._apply_live(new, plan.live)
        self.config = new
        if self.control is not None:
            self.control.config = new
        summary = plan.summary()
        if not plan.changed:
            log.info("reload: configuration unchanged")
        else:
            log.info("reload: applied %s%s; needs a restart: %s",
                     ", ".join(plan.live) or "nothing",
                     f" (users added: {', '.join(plan.users_added)})" if plan.users_added
                     else "", ", ".join(plan.restart) or "nothing")
        summary["calls_kept"] = len(self.proxy.calls) if self.proxy is not None else 0
        self.notifier.ready("serving")
        if self.control is not None:
            self.control.bus.publish("reload", **summary)
        return summary

    def _apply_live(self, new: Config, keys: list[str]) -> None:
        """Push the live settings of ``new`` into the running cores (nothing is restarted)."""
        changed = set(keys)
        if "users" in changed:
            self.passwords.clear()  # the proxy reads this very dict (password_of)
            self.passwords.update({name: user.password for name, user in new.users.items()})
            if self.registrar is not None and self._loop is not None:
                for name in set(self.config.users) - set(new.users):
                    self.registrar.remove_user(name, self._loop.time())
        served = list(new.sip.domains) or [new.node.name]
        if "users" in changed and self.keys is not None:
            self._spawn(self._openpgp_users([f"{user}@{domain}" for domain in served
                                             for user in new.users]))
        if self.peering is not None:
            self.peering.reconfigure(
                seeds=[(seed.host, seed.port) for seed in new.peering.seeds],
                srv_domain=new.peering.srv_domain,
                routes=[*served, *(f"{user}@{served[0]}" for user in new.users)],
                openpgp_key=self._record_openpgp_key())
        if "routes" in changed and self.router is not None:
            self.router.routes = parse_routes(new.routes)
        engine = self.media_engine
        if engine is not None:  # new calls take these; calls in progress keep theirs
            engine.policy = new.security.policy
            engine.zrtp_timeout = new.security.zrtp_timeout
            engine.rtp_timeout = new.media.rtp_timeout
            engine.native = new.media.native != "off"
        self._apply_limits(new.security)
        if self.proxy is not None:
            self.proxy.lockout = self.stats.lockout
            self.proxy.settings = dataclasses.replace(
                self.proxy.settings, trusted=tuple(new.sip.trusted),
                allow_register_from=tuple(new.sip.allow_register_from),
                calls_per_source=new.security.calls_per_source,
                cap_exempt=tuple(new.security.rate_exempt))
        if self.registrar is not None:
            reg = new.sip.registration
            registrar = self.registrar
            registrar.min_expires, registrar.max_expires = reg.min_expires, reg.max_expires
            registrar.default_expires = min(max(reg.default_expires, reg.min_expires),
                                            reg.max_expires)
            registrar.max_bindings_per_aor = reg.max_contacts
        logging.getLogger().setLevel(new.log.level.upper())
        logging.getLogger("freecall.sip.trace").setLevel(
            logging.DEBUG if new.log.sip_trace else logging.WARNING)
        if new.log.call_records and self.records is None:
            self.records = CallRecordLog(self.state_dir / RECORDS_FILE,
                                         max_bytes=new.log.call_records_max_size,
                                         keep=new.log.call_records_keep, loop=self._loop)
        elif not new.log.call_records and self.records is not None:
            self.records.close()
            self.records = None

    async def _openpgp_users(self, addresses: list[str]) -> None:
        """Users added by a reload: our key gains their user IDs and offers (off the loop),
        so a peer checking the key our record names finds their address on it."""
        assert self.keys is not None
        try:
            await self.keys.set_addresses(addresses)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("reload: the OpenPGP key could not name the new users: %s", exc)

    def _apply_limits(self, sec: SecurityConfig) -> None:
        """The rate limit and the lockout from ``security.*``, at start and on a reload: a
        running limiter is reconfigured in place, so blocks in progress and the counters
        behind the metrics survive; ``0`` switches one off, a non-zero value back on.
        (``rate_softphones`` and ``rate_exempt`` are read from the config per message.)"""
        stats = self.stats
        if not sec.rate_limit:
            stats.limiter = None
        elif stats.limiter is None:
            stats.limiter = SourceLimiter(sec.rate_limit, sec.rate_window, sec.rate_block,
                                          max_sources=sec.max_sources)
        else:
            stats.limiter.reconfigure(sec.rate_limit, sec.rate_window, sec.rate_block,
                                      sec.max_sources)
        if not sec.auth_failures:
            stats.lockout = None
        elif stats.lockout is None:
            stats.lockout = AuthLockout(sec.auth_failures, sec.auth_window, sec.lockout,
                                        max_sources=sec.max_sources)
        else:
            stats.lockout.reconfigure(sec.auth_failures, sec.auth_window, sec.lockout,
                                      sec.max_sources)

    def _record_call(self, record: CallRecord | None) -> None:
        """A finished call's line in calls.jsonl, from the control API's view of it."""
        if self.records is None or self.control is None or record is None:
            return
        self.records.append(record_of(self.control.book.view(record), self.config.node.name))

    def _domains(self, listeners: list[Listener]) -> set[str]:
        """What this node answers for: configured domains, else its own names and addresses."""
        config = self.config
        names = {d.lower() for d in config.sip.domains}
        names.add(config.node.name.lower())
        names.add("localhost")
        for lst in listeners:
            names.add(lst.host.lower())
            names.add(f"[{lst.host}]" if ":" in lst.host else lst.host)
        if config.sip.advertise:
            names.add(config.sip.advertise.lower())
        return names

    async def run(self) -> None:
        """Serve until SIGINT/SIGTERM, then shut down cleanly."""
        await self._stopping.wait()
        await self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        """End every call with BYE, give the BYEs a moment, then close the sockets."""
        self.notifier.stopping()
        if self.control is not None:
            await self.control.stop()
        if self.router is not None:
            await self.router.close()  # lookups in flight are cancelled, never delivered
        if self.nat is not None:
            await self.nat.stop()
        if self.peering is not None:
            await self.peering.stop()  # the host cache is saved
        if self.dns is not None:
            await self.dns.close()
        proxy, layer = self.proxy, self.layer
        if proxy is not None and layer is not None and self._loop is not None:
            ended = proxy.hang_up_all(self._loop.time())
            self._pump()
            if ended:
                log.info("shutting down: ended %d call(s) with BYE", ended)
                await self._drain(layer, 2.0)
        if self.media is not None:
            self.media.close()
        if self.media_engine is not None:
            self.media_engine.close()
        for task in list(self._tasks):
            task.cancel()
        if self.keys is not None:
            await self.keys.close()  # stops our gpg-agent
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            await self.transport.close()
        if self.records is not None:
            self.records.close()
        self._save_registrations()
        self.notifier.close()
        log.info("freecall stopped")

    async def _drain(self, layer: TransactionLayer, limit: float) -> None:
        """Wait (bounded) for our client transactions (the BYEs) to complete."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while layer.client and loop.time() < deadline:
            await asyncio.sleep(0.05)

    # -- inputs from the transport --------------------------------------------------------
    def _side_of(self, flow: Flow) -> Side:
        if flow.local is not None:
            side = self._sides.get((flow.transport, flow.local[1]))
            if side is not None:
                return side
        return Side.SOFTPHONE if _loopback(flow.remote[0]) else Side.PUBLIC

    def _on_message(self, data: bytes, flow: Flow, now: float) -> None:
        layer = self.layer
        if layer is None:
            return
        self.stats.messages_in += 1
        if self.stats.limiter is not None and not self._within_rate(flow, now):
            return
        try:
            msg = parse_message(data, datagram=not flow.reliable, cache=self.cache)
        except SipParseError as error:
            self.stats.parse_errors += 1
            transport = self.transport
            if transport is not None:
                transport.note_parse_error(flow, error)  # counts it, one rate-limited log line
                answer = make_error_response(error, self.config.sip.user_agent or None)
                if answer is not None:
                    transport.send(answer, flow)
                if error.fatal:
                    transport.close_flow(flow)
            return
        stats = self.stats
        if self.nat is not None and not isinstance(msg, Request) and self.nat.response(msg, flow):
            return  # the answer to our attaching REGISTER (the relay link's, not the layer's)
        if isinstance(msg, Request):
            method = msg.method if msg.method in KNOWN_METHODS else "other"
            stats.requests_in[method] = stats.requests_in.get(method, 0) + 1
        else:
            kind = f"{msg.status // 100}xx"
            stats.responses_in[kind] = stats.responses_in.get(kind, 0) + 1
        try:
            layer.receive(msg, flow, now)
        except (LookupError, ValueError) as error:
            # A message that parsed but that a core could not use: never let it escape.
            log.warning("dropped %s from %s: %s", _describe(msg), flow, error)
        self._pump()

    def _within_rate(self, flow: Flow, now: float) -> bool:
        """Pike-style flood guard: False drops the message unanswered (one log line per
        block). Only public listeners, unless ``security.rate_softphones``."""
        limiter, sec = self.stats.limiter, self.config.security
        assert limiter is not None
        if not sec.rate_softphones and self._side_of(flow) is Side.SOFTPHONE:
            return True
        source = str(flow.remote[0])
        if sec.rate_exempt and _in_cidrs(source, sec.rate_exempt):
            return True
        decision = limiter.check(source, now)
        if decision is Decision.BLOCKED:
            log.warning("rate limit: %s sent over %d messages in %g s: dropping it for %g s",
                        source, limiter.limit, limiter.window, limiter.block)
        return decision is Decision.PASS

    def _on_resolved(self, ticket: int, resolution: Resolution) -> None:
        """A route came back from DNS (or the host cache): hand it to the proxy and pump."""
        if self.proxy is None or self._loop is None:
            return
        self.proxy.resolved(ticket, resolution, self._loop.time())
        self._pump()

    def _on_transport_error(self, flow: Flow) -> None:
        if self.layer is not None:
            log.info("cannot send to %s", flow)
            self.layer.transport_failed(flow)
            self._pump()

    def _on_framing_error(self, flow: Flow, error: SipParseError, head: bytes) -> None:
        """A stream could not be framed (bad Content-Length, header too long): answer what we
        can before the transport closes it (RFC 4475 sections 3.1.2.3 and 3.3.9)."""
        answer = framing_error_response(error, head, self.config.sip.user_agent or None)
        if answer is not None and self.transport is not None:
            self.transport.send(answer, flow)

    def _on_flow_closed(self, flow: Flow) -> None:
        if self.nat is not None:
            self.nat.flow_closed(flow)
        if self.registrar is not None:
            self.registrar.remove_flow(flow)
            self._pump()

    def _on_timer(self, now: float) -> None:
        if self.layer is None or self.proxy is None or self.registrar is None:
            return
        self.layer.handle_timer(now)
        self.proxy.handle_timer(now)
        self.registrar.handle_timer(now)
        self._pump()

    # -- media --------------------------------------------------------------------------
    def _on_media_event(self, event: MediaEvent) -> None:
        """Security of a call's media: log it, keep it for the control API, act on failures
        (RFC 6189 section 4.3.2: a cache mismatch under ``on_mitm: hangup`` ends the call)."""
        media, loop = self.media, self._loop
        if media is None or loop is None:
            return
        key = media.find(event.stream)
        call = self.proxy.calls.get(key) if self.proxy is not None and key else None
        name = call.id if call is not None else (key[0] if key else "?")
        now = loop.time()
        if isinstance(event, SasSignatureNeeded):
            if self.keys is None:
                event.stream.provide_signature(b"PGP ", None)
            else:
                self._spawn(self._sign(event.stream, event.sashash, name))
            return
        if self.control is not None and key:
            self.control.media_event(key, event)
        if isinstance(event, StreamSecure):
            if key:
                self.media_state[key] = "secure"
            log.info("call %s: media secure, SAS %s (%s), %s/%s %s, %s cache, peer %r, "
                     "ZRTP %.0f ms", name, event.sas, event.sas_type, event.cipher,
                     event.auth_tag, event.key_agreement, event.continuity,
                     event.peer_client_id, event.elapsed * 1000)
            if event.continuity == "mismatch":
                log.warning("call %s: ZRTP retained secrets differ: possible man in the "
                            "middle (compare the SAS)", name)
            if key and not event.multistream:
                self._spawn(self._verify(key, event, name))
        elif isinstance(event, StreamInsecure):
            if key:
                self.media_state[key] = "insecure"
            log.warning("call %s: media in clear: %s", name, event.reason)
        elif isinstance(event, ZrtpFailure):
            if key:
                self.media_state[key] = "failed"
            log.warning("call %s: media security failed (%s): ending the call", name,
                        event.reason)
            if key:
                self._end_call(key, f"ZRTP failed: {event.reason}", now)
        elif isinstance(event, MediaTimeout):
            log.info("call %s: no media for %.0f s: ending the call", name, event.idle)
            if key:
                self._end_call(key, "media timeout", now)
        elif isinstance(event, ZrtpWarning):
            log.warning("call %s: ZRTP: %s", name, event.reason)
        self._pump()

    async def _sign(self, stream: MediaStream, sashash: bytes, name: str) -> None:
        """RFC 6189 section 7.2: our signature over sashash goes in our Confirm."""
        assert self.keys is not None
        signature: bytes | None = None
        try:
            signature = await self.keys.sign(sashash)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("call %s: could not sign the SAS hash: %s (sending unsigned)", name, exc)
        stream.provide_signature(b"PGP ", signature)  # the stream sends its Confirm itself

    def _remote_sdp_crossed(self, key: DialogKey) -> None:
        waiter = self._remote_sdp.pop(key, None)
        if waiter is not None:
            waiter.set()

    async def _far_sdp(self, key: DialogKey, name: str) -> None:
        """Wait (at most Timer B's 64*T1) until the far end's SDP, which carries its OpenPGP
        key, has crossed: ZRTP may finish first when its answer is lost and retransmitted,
        since our stream starts on the far end's Hello (srtp/bridge.py, latching)."""
        media = self.media
        call_media = media.calls.get(key) if media is not None else None
        if call_media is None or call_media.remote_sdp:
            return
        log.info("call %s: media secure before the far end's SDP arrived: the signature "
                 "check waits for it (it carries the far end's key)", name)
        waiter = self._remote_sdp.setdefault(key, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), 64 * self.config.sip.timers.t1)
        self._remote_sdp.pop(key, None)

    def _record_key(self, call: Call, address: str) -> RecordKey | None:
        """The OpenPGP key the host-cache record of the call's far node names for the peer's
        address (docs/security.md, "Keys from the mesh"); None without one."""
        flow = call.callee_flow if call.direction == "out" else call.caller_flow
        if self.peering is None or flow is None:
            return None
        return self.peering.openpgp_key_for(normalise_address(address),
                                            (str(flow.remote[0]), int(flow.remote[1])))

    async def _verify(self, key: DialogKey, event: StreamSecure, name: str) -> None:
        """The peer's signature over OUR sashash, checked off the loop; the media is already
        encrypted meanwhile. The outcome updates the call's state and may end it."""
        await self._far_sdp(key, name)
        call = self.proxy.calls.get(key) if self.proxy is not None else None
        address = _peer_address(call) if call is not None else None
        mismatch = event.continuity == "mismatch"
        if self.keys is None or address is None:
            reason = "no OpenPGP key here" if self.keys is None else "no peer address"
            verdict = (Verdict(Outcome.MITM_SUSPECTED, "ZRTP retained secrets differ")
                       if mismatch else Verdict(Outcome.UNVERIFIED, reason))
        else:
            signature = event.peer_signature
            data: bytes | None = None
            if signature is not None and signature.sig_type == b"PGP ":
                data = signature.sig_bytes
            elif signature is not None:
                log.info("call %s: signature type %r not supported", name, signature.sig_type)
            offered = self.media.calls[key].offered_key if (
                self.media is not None and key in self.media.calls) else None
            record = self._record_key(call, address) if call is not None else None
            try:
                verdict = await self.keys.verify(
                    address, data, signature.sashash if signature else b"", offered, mismatch,
                    named=record.fingerprint if record else None,
                    named_by=f"the host-cache record of node {record.node_id[:16]}"
                    if record else "")
            except (OSError, RuntimeError, ValueError) as exc:
                log.warning("call %s: signature check failed: %s", name, exc)
                verdict = (Verdict(Outcome.MITM_SUSPECTED, "ZRTP retained secrets differ")
                           if mismatch else Verdict(Outcome.UNVERIFIED, f"gpg failed: {exc}"))
        self._verified(key, event, with_voice_check(verdict, event.sas_verified), name, address)

    def _verified(self, key: DialogKey, event: StreamSecure, verdict: Verdict, name: str,
                  address: str | None) -> None:
        if self.control is not None:
            self.control.update_security(key, verification=verdict.outcome.value,
                                         peer_key=verdict.peer_key,
                                         verification_reason=verdict.reason)
        if verdict.lifts_cache_mismatch:
            event.stream.peer_signature_verified()
        level = logging.WARNING if verdict.outcome is Outcome.MITM_SUSPECTED else logging.INFO
        log.log(level, "call %s: %s (%s), SAS %s", name, verdict.outcome.value, verdict.reason,
                event.sas)
        hang_up = (verdict.outcome is Outcome.MITM_SUSPECTED
                   and self.config.security.on_mitm == "hangup")
        call = self.proxy.calls.get(key) if self.proxy is not None else None
        if call is not None and self._loop is not None and self.proxy is not None:
            text = _tell_text(verdict, address or "the far end", event.sas, call.id, hang_up)
            self.proxy.tell(call, call.direction == "out", text, self._loop.time())
        if hang_up and self._loop is not None:
            self._end_call(key, f"man in the middle suspected: {verdict.reason}",
                           self._loop.time())
        self._pump()

    def _end_call(self, key: DialogKey, reason: str, now: float) -> None:
        """End a call from the middle (BYE both ways), or at least free its media."""
        proxy = self.proxy
        call = proxy.calls.get(key) if proxy is not None else None
        if proxy is not None and call is not None and proxy.hang_up(call, now, reason):
            return
        if self.media is not None:
            self.media.release(key)

    # -- the pump -------------------------------------------------------------------------
    def _pump(self) -> None:
        layer, proxy, registrar, transport = self.layer, self.proxy, self.registrar, self.transport
        if layer is None or proxy is None or registrar is None or transport is None:
            return
        now = transport.loop.time()
        busy = True
        while busy:
            busy = False
            while (event := layer.next_event()) is not None:
                busy = True
                proxy.handle_event(event, now)
            while (pevent := proxy.next_event()) is not None:
                busy = True
                try:
                    self._on_proxy_event(pevent, now)
                except Exception:  # one event's failure must not hold back the ones queued
                    log.exception("handling %s failed", type(pevent).__name__)
            while (revent := registrar.next_event()) is not None:
                busy = True
                self._registrations_dirty = True
                log.info("%s", revent)
                if self.control is not None:
                    self.control.registrar_event(revent)
            if self.media is not None and self.media.broken:
                busy = True
                for key in self.media.broken:
                    self._end_call(key, "media could not be bridged", now)
                self.media.broken.clear()
        for data, flow in layer.messages_to_send():
            transport.send(data, flow)  # the transport traces it (freecall.sip.trace, DEBUG)
        if self._timer is not None:
            deadlines = [
                d
                for d in (layer.get_timer(), proxy.get_timer(), registrar.get_timer())
                if d is not None
            ]
            self._timer.arm(min(deadlines) if deadlines else None)

    def _on_proxy_event(self, event: ProxyEvent, now: float) -> None:
        # the call book first: before CallEnded frees the media, so its figures are kept
        record = self.control.proxy_event(event) if self.control is not None else None
        if isinstance(event, Registered):
            assert self.registrar is not None
            response = self.registrar.register(
                event.request, event.user, event.transaction.request_flow, now
            )
            event.transaction.respond(response, now)
            flow = event.transaction.request_flow
            if flow.reliable and flow.conn is not None and self.transport is not None:
                self.transport.keep_alive(flow.conn)
        elif isinstance(event, CallStarted):
            self.stats.calls_total += 1
            call = event.call
            log.debug("call %s: %s -> %s (%s)", call.id, call.caller, call.callee, call.direction)
        elif isinstance(event, CallAnswered):
            call = event.call
            log.debug("call %s: %s -> %s answered", call.id, call.caller, call.callee)
        elif isinstance(event, CallEnded):
            call = event.call
            key = (call.call_id, call.from_tag)
            self._record_call(record)
            verification = str(record.security.get("verification")) if record else "none"
            result = ("answered" if call.answered is not None
                      else "cancelled" if call.outcome == "cancelled" else "failed")
            slot = (result, verification)
            self.stats.calls_ended[slot] = self.stats.calls_ended.get(slot, 0) + 1
            if self.media is not None:
                self.media.release(key)
            self._remote_sdp_crossed(key)  # a verification still waiting gives up
            media_state = self.media_state.pop(key, None)
            if media_state is not None:
                log.info("call %s: media was %s", call.id, media_state)
            log.info(
                "call %s: %s -> %s %s, %s, duration %.0f s",
                call.id,
                call.caller,
                call.callee,
                call.direction,
                call.outcome,
                call.duration,
            )
        elif isinstance(event, Refused):
            log.info(
                "refused %s from %s: %d (%s)",
                _describe(event.request),
                event.flow,
                event.status,
                event.why,
            )


_SIP_KIND = {"udp": AddrKind.SIP_UDP, "tcp": AddrKind.SIP_TCP, "tls": AddrKind.SIP_TLS}


async def _an_ip(host: str, timeout: float) -> str | None:
    """``host`` if an IP literal, else its first address (records carry addresses only)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host.strip("[]")
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None), timeout)
    except (OSError, TimeoutError) as error:
        log.warning("peering: cannot resolve %s (%s); announcing no SIP address", host, error)
        return None
    return str(infos[0][4][0]) if infos else None


def _is_local_address(address: str) -> bool:
    """Whether an address belongs to this host (else media binds the wildcard: NAT)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def _tell_text(verdict: Verdict, address: str, sas: str | None, call_id: str,
               hanging_up: bool) -> str:
    """What the softphone user reads (a SIP MESSAGE): the outcome, the SAS, what to do."""
    sas_text = f"SAS {sas}" if sas else "no SAS"
    outcome = verdict.outcome
    if outcome is Outcome.VERIFIED:
        return (f"[freecall] call with {address}: encrypted and VERIFIED ({verdict.reason}). "
                f"{sas_text}.")
    if outcome is Outcome.TRUSTED_FIRST_USE:
        return (f"[freecall] call with {address}: encrypted; their key was seen for the first "
                f"time and is now remembered. To be sure, compare the {sas_text} by voice.")
    if outcome is Outcome.UNVERIFIED:
        return (f"[freecall] call with {address}: encrypted but NOT VERIFIED ({verdict.reason})."
                f" Read the {sas_text} aloud; if it matches: freecall verify {call_id}")
    action = "The call is being ended." if hanging_up else "The call goes on: beware."
    return (f"[freecall] WARNING: call with {address}: a man in the middle is suspected "
            f"({verdict.reason}). {action}")


def _peer_address(call: Call) -> str | None:
    """The far party of a call between nodes: whose key must have signed the SAS hash."""
    if call.direction == "out":
        return call.callee
    if call.direction == "in":
        return call.caller
    return None


def _describe(msg: object) -> str:
    if isinstance(msg, Request):
        return f"{msg.method} {msg.uri}"
    return type(msg).__name__


@functools.lru_cache(maxsize=4096)
def _in_cidrs(host: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
              ) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return any(address in network for network in networks)


@functools.lru_cache(maxsize=4096)
def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
