"""PeeringService on real UDP sockets on loopback: bootstrap from a seed, routes for the
router (TLS only where a record names a TLS key), mesh lookups, the TLS key check, and the
host cache surviving a restart."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from freecall.peering.gossip import GossipConfig
from freecall.peering.records import Address, AddrKind, NodeIdentity
from freecall.peering.service import PeeringService, announcement_for

CFG = GossipConfig(interval=0.05, group_bits=0, probe_timeout=0.05, lookup_timeout=0.05)
"""One group: every node is in the home group of every route, so a lookup always has someone
to ask (in a three-node mesh with more groups, a route's home group may hold nobody)."""
TLS_KEY = bytes(range(32))


def service(tmp_path: Path, name: str, host: str, *, seeds: list[tuple[str, int]] | None = None,
            routes: tuple[str, ...] = (), tls: bool = True, port: int = 0) -> PeeringService:
    state = tmp_path / name
    state.mkdir(exist_ok=True)
    identity = NodeIdentity.load_or_create(state)
    sip = [Address(AddrKind.SIP_UDP, host, 5062), Address(AddrKind.SIP_TCP, host, 5062)]
    if tls:
        sip.append(Address(AddrKind.SIP_TLS, host, 5061))
    # the gossip port is only known once bound: announce the one asked for (fixed in tests)
    announcement = announcement_for(
        identity, gossip=Address(AddrKind.GOSSIP, host, port), sip=sip, routes=routes,
        tls_key=TLS_KEY if tls else None, name=name,
    )
    return PeeringService(identity, announcement, listen=(host, port), state_dir=state,
                          config=CFG, seeds=seeds or [], rng=random.Random(name))


async def until(check: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():  # type: ignore[operator]
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.02)


def free_udp_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def test_two_services_meet_route_and_check_keys(tmp_path: Path) -> None:
    async def main() -> None:
        pa, pb = free_udp_port("127.0.0.21"), free_udp_port("127.0.0.22")
        a = service(tmp_path, "a", "127.0.0.21", routes=("a.test",), port=pa)
        b = service(tmp_path, "b", "127.0.0.22", routes=("b.test", "bob@b.test"), tls=False,
                    seeds=[("127.0.0.21", pa)], port=pb)
        await a.start()
        assert a.prepare(["x.test"]) is None  # alone: nobody to ask, routing goes on at once
        await b.start()
        try:
            await until(lambda: a.known_nodes() == 1 and b.known_nodes() == 1)
            # a names a TLS key: only its TLS address is offered
            assert [str(u) for u in b.next_hops("a.test")] == ["sip:127.0.0.21:5061;transport=tls"]
            # b has no TLS: TCP before UDP; a user route falls back to the domain's node
            assert [str(u) for u in a.next_hops("bob@b.test")] == [
                "sip:127.0.0.22:5062;transport=tcp", "sip:127.0.0.22:5062;transport=udp"]
            assert a.next_hops("nobody.test") == []
            assert a.next_hops("a.test") == []  # never ourselves
            # the TLS check: the key a's record names, at a's address; anything else refused
            assert b.tls_key_ok(("127.0.0.21", 5061), TLS_KEY.hex())
            assert not b.tls_key_ok(("127.0.0.21", 5061), "00" * 32)
            assert not b.tls_key_ok(("127.0.0.21", 5061), None)
            assert b.tls_key_ok(("127.0.0.99", 5061), None)  # no record names it
            # a mesh lookup for a route nobody serves ends, unfound
            waiting = a.prepare(["x@none.test", "none.test"])
            assert waiting is not None
            assert await asyncio.wait_for(waiting, 5) is False
            assert a.prepare([]) is None
            peers = a.peers()
            assert [p["routes"] for p in peers] == [["b.test", "bob@b.test"]]
        finally:
            await b.stop()
            await a.stop()
        saved = json.loads((tmp_path / "b" / "hostcache.json").read_bytes())
        assert len(saved["records"]) == 2  # a's record and b's own

        # b comes back with no seed: what it learned is loaded from the state directory
        b2 = service(tmp_path, "b", "127.0.0.22", routes=("b.test",), tls=False, port=pb)
        await b2.start()
        try:
            assert b2.known_nodes() == 1
            assert [str(u) for u in b2.next_hops("a.test")] == [
                "sip:127.0.0.21:5061;transport=tls"]
        finally:
            await b2.stop()

    asyncio.run(main())


def test_a_lookup_finds_a_route_the_cache_lacks(tmp_path: Path) -> None:
    """c learns a route only by asking the mesh (its cache dropped b's record)."""

    async def main() -> None:
        ports = [free_udp_port(f"127.0.0.{i}") for i in (31, 32, 33)]
        a = service(tmp_path, "a", "127.0.0.31", routes=("a.test",), port=ports[0])
        b = service(tmp_path, "b", "127.0.0.32", routes=("b.test",), port=ports[1],
                    seeds=[("127.0.0.31", ports[0])])
        c = service(tmp_path, "c", "127.0.0.33", routes=("c.test",), port=ports[2],
                    seeds=[("127.0.0.31", ports[0])])
        for s in (a, b, c):
            await s.start()
        try:
            await until(lambda: all(s.known_nodes() == 2 for s in (a, b, c)))
            assert c.gossip is not None and b.gossip is not None
            c.gossip.cache.remove(b.gossip.key, c.clock())
            assert c.next_hops("b.test") == []
            waiting = c.prepare(["b.test"])
            assert waiting is not None
            assert await asyncio.wait_for(waiting, 5) is True
            assert [str(u) for u in c.next_hops("b.test")] == [
                "sip:127.0.0.32:5061;transport=tls"]
        finally:
            for s in (c, b, a):
                await s.stop()

    asyncio.run(main())


def test_announcement_keeps_what_fits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    identity = NodeIdentity.generate()
    users = [f"{'u' * 60}{i:02d}@example.org" for i in range(40)]
    ann = announcement_for(identity, gossip=None, sip=[],
                           routes=["example.org", "bad domain", *users], tls_key=None, name="n")
    assert ann.routes[0] == "example.org" and 1 < len(ann.routes) < 20
    assert "bad domain" in caplog.text and "left out" in caplog.text
    identity.make_record(seq=1, expires=2, routes=ann.routes, extensions=ann.extensions)


def test_the_openpgp_key_a_record_names_follows_a_reload(tmp_path: Path) -> None:
    """reconfigure() re-signs a changed OpenPGP fingerprint (and users) into the record; the
    other node then expects that key for the node's addresses (openpgp_key_for)."""
    first, second = bytes.fromhex("AA" * 20), bytes.fromhex("BB" * 32)

    async def main() -> None:
        pa, pb = free_udp_port("127.0.0.21"), free_udp_port("127.0.0.22")
        a = service(tmp_path, "a", "127.0.0.21", routes=("a.test",), port=pa)
        b = service(tmp_path, "b", "127.0.0.22", routes=("b.test", "bob@b.test"),
                    seeds=[("127.0.0.21", pa)], port=pb)
        await a.start()
        await b.start()
        try:
            await until(lambda: a.known_nodes() == 1)
            assert a.openpgp_key_for("bob@b.test", ("127.0.0.22", 5062)) is None  # none named
            b.reconfigure(seeds=[("127.0.0.21", pa)], srv_domain=None,
                          routes=("b.test", "bob@b.test", "carol@b.test"), openpgp_key=first)
            assert b.gossip is not None
            assert b.gossip.local.openpgp_fingerprint == first
            await until(lambda: a.openpgp_key_for("carol@b.test", ("127.0.0.22", 5062)))
            found = a.openpgp_key_for("bob@b.test", ("127.0.0.22", 40000))  # host match
            assert found is not None and found.fingerprint == first.hex().upper()
            assert found.node_id == b.identity.node_id.hex() and found.route == "bob@b.test"
            assert a.openpgp_key_for("bob@c.test", ("127.0.0.22", 5062)) is None  # not served
            assert a.openpgp_key_for("bob@b.test", ("127.0.0.23", 5062)) is None  # other host
            assert [p["openpgp"] for p in a.peers()] == [first.hex().upper()]
            seq = b.gossip.local.seq
            b.reconfigure(seeds=[("127.0.0.21", pa)], srv_domain=None,
                          routes=("b.test", "bob@b.test", "carol@b.test"), openpgp_key=second)
            assert b.gossip.local.seq > seq
            await until(lambda: (k := a.openpgp_key_for("b.test", ("127.0.0.22", 5061)))
                        is not None and k.fingerprint == second.hex().upper())
            seq = b.gossip.local.seq  # unchanged: nothing to re-sign
            b.reconfigure(seeds=[("127.0.0.21", pa)], srv_domain=None,
                          routes=("b.test", "bob@b.test", "carol@b.test"))
            assert b.gossip.local.seq == seq
        finally:
            await b.stop()
            await a.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_changed_addresses_are_republished_and_replace_the_old_record(tmp_path: Path) -> None:
    """republish() (a public address learnt at run time, or moved by a reload) signs the new
    addresses into a newer record; the peer replaces the old one and routes to the new
    address only. The same addresses again change nothing; addresses that do not fit a
    record are refused and the old record stays."""

    async def main() -> None:
        pa, pb = free_udp_port("127.0.0.21"), free_udp_port("127.0.0.22")
        a = service(tmp_path, "a", "127.0.0.21", routes=("a.test",), port=pa)
        b = service(tmp_path, "b", "127.0.0.22", routes=("b.test",),
                    seeds=[("127.0.0.21", pa)], port=pb)
        await a.start()
        await b.start()
        try:
            await until(lambda: a.known_nodes() == 1)
            assert [u.host for u in a.next_hops("b.test")] == ["127.0.0.22"]
            assert b.gossip is not None
            seq = b.gossip.local.seq
            gossip = Address(AddrKind.GOSSIP, "127.0.0.22", pb)
            moved = [Address(AddrKind.SIP_TLS, "127.0.0.23", 5071)]
            assert b.republish(gossip=gossip, sip=moved)
            assert b.gossip.local.seq > seq
            assert b.announcement.addresses == (gossip, *moved)
            await until(lambda: [(u.host, u.port) for u in a.next_hops("b.test")]
                        == [("127.0.0.23", 5071)])
            held = a.gossip.cache.get(b.identity.node_id) if a.gossip else None
            assert held is not None and held.seq == b.gossip.local.seq
            assert not b.republish(gossip=gossip, sip=moved)  # nothing changed: no new seq
            too_many = [Address(AddrKind.SIP_UDP, "127.0.0.23", 6000 + i) for i in range(8)]
            assert not b.republish(gossip=gossip, sip=too_many)
            assert b.announcement.addresses == (gossip, *moved)
            assert b.gossip.local.addresses == (gossip, *moved)
        finally:
            await b.stop()
            await a.stop()

    asyncio.run(asyncio.wait_for(main(), 30))
