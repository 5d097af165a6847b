"""A NAT lab for a test: a public segment with a relay host and two homes behind NAT routers,
all network namespaces, removed afterwards.

    public 198.51.100.0/24 (a bridge in ``<tag>-pub``)
      |-- <tag>-relay  eth0 198.51.100.1
      |-- <tag>-r1     wan0 198.51.100.11  lan0 10.0.1.1 -- <tag>-h1 eth0 10.0.1.2
      '-- <tag>-r2     wan0 198.51.100.12  lan0 10.0.2.1 -- <tag>-h2 eth0 10.0.2.2

Each router NATs its home with nftables (RFC 4787 behaviours):

* ``full-cone``: endpoint-independent mapping (port-preserving source NAT) and
  endpoint-independent filtering: a UDP port the home host sent from goes into a dynamic set
  for two minutes, and anything arriving on the router's WAN address at that port is forwarded
  to the host, whoever sends it.
* ``symmetric``: address-and-port-dependent mapping (``masquerade fully-random``: a new random
  port for each destination) and filtering (conntrack lets only replies in).

Private addresses are not routed between homes. ``lab.run(name)`` is the command prefix for a
namespace (``"relay"``, ``"r1"``, ``"h1"``, ...).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .netns import Namespaces, ip
from .proc import ManagedProcess, wait_until

_COUNTER = itertools.count(1)
PUBLIC = "198.51.100"
RELAY_ADDRESS = f"{PUBLIC}.1"

FULL_CONE = """
table ip natlab {{
  set mapped {{ type inet_service; flags dynamic,timeout; timeout 2m; }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "lan0" meta l4proto udp update @mapped {{ udp sport timeout 2m }}
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "wan0" udp dport @mapped dnat to {host}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" masquerade
  }}
}}
"""

SYMMETRIC = """
table ip natlab {
  chain forward {
    type filter hook forward priority 0; policy drop;
    iifname "lan0" accept
    ct state established,related accept
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" masquerade fully-random
  }
}
"""


class NatLab(Namespaces):
    """The topology of the module docstring; ``nats`` gives each home's NAT kind."""

    def __init__(self, nats: tuple[str, str] = ("full-cone", "symmetric")) -> None:
        for kind in nats:
            if kind not in ("full-cone", "symmetric"):
                raise ValueError(f"unknown NAT kind {kind}")
        super().__init__()
        self.nats = nats
        self.tag = f"nl{os.getpid() % 100000}x{next(_COUNTER)}"

    def name(self, short: str) -> str:
        return f"{self.tag}-{short}"

    def run(self, short: str) -> list[str]:
        return ["ip", "netns", "exec", self.name(short)]

    @staticmethod
    def host_address(home: int) -> str:
        return f"10.0.{home}.2"

    @staticmethod
    def wan_address(home: int) -> str:
        return f"{PUBLIC}.{10 + home}"

    def __enter__(self) -> NatLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _host(self, short: str) -> str:
        name = self.name(short)
        self._netns(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def _build(self) -> None:
        pub = self._host("pub")
        ip("-n", pub, "link", "add", "br0", "type", "bridge")
        ip("-n", pub, "link", "set", "br0", "up")
        relay = self._host("relay")
        self._plug(relay, "eth0", pub, "prelay", f"{RELAY_ADDRESS}/24")
        for home, kind in enumerate(self.nats, start=1):
            router = self._host(f"r{home}")
            host = self._host(f"h{home}")
            self._plug(router, "wan0", pub, f"pr{home}", f"{self.wan_address(home)}/24")
            ip("-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
               "netns", host)
            ip("-n", router, "addr", "add", f"10.0.{home}.1/24", "dev", "lan0")
            ip("-n", router, "link", "set", "lan0", "up")
            ip("-n", host, "addr", "add", f"{self.host_address(home)}/24", "dev", "eth0")
            ip("-n", host, "link", "set", "eth0", "up")
            ip("-n", host, "route", "add", "default", "via", f"10.0.{home}.1")
            subprocess.run([*self.run(f"r{home}"), "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                           check=True, capture_output=True)
            rules = (FULL_CONE.format(host=self.host_address(home)) if kind == "full-cone"
                     else SYMMETRIC)
            done = subprocess.run([*self.run(f"r{home}"), "nft", "-f", "-"], input=rules,
                                  text=True, capture_output=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"nft in r{home}: {done.stderr.strip()}")

    def _plug(self, ns: str, ifname: str, pub: str, port: str, cidr: str) -> None:
        ip("-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", pub)
        ip("-n", pub, "link", "set", port, "master", "br0", "up")
        ip("-n", ns, "addr", "add", cidr, "dev", ifname)
        ip("-n", ns, "link", "set", ifname, "up")


RELAY_SIP_PORT = 5061


def start_relay(lab: NatLab, directory: Path, *, sip: bool = False,
                gossip_interval: str | None = None) -> tuple[ManagedProcess, Path]:
    """``freecall run --role relay`` on the relay host (STUN, TURN, gossip seed; with ``sip``
    its SIP edge for attached nodes on TLS port `RELAY_SIP_PORT`); its state directory holds
    the TURN shared secret."""
    directory.mkdir(parents=True, exist_ok=True)
    state = directory / "state"
    config: dict[str, Any] = {
        "node": {"name": "relay1", "role": "relay"},
        "peering": {"listen": f"udp:{RELAY_ADDRESS}:5064", "mdns": False},
        "relay": {"listen": f"udp:{RELAY_ADDRESS}:3478", "realm": "lab.test",
                  "ports": "49152-49407", "allow_peers": ["198.51.100.0/24"]},
        "log": {"level": "debug"},
    }
    config["relay"]["sip"] = f"tls:{RELAY_ADDRESS}:{RELAY_SIP_PORT}" if sip else None
    if gossip_interval is not None:
        config["peering"]["interval"] = gossip_interval
    path = directory / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    process = ManagedProcess(
        "relay", [*lab.run("relay"), sys.executable, "-m", "freecall", "run", "-c", str(path),
                  "--state-dir", str(state)],
        log_path=directory / "relay.log", cwd=directory)
    process.start()

    def ready() -> bool:
        if not process.alive():
            raise AssertionError(process.log_text()[-3000:])
        return re.search(r" node relay1 listening on ", process.log_text()) is not None

    wait_until(ready, 15, message="the relay to start")
    return process, state


def relayed_packets(relay_log: str) -> int:
    """The relay's own count, from the line it logs at stop."""
    found = re.findall(r"relay at stop: .*? relayed (\d+) packets", relay_log)
    assert found, relay_log[-2000:]
    return int(found[-1])
