"""The control API bound to the daemon: what it reads of each core, and what it feeds the model.

The daemon (the composition root) owns one :class:`ControlService`. It calls
:meth:`proxy_event`, :meth:`media_event` and :meth:`registrar_event` from its existing
handlers (one line each) and :meth:`start`/:meth:`stop`; everything else here reads the cores
when a request comes, so the API costs nothing while nobody asks. Peer changes are found by
comparing the host cache every few seconds (the peering service logs them but keeps no list
of subscribers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..sip.proxy import CallAnswered, CallEnded, CallStarted
from ..sip.registrar import BindingAdded, BindingRefreshed
from ..srtp.bridge import MediaStream, StreamInsecure, StreamSecure, ZrtpFailure
from .api import ApiError, ControlServer, KeysProvider, load_or_create_token
from .model import CallBook, CallRecord, EventBus, ProxyCall

if TYPE_CHECKING:
    from ..daemon import Daemon
    from ..sip.registrar import RegistrarEvent
    from ..srtp.bridge import MediaEvent
    from ..srtp.calls import DialogKey

log = logging.getLogger("freecall.control")

PEER_POLL = 2.0


class ControlService:
    """The :class:`~freecall.control.api.Backend` of a running daemon (module docstring)."""

    def __init__(self, daemon: Daemon, *, keys: KeysProvider | None = None) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.key_store = keys
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.wall_offset = time.time() - loop.time()
        self.bus = EventBus(time.time)
        self.book = CallBook(self.bus, wall_offset=self.wall_offset,
                             media_source=self._media_of, remote_node=self._remote_node)
        self.server: ControlServer | None = None
        self.token_path: Path = Path(self.config.control.token_file)
        self.token = ""
        self._peers: dict[str, tuple[Any, ...]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._notify = self.config.control.notify and shutil.which("notify-send") is not None
        self._notifying: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> list[str]:
        control = self.config.control
        self.token = load_or_create_token(self.token_path)
        listen = (control.listen.host, control.listen.port) if control.listen else None
        self.server = ControlServer(
            self, token=self.token, listen=listen,
            socket_path=Path(control.socket) if control.socket else None,
            allow_from=control.allow_from)
        bound = await self.server.start()
        self._peers = self._peer_index()
        self._poller = asyncio.ensure_future(self._poll_peers())
        return bound

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self.server is not None:
            await self.server.stop()

    @property
    def dashboard_url(self) -> str | None:
        server = self.server
        listen = self.config.control.listen
        if server is None or listen is None or server.http_port is None:
            return None
        host = "127.0.0.1" if listen.host in ("0.0.0.0", "::") else listen.host  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{server.http_port}/#token={self.token}"

    # -- feeds from the daemon ----------------------------------------------------------------
    def proxy_event(self, event: object) -> CallRecord | None:
        """Feed the call book; the record of the call the event is about, if any."""
        if isinstance(event, CallStarted):
            return self.book.started(event.call)
        if isinstance(event, CallAnswered):
            return self.book.answered(event.call)
        if isinstance(event, CallEnded):
            return self.book.ended(event.call)  # before the daemon frees the media
        return None

    def registrar_event(self, event: RegistrarEvent) -> None:
        now = self.loop.time()
        binding = event.binding
        if isinstance(event, BindingAdded):
            action, reason = "added", None
        elif isinstance(event, BindingRefreshed):
            action, reason = "refreshed", None
        else:
            action, reason = "removed", str(event.reason)
        self.bus.publish("registration", action=action, reason=reason,
                         registration=binding.describe(now))

    def media_event(self, key: DialogKey, event: MediaEvent) -> None:
        """A stream's security changed: the call's security fields follow (first stream
        decides; a second one in clear makes the call insecure)."""
        record = self.book.find(key)
        if record is None:
            return
        before = record.security.get("state")
        if isinstance(event, StreamSecure):
            if before in ("insecure", "failed"):
                return
            verification: str | None
            if event.continuity == "mismatch":
                verification = "mitm-suspected"
            elif event.sas_verified:
                verification = "verified"  # confirmed by voice in an earlier call (RFC 6189 V)
            else:
                verification = record.security.get("verification")
                if verification in (None, "none"):
                    verification = "unverified"
            self.book.update_security(
                key, media="srtp", keying="zrtp", sas=event.sas, state="secure",
                verification=verification, sas_confirmed=event.sas_verified,
                cipher=f"{event.cipher}/{event.auth_tag}", continuity=event.continuity,
                peer_client=event.peer_client_id or None,
                reason=("retained secrets differ: possible man in the middle"
                        if event.continuity == "mismatch" else None))
        elif isinstance(event, StreamInsecure):
            self.book.update_security(key, media="clear", keying="none", state="insecure",
                                      verification="none", reason=event.reason)
        elif isinstance(event, ZrtpFailure):
            self.book.update_security(key, media="clear", keying="zrtp", state="failed",
                                      reason=event.reason)
        else:
            return
        if record.security.get("state") != before:
            self._notify_security(record.call, record.security)

    def update_security(self, key_or_id: DialogKey | str, **fields: Any) -> None:
        """For the OpenPGP layer (issue 7): ``verification=..., peer_key=...``."""
        self.book.update_security(key_or_id, **fields)

    # -- the Backend --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        daemon = self.daemon
        peering = daemon.peering
        listeners: list[str] = []
        if daemon.proxy is not None:
            listeners += [f"sip:{lst.transport}:{_host(lst.host)}:{lst.port} ({lst.side.value})"
                          for lst in daemon.proxy.settings.listeners]
        if self.server is not None:
            listeners += [f"control:{b}" for b in self.server.bound]
        if peering is not None:
            listeners.append(f"peering:udp:{_host(peering.listen[0])}:{peering.listen[1]}")
        engine = daemon.media_engine
        keys = self.key_store
        return {
            "version": __version__,
            "node_id": peering.identity.node_id.hex() if peering is not None else None,
            "uptime_s": round(self.loop.time() - daemon.stats.started, 1),
            "listeners": listeners,
            "key_fingerprint": keys.own_fingerprint() if keys is not None else None,
            "role": self.config.node.role,
            "name": self.config.node.name,
            "domains": list(self.config.sip.domains),
            "security_policy": self.config.security.policy,
            "media": None if engine is None else {"address": engine.address},
            "calls_active": len(self.book.live),
            "calls_total": daemon.stats.calls_total,
            "registrations": daemon.registrar.binding_count if daemon.registrar else 0,
            "peers": peering.known_nodes() if peering is not None else 0,
            "nat": (daemon.nat.summary() if daemon.nat is not None
                    else {**daemon.nat_view.summary(), "attach": "never", "relay_link": None}
                    if peering is not None else None),
        }

    def registrations(self) -> list[dict[str, Any]]:
        registrar = self.daemon.registrar
        if registrar is None:
            return []
        now = self.loop.time()
        return [b.describe(now) for b in registrar.bindings(now)]

    def peers(self) -> list[dict[str, Any]]:
        peering = self.daemon.peering
        return [] if peering is None else [dict(p) for p in peering.peers()]

    def calls(self) -> list[dict[str, Any]]:
        return self.book.views()

    def call(self, call_id: str) -> dict[str, Any] | None:
        record = self.book.find(call_id)
        return None if record is None else self.book.view(record)

    def hang_up(self, call_id: str) -> dict[str, Any]:
        record = self.book.find(call_id)
        if record is None:
            raise ApiError(404, f"no call {call_id}")
        if record.state == "ended":
            raise ApiError(409, f"call {call_id} has already ended")
        if not self.daemon.hang_up(record.key, "hung up from the control API"):
            raise ApiError(409, f"call {call_id} is not answered yet: it cannot be ended "
                           "from the middle (hang up on the phone)")
        log.info("call %s: hung up from the control API", call_id)
        return self.book.view(record)

    def confirm_sas(self, call_id: str, verified: bool) -> dict[str, Any]:
        """The user compared the SAS by voice: remember it in the ZRTP cache (the V flag,
        RFC 6189 section 7.1), so the next call with this peer starts verified."""
        record = self.book.find(call_id)
        if record is None:
            raise ApiError(404, f"no call {call_id}")
        if record.state == "ended" or record.security.get("state") != "secure":
            raise ApiError(409, f"call {call_id} has no secure media: no SAS to confirm")
        media = self.daemon.media
        streams = list(media.calls[record.key].streams()) if (
            media is not None and record.key in media.calls) else []
        for stream in streams:
            if isinstance(stream, MediaStream) and stream.secure:
                with contextlib.suppress(RuntimeError):
                    stream.mark_sas_verified(verified)
        current = record.security.get("verification")
        if verified:
            verification = "verified" if current != "mitm-suspected" else current
        else:
            verification = "unverified" if current == "verified" else current
        log.info("call %s: SAS %s %s by the user", call_id, record.security.get("sas"),
                 "confirmed" if verified else "reset")
        self.book.update_security(record.key, sas_confirmed=verified, verification=verification)
        return self.book.view(record)

    def keys(self) -> KeysProvider | None:
        return self.key_store

    def reload(self) -> dict[str, Any]:
        """Re-read the configuration (like SIGHUP): what was applied, what needs a restart."""
        from ..config import ConfigError  # noqa: PLC0415

        try:
            return self.daemon.reload()
        except ConfigError as error:
            raise ApiError(
                400, f"the configuration has errors; nothing was changed: {error}") from None

    def metrics(self) -> str:
        """Prometheus text exposition format 0.0.4 (docs/operations.md lists every metric)."""
        daemon = self.daemon
        stats = daemon.stats
        out = Exposition()
        out.add("freecall_uptime_seconds", "gauge", "Seconds since the daemon started.",
                self.loop.time() - stats.started)
        out.add("freecall_registrations", "gauge", "Live softphone registrations.",
                daemon.registrar.binding_count if daemon.registrar else 0)
        out.add("freecall_calls_total", "counter", "Calls started.", stats.calls_total)
        out.add("freecall_calls_active", "gauge", "Calls in progress.", len(self.book.live))
        by_state: dict[str, int] = {"trying": 0, "active": 0}
        by_security: dict[str, int] = {}
        for record in self.book.live.values():
            by_state[record.state] = by_state.get(record.state, 0) + 1
            verification = str(record.security.get("verification") or "none")
            by_security[verification] = by_security.get(verification, 0) + 1
        out.labelled("freecall_calls", "gauge", "Calls in progress by state.",
                     {(("state", k),): v for k, v in by_state.items()})
        out.labelled("freecall_calls_by_verification", "gauge",
                     "Calls in progress by security outcome.",
                     {(("verification", k),): v for k, v in by_security.items()})
        out.labelled("freecall_calls_ended_total", "counter",
                     "Finished calls by result and security outcome.",
                     {(("result", r), ("verification", v)): n
                      for (r, v), n in stats.calls_ended.items()})
        out.add("freecall_sip_messages_received_total", "counter", "SIP messages received.",
                stats.messages_in)
        out.labelled("freecall_sip_requests_received_total", "counter",
                     "SIP requests received by method.",
                     {(("method", k),): v for k, v in stats.requests_in.items()})
        out.labelled("freecall_sip_responses_received_total", "counter",
                     "SIP responses received by status class.",
                     {(("class", k),): v for k, v in stats.responses_in.items()})
        out.add("freecall_sip_parse_errors_total", "counter", "SIP messages that did not parse.",
                stats.parse_errors)
        transport = daemon.transport
        if transport is not None:
            counters = transport.counters
            for name, help_text in (("messages_in", "SIP messages received"),
                                    ("messages_out", "SIP messages sent"),
                                    ("bytes_in", "SIP bytes received"),
                                    ("bytes_out", "SIP bytes sent")):
                out.labelled(f"freecall_sip_transport_{name}_total", "counter",
                             f"{help_text} by transport.",
                             {(("transport", k),): v for k, v in getattr(counters, name).items()})
            out.labelled("freecall_sip_transport_errors_total", "counter",
                         "Transport-level errors by kind.",
                         {(("kind", k),): getattr(counters, k) for k in (
                             "send_errors", "framing_errors", "connect_failures",
                             "connections_refused", "dropped_datagrams")})
        engine = daemon.media_engine
        if engine is not None:
            media = engine.stats()
            totals = media["totals"]
            retired = engine.retired

            def total(name: str) -> int:
                return int(totals.get(name, 0)) + int(retired.get(name, 0))

            out.add("freecall_media_streams", "gauge", "Media streams bridged now.",
                    media["streams"])
            out.labelled("freecall_media_packets_total", "counter",
                         "RTP packets bridged, by leg (phone: loopback RTP; net: SRTP between "
                         "nodes) and direction.",
                         {(("leg", leg), ("direction", d)): total(f"{leg}_rtp_{d}")
                          for leg in ("phone", "net") for d in ("in", "out")})
            out.add("freecall_media_packets_lost_total", "counter",
                    "RTP packets the far end sent that never arrived (RFC 3550 A.3).",
                    total("lost"))
            out.labelled("freecall_media_dropped_total", "counter",
                         "Media packets dropped, by reason.",
                         {(("reason", k),): total(k) for k in (
                             "auth_failures", "replays", "dropped_insecure", "dropped_other")})
            out.add("freecall_media_port_pairs_free", "gauge", "Media port pairs free.",
                    media["port_pairs_free"])
            out.add("freecall_media_phone_unrouted_total", "counter",
                    "Datagrams on the shared softphone port pair (media.phone_socket: shared) "
                    "from a source no call's softphone SDP names: dropped.",
                    media.get("phone_unrouted", 0))
        peering = daemon.peering
        out.add("freecall_peers", "gauge", "Nodes in the host cache.",
                peering.known_nodes() if peering else 0)
        behind = daemon.nat_view.behind_nat
        if behind is not None:
            out.add("freecall_nat_behind", "gauge",
                    "1 when the node is behind NAT (node-level STUN, else the media "
                    "gathering), 0 when not; absent while unknown.", int(behind))
        if daemon.nat is not None:
            link = daemon.nat.link
            out.add("freecall_nat_relay_attached", "gauge",
                    "1 while the node is attached to a relay that calls reach it through.",
                    int(link.state == "attached"))
            out.add("freecall_nat_relay_attaches_total", "counter",
                    "Attachments to a relay (a reconnect counts again).", link.attaches)
        gossip = peering.gossip if peering is not None else None
        if gossip is not None:
            out.labelled("freecall_gossip_events_total", "counter",
                         "Gossip traffic and drops by kind (docs/peering.md).",
                         {(("kind", k),): v for k, v in sorted(gossip.stats.items())})
        records = daemon.records
        out.add("freecall_call_records_written_total", "counter",
                "Lines written to calls.jsonl.", records.written if records else 0)
        out.add("freecall_call_records_failures_total", "counter",
                "Failed writes to calls.jsonl (disk full?); the records are retried.",
                records.failures if records else 0)
        out.add("freecall_call_records_pending", "gauge",
                "Call records held back by a failed write.",
                len(records.pending) if records else 0)
        out.add("freecall_state_write_failures_total", "counter",
                "Failed writes of state files (registrations; disk full?).",
                stats.state_write_failures)
        out.add("freecall_reloads_total", "counter", "Configuration reloads.", stats.reloads)
        out.add("freecall_reload_failures_total", "counter",
                "Reloads refused because the configuration had errors.", stats.reload_failures)
        out.add("freecall_control_event_subscribers", "gauge", "Open event streams.",
                len(self.bus.subscribers))
        self._resource_gauges(out)
        limiter, lockout = daemon.stats.limiter, daemon.stats.lockout  # issue 11
        out.add("freecall_ratelimit_blocked_total", "counter",
                "Sources blocked by the rate limit.", limiter.blocked_total if limiter else 0)
        out.add("freecall_ratelimit_dropped_total", "counter",
                "Messages dropped unanswered from blocked sources.",
                limiter.dropped_total if limiter else 0)
        out.add("freecall_ratelimit_blocked_sources", "gauge", "Sources blocked now.",
                len(limiter.blocked(self.loop.time())) if limiter else 0)
        out.add("freecall_auth_lockouts_total", "counter",
                "Sources locked out after repeated failed authentication.",
                lockout.lockouts_total if lockout else 0)
        proxy = daemon.proxy
        if proxy is not None:
            out.labelled("freecall_overload_refused_total", "counter",
                         "INVITEs this node answered 503 with Retry-After, by reason "
                         "(calls_per_source: the source's cap; media_ports: none free).",
                         {(("reason", k),): v for k, v in sorted(proxy.overload_refused.items())})
            out.add("freecall_calls_in_progress", "gauge",
                    "Calls from public sources not yet confirmed by an ACK "
                    "(security.calls_per_source counts these).", proxy.calls_in_progress)
            out.add("freecall_calls_capped_sources", "gauge",
                    "Sources at security.calls_per_source now.", proxy.capped_sources)
            out.add("freecall_calls_unacknowledged_total", "counter",
                    "Answered calls the node ended because no ACK came within 64*T1.",
                    proxy.unacknowledged_total)
        return out.text()

    def _resource_gauges(self, out: Exposition) -> None:
        """What a long soak watches for leaks (issue 11): each must stay flat under steady load."""
        daemon = self.daemon
        out.add("freecall_tasks", "gauge", "asyncio tasks alive.",
                len(asyncio.all_tasks(self.loop)))
        try:
            fds = len(os.listdir("/proc/self/fd"))
        except OSError:  # not Linux
            fds = 0
        out.add("freecall_open_fds", "gauge", "Open file descriptors (sockets included).", fds)
        layer, proxy, registrar = daemon.layer, daemon.proxy, daemon.registrar
        out.labelled("freecall_sip_transactions", "gauge", "SIP transactions alive, by kind.",
                     {(("kind", "server"),): len(layer.server) if layer else 0,
                      (("kind", "client"),): len(layer.client) if layer else 0})
        out.add("freecall_proxy_contexts", "gauge", "Requests being proxied.",
                proxy.contexts if proxy else 0)
        out.labelled("freecall_timer_entries", "gauge",
                     "Entries in the cores' timer heaps (stale ones included), by core.",
                     {(("core", "transactions"),): layer.timer_entries if layer else 0,
                      (("core", "proxy"),): proxy.timer_entries if proxy else 0,
                      (("core", "registrar"),): registrar.timer_entries if registrar else 0})
        media = daemon.media
        out.add("freecall_media_calls", "gauge", "Calls with media state held.",
                len(media.calls) if media else 0)

    def _media_of(self, key: DialogKey) -> dict[str, Any] | None:
        media = self.daemon.media
        call_media = media.calls.get(key) if media is not None else None
        if call_media is None:
            return None
        streams = [s for s in call_media.streams() if isinstance(s, MediaStream)]
        if not streams:
            return None
        for stream in streams:
            stream.sync_counters()  # the C hop's counts (srtp/bridge.py)
        first = streams[0]
        remote = first.remote_rtp_address
        local = first.local_network_rtp
        return {
            "codec": call_media.codec,
            "local": f"{_host(local[0])}:{local[1]}",
            "remote": f"{_host(str(remote[0]))}:{remote[1]}" if remote else None,
            "packets_in": sum(s.net_rtp_in for s in streams),
            "packets_out": sum(s.net_rtp_out for s in streams),
            "lost": sum(s.reception.lost for s in streams),
            "softphone": f"{_host(first.local_softphone_rtp[0])}:{first.local_softphone_rtp[1]}",
        }

    def _remote_node(self, call: ProxyCall) -> str | None:
        """The far node of a call between nodes: its node id when the host cache knows its
        address, else the address; None for calls between local phones."""
        flow = None
        if call.direction == "out":
            flow = getattr(call, "callee_flow", None)
        elif call.direction == "in":
            flow = getattr(call, "caller_flow", None)
        if flow is None:
            return None
        host, port = str(flow.remote[0]), int(flow.remote[1])
        peering = self.daemon.peering
        if peering is not None:
            for peer in peering.peers():
                addresses = peer.get("addresses")
                if isinstance(addresses, list) and any(
                        isinstance(a, dict) and a.get("host") == host for a in addresses):
                    return str(peer["node_id"])
        return f"{_host(host)}:{port}"

    def _peer_index(self) -> dict[str, tuple[Any, ...]]:
        out: dict[str, tuple[Any, ...]] = {}
        for peer in self.peers():
            out[str(peer["node_id"])] = (repr(peer.get("addresses")), repr(peer.get("routes")),
                                         peer.get("relay"))
        return out

    async def _poll_peers(self) -> None:
        """``peer`` events: joined, updated (addresses, routes, relay role), left."""
        while True:
            await asyncio.sleep(PEER_POLL)
            try:
                current = self._peer_index()
            except Exception:  # the cache being rebuilt must not end the poller
                log.exception("control API: reading the host cache failed")
                continue
            old = self._peers
            self._peers = current
            if current == old:
                continue
            by_id = {str(p["node_id"]): p for p in self.peers()}
            for node_id, shape in current.items():
                if node_id not in old:
                    self.bus.publish("peer", action="joined", node_id=node_id,
                                     peer=by_id.get(node_id))
                elif old[node_id] != shape:
                    self.bus.publish("peer", action="updated", node_id=node_id,
                                     peer=by_id.get(node_id))
            for node_id in old.keys() - current.keys():
                self.bus.publish("peer", action="left", node_id=node_id, peer=None)

    def _notify_security(self, call: ProxyCall, security: dict[str, Any]) -> None:
        """``notify-send`` when configured; one at a time, never waited for."""
        if not self._notify or (self._notifying is not None and not self._notifying.done()):
            return
        other = call.callee if call.direction != "in" else call.caller
        state = security.get("state")
        if state == "secure" and security.get("verification") == "mitm-suspected":
            title, urgency = f"Call with {other}: man in the middle suspected", "critical"
            text = str(security.get("reason") or "compare the SAS")
        elif state == "secure":
            title, urgency = f"Call with {other} is encrypted", "normal"
            text = f"Compare the words aloud: {security.get('sas')}"
        else:
            title, urgency = f"Call with {other} is NOT encrypted", "critical"
            text = str(security.get("reason") or "")
        self._notifying = asyncio.ensure_future(_notify_send(title, text, urgency))


async def _notify_send(title: str, text: str, urgency: str) -> None:
    with contextlib.suppress(OSError, TimeoutError):
        process = await asyncio.create_subprocess_exec(
            "notify-send", "--app-name=freecall", f"--urgency={urgency}", title, text,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            async with asyncio.timeout(5.0):
                await process.wait()
        except TimeoutError:
            process.kill()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Exposition:
    """Prometheus text format: HELP and TYPE once per family, label values escaped."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                       f"{name} {value:g}"]

    def labelled(self, name: str, kind: str, help_text: str,
                 samples: dict[tuple[tuple[str, str], ...], float]) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in sorted(samples.items()):
            text = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels)
            self.lines.append(f"{name}{{{text}}} {value:g}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
