"""The ``freecall`` command line (docs/CONTRACT.md): run the daemon, check a configuration."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, ensure_auto_user, load_config, softphone_instructions

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freecall",
        description="Secure calls with no central provider: a local SIP registrar and proxy "
        "for your softphone, with end-to-end encrypted media between nodes.",
    )
    parser.add_argument("--version", action="version", version=f"freecall {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", metavar="FILE", help="configuration file (YAML)")
    run.add_argument("--state-dir", metavar="DIR", help="state directory (overrides the config)")
    run.add_argument("--role", choices=["endpoint", "relay"], help="overrides node.role")
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="overrides log.level",
    )
    config = commands.add_parser("config", help="check or show a configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION")
    check = config_commands.add_parser("check", help="validate FILE; errors name key and line")
    check.add_argument("file", metavar="FILE")
    show = config_commands.add_parser("show", help="print FILE with every default filled in")
    show.add_argument("file", metavar="FILE", nargs="?")
    install = commands.add_parser(
        "install-service", help="write and enable the systemd unit (user or system service)")
    scope = install.add_mutually_exclusive_group()
    scope.add_argument("--user", dest="scope", action="store_const", const="user",
                       help="a user service for this desktop (default)")
    scope.add_argument("--system", dest="scope", action="store_const", const="system",
                       help="a system service with its own user (run as root)")
    install.add_argument("-c", "--config", metavar="FILE", help="configuration file to run with")
    install.add_argument("--no-enable", action="store_true",
                         help="write the unit only; do not run systemctl")
    install.add_argument("--print", action="store_true", dest="print_only",
                         help="print the unit instead of writing it")
    from .gpgverify.cli import add_parser as add_keys_parser  # noqa: PLC0415

    add_keys_parser(commands)
    # Client commands: they talk to the running daemon over its control socket. `keys` (the
    # OpenPGP key store, issue 7) goes here too, built on freecall.control.cli.request.
    from .control.cli import add_commands  # noqa: PLC0415

    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "keys":
        return keys(args)
    if args.command == "install-service":
        return install_service(args)
    from .control.cli import CLIENT_COMMANDS  # noqa: PLC0415

    if args.command in CLIENT_COMMANDS:
        from .control.cli import main as client_main  # noqa: PLC0415

        return client_main(args)
    if args.command == "config":
        from .config import main as config_main  # noqa: PLC0415

        if args.config_command == "check":
            return config_main(["check", args.file])
        if args.config_command == "show":
            return config_main(["show", *([args.file] if args.file else [])])
    parser.print_help()
    return 2


def keys(args: argparse.Namespace) -> int:
    """``freecall keys ...`` on the state directory's keyrings and pins (issue 7)."""
    try:
        config = load_config(args.config, overrides={"node.state_dir": args.state_dir})
    except ConfigError as error:
        print(f"freecall: configuration error\n{error}", file=sys.stderr)
        return 1
    from .gpgverify.cli import main as keys_main  # noqa: PLC0415

    return keys_main(args, config)


def install_service(args: argparse.Namespace) -> int:
    """``freecall install-service [--user|--system]`` (issue 10)."""
    import subprocess  # noqa: PLC0415

    from .ops import units  # noqa: PLC0415

    scope = args.scope or "user"
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"freecall: configuration error\n{error}", file=sys.stderr)
        return 1
    if args.print_only:
        options = units.UnitOptions(
            units.this_executable(),
            config=str(Path(args.config).resolve()) if args.config else None,
            privileged_ports=units.privileged_ports(config))
        if scope == "user":
            print(units.render_user_unit(options), end="")
        else:
            print(units.render_system_unit(units.UnitOptions(
                options.executable, config=options.config or units.SYSTEM_CONFIG,
                state_dir=units.SYSTEM_STATE, privileged_ports=options.privileged_ports)), end="")
        return 0
    try:
        if scope == "user":
            result = units.install_user(args.config, enable=not args.no_enable)
        else:
            import os  # noqa: PLC0415

            if os.geteuid() != 0:
                print("freecall: install-service --system needs root", file=sys.stderr)
                return 1
            result = units.install_system(config, args.config, enable=not args.no_enable)
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"freecall: cannot install the service: {error}", file=sys.stderr)
        return 1
    print(f"wrote {result.unit_path}")
    for note in result.notes:
        print(note)
    for command in result.commands:
        done = subprocess.run(command, check=False)  # noqa: S603 -- fixed systemctl commands
        if done.returncode != 0:
            print(f"freecall: `{' '.join(command)}` failed (exit {done.returncode}); the unit "
                  "is written, run it by hand once systemd is there", file=sys.stderr)
            return 1
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(
            args.config,
            overrides={
                "node.state_dir": args.state_dir,
                "node.role": args.role,
                "log.level": args.log_level,
            },
        )
        auto_user = None
        if config.node.role != "relay":  # a relay serves no softphone, so it has no users
            config, auto_user = ensure_auto_user(config)
    except ConfigError as error:
        print(f"freecall: configuration error\n{error}", file=sys.stderr)
        return 1
    # Log records need no caller frame, thread or process lookup: at hundreds of calls a
    # second that bookkeeping cost more than the message itself.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    from .ops.logformat import make_formatter  # noqa: PLC0415

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(config.log.format))
    logging.basicConfig(level=config.log.level.upper(), handlers=[handler])
    trace = logging.getLogger("freecall.sip.trace")
    trace.setLevel(logging.DEBUG if config.log.sip_trace else logging.WARNING)
    if config.node.role == "relay":
        return run_relay(config)
    from .daemon import Daemon  # noqa: PLC0415 -- keeps `freecall --version` fast
    from .transport import install_event_loop_policy  # noqa: PLC0415

    loop_name = install_event_loop_policy()
    daemon = Daemon(config, auto_user=auto_user, config_path=args.config,
                    overrides={"node.state_dir": args.state_dir, "node.role": args.role,
                               "log.level": args.log_level})

    async def serve() -> int:
        try:
            await daemon.start()
        except OSError as error:
            logging.getLogger("freecall").error("cannot start: %s", error)
            return 1
        logging.getLogger("freecall").info("event loop: %s", loop_name)
        user = auto_user.name if auto_user else next(iter(config.users), "")
        if user:
            password = auto_user.password if auto_user else ""
            print(softphone_instructions(config, user, password=password), file=sys.stderr)
        await daemon.run()
        return 0

    try:
        return asyncio.run(serve())
    except KeyboardInterrupt:
        return 130


def run_relay(config: Config) -> int:
    """The headless relay node (freecall.relay.daemon): STUN, TURN and the host-cache seed."""
    from .relay.daemon import RelayDaemon  # noqa: PLC0415
    from .transport import install_event_loop_policy  # noqa: PLC0415

    loop_name = install_event_loop_policy()
    daemon = RelayDaemon(config)

    async def serve() -> int:
        try:
            await daemon.start()
        except (OSError, ValueError) as error:
            logging.getLogger("freecall").error("cannot start: %s", error)
            await daemon.stop()
            return 1
        logging.getLogger("freecall").info("event loop: %s", loop_name)
        await daemon.run()
        return 0

    try:
        return asyncio.run(serve())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
