"""Locating SIP servers (RFC 3263 section 4) and ordering SRV records (RFC 2782), pure.

:func:`locate` turns a sip:/sips: URI into the ordered list of next hops ``(transport, address,
port)`` to try, the later ones being the failover alternatives of RFC 3263 section 4.3.  It is a
:data:`~freecall.routing.plan.Plan`: it asks for NAPTR, SRV, A and AAAA records and is sent the
answers, so it is exercised with a fake resolver and a seeded ``random.Random`` (SRV weights).

The steps, in the order the RFC gives them:

* 4.1 transport: the ``transport`` parameter; else UDP (SIP) or TLS (SIPS) when the TARGET is an
  IP literal or a port is given; else NAPTR ``SIP+D2U``/``SIP+D2T``/``SIPS+D2T`` records in
  order/preference order (a SIPS URI keeps only ``SIPS+`` services; a SIP URI keeps them when
  TLS is supported); with no usable NAPTR, an SRV query per supported transport; with no SRV,
  UDP (SIP) or TLS (SIPS).
* 4.2 port and address: an IP literal is used as is; an explicit port means A/AAAA only; else
  the SRV records (from NAPTR, or ``_sip._udp``/``_sip._tcp``/``_sips._tcp``); with none, A/AAAA
  at the default port (5060, TLS 5061).
* 4.3 failover: the SRV order of RFC 2782 (priority, then a weighted random draw), and every
  address of a name in turn.

Decisions where the RFC leaves room (documented here because they change behaviour):

* NXDOMAIN for the NAPTR query ends the search: the domain does not exist, so no SRV or A record
  can exist below it (RFC 8020).  "A missing domain gives 404 quickly."
* NAPTR records that lead nowhere (their SRV sets are empty) fall back to the SRV queries of a
  domain without NAPTR: RFC 3263 section 4.1 asks domains to keep those SRV records anyway.
* Without NAPTR, every supported transport with SRV records is kept, in the caller's
  preference order (TLS, TCP, UDP by default), as one failover list.
* An SRV set whose only target is "." means the service is "decidedly not available" (RFC 2782):
  that transport is skipped, and no A/AAAA fallback is made for it.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..sip.uri import SipUri
from .plan import Answers, Naptr, Outcome, Plan, Query, Srv, ask, normalize_name

TRANSPORTS: tuple[str, ...] = ("tls", "tcp", "udp")
"""Transports this code can select, in the default order of preference."""

DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}

# RFC 3263 section 4.1 and the IANA "SIP NAPTR Resource Record Services Field" registry.
# SCTP (D2S) and WebSocket (D2W) services are not supported and are discarded.
NAPTR_SERVICES = {"SIP+D2U": "udp", "SIP+D2T": "tcp", "SIPS+D2T": "tls"}

# RFC 3263 section 4.2: "_sips" for TLS (also for a SIP URI that uses TLS), "_sip" otherwise.
SRV_PREFIXES = {"udp": "_sip._udp", "tcp": "_sip._tcp", "tls": "_sips._tcp"}


class Hop(NamedTuple):
    """A next hop: transport ("udp", "tcp", "tls"), IP address (no brackets) and port."""

    transport: str
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Located:
    """The hops found for a URI, in failover order, and what went wrong on the way.

    ``errors`` holds TIMEOUT/FAILURE outcomes of queries that could not be answered: with no
    hops they decide between "not found" (404) and "could not find out" (408/503).
    """

    hops: tuple[Hop, ...]
    errors: frozenset[Outcome] = frozenset()
    reason: str = ""


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def target_of(uri: SipUri) -> str:
    """RFC 3263 section 4: TARGET is the maddr parameter if present, else the host."""
    maddr = uri.maddr
    host = maddr if maddr else uri.host
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.lower()


def uri_transport(uri: SipUri) -> str | None:
    """The transport the URI names (4.1), normalised: a SIPS URI over TCP is TLS (RFC 3261
    section 26.2.2), so is the deprecated ``transport=tls``.  A SIPS URI with UDP (or any
    transport we do not know) gives the name as written, which no caller supports."""
    given = uri.transport
    if given is None:
        return None
    if given == "tls" or (uri.secure and given == "tcp"):
        return "tls"
    if uri.secure:
        return f"sips+{given}"  # e.g. sips + udp: there is no TLS over UDP
    return given


def default_port(transport: str) -> int:
    return DEFAULT_PORTS.get(transport, 5060)


def srv_name(transport: str, domain: str) -> str:
    return f"{SRV_PREFIXES[transport]}.{domain}"


def select_naptr(
    records: Sequence[Naptr], secure: bool, transports: Sequence[str]
) -> list[tuple[Naptr, str]]:
    """The NAPTR records usable for SIP, with their transport, in order then preference.

    RFC 3263 section 4.1: a SIPS URI MUST discard services without "SIPS"; a SIP URI SHOULD keep
    "SIPS" services when TLS is supported; services of unsupported transports are discarded.
    The flag must be "s" (the next lookup is SRV) and the regexp empty; the replacement names
    the SRV records.  RFC 3403 section 4.1: lower order first, then lower preference.
    """
    usable: list[tuple[Naptr, str]] = []
    for record in records:
        transport = NAPTR_SERVICES.get(record.services.upper())
        if transport is None or transport not in transports:
            continue
        if secure and transport != "tls":
            continue
        if record.flags.lower() != "s" or record.regexp or record.replacement in ("", "."):
            continue
        usable.append((record, transport))
    usable.sort(key=lambda item: (item[0].order, item[0].preference))
    return usable


def srv_unavailable(records: Sequence[Srv]) -> bool:
    """RFC 2782: a target of "." means the service is decidedly not available here."""
    return bool(records) and all(r.target == "." for r in records)


def order_srv(records: Sequence[Srv], rng: random.Random) -> list[Srv]:
    """RFC 2782 "Usage rules": lowest priority first; within a priority, a weighted random
    order.  For each pick: arrange the remaining records with the weight-0 ones first, take a
    uniform integer in [0, sum of weights] (inclusive) and select the first record whose
    running sum of weights reaches it.  Targets of "." are dropped."""
    usable = [r for r in records if r.target != "."]
    ordered: list[Srv] = []
    for priority in sorted({r.priority for r in usable}):
        group = [r for r in usable if r.priority == priority]
        rng.shuffle(group)  # "in any order": do not favour the order the server sent
        group.sort(key=lambda r: r.weight != 0)  # stable: weight 0 at the beginning
        while group:
            pick = rng.randint(0, sum(r.weight for r in group))
            running = 0
            chosen = len(group) - 1
            for i, record in enumerate(group):
                running += record.weight
                if running >= pick:
                    chosen = i
                    break
            ordered.append(group.pop(chosen))
    return ordered


def _address_types(ip_versions: Sequence[int]) -> tuple[str, ...]:
    return tuple("A" if v == 4 else "AAAA" for v in ip_versions)


def addresses_of(
    names: Sequence[str], ip_versions: Sequence[int], errors: set[Outcome]
) -> Plan[dict[str, list[str]]]:
    """A and/or AAAA records of several names in one batch: name -> addresses, in the order
    of ``ip_versions`` (IPv4 first by default).  IP literals need no query."""
    types = _address_types(ip_versions)
    wanted = [n for n in dict.fromkeys(normalize_name(n) for n in names) if not is_ip(n)]
    answers: Answers = yield from ask(*(Query.of(n, t) for n in wanted for t in types))
    found: dict[str, list[str]] = {}
    for name in names:
        key = normalize_name(name)
        if is_ip(key):
            found[key] = [key]
            continue
        addresses: list[str] = []
        for t in types:
            answer = answers[Query.of(key, t)]
            if answer.failed:
                errors.add(answer.outcome)
            addresses.extend(a for a in answer.addresses if a not in addresses)
        found[key] = addresses
    return found


def _hops_for_srvs(
    ordered: Sequence[tuple[str, Srv]], ip_versions: Sequence[int], errors: set[Outcome]
) -> Plan[list[Hop]]:
    """Hops for (transport, SRV) pairs already in failover order: each target's addresses."""
    addresses = yield from addresses_of([s.target for _, s in ordered], ip_versions, errors)
    hops: list[Hop] = []
    for transport, srv in ordered:
        for address in addresses[normalize_name(srv.target)]:
            hops.append(Hop(transport, address, srv.port))
    return hops


def _unique(hops: Sequence[Hop]) -> tuple[Hop, ...]:
    return tuple(dict.fromkeys(hops))


def locate(
    uri: SipUri,
    *,
    rng: random.Random,
    transports: Sequence[str] = TRANSPORTS,
    ip_versions: Sequence[int] = (4, 6),
) -> Plan[Located]:
    """RFC 3263 section 4 for one URI (see the module docstring); ``transports`` are those this
    node can send on, in order of preference."""
    host = target_of(uri)
    secure = uri.secure
    errors: set[Outcome] = set()
    explicit = uri_transport(uri)

    def fixed_transport() -> str:
        # 4.1: "UDP for a SIP URI, and TCP for a SIPS URI" (TLS over TCP)
        return explicit or ("tls" if secure else "udp")

    def unsupported(transport: str) -> Located:
        return Located((), frozenset({Outcome.FAILURE}), f"transport {transport} not available")

    if is_ip(host):
        # 4.2: a numeric TARGET is used as is, at the URI's port or the transport's default
        transport = fixed_transport()
        if transport not in transports:
            return unsupported(transport)
        return Located((Hop(transport, host, uri.port or default_port(transport)),))

    if uri.port is not None:
        # 4.2: an explicit port means A/AAAA only (no SRV), each address in turn
        transport = fixed_transport()
        if transport not in transports:
            return unsupported(transport)
        found = yield from addresses_of([host], ip_versions, errors)
        hops = [Hop(transport, a, uri.port) for a in found[host]]
        return Located(_unique(hops), frozenset(errors), "" if hops else f"no address for {host}")

    if explicit is not None:
        # 4.2: a transport given without a port: the SRV records of that transport
        if explicit not in transports:
            return unsupported(explicit)
        answers = yield from ask(Query.of(srv_name(explicit, host), "SRV"))
        srv = answers[Query.of(srv_name(explicit, host), "SRV")]
        if srv.failed:
            errors.add(srv.outcome)
        if srv.srvs:
            pairs = [(explicit, s) for s in order_srv(srv.srvs, rng)]
            hops = yield from _hops_for_srvs(pairs, ip_versions, errors)
            return Located(_unique(hops), frozenset(errors), "" if hops else "SRV unavailable")
        return (yield from _a_fallback(host, explicit, ip_versions, errors))

    # 4.1: NAPTR
    naptr_query = Query.of(host, "NAPTR")
    answers = yield from ask(naptr_query)
    naptr = answers[naptr_query]
    if naptr.outcome is Outcome.NXDOMAIN:
        return Located((), frozenset(errors), f"domain {host} does not exist")  # RFC 8020
    if naptr.failed:
        errors.add(naptr.outcome)
    usable = select_naptr(naptr.naptrs, secure, transports)
    ordered: list[tuple[str, Srv]] = []
    for order in sorted({record.order for record, _ in usable}):
        # RFC 3403 section 4.1: records of one order, in preference order; a later order only
        # when this one led to no address at all.
        group = [(record, t) for record, t in usable if record.order == order]
        queries = [Query.of(record.replacement, "SRV") for record, _ in group]
        srv_answers = yield from ask(*queries)
        ordered.clear()
        for (_, transport), query in zip(group, queries, strict=True):
            answer = srv_answers[query]
            if answer.failed:
                errors.add(answer.outcome)
            ordered.extend((transport, s) for s in order_srv(answer.srvs, rng))
        hops = yield from _hops_for_srvs(ordered, ip_versions, errors)
        if hops:
            return Located(_unique(hops), frozenset(errors))

    # 4.1: no (usable) NAPTR: SRV queries for the supported transports, "_sips" for SIPS URIs
    candidates = [t for t in transports if t in SRV_PREFIXES and (t == "tls" or not secure)]
    srv_queries = [Query.of(srv_name(t, host), "SRV") for t in candidates]
    srv_answers = yield from ask(*srv_queries)
    any_srv = False
    ordered.clear()
    for transport, query in zip(candidates, srv_queries, strict=True):
        answer = srv_answers[query]
        if answer.failed:
            errors.add(answer.outcome)
        if answer.srvs:
            any_srv = True
            if not srv_unavailable(answer.srvs):
                ordered.extend((transport, s) for s in order_srv(answer.srvs, rng))
    if any_srv:
        hops = yield from _hops_for_srvs(ordered, ip_versions, errors)
        return Located(_unique(hops), frozenset(errors), "" if hops else "SRV unavailable")

    # 4.1/4.2: no SRV records: UDP for SIP (TLS for SIPS) at the default port, via A/AAAA.
    # "another transport ... MAY be used": the first supported one when UDP is not.
    if secure:
        transport = "tls"
    else:
        transport = "udp" if "udp" in transports else next(iter(transports), "udp")
    if transport not in transports:
        return unsupported(transport)
    return (yield from _a_fallback(host, transport, ip_versions, errors))


def _a_fallback(
    host: str, transport: str, ip_versions: Sequence[int], errors: set[Outcome]
) -> Plan[Located]:
    """4.2: "the client performs an A or AAAA record lookup of the domain name" and uses the
    default port of the transport."""
    found = yield from addresses_of([host], ip_versions, errors)
    hops = [Hop(transport, a, default_port(transport)) for a in found[host]]
    reason = "" if hops else f"no SIP service or address for {host}"
    return Located(_unique(hops), frozenset(errors), reason)


__all__ = [
    "DEFAULT_PORTS",
    "NAPTR_SERVICES",
    "SRV_PREFIXES",
    "TRANSPORTS",
    "Hop",
    "Located",
    "addresses_of",
    "default_port",
    "is_ip",
    "locate",
    "order_srv",
    "select_naptr",
    "srv_name",
    "srv_unavailable",
    "target_of",
    "uri_transport",
]
