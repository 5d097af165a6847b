"""systemd units for freecall and ``freecall install-service`` (issue 10).

Two units: a *user* unit for desktops (``systemctl --user enable --now freecall``), and a
*system* unit for servers with a dedicated user and the sandboxing systemd offers. Both are
``Type=notify`` (the daemon sends ``READY=1`` once its listeners are bound,
:mod:`freecall.ops.sdnotify`), reload on SIGHUP (``ExecReload``) and restart on failure.

The static copies in ``etc/systemd/`` (what a distribution package installs, with
``/usr/bin/freecall``) are rendered from the same templates; a test keeps them current.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import Config

UNIT_NAME = "freecall.service"
SYSTEM_USER = "freecall"
SYSTEM_CONFIG = "/etc/freecall/freecall.yaml"
SYSTEM_STATE = "/var/lib/freecall"

_COMMON_SERVICE = """\
Type=notify
NotifyAccess=main
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2s
# The daemon pings the watchdog from its event loop: a stuck loop is restarted.
WatchdogSec=30s
TimeoutStopSec=15s
"""

USER_TEMPLATE = """\
# freecall: secure calls with no central provider (user service for a desktop).
# Install: freecall install-service --user   (or copy to ~/.config/systemd/user/ and run
# systemctl --user daemon-reload && systemctl --user enable --now freecall)
[Unit]
Description=freecall secure calls (local SIP registrar and proxy for your softphone)

[Service]
{common}ExecStart={exec_start}

[Install]
WantedBy=default.target
"""

SYSTEM_TEMPLATE = """\
# freecall: secure calls with no central provider (system service: relay node or server).
# Install: freecall install-service --system
[Unit]
Description=freecall node (SIP, peering, media relay)
Wants=network-online.target
After=network-online.target

[Service]
{common}ExecStart={exec_start}
User={user}
Group={user}
StateDirectory=freecall
StateDirectoryMode=0700
ConfigurationDirectory=freecall
UMask=0077
LimitNOFILE=65536
# Hardening (systemd.exec(5)): the daemon needs its state directory, the network and gpg.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
CapabilityBoundingSet={capabilities}
AmbientCapabilities={capabilities}

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True, slots=True)
class UnitOptions:
    executable: Iterable[str]
    """The command that runs freecall (``/usr/bin/freecall``, or ``python -m freecall``)."""
    config: str | None = None
    state_dir: str | None = None
    user: str = SYSTEM_USER
    privileged_ports: bool = False
    """A listener below port 1024 needs CAP_NET_BIND_SERVICE; otherwise no capability."""


def _exec_start(options: UnitOptions) -> str:
    words = [*options.executable, "run"]
    if options.config:
        words += ["-c", options.config]
    if options.state_dir:
        words += ["--state-dir", options.state_dir]
    return " ".join(shlex.quote(word) for word in words)


def render_user_unit(options: UnitOptions) -> str:
    return USER_TEMPLATE.format(common=_COMMON_SERVICE, exec_start=_exec_start(options))


def render_system_unit(options: UnitOptions) -> str:
    executable = list(options.executable)
    # ProtectHome=yes hides /home and /root: a freecall installed in a virtualenv there would
    # not start. Read-only keeps most of the protection.
    in_home = any(word.startswith(("/home/", "/root/")) for word in executable)
    capabilities = "CAP_NET_BIND_SERVICE" if options.privileged_ports else ""
    return SYSTEM_TEMPLATE.format(
        common=_COMMON_SERVICE, exec_start=_exec_start(options), user=options.user,
        protect_home="read-only" if in_home else "yes", capabilities=capabilities)


def packaged_units() -> dict[str, str]:
    """The units a distribution package ships (``etc/systemd/``), for ``/usr/bin/freecall``."""
    return {
        "user/freecall.service": render_user_unit(UnitOptions(["/usr/bin/freecall"])),
        "system/freecall.service": render_system_unit(UnitOptions(
            ["/usr/bin/freecall"], config=SYSTEM_CONFIG, state_dir=SYSTEM_STATE)),
    }


def privileged_ports(config: Config) -> bool:
    """Whether any socket the configuration opens is below 1024 (needs a capability)."""
    ports = [lst.port for lst in (*config.sip.listen, *config.sip.public)]
    if config.peering.listen is not None:
        ports.append(config.peering.listen.port)
    if config.control.listen is not None:
        ports.append(config.control.listen.port)
    return any(0 < port < 1024 for port in ports)


def this_executable() -> list[str]:
    """How to run the installed freecall: its console script, else this interpreter."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.name == "freecall" and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("freecall")
    if found:
        return [str(Path(found).resolve())]
    return [sys.executable, "-m", "freecall"]


@dataclass
class InstallResult:
    unit_path: Path
    commands: list[list[str]]
    notes: list[str]


def install_user(config_file: str | None, *, unit_dir: Path | None = None,
                 enable: bool = True, executable: list[str] | None = None) -> InstallResult:
    """Write the user unit to ``~/.config/systemd/user`` and enable it."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    unit_dir = unit_dir or base / "systemd" / "user"
    options = UnitOptions(executable or this_executable(),
                          config=str(Path(config_file).resolve()) if config_file else None)
    path = _write_unit(unit_dir, render_user_unit(options))
    commands = [["systemctl", "--user", "daemon-reload"],
                ["systemctl", "--user", "enable", "--now", "freecall"]]
    return InstallResult(path, commands if enable else [], [])


def install_system(config: Config, config_file: str | None, *, root: Path = Path("/"),
                   enable: bool = True, executable: list[str] | None = None,
                   create_user: bool = True) -> InstallResult:
    """Write the system unit, create the ``freecall`` user and ``/etc/freecall``, enable it."""
    notes: list[str] = []
    target_config = str(Path(config_file).resolve()) if config_file else SYSTEM_CONFIG
    if not config_file:
        etc = root / SYSTEM_CONFIG.lstrip("/")
        if not etc.exists():
            etc.parent.mkdir(parents=True, exist_ok=True)
            etc.write_text(_SYSTEM_CONFIG_TEXT)
            notes.append(f"wrote {etc}: edit it, then `systemctl reload freecall`")
    executable = executable or this_executable()
    if any(word.startswith(("/home/", "/root/")) for word in executable):
        notes.append("freecall is installed under /home or /root: the unit uses "
                      "ProtectHome=read-only so that the service can run it")
    options = UnitOptions(executable, config=target_config, state_dir=SYSTEM_STATE,
                          privileged_ports=privileged_ports(config))
    if options.privileged_ports:
        notes.append("a listener below port 1024: the unit grants CAP_NET_BIND_SERVICE only")
    path = _write_unit(root / "etc/systemd/system", render_system_unit(options))
    if create_user and root == Path("/"):
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(  # noqa: S603 -- fixed arguments
                ["useradd", "--system", "--user-group", "--home-dir", SYSTEM_STATE,  # noqa: S607
                 "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER], check=True)
            notes.append(f"created the system user {SYSTEM_USER}")
    commands = [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "freecall"]]
    return InstallResult(path, commands if enable else [], notes)


def _write_unit(directory: Path, text: str) -> Path:
    from ..storage import atomic_write  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / UNIT_NAME
    atomic_write(path, text.encode(), mode=0o644)
    return path


_SYSTEM_CONFIG_TEXT = """\
# freecall system service configuration: every key is optional; see
# `freecall config show` for the defaults and docs/configuration.md for the reference.
# `systemctl reload freecall` applies users, routes, seeds, policy and log level live.
node:
  role: endpoint
sip:
  public: ["udp:0.0.0.0:5062", "tcp:0.0.0.0:5062", "tls:0.0.0.0:5061"]
"""
