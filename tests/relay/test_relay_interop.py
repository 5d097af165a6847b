"""The real relay daemon (``freecall run --role relay``) against third-party STUN/TURN clients:
aioice's TURN client, coturn's ``turnutils_uclient`` and ``turnutils_stunclient``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aioice import stun as aioice_stun
from aioice.turn import TurnClientUdpProtocol, create_turn_endpoint

from freecall.peering.records import NodeIdentity
from freecall.relay.credentials import node_credentials, node_key_credentials
from harness import Harness, ManagedProcess, PortAllocator, wait_until

pytestmark = [pytest.mark.interop]


class Relay:
    """One relay daemon on 127.0.0.1 with ports from a harness block: listen, spare, relayed."""

    def __init__(self, directory: Path, allocator: PortAllocator, **relay: Any) -> None:
        block = allocator.block(32)
        self.block = block
        self.port = block.take(1)
        self.gossip_port = block.take(1)
        first = block.take(1)
        self.spare = block.take(1)
        self.control_port = block.take(1)
        last = block.last
        self.directory = directory
        self.state = directory / "state"
        config = {
            "node": {"name": "relay1", "role": "relay"},
            "peering": {"listen": f"udp:127.0.0.1:{self.gossip_port}", "mdns": False},
            "relay": {"listen": f"udp:127.0.0.1:{self.port}", "realm": "relay.test",
                      "ports": f"{first}-{last}", "sip": None, **relay},
            "log": {"level": "debug"},
            "control": {"listen": f"127.0.0.1:{self.control_port}"},
        }
        self.config_path = directory / "relay.yaml"
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config))
        self.process = ManagedProcess(
            "freecall-relay", [sys.executable, "-m", "freecall", "run", "-c",
                               str(self.config_path), "--state-dir", str(self.state)],
            log_path=directory / "relay.log", cwd=directory)

    def start(self) -> Relay:
        self.process.start()
        wait_until(self._ready, 15, message="the relay to start")
        return self

    def _ready(self) -> bool:
        if not self.process.alive():
            raise AssertionError(f"relay died: {self.process.describe_exit()}\n"
                                 f"{self.process.log_text()[-3000:]}")
        return re.search(r" node relay1 listening on ", self.process.log_text()) is not None

    @property
    def secret(self) -> str:
        return (self.state / "relay-secret").read_text().strip()

    def credentials(self, node: str = "node-a", ttl: float = 3600) -> tuple[str, str]:
        return node_credentials(self.secret, node, time.time(), ttl)


@pytest.fixture
def allocator() -> Iterator[PortAllocator]:
    allocator = PortAllocator()
    yield allocator
    allocator.release_all()


@pytest.fixture
def relays(tmp_path: Path, allocator: PortAllocator) -> Iterator[list[Relay]]:
    started: list[Relay] = []
    yield started
    for relay in reversed(started):
        relay.process.stop(5)
        relay.block.release()


def start_relay(relays: list[Relay], tmp_path: Path, allocator: PortAllocator,
                **relay: Any) -> Relay:
    r = Relay(tmp_path / f"relay{len(relays)}", allocator, **relay)
    relays.append(r)
    return r.start()


class Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, (addr[0], addr[1])))


async def _aioice_round_trip(relay: Relay, peer_host: str) -> dict[str, Any]:
    """aioice allocates on the relay; a plain UDP socket on ``peer_host`` talks to it."""
    loop = asyncio.get_running_loop()
    username, password = relay.credentials()
    turn, client = await create_turn_endpoint(Inbox, ("127.0.0.1", relay.port), username,
                                              password)
    relayed = turn.get_extra_info("sockname")
    assert next(iter(turn.get_extra_info("related_address"))) == "127.0.0.1"  # mapped address
    peer_transport, peer = await loop.create_datagram_endpoint(
        Inbox, local_addr=(peer_host, relay.spare))
    peer_addr = peer_transport.get_extra_info("sockname")[:2]
    try:
        got_at_peer: list[bytes] = []
        for i in range(20):  # the client speaks first: that binds a channel (permission)
            turn.sendto(f"to-peer {i}".encode(), peer_addr)
            data, source = await asyncio.wait_for(peer.queue.get(), 5)
            got_at_peer.append(data)
            assert tuple(source) == tuple(relayed)
        got_at_client: list[bytes] = []
        for i in range(20):
            peer_transport.sendto(f"to-client {i}".encode(), tuple(relayed))
            data, source = await asyncio.wait_for(client.queue.get(), 5)
            got_at_client.append(data)
            assert tuple(source) == tuple(peer_addr)
        return {"relayed": tuple(relayed), "at_peer": got_at_peer, "at_client": got_at_client}
    finally:
        turn.close()
        peer_transport.close()
        await asyncio.sleep(0.1)


def test_aioice_turn_client_relays_both_ways(relays: list[Relay], tmp_path: Path,
        allocator: PortAllocator) -> None:
    relay = start_relay(relays, tmp_path, allocator, allow_peers=["127.0.0.0/8"])
    result = asyncio.run(_aioice_round_trip(relay, "127.0.0.2"))
    assert result["relayed"][0] == "127.0.0.1"
    assert result["at_peer"] == [f"to-peer {i}".encode() for i in range(20)]
    assert result["at_client"] == [f"to-client {i}".encode() for i in range(20)]
    # the record the relay gossips says it relays and answers STUN
    log = relay.process.log_text()
    assert re.search(rf"announcing gossip:127\.0\.0\.1:{relay.gossip_port}, "
                     rf"stun:127\.0\.0\.1:{relay.port}, relay:127\.0\.0\.1:{relay.port}", log)
    # the operator's view: status (the CLI's), and the allocations and traffic in /metrics
    token = (relay.state / "control.token").read_text().strip()

    def get(path: str) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{relay.control_port}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return bytes(resp.read())

    status = json.loads(get("/api/status"))
    assert status["role"] == "relay" and len(status["node_id"]) == 32
    assert f"udp:127.0.0.1:{relay.port} (STUN, TURN)" in status["listeners"]
    metrics = get("/metrics").decode()
    created = re.search(r"^freecall_relay_allocations_created_total (\d+)$", metrics, re.M)
    relayed = re.search(r"^freecall_relay_packets_total (\d+)$", metrics, re.M)
    assert created and int(created.group(1)) >= 1, metrics
    assert relayed and int(relayed.group(1)) >= 40, metrics
    done = subprocess.run([sys.executable, "-m", "freecall", "status", "--state-dir",
                           str(relay.state)], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0 and "relay" in done.stdout, done.stdout + done.stderr


async def _raw_requests(relay: Relay, username: str, password: str) -> dict[str, Any]:
    """aioice's own TURN protocol object: Allocate, then a CreatePermission to loopback."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: TurnClientUdpProtocol(("127.0.0.1", relay.port), username=username,
                                      password=password, lifetime=600,
                                      channel_refresh_time=300),
        remote_addr=("127.0.0.1", relay.port))
    out: dict[str, Any] = {}
    try:
        try:
            out["relayed"] = await protocol.connect()
        except aioice_stun.TransactionFailed as exc:
            out["allocate_error"] = exc.response.error_code
            return out
        request = aioice_stun.Message(aioice_stun.Method.CREATE_PERMISSION,
                                      aioice_stun.Class.REQUEST)
        request.attributes["XOR-PEER-ADDRESS"] = ("127.0.0.2", 9)
        try:
            await protocol.request_with_retry(request)
            out["permission"] = "ok"
        except aioice_stun.TransactionFailed as exc:
            out["permission"] = exc.response.error_code
    finally:
        transport.close()
    return out


def test_loopback_peers_are_refused_by_default(relays: list[Relay], tmp_path: Path,
        allocator: PortAllocator) -> None:
    relay = start_relay(relays, tmp_path, allocator)
    username, password = relay.credentials()
    result = asyncio.run(_raw_requests(relay, username, password))
    assert "relayed" in result
    assert result["permission"] == 403


def test_bad_and_expired_credentials_are_refused(relays: list[Relay], tmp_path: Path,
        allocator: PortAllocator) -> None:
    relay = start_relay(relays, tmp_path, allocator, allow_peers=["127.0.0.0/8"])
    username, _ = relay.credentials()
    assert asyncio.run(_raw_requests(relay, username, "wrong"))["allocate_error"] == 401
    expired, password = relay.credentials(ttl=-10)
    assert asyncio.run(_raw_requests(relay, expired, password))["allocate_error"] == 401


def test_quota_per_node_gives_486_while_other_nodes_keep_working(
        relays: list[Relay], tmp_path: Path, allocator: PortAllocator) -> None:
    relay = start_relay(relays, tmp_path, allocator, allow_peers=["127.0.0.0/8"],
                        allocations_per_user=2)

    async def scenario() -> list[Any]:
        greedy = relay.credentials("greedy")
        results = [await _raw_requests(relay, *greedy) for _ in range(2)]
        # the two allocations above were closed without Refresh(0): they are still held
        results.append(await _raw_requests(relay, *greedy))
        results.append(await _raw_requests(relay, *relay.credentials("modest")))
        return results

    first, second, third, modest = asyncio.run(scenario())
    assert first["permission"] == second["permission"] == "ok"
    assert third["allocate_error"] == 486
    assert modest["permission"] == "ok"


def test_bogus_flood_does_not_stop_service(relays: list[Relay], tmp_path: Path,
        allocator: PortAllocator) -> None:
    relay = start_relay(relays, tmp_path, allocator, allow_peers=["127.0.0.0/8"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    junk = [os.urandom(n) for n in (1, 20, 48, 300)] + [
        bytes.fromhex("000300002112a442") + os.urandom(12),  # unauthenticated Allocate
        bytes.fromhex("000100082112a442") + os.urandom(12) + b"\x00\x01\x00\x04abcd",
        b"\x40\x00\x00\x10" + os.urandom(16)]
    sent = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        for data in junk:
            try:
                sock.sendto(data, ("127.0.0.1", relay.port))
                sent += 1
            except BlockingIOError:
                time.sleep(0.001)
        while True:  # throw the answers away
            try:
                sock.recv(2048)
            except BlockingIOError:
                break
    sock.close()
    assert sent > 5000
    result = asyncio.run(_aioice_round_trip(relay, "127.0.0.3"))
    assert len(result["at_client"]) == 20
    assert relay.process.alive()


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install Debian's coturn (scripts/debian-packages.txt)"
    return path


def test_coturn_stunclient_learns_its_address(relays: list[Relay], tmp_path: Path,
        allocator: PortAllocator) -> None:
    relay = start_relay(relays, tmp_path, allocator)
    out = subprocess.run([_tool("turnutils_stunclient"), "-p", str(relay.port), "127.0.0.1"],
                         check=False, capture_output=True, text=True, timeout=20)
    assert re.search(r"UDP reflexive addr: 127\.0\.0\.1:\d+", out.stdout + out.stderr), out


def test_coturn_uclient_relays_through_channels_without_loss(relays: list[Relay], tmp_path: Path,
        allocator: PortAllocator) -> None:
    relay = start_relay(relays, tmp_path, allocator, allow_peers=["127.0.0.0/8"])
    peer = ManagedProcess("turnutils_peer", [_tool("turnutils_peer"), "-L", "127.0.0.1",
                                             "-p", str(relay.spare)],
                          log_path=tmp_path / "peer.log").start()
    try:
        time.sleep(0.3)
        out = subprocess.run(
            [_tool("turnutils_uclient"), "-u", "node-a", "-W", relay.secret,
             "-p", str(relay.port), "-e", "127.0.0.1", "-r", str(relay.spare),
             "-n", "100", "-l", "172", "-c", "-m", "4", "127.0.0.1"],
            check=False, capture_output=True, text=True, timeout=60)
    finally:
        peer.stop(5)
    text = out.stdout + out.stderr
    sent = re.search(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\n", text)
    assert sent, text[-2000:]
    assert int(sent.group(1)) == 400 and int(sent.group(2)) == 400, text[-2000:]
    assert re.search(r"Total lost packets 0 \(", text), text[-2000:]


def test_coturn_uclient_with_wrong_secret_cannot_allocate(relays: list[Relay], tmp_path: Path,
        allocator: PortAllocator) -> None:
    relay = start_relay(relays, tmp_path, allocator, allow_peers=["127.0.0.0/8"])
    out = subprocess.run(
        [_tool("turnutils_uclient"), "-u", "node-a", "-W", "not-the-secret",
         "-p", str(relay.port), "-e", "127.0.0.1", "-r", str(relay.spare),
         "-n", "5", "-c", "-m", "1", "127.0.0.1"],
        check=False, capture_output=True, text=True, timeout=60)
    assert "Cannot complete Allocation" in out.stdout + out.stderr


def test_bare_config_relay_starts(tmp_path: Path) -> None:
    """``freecall run --role relay --state-dir X`` with no file: the standard ports and a
    generated secret. If another program holds 3478, 5061 or 5064 here, the daemon must say so and
    exit instead."""
    state = tmp_path / "state"
    process = ManagedProcess("bare-relay", [sys.executable, "-m", "freecall", "run", "--role",
                                            "relay", "--state-dir", str(state)],
                             log_path=tmp_path / "bare.log", cwd=tmp_path).start()
    try:
        wait_until(lambda: "; role: relay" in process.log_text()
                   or "cannot start" in process.log_text() or not process.alive(), 15,
                   message="the bare relay to start or fail")
        log = process.log_text()
        if "cannot start" in log:  # 3478 or 5064 taken by something else on this machine
            assert "Address already in use" in log
        else:
            assert "udp:0.0.0.0:3478 (STUN, TURN)" in log
            assert "tls:0.0.0.0:5061 (SIP edge)" in log  # nodes behind NAT can attach
            assert "relay: SIP edge on tls:" in log
            assert (state / "relay-secret").stat().st_mode & 0o777 == 0o600
    finally:
        process.stop(5)


def test_service_edge_frees_the_relayed_socket_when_the_allocation_is_deleted(
        allocator: PortAllocator) -> None:
    """In process: the asyncio edge binds one socket per allocation and closes it when aioice
    deletes the allocation (Refresh with LIFETIME 0 on close)."""
    from freecall.config import PortRange
    from freecall.relay.server import TurnSettings
    from freecall.relay.service import RelayService

    block = allocator.block(32)
    port = block.take(1)
    first = block.take(1)
    secret = "in-process-secret-0123456789"

    async def scenario() -> tuple[int, int, int]:
        service = RelayService(
            TurnSettings(realm="relay.test", secret=secret), ("127.0.0.1", port),
            "127.0.0.1", PortRange(first, block.last))
        await service.start()
        assert service.ports is not None and service.core is not None
        try:
            username, password = node_credentials(secret, "node-a", time.time(), 600)
            turn, _ = await create_turn_endpoint(Inbox, ("127.0.0.1", port), username,
                                                 password)
            relayed = turn.get_extra_info("sockname")
            assert first <= relayed[1] <= block.last
            during = len(service.ports.sockets)
            turn.close()
            for _ in range(50):
                await asyncio.sleep(0.05)
                if not service.ports.sockets:
                    break
            return during, len(service.ports.sockets), service.core.allocations
        finally:
            service.close()

    try:
        assert asyncio.run(scenario()) == (1, 0, 0)
    finally:
        block.release()


def test_relay_tells_systemd_it_is_ready_survives_sighup_and_says_it_stops(
        tmp_path: Path) -> None:
    """The system unit is Type=notify for both roles: a relay must send READY=1, and SIGHUP
    (``systemctl reload``) must not kill it."""
    config = tmp_path / "relay.yaml"
    config.write_text("node: {role: relay}\nrelay: {listen: 'udp:127.0.0.1:0'}\n"
                      "peering: {listen: null}\ncontrol: {listen: null}\n")
    with tempfile.TemporaryDirectory(prefix="fcr") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(20)
            process = ManagedProcess(
                "notify-relay", [sys.executable, "-m", "freecall", "run", "-c", str(config),
                                 "--state-dir", str(tmp_path / "state")],
                log_path=tmp_path / "relay.log", cwd=tmp_path,
                env={**os.environ, "NOTIFY_SOCKET": path}).start()
            try:
                ready = sock.recv(4096).decode().split("\n")
                assert "READY=1" in ready, ready
                assert any(f.startswith("STATUS=relay on udp:127.0.0.1:") for f in ready)
                os.kill(process.pid, signal.SIGHUP)
                assert sock.recv(4096).decode().startswith("RELOADING=1")
                assert "READY=1" in sock.recv(4096).decode().split("\n")
                assert process.alive()
                os.kill(process.pid, signal.SIGTERM)
                assert sock.recv(4096).decode().startswith("STOPPING=1")
                assert process.wait(10) == 0
            finally:
                process.stop(5)


def test_a_mesh_node_allocates_with_its_node_key(
        relays: list[Relay], tmp_path: Path, allocator: PortAllocator) -> None:
    """Node-key credentials end to end: an endpoint daemon gossips with the relay, so the relay
    holds its record; a TURN client with the endpoint's node key (and no shared secret)
    allocates, aioice's own client doing the long-term mechanism. A key the relay has never
    seen in its host cache gets 401."""
    relay = start_relay(relays, tmp_path, allocator, allow_peers=["127.0.0.0/8"])
    harness = Harness(tmp_path / "run", allocator, on_missing=pytest.fail)
    try:
        endpoint = harness.daemon(
            "ep", config={"peering": {"seeds": [f"127.0.0.1:{relay.gossip_port}"]}})
        _allocate_with_node_keys(relay, NodeIdentity.load_or_create(endpoint.state_dir))
    finally:
        harness.close()


def _allocate_with_node_keys(relay: Relay, mine: NodeIdentity) -> None:
    theirs = NodeIdentity.load_or_create(relay.state)
    wait_until(lambda: f"peer {mine.node_id.hex()[:16]} joined" in relay.process.log_text(),
               20, message="the relay to learn the endpoint's record")

    def credentials(identity: NodeIdentity) -> tuple[str, str]:
        return node_key_credentials(identity.x25519(), identity.public_key, theirs.public_key,
                                    identity.node_id.hex(), time.time(), 600)

    result = asyncio.run(_raw_requests(relay, *credentials(mine)))
    assert "relayed" in result and result["permission"] == "ok", result
    stranger = NodeIdentity.generate()
    assert asyncio.run(_raw_requests(relay, *credentials(stranger)))["allocate_error"] == 401
