"""Host cache: bounds, flood resistance, lookups for routing, persistence."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path
from typing import Any

from freecall.peering.hostcache import CACHE_FILE, HostCache, digest_hash
from freecall.peering.records import (
    Address,
    AddrKind,
    NodeIdentity,
    NodeRecord,
    RecordCodec,
    id_group,
)

NOW = 1_700_000_000.0


def ident(i: int) -> NodeIdentity:
    return NodeIdentity.from_seed(i.to_bytes(4, "big") * 8)


def rec(
    i: int, seq: int = 1, routes: tuple[str, ...] | None = None, ttl: int = 3600
) -> NodeRecord:
    return ident(i).make_record(
        seq=seq,
        expires=int(NOW) + ttl,
        addresses=(Address(AddrKind.GOSSIP, f"10.0.{i >> 8 & 255}.{i & 255}", 5064),),
        routes=routes if routes is not None else (f"n{i}.example",),
    )


def cache(**kw: Any) -> HostCache:
    return HostCache(rng=random.Random(1), **kw)


def test_put_update_stale_same_and_lookup() -> None:
    c = cache()
    assert c.put(rec(1, 1), NOW) == "added"
    assert c.put(rec(1, 1), NOW) == "same"
    assert c.put(rec(1, 3, routes=("moved.example",)), NOW) == "updated"
    assert c.put(rec(1, 2), NOW) == "stale"
    assert c.lookup_domain("n1.example") == []
    assert [r.seq for r in c.lookup_domain("MOVED.example.")] == [3]
    got = c.get(ident(1).node_id)
    assert got is not None and got.seq == 3


def test_lookup_user_prefers_user_route_then_domain() -> None:
    c = cache()
    c.put(rec(1, routes=("example.org",)), NOW)
    c.put(rec(2, routes=("alice@example.org",)), NOW)
    c.put(rec(3, routes=("bob@example.org",)), NOW)
    got = c.lookup_user("alice@example.org")
    assert [r.key for r in got] == [rec(2).key, rec(1).key]
    assert [r.key for r in c.lookup_user("carol@example.org")] == [rec(1).key]
    assert c.lookup_user("nobody@nowhere.example") == []
    assert c.lookup_domain("not a domain!") == []


def test_lookup_ranks_recently_heard_first() -> None:
    c = cache()
    c.put(rec(1, routes=("shared.example",)), NOW)
    c.put(rec(2, routes=("shared.example",)), NOW)
    c.heard(rec(2).key, NOW + 5)
    assert [r.key for r in c.lookup_domain("shared.example")] == [rec(2).key, rec(1).key]
    c.failed(rec(2).key)
    assert c.lookup_domain("shared.example")[0].key == rec(1).key


def test_capacity_is_a_hard_bound_and_home_records_are_kept() -> None:
    bits = 4
    me = 3
    c = cache(capacity=50, group_bits=bits, my_group=me, source_quota=10_000)
    home = [rec(i) for i in range(400) if me in rec(i).homes(bits)]
    other = [rec(i) for i in range(400, 800) if me not in rec(i).homes(bits)]
    for r in home[:20]:
        assert c.put(r, NOW) == "added"
    for r in other:
        c.put(r, NOW, source=f"198.51.100.{len(c) % 250}")
        assert len(c) <= 50
    assert all(c.entry(r.key) is not None for r in home[:20])
    assert c.home_count == 20
    assert c.counters["evicted"] > 0


def test_one_source_cannot_take_more_than_its_quota() -> None:
    c = cache(capacity=1000, source_quota=30)
    for i in range(200):
        c.put(rec(i), NOW, source="203.0.113.66")
    assert len(c.by_source["203.0.113.66"]) == 30
    for i in range(200, 220):
        assert c.put(rec(i), NOW, source="192.0.2.1") == "added"
    assert len(c) == 50


def test_ipv6_sources_share_a_quota_per_64() -> None:
    from freecall.peering.hostcache import source_of
    assert source_of("2001:db8:1:2::5") == source_of("2001:db8:1:2:ffff::9")
    assert source_of("2001:db8:1:3::5") != source_of("2001:db8:1:2::5")
    assert source_of("192.0.2.1") == "192.0.2.1"


def test_tombstones_block_that_version_only() -> None:
    c = cache()
    c.put(rec(1, 5), NOW)
    gone = c.remove(rec(1).key, NOW, tomb=True)
    assert gone is not None and len(c) == 0
    assert c.put(rec(1, 5), NOW) == "tomb"
    assert c.put(rec(1, 4), NOW) == "tomb"
    assert c.put(rec(1, 6), NOW) == "added"
    c.remove(rec(1).key, NOW, tomb=True)
    assert c.lift_tomb(rec(1).key, NOW) is not None and len(c) == 1


def test_expiry() -> None:
    c = cache()
    c.put(rec(1, ttl=10), NOW)
    c.put(rec(2, ttl=100), NOW)
    assert c.expire(NOW + 5) == []
    assert [r.key for r in c.expire(NOW + 11)] == [rec(1).key]
    assert len(c) == 1


def test_groups_members_pages_and_need() -> None:
    bits = 3
    c = cache(group_bits=bits, my_group=0)
    recs = [rec(i) for i in range(60)]
    for r in recs:
        c.put(r, NOW)
    for g in range(1 << bits):
        assert set(c.members[g]) == {r.key for r in recs if id_group(r.node_id, bits) == g}
    homes = {r.key for r in recs if 0 in r.homes(bits)}
    assert c.home_count == len(homes)
    pages = set()
    for i in range(4):
        pages |= {k for k, _ in c.home_page(2, i)}
    assert pages == homes
    need = c.need_bitmap()
    assert need == bytes(1)  # every group has at least two members here
    c2 = cache(group_bits=bits, my_group=0)
    assert c2.need_bitmap() == b"\xff"


def test_pages_are_remembered_until_a_home_record_changes() -> None:
    bits = 2
    c = cache(group_bits=bits, my_group=1)
    recs = [rec(i) for i in range(40)]
    for r in recs[:20]:
        c.put(r, NOW)
    homed = [i for i in range(20) if 1 in recs[i].homes(bits)]

    def fresh(sub_bits: int, index: int) -> set[tuple[bytes, int]]:
        width = 64 >> sub_bits
        return {(k, s) for f in range(index * width, (index + 1) * width)
                for k, s in c.home_fine[f].items()}

    pages = [c.home_page(2, i) for i in range(4)]
    assert c.home_page(2, 0) is pages[0]  # remembered

    def check() -> None:
        for i in range(4):
            assert set(c.home_page(2, i)) == fresh(2, i) == c.home_page_set(2, i)

    assert c.put(rec(homed[0], seq=5), NOW) == "updated"  # newer version, same routes
    check()
    assert c.put(rec(homed[1], seq=6, routes=("elsewhere.example",)), NOW) == "updated"
    check()
    c.remove(recs[homed[2]].key, NOW, tomb=True)
    check()
    c.bulk_load(recs[20:], NOW)
    check()


def test_slice_summaries_follow_every_change_and_show_where_two_caches_differ() -> None:
    bits = 2
    recs = [rec(i) for i in range(60)]
    a, b = cache(group_bits=bits, my_group=1), cache(group_bits=bits, my_group=1)
    for r in recs[:30]:
        a.put(r, NOW)
    b.bulk_load(recs[:30], NOW)
    homed = [i for i in range(30) if 1 in recs[i].homes(bits)]
    assert len(homed) >= 4

    def fresh(c: HostCache, sub_bits: int) -> bytes:
        width = 64 >> sub_bits
        out = b""
        for i in range(1 << sub_bits):
            x = 0
            for f in range(i * width, (i + 1) * width):
                for k, s in c.home_fine[f].items():
                    x ^= digest_hash(k, s)
            out += ((x ^ (x >> 32)) & 0xFFFFFFFF).to_bytes(4, "big")
        return out

    for sub_bits in (0, 2, 3):  # the same records: the same summary, at any slicing
        assert a.home_summary(sub_bits) == b.home_summary(sub_bits) == fresh(a, sub_bits)
    # one newer version in b: exactly the slice holding it differs
    k = recs[homed[0]].key
    assert b.put(rec(homed[0], seq=5), NOW) == "updated"
    mine, theirs = a.home_summary(3), b.home_summary(3)
    differ = [i for i in range(8) if mine[4 * i : 4 * i + 4] != theirs[4 * i : 4 * i + 4]]
    assert differ == [(k[7] & 63) >> 3]
    assert theirs == fresh(b, 3)
    # removal, a change of routes and a bulk load keep it exact
    b.remove(recs[homed[1]].key, NOW, tomb=True)
    assert b.home_summary(3) == fresh(b, 3)
    assert b.put(rec(homed[2], seq=6, routes=("elsewhere.example",)), NOW) == "updated"
    assert b.home_summary(3) == fresh(b, 3)
    b.bulk_load(recs[30:], NOW)
    assert b.home_summary(3) == fresh(b, 3) != a.home_summary(3)


def test_save_and_load(tmp_path: Path) -> None:
    c = cache()
    for i in range(20):
        c.put(rec(i), NOW)
    c.heard(rec(3).key, NOW + 1)
    path = tmp_path / CACHE_FILE
    c.save(path, NOW + 2)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = cache()
    assert loaded.load(path, RecordCodec(), NOW + 3) == 20
    assert {r.raw for r in loaded.records()} == {r.raw for r in c.records()}
    e = loaded.entry(rec(3).key)
    assert e is not None and e.last_heard == NOW + 1
    # expired records are skipped on load
    assert cache().load(path, RecordCodec(), NOW + 7200) == 0


def test_load_skips_tampered_and_garbage(tmp_path: Path) -> None:
    c = cache()
    for i in range(5):
        c.put(rec(i), NOW)
    doc = json.loads(c.to_json(NOW))
    raw = bytearray(c.records()[0].raw)
    raw[60] ^= 1
    import base64
    doc["records"][0]["record"] = base64.b64encode(bytes(raw)).decode()
    doc["records"].append({"record": "not base64!"})
    doc["records"].append(7)
    path = tmp_path / CACHE_FILE
    path.write_text(json.dumps(doc))
    assert cache().load(path, RecordCodec(), NOW) == 4
    path.write_bytes(b"\x00garbage")
    assert cache().load(path, RecordCodec(), NOW) == 0
    assert cache().load(tmp_path / "missing.json", RecordCodec(), NOW) == 0


def test_peers_view_has_the_contract_fields() -> None:
    c = cache()
    c.put(rec(1), NOW)
    c.heard(rec(1).key, NOW)
    (p,) = c.peers(NOW + 2.5)
    assert set(p) >= {"node_id", "addresses", "routes", "last_seen_s", "relay"}  # CONTRACT
    assert set(p) - {"node_id", "addresses", "routes", "last_seen_s", "relay"} == {
        "through_relay"}
    assert p["last_seen_s"] == 2.5 and p["routes"] == ["n1.example"] and p["relay"] is False
    assert p["through_relay"] is None
