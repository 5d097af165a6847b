"""Relayed calls per core: freecall's relay against coturn, same load, same run (issue 9).

    .venv/bin/python bench/relay.py                     # both relays, 5 s per trial
    .venv/bin/python bench/relay.py --only freecall --duration 3

A simulated call is a pair of UDP sockets: the "client" allocates on the relay and binds a
channel to the "peer"; then both send 172-byte packets at 50 packets/s (G.711 SRTP at 20 ms),
the client as ChannelData to the relay, the peer as plain UDP to the relayed address. The relay
thus receives and sends 100 packets/s per call. A trial runs N calls for ``--duration`` seconds
and counts what arrives; the search doubles N until loss reaches 0.1 %, then bisects. Printed:
the highest N with loss under 0.1 % for each relay, the relay's CPU time per relayed packet in
the most loaded lossless trial (from /proc, threads and kernel time included) and the calls one
fully busy core would carry at that cost, and both ratios.

The relay under test is pinned to one CPU (``taskset -c 1``): freecall's ``freecall run --role
relay`` (uvloop), coturn's ``turnserver`` with ``--relay-threads=1``, both with TURN REST
credentials from one shared secret and loopback peers allowed. The load generator is one Python
process pinned to the other CPU; when it cannot keep the 50 packets/s schedule the trial is
marked generator-bound. On a 2-core machine the generator, not the relay, is usually what runs
out first (it does as many socket calls as the relay, in Python); the CPU cost per packet is
then the figure that compares the relays themselves.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from freecall.relay.credentials import node_credentials
from freecall.relay.stun import (
    Attr,
    Class,
    Method,
    StunMessage,
    decode_error_code,
    decode_xor_address,
    encode_message,
    encode_xor_address,
    long_term_key,
    parse_message,
)

SECRET = "bench-shared-secret-0123456789"
REALM = "bench"
PACKET = 172
PPS = 50
LOSS_LIMIT = 0.001
HOST_PEER, HOST_RELAY = "127.0.0.2", "127.0.0.1"


# -- relays under test ------------------------------------------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST_RELAY, 0))
        return int(s.getsockname()[1])


def _pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


class RelayProcess:
    def __init__(self, kind: str, cpu: int | None, workdir: Path) -> None:
        self.kind = kind
        self.port = _free_udp_port()
        self.workdir = workdir
        log = open(workdir / f"{kind}.log", "wb")  # noqa: SIM115 -- closed in stop()
        self.log = log
        if kind == "freecall":
            config = {
                "node": {"name": "bench-relay", "role": "relay"},
                "peering": {"listen": None},
                "control": {"listen": None},
                "relay": {"listen": f"udp:{HOST_RELAY}:{self.port}", "realm": REALM,
                          "secret_file": str(workdir / "secret"), "ports": "27000-31999",
                          "max_allocations": 10000, "allocations_per_user": 10000,
                          "bandwidth_kbps": 0, "allow_peers": ["127.0.0.0/8"]},
                "log": {"level": "warning"},
            }
            (workdir / "secret").write_text(SECRET + "\n")
            (workdir / "relay.yaml").write_text(yaml.safe_dump(config))
            argv = [sys.executable, "-m", "freecall", "run", "-c", str(workdir / "relay.yaml"),
                    "--state-dir", str(workdir / "state")]
        else:
            argv = ["turnserver", "-n", "--no-cli", "--use-auth-secret",
                    f"--static-auth-secret={SECRET}", f"--realm={REALM}",
                    "--allow-loopback-peers", "--no-tls", "--no-dtls", "--no-tcp",
                    "--no-tcp-relay", "--relay-threads=1", f"--listening-ip={HOST_RELAY}",
                    f"--listening-port={self.port}", f"--relay-ip={HOST_RELAY}",
                    "--min-port=22000", "--max-port=26999", "--log-file=stdout",
                    "--simple-log", f"--userdb={workdir / 'turndb'}"]
        self.proc = subprocess.Popen([*_pin(cpu), *argv], stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited; see {self.log.name}")
                s.sendto(encode_message(Method.BINDING, Class.REQUEST, os.urandom(12), []),
                         (HOST_RELAY, self.port))
                try:
                    s.recv(1500)
                    return
                except TimeoutError:
                    continue
        raise RuntimeError(f"{self.kind} did not answer STUN")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- the load -----------------------------------------------------------------------------------


@dataclass
class Call:
    client: socket.socket
    peer: socket.socket
    relayed: tuple[str, int]
    frame: bytes  # ChannelData the client sends
    payload: bytes  # what the peer sends
    delete: bytes  # Refresh with LIFETIME 0, signed: frees the allocation at the end


def _buffers(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 1 << 18)


def _transact(sock: socket.socket, server: tuple[str, int], method: int,
              attrs: list[tuple[int, bytes | tuple[str, int]]],
              key: bytes | None) -> tuple[int | None, StunMessage]:
    """One request and its answer (blocking, with retransmissions); (error code, message)."""
    tid = os.urandom(12)
    fixed = [(k, encode_xor_address(v, tid) if isinstance(v, tuple) else v) for k, v in attrs]
    data = encode_message(method, Class.REQUEST, tid, fixed, key=key)
    sock.settimeout(1.0)
    for _ in range(5):
        sock.sendto(data, server)
        try:
            reply = parse_message(sock.recv(2048))
            while reply.transaction_id != tid:
                reply = parse_message(sock.recv(2048))
        except TimeoutError:
            continue
        if reply.cls == Class.ERROR:
            value = reply.get(Attr.ERROR_CODE)
            return (decode_error_code(value)[0] if value else 0), reply
        return None, reply
    raise RuntimeError("no answer from the relay")


def setup_calls(count: int, server: tuple[str, int], client_host: str) -> list[Call]:
    """Allocate and bind one channel per call (long-term credentials, TURN REST)."""
    username, password = node_credentials(SECRET, "bench", time.time(), 3600)
    key = long_term_key(username, REALM, password)
    calls: list[Call] = []
    nonce = b""
    transport: list[tuple[int, bytes | tuple[str, int]]] = [
        (Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")]
    for i in range(count):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind((client_host, 0))
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind((HOST_PEER, 0))
        _buffers(client)
        _buffers(peer)
        code, reply = None, None
        if nonce:
            code, reply = _transact(client, server, Method.ALLOCATE,
                                    [*transport, *_creds(username, nonce)], key)
        if reply is None or code in (401, 438):
            code, reply = _transact(client, server, Method.ALLOCATE, transport, None)
            nonce = reply.get(Attr.NONCE) or b""
            code, reply = _transact(client, server, Method.ALLOCATE,
                                    [*transport, *_creds(username, nonce)], key)
        value = reply.get(Attr.XOR_RELAYED_ADDRESS)
        if code is not None or value is None:
            raise RuntimeError(f"Allocate for call {i}: error {code}")
        relayed = decode_xor_address(value, reply.transaction_id)
        peer_addr = peer.getsockname()
        code, _ = _transact(client, server, Method.CHANNEL_BIND, [
            (Attr.CHANNEL_NUMBER, b"\x40\x00\0\0"), (Attr.XOR_PEER_ADDRESS, peer_addr),
            *_creds(username, nonce)], key)
        if code is not None:
            raise RuntimeError(f"ChannelBind for call {i}: error {code}")
        client.setblocking(False)
        peer.setblocking(False)
        payload = bytes([i % 256]) * PACKET
        delete = encode_message(Method.REFRESH, Class.REQUEST, os.urandom(12),
                                [(Attr.LIFETIME, bytes(4)), *_creds(username, nonce)], key=key)
        calls.append(Call(client, peer, relayed, struct.pack("!HH", 0x4000, PACKET) + payload,
                          payload, delete))
    return calls


def _creds(username: str, nonce: bytes) -> list[tuple[int, bytes]]:
    return [(Attr.USERNAME, username.encode()), (Attr.REALM, REALM.encode()),
            (Attr.NONCE, nonce)]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Trial:
    calls: int
    sent: int
    received: int
    lag: float  # how far the generator fell behind its schedule at the end, in seconds
    relay_cpu: float = 0.0  # CPU seconds the relay used during the trial
    generator_cpu: float = 0.0
    duration: float = 0.0

    @property
    def cost_us(self) -> float:
        """Relay CPU time per relayed packet, in microseconds."""
        return self.relay_cpu / self.received * 1e6 if self.received else 0.0

    @property
    def loss(self) -> float:
        return 1 - self.received / self.sent if self.sent else 1.0

    @property
    def generator_bound(self) -> bool:
        return self.lag > 0.1


def run_trial(calls: list[Call], server: tuple[str, int], duration: float) -> Trial:
    """Send on schedule (each call every 20 ms, spread over the interval), read everything."""
    poller = select.epoll()
    socks: dict[int, socket.socket] = {}
    for call in calls:
        for sock in (call.client, call.peer):
            socks[sock.fileno()] = sock
            poller.register(sock.fileno(), select.EPOLLIN)
    interval = 1.0 / PPS
    n = len(calls)
    step = interval / n
    sent = received = 0
    start = time.monotonic()
    end = start + duration
    index = 0
    due = start
    poll = poller.poll

    def drain(timeout: float) -> int:
        """Read every socket that is readable within ``timeout`` until empty; how many."""
        got = 0
        for fd, _ in poll(timeout):
            sock = socks[fd]
            while True:
                try:
                    sock.recv(2048)
                    got += 1
                except BlockingIOError:
                    break
        return got

    while True:
        now = time.monotonic()
        if due >= end:
            break
        while due <= now and due < end:  # send everything that is due
            call = calls[index]
            try:
                call.client.sendto(call.frame, server)
                call.peer.sendto(call.payload, call.relayed)
                sent += 2
            except BlockingIOError:
                pass
            index += 1
            if index == n:
                index = 0
            due += step
        received += drain(0)
        if due > now:
            wait = due - time.monotonic()
            if wait > 0.0005:
                received += drain(min(wait, 0.002))
    lag = time.monotonic() - end
    drain_until = time.monotonic() + 0.5
    while time.monotonic() < drain_until:
        received += drain(0.05)
    poller.close()
    return Trial(n, sent, received, lag)


def close_calls(calls: list[Call], server: tuple[str, int]) -> None:
    """Delete every allocation (RFC 5766 section 7), so the next trial's sockets, which may get
    the same ports, do not meet 437."""
    for call in calls:
        try:
            call.client.sendto(call.delete, server)
        except BlockingIOError:
            time.sleep(0.01)
            call.client.sendto(call.delete, server)
    time.sleep(0.5)
    for call in calls:
        call.client.close()
        call.peer.close()


@dataclass
class Result:
    calls: int  # highest N with loss under 0.1 %
    cost_us: float  # relay CPU per relayed packet in the most loaded lossless trial

    @property
    def calls_per_core(self) -> int:
        """Calls one fully busy core could relay at this cost (100 packets/s per call)."""
        return int(1e6 / (self.cost_us * 2 * PPS)) if self.cost_us else 0


def measure(kind: str, cpu: int | None, duration: float, start_n: int, limit: int) -> Result:
    """The highest N with loss under 0.1 %: double, then bisect."""
    costs: list[Trial] = []
    calls = _search(kind, cpu, duration, start_n, limit, costs)
    clean = [t for t in costs if t.loss < LOSS_LIMIT]
    busiest = max(clean, key=lambda t: t.calls, default=None)
    return Result(calls, busiest.cost_us if busiest else 0.0)


def _search(kind: str, cpu: int | None, duration: float, start_n: int, limit: int,
            costs: list[Trial]) -> int:
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        relay = RelayProcess(kind, cpu, Path(tmp))
        server = (HOST_RELAY, relay.port)
        try:
            trials = [0]

            def ok(n: int) -> bool:
                # a new client address per trial: no 5-tuple of an earlier trial comes back
                trials[0] += 1
                calls = setup_calls(n, server, f"127.0.{10 + trials[0]}.1")
                try:
                    time.sleep(0.2)
                    relay_before, own_before = cpu_seconds(relay.proc.pid), time.process_time()
                    trial = run_trial(calls, server, duration)
                    trial.relay_cpu = cpu_seconds(relay.proc.pid) - relay_before
                    trial.generator_cpu = time.process_time() - own_before
                    trial.duration = duration
                finally:
                    close_calls(calls, server)
                flag = " (generator-bound)" if trial.generator_bound else ""
                costs.append(trial)
                print(f"  {kind:8} N={n:5d}: sent {trial.sent:7d}, received {trial.received:7d}"
                      f", loss {trial.loss:.4%}; relay CPU {trial.relay_cpu / duration:.0%}"
                      f" ({trial.cost_us:.1f} us/packet), generator CPU "
                      f"{trial.generator_cpu / duration:.0%}{flag}", flush=True)
                return trial.loss < LOSS_LIMIT

            good, bad = 0, None
            n = start_n
            while n <= limit:
                if ok(n):
                    good, n = n, n * 2
                else:
                    bad = n
                    break
            if bad is None:
                return good
            while bad - good > max(10, good // 20):
                mid = (good + bad) // 2
                if ok(mid):
                    good = mid
                else:
                    bad = mid
            return good
        finally:
            relay.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per trial")
    parser.add_argument("--start", type=int, default=50, help="first N tried")
    parser.add_argument("--limit", type=int, default=2400, help="largest N tried")
    parser.add_argument("--only", choices=["freecall", "coturn"])
    parser.add_argument("--relay-cpu", type=int, default=1)
    parser.add_argument("--generator-cpu", type=int, default=0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if shutil.which("taskset"):
        os.sched_setaffinity(0, {args.generator_cpu})
    results: dict[str, Result] = {}
    for kind in ("freecall", "coturn"):
        if args.only and kind != args.only:
            continue
        r = results[kind] = measure(kind, args.relay_cpu, args.duration, args.start,
                                    args.limit)
        print(f"{kind}: {r.calls} calls at loss < 0.1 % ({r.calls * 2 * PPS} packets/s "
              f"relayed); {r.cost_us:.1f} us of relay CPU per packet = {r.calls_per_core} "
              "calls per fully busy core", flush=True)
    if len(results) == 2 and results["coturn"].calls and results["freecall"].cost_us:
        f, c = results["freecall"], results["coturn"]
        print(f"ratio freecall/coturn: {f.calls / c.calls:.2f} in calls at loss < 0.1 %, "
              f"{c.cost_us / f.cost_us:.2f} in CPU per packet")


if __name__ == "__main__":
    main()
