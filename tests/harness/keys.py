"""OpenPGP helpers for the multi-node tests (issue 7): the `freecall keys` CLI against a
daemon's configuration, and the verification outcomes a daemon logged."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from .daemon import FreecallDaemon

OUTCOME = (r"call (\w+): (verified|trusted-first-use|unverified|mitm-suspected) \((.*)\), "
           r"SAS (\w+)")


def keys_cli(node: FreecallDaemon, *args: str, stdin: bytes | None = None) -> str:
    """Run ``freecall keys ARGS -c <node's config>``; its output (fails the test on error)."""
    done = subprocess.run([sys.executable, "-m", "freecall", "keys", *args,
                           "-c", str(node.config_path)],
                          input=stdin, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def exchange_keys(a: FreecallDaemon, b: FreecallDaemon) -> None:
    """What two users do once: export their keys and import each other's."""
    keys_cli(b, "import", "-", stdin=keys_cli(a, "export").encode())
    keys_cli(a, "import", "-", stdin=keys_cli(b, "export").encode())


def outcomes(node: FreecallDaemon) -> list[tuple[str, str, str, str]]:
    """(call, outcome, why, SAS) of each verification line of a daemon's log, oldest first."""
    return [(m.group(1), m.group(2), m.group(3), m.group(4))
            for m in re.finditer(OUTCOME, node.log_text())]


def wait_outcomes(node: FreecallDaemon, count: int, timeout: float = 10.0
                  ) -> list[tuple[str, str, str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = outcomes(node)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{node.name}: {len(outcomes(node))} outcomes, wanted {count}\n"
                         + "\n".join(node.log_text().splitlines()[-30:]))


def make_user_key(home: Path, uid: str, passphrase: str) -> str:
    """A user's own passphrase-protected Ed25519 signing key in GnuPG home ``home`` (made
    0700 if new), the way ``gpg --quick-generate-key`` makes one; its fingerprint. Stop the
    home's agent afterwards (``stop_gpg_agent`` in harness.mitm)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--pinentry-mode", "loopback"]
    subprocess.run([*gpg, "--passphrase", passphrase, "--quick-generate-key", uid, "ed25519",
                    "sign", "never"], check=True, capture_output=True, timeout=60)
    listing = subprocess.run([*gpg, "--with-colons", "--list-secret-keys"], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
