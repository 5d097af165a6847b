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
import subprocess

from .netns import Namespaces, ip

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
