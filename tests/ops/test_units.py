"""systemd units: the packaged copies are current, systemd-analyze accepts both, and
``freecall install-service`` writes what it should (issue 10)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from freecall.config import load_config, parse_config
from freecall.ops import units

ROOT = Path(__file__).resolve().parents[2]


def test_the_packaged_units_are_rendered_from_the_templates() -> None:
    for name, text in units.packaged_units().items():
        assert (ROOT / "etc/systemd" / name).read_text() == text, (
            f"etc/systemd/{name} is stale: regenerate it with "
            "python -c 'from freecall.ops.units import packaged_units; ...'")


@pytest.mark.parametrize("kind", ["user", "system"])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, kind: str) -> None:
    options = units.UnitOptions(units.this_executable(), config="/etc/freecall/freecall.yaml",
                                state_dir="/var/lib/freecall")
    text = (units.render_user_unit(options) if kind == "user"
            else units.render_system_unit(options))
    path = tmp_path / "freecall.service"
    path.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # systemd-analyze prints warnings for problems it does not count as errors
    assert "freecall.service:" not in done.stderr, done.stderr
    assert "Type=notify" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "Restart=on-failure" in text


def test_the_system_unit_is_hardened_and_grants_a_capability_only_for_low_ports() -> None:
    plain = units.render_system_unit(units.UnitOptions(["/usr/bin/freecall"]))
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "PrivateTmp=yes", "StateDirectory=freecall", "CapabilityBoundingSet=\n",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
                 "User=freecall"):
        assert line in plain, line
    low = parse_config("sip:\n  public: ['udp:0.0.0.0:506']\n", source="t")
    high = parse_config("sip:\n  public: ['udp:0.0.0.0:5062']\n", source="t")
    assert units.privileged_ports(low) and not units.privileged_ports(high)
    granted = units.render_system_unit(units.UnitOptions(["/usr/bin/freecall"],
                                                         privileged_ports=True))
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in granted
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in granted
    # a freecall in a virtualenv under /home stays runnable under the sandbox
    venv = units.render_system_unit(units.UnitOptions(["/home/u/.venv/bin/freecall"]))
    assert "ProtectHome=read-only" in venv


def test_install_writes_the_user_and_system_units(tmp_path: Path) -> None:
    result = units.install_user(None, unit_dir=tmp_path / "user", enable=False,
                                executable=["/usr/bin/freecall"])
    assert result.unit_path.read_text() == units.packaged_units()["user/freecall.service"]
    assert result.commands == []
    config = load_config(None)
    system = units.install_system(config, None, root=tmp_path, enable=False,
                                  executable=["/usr/bin/freecall"], create_user=False)
    assert system.unit_path == tmp_path / "etc/systemd/system/freecall.service"
    assert system.unit_path.read_text() == units.packaged_units()["system/freecall.service"]
    assert system.unit_path.stat().st_mode & 0o777 == 0o644
    written = tmp_path / "etc/freecall/freecall.yaml"
    load_config(written)  # the starter configuration is valid
    assert any("freecall.yaml" in note for note in system.notes)


def test_install_service_print_from_the_command_line() -> None:
    done = subprocess.run([sys.executable, "-m", "freecall", "install-service", "--system",
                           "--print"], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert "ExecStart=" in done.stdout and "--state-dir /var/lib/freecall" in done.stdout
    assert "-c /etc/freecall/freecall.yaml" in done.stdout
