"""Port blocks: never shared between allocators, never handed out while something holds them."""

# The ranges here (13000-13255) lie below the harness default (14000-19999): ports the
# interop tests used a moment ago (TIME_WAIT) must not make these tests fail.

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest

from harness.ports import PortAllocator, PortBlock, PortPool, PortsExhausted, port_free


def test_blocks_do_not_overlap_and_are_free(tmp_path: Path) -> None:
    alloc = PortAllocator(13000, 13255, block_size=32, lock_dir=tmp_path)
    blocks = [alloc.block() for _ in range(4)]
    starts = sorted(b.first for b in blocks)
    assert all(b - a >= 32 for a, b in itertools.pairwise(starts))
    assert all(b.first >= 13000 and b.last <= 13255 for b in blocks)
    alloc.release_all()


def test_a_second_allocator_cannot_take_a_locked_block(tmp_path: Path) -> None:
    # like another pytest-xdist worker: same lock directory, different process state
    one = PortAllocator(13000, 13063, block_size=32, lock_dir=tmp_path)
    two = PortAllocator(13000, 13063, block_size=32, lock_dir=tmp_path)
    a, b = one.block(), two.block()
    assert a.first != b.first
    with pytest.raises(PortsExhausted):
        two.block()
    a.release()
    assert two.block().first == a.first
    one.release_all()
    two.release_all()


def test_a_block_with_a_busy_port_is_skipped(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 13010))
        assert not port_free(13010)
        alloc = PortAllocator(13000, 13063, block_size=32, lock_dir=tmp_path)
        assert alloc.block().first == 13032
        with pytest.raises(PortsExhausted):
            alloc.block()
        alloc.release_all()
    assert port_free(13010)


def test_take_and_ranges() -> None:
    blk = PortBlock(20000, 32, None)
    assert blk.take(2) == 20000  # SIP + TLS (baresip's port + 1)
    assert blk.take(1) == 20002
    assert blk.take_range(20) == (20004, 20023)  # even start for RTP
    assert blk.take(1, align=4) == 20024
    with pytest.raises(PortsExhausted):
        blk.take(8)
    blk.release()  # no lock held: nothing to do


def test_pool_releases_its_blocks(tmp_path: Path) -> None:
    alloc = PortAllocator(13000, 13031, block_size=32, lock_dir=tmp_path)
    pool = PortPool(alloc)
    port = pool.port()
    assert port == 13000
    with pytest.raises(PortsExhausted):
        PortPool(PortAllocator(13000, 13031, lock_dir=tmp_path)).block()
    pool.release()
    assert PortPool(PortAllocator(13000, 13031, lock_dir=tmp_path)).block().first == 13000


def test_range_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREECALL_HARNESS_PORTS", "17000-17063")
    alloc = PortAllocator(lock_dir=tmp_path)
    assert (alloc.first, alloc.last) == (17000, 17063)
