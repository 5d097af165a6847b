"""What carrying the OpenPGP key in a node record would cost, against its fingerprint (issue 7).

    .venv/bin/python bench/openpgp_record.py

Prints the size of a typical record (one route, a gossip and a SIP-TLS address) without and
with the OpenPGP fingerprint extension, and the size of the node's key as the daemon offers it
in SDP (minimal export, Ed25519, only one user ID) and whole (three user IDs): the numbers
behind docs/peering.md's choice of the fingerprint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from freecall.gpgverify.gpg import GpgHome
from freecall.peering.records import Address, AddrKind, Ext, NodeIdentity


def main() -> None:
    ident = NodeIdentity.from_seed(bytes(32))
    addresses = (Address(AddrKind.GOSSIP, "192.0.2.10", 5064),
                 Address(AddrKind.SIP_TLS, "192.0.2.10", 5061))
    plain = ident.make_record(seq=1, expires=2, addresses=addresses, routes=("example.org",))
    named = ident.make_record(seq=1, expires=2, addresses=addresses, routes=("example.org",),
                              extensions=((Ext.OPENPGP_FINGERPRINT, b"\x01" * 20),))
    print(f"record: {len(plain.raw)} bytes; with the OpenPGP fingerprint: {len(named.raw)}")
    with tempfile.TemporaryDirectory(prefix="fcb") as tmp:
        home = GpgHome(Path(tmp) / "g")
        users = [f"user{i}@example.org" for i in range(3)]
        fingerprint = home.create_key("freecall node", users)
        one = home.export(fingerprint, armor=False, address=users[0])
        every = home.export(fingerprint, armor=False)
        print(f"key, minimal export: {len(one)} bytes with one user ID, {len(every)} with three")
        home.close()


if __name__ == "__main__":
    main()
