"""``freecall keys show | export | import FILE | trust ADDRESS FINGERPRINT | forget ADDRESS``.

The commands work on the state directory's keyrings and pins directly, so they work whether
or not the daemon runs; a running daemon sees a change on its next call (the pins file is
re-read when it changes, GnuPG locks its own keyrings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import Config
from .service import KeyPaths, KeyStore


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="OpenPGP keys that sign and check the SAS")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE", help="configuration file (YAML)")
    common.add_argument("--state-dir", metavar="DIR", help="state directory")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    for option in common._actions:
        keys._add_action(option)
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    actions.add_parser("show", parents=[common], help="our key, known keys and pins (default)")
    export = actions.add_parser("export", parents=[common],
                                help="print our public key (armoured), to give to peers")
    export.add_argument("address", nargs="?", help="only the user ID naming this address")
    imp = actions.add_parser("import", parents=[common],
                             help="import a peer's public key: it verifies their calls")
    imp.add_argument("file", metavar="FILE", help="key file, or - for standard input")
    trust = actions.add_parser("trust", parents=[common],
                               help="pin FINGERPRINT as ADDRESS's key (after checking it)")
    trust.add_argument("address", metavar="ADDRESS")
    trust.add_argument("fingerprint", metavar="FINGERPRINT", nargs="+")
    forget = actions.add_parser("forget", parents=[common], help="drop ADDRESS's pin")
    forget.add_argument("address", metavar="ADDRESS")


def main(args: argparse.Namespace, config: Config) -> int:
    store = KeyStore(KeyPaths.for_state(config.state_dir, config.openpgp.home or None),
                     config.openpgp.binary)
    try:
        return _dispatch(args, config, store)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"freecall keys: {error}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _dispatch(args: argparse.Namespace, config: Config, store: KeyStore) -> int:
    command = args.keys_command or "show"
    if command == "show":
        rows = store.list_keys()
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        if not rows:
            print("no keys yet (the daemon makes its key on first start)")
        for row in rows:
            flags = [str(row["source"])]
            if row["pin"]:
                flags.append(f"pinned ({row['pin']}) for {', '.join(row['pinned_for'])}")  # type: ignore[arg-type]
            if row["revoked"]:
                flags.append("REVOKED")
            if row["expired"]:
                flags.append("EXPIRED")
            addresses = ", ".join(row["addresses"]) or "-"  # type: ignore[arg-type]
            print(f"{row['fingerprint']}  {addresses}  [{'; '.join(flags)}]")
        return 0
    if command == "export":
        own = store.keyring.list_keys(secret=True)
        wanted = config.openpgp.key
        key = next((k for k in own if wanted is None or k.fingerprint == wanted), None)
        if key is None:
            print("freecall keys: no key of ours yet (start the daemon once)", file=sys.stderr)
            return 1
        sys.stdout.write(store.keyring.export(key.fingerprint, address=args.address).decode())
        return 0
    if command == "import":
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        fingerprints = store.import_file(data)
        if not fingerprints:
            print("freecall keys: no key found in the input", file=sys.stderr)
            return 1
        for fingerprint in fingerprints:
            key = store.keyring.key(fingerprint)
            names = ", ".join(key.addresses) if key else "?"
            print(f"imported {fingerprint} for {names}")
        return 0
    if command == "trust":
        pin = store.trust(args.address, "".join(args.fingerprint))
        print(f"{pin.address} is now {pin.fingerprint}")
        return 0
    if command == "forget":
        if store.forget(args.address):
            print(f"forgot the key pinned for {args.address}")
            return 0
        print(f"no key pinned for {args.address}", file=sys.stderr)
        return 1
    return 2
