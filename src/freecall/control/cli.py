"""The client commands (``freecall status | calls | peers | hangup | verify | watch | dashboard``).

They talk to the running daemon over its Unix socket (no token: the socket's mode is 0600), found
through the state directory: ``--state-dir``, else the configuration's (``-c FILE``), else the
default. Output is a readable table, or with ``--json`` exactly what the API returned.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..config import ConfigError, load_config

CLIENT_COMMANDS = ("status", "calls", "peers", "registrations", "hangup", "verify", "watch",
                   "dashboard")
"""Sub-commands handled here (``keys`` belongs to the OpenPGP layer, issue 7: it can call
:func:`request` the same way)."""


class ClientError(Exception):
    """Something the user must fix (no daemon, an unknown call): printed, exit status 1."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def add_client_options(parser: argparse.ArgumentParser, *, json_switch: bool = True) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="configuration file (YAML)")
    parser.add_argument("--state-dir", metavar="DIR", help="the daemon's state directory")
    if json_switch:
        parser.add_argument("--json", action="store_true", help="print the API's JSON")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The client sub-commands, added to ``freecall``'s parser."""
    for name, text in (("status", "the running daemon: version, node, listeners, uptime"),
                       ("calls", "live and recent calls, with their security"),
                       ("peers", "nodes in the host cache"),
                       ("registrations", "softphones registered here")):
        add_client_options(commands.add_parser(name, help=text))
    hangup = commands.add_parser("hangup", help="end a call (BYE to both parties)")
    hangup.add_argument("call_id", metavar="CALL_ID")
    add_client_options(hangup)
    verify = commands.add_parser(
        "verify", help="confirm a call's SAS after reading it aloud with the other party")
    verify.add_argument("call_id", metavar="CALL_ID")
    verify.add_argument("--yes", action="store_true",
                        help="the SAS matched: confirm without asking")
    verify.add_argument("--reset", action="store_true",
                        help="withdraw an earlier confirmation (the SAS did not match)")
    add_client_options(verify)
    watch = commands.add_parser("watch", help="follow the daemon's events as they happen")
    add_client_options(watch)
    dashboard = commands.add_parser("dashboard", help="print the dashboard's address (with "
                                    "the token in the fragment: keep it to yourself)")
    add_client_options(dashboard, json_switch=False)


def control_files(config_file: str | None, state_dir: str | None) -> tuple[Path, Path]:
    """(Unix socket, token file) of the daemon that uses this state directory."""
    try:
        config = load_config(config_file, overrides={"node.state_dir": state_dir})
    except ConfigError as error:
        raise ClientError(f"configuration error\n{error}") from None
    return Path(config.control.socket), Path(config.control.token_file)


def request(path: Path, method: str, target: str, body: Any = None,
            timeout: float = 10.0) -> Any:
    """One API call over the Unix socket; its JSON, or :class:`ClientError`."""
    connection = _UnixConnection(str(path), timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection.request(method, target, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
    except FileNotFoundError:
        raise ClientError(f"no daemon: {path} does not exist (is `freecall run` running "
                          "with this state directory?)") from None
    except ConnectionRefusedError:
        raise ClientError(f"no daemon listens on {path}") from None
    except PermissionError:
        raise ClientError(f"{path}: permission denied (run as the daemon's user)") from None
    except (OSError, http.client.HTTPException) as error:
        raise ClientError(f"{path}: {error}") from None
    finally:
        connection.close()
    try:
        value = json.loads(data) if data else None
    except ValueError:
        raise ClientError(f"the daemon answered {response.status} with something that is "
                          "not JSON") from None
    if response.status >= 400:
        message = value.get("error") if isinstance(value, dict) else None
        raise ClientError(message or f"the daemon answered {response.status}")
    return value


def events(path: Path, timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """The event stream, one event at a time, until the daemon closes it."""
    connection = _UnixConnection(str(path), timeout)
    try:
        connection.request("GET", "/api/events", headers={"Accept": "text/event-stream"})
        response = connection.getresponse()
        if response.status != 200:
            raise ClientError(f"the daemon answered {response.status}")
        data: list[str] = []
        while True:
            raw = response.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                if data:
                    yield json.loads("\n".join(data))
                data = []
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
    except FileNotFoundError:
        raise ClientError(f"no daemon: {path} does not exist") from None
    except ConnectionRefusedError:
        raise ClientError(f"no daemon listens on {path}") from None
    finally:
        connection.close()


# -- rendering -----------------------------------------------------------------------------------


def security_text(security: dict[str, Any]) -> str:
    """One phrase a person understands at a glance."""
    state = security.get("state")
    verification = security.get("verification")
    if verification == "mitm-suspected":
        return "MAN IN THE MIDDLE SUSPECTED"
    if state == "secure":
        if verification in ("verified", "trusted-first-use"):
            how = "verified" if verification == "verified" else "trusted key (first use)"
            return f"secure, {how}"
        return f"secure, UNVERIFIED: compare SAS '{security.get('sas')}'"
    if state == "local":
        return "local (media stays on this host)"
    if state == "pending":
        return "negotiating..."
    if state == "failed":
        return f"FAILED: {security.get('reason')}"
    return f"INSECURE (clear media): {security.get('reason') or ''}".rstrip(": ")


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    text = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in text]
    return "\n".join(lines)


def render_calls(calls: list[dict[str, Any]]) -> str:
    if not calls:
        return "no calls"
    rows = []
    for c in calls:
        media = c.get("media") or {}
        rows.append((c["id"], c["direction"], c["from"], c["to"], c["state"],
                     f"{c.get('duration_s', 0):.0f}s", media.get("codec"),
                     f"{media.get('packets_in', 0)}/{media.get('packets_out', 0)}",
                     security_text(c.get("security") or {})))
    return table(rows, ("ID", "DIR", "FROM", "TO", "STATE", "TIME", "CODEC", "PKTS IN/OUT",
                        "SECURITY"))


def render_status(status: dict[str, Any]) -> str:
    lines = [f"freecall {status.get('version')}  node {status.get('name')} "
             f"({status.get('role')})  up {status.get('uptime_s', 0):.0f} s"]
    if status.get("node_id"):
        lines.append(f"node id      {status['node_id']}")
    lines.append(f"signing key  {status.get('key_fingerprint') or '-'}")
    if status.get("role") == "relay":  # no softphones, no calls: its allocations instead
        lines.append(f"allocations  {status.get('allocations', 0)} (TURN); "
                     f"peers known: {status.get('peers', 0)}")
    else:
        lines.append(f"calls        {status.get('calls_active', 0)} active, "
                     f"{status.get('calls_total', 0)} since start")
        lines.append(f"registered   {status.get('registrations', 0)} contact(s); "
                     f"peers known: {status.get('peers', 0)}")
    lines.append("listening    " + "\n             ".join(status.get("listeners") or ["-"]))
    nat = status.get("nat")
    if isinstance(nat, dict):
        lines += render_nat(nat)
    edge = status.get("sip_edge")
    if isinstance(edge, dict):
        lines.append(f"SIP edge     {edge.get('attached', 0)} node(s) attached, "
                     f"{edge.get('connections_open', 0)} TLS connection(s); "
                     f"{edge.get('forwarded', 0)} forwarded, {edge.get('refused', 0)} refused, "
                     f"{edge.get('attach_refused', 0)} attach(es) refused")
    return "\n".join(lines)


def render_nat(nat: dict[str, Any]) -> list[str]:
    """The node's NAT state (``/api/status`` ``nat``): the verdict and whose it is, the
    mapping, the public address, and the link to the relay calls reach us through."""
    behind = nat.get("behind_nat")
    verdict = ("behind NAT" if behind is True else "not behind NAT" if behind is False
               else "unknown")
    source = nat.get("source")
    said = {"stun": "by STUN", "media": "by media gathering"}.get(str(source), "")
    mapping = nat.get("mapping")
    details = [d for d in (said, f"mapping {mapping}" if mapping and behind else "",
                           f"public {nat['public_address']}" if nat.get("public_address")
                           else "") if d]
    lines = [f"NAT          {verdict}" + (f" ({', '.join(details)})" if details else "")]
    link = nat.get("relay_link")
    if isinstance(link, dict):
        state = str(link.get("state"))
        relay = link.get("relay") if isinstance(link.get("relay"), dict) else None
        where = (f" {str(relay.get('node_id'))[:16]} at {relay.get('address')}"
                 if relay else "")
        text = f"relay link   {state}{where}"
        if state == "attached" and link.get("attached_s") is not None:
            text += f" for {link['attached_s']:.0f} s"
        text += (f" ({link.get('attaches', 0)} attach(es), {link.get('failures', 0)} "
                 f"failure(s) in a row, {link.get('pongs', 0)}/"
                 f"{link.get('keepalives_sent', 0)} keep-alives answered)")
        lines.append(text)
    elif nat.get("attach") is not None:
        lines.append(f"relay link   none (nat.attach: {nat.get('attach')})")
    return lines


def render_peers(peers: list[dict[str, Any]]) -> str:
    if not peers:
        return "no peers in the host cache"
    rows = []
    for p in peers:
        addresses = ", ".join(f"{a.get('kind')}:{a.get('host')}:{a.get('port')}"
                              if isinstance(a, dict) else str(a)
                              for a in p.get("addresses") or [])
        rows.append((str(p.get("node_id"))[:16], addresses,
                     ", ".join(p.get("routes") or []), p.get("last_seen_s"),
                     "yes" if p.get("relay") else ""))
    return table(rows, ("NODE", "ADDRESSES", "ROUTES", "SEEN (S AGO)", "RELAY"))


def render_registrations(items: list[dict[str, Any]]) -> str:
    if not items:
        return "no softphone registered"
    rows = [(r.get("user"), r.get("contact"), r.get("expires_s"), r.get("source"),
             r.get("user_agent")) for r in items]
    return table(rows, ("USER", "CONTACT", "EXPIRES (S)", "SOURCE", "USER AGENT"))


def render_event(event: dict[str, Any]) -> str:
    time = str(event.get("time", ""))[11:23]
    kind = event.get("type")
    if kind == "call":
        c = event.get("call") or {}
        return (f"{time} call     {c.get('id')} {c.get('state')}: {c.get('from')} -> "
                f"{c.get('to')} ({c.get('direction')}, {c.get('outcome')})")
    if kind == "security":
        return (f"{time} security {event.get('call_id')}: "
                f"{security_text(event.get('security') or {})}")
    if kind == "registration":
        r = event.get("registration") or {}
        reason = f" ({event['reason']})" if event.get("reason") else ""
        return (f"{time} register {event.get('action')} {r.get('aor')} at {r.get('contact')}"
                f"{reason}")
    if kind == "peer":
        return f"{time} peer     {event.get('action')} {str(event.get('node_id'))[:16]}"
    return f"{time} {kind} {json.dumps(event)}"


# -- commands ------------------------------------------------------------------------------------


def main(args: argparse.Namespace, *, out: TextIO = sys.stdout,
         ask: Callable[[str], str] = input) -> int:
    try:
        return _run(args, out, ask)
    except ClientError as error:
        print(f"freecall: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, out: TextIO, ask: Callable[[str], str]) -> int:
    path, token_file = control_files(args.config, args.state_dir)
    command = args.command
    as_json = getattr(args, "json", False)

    def show(value: Any, render: Callable[[Any], str]) -> None:
        print(json.dumps(value, indent=2) if as_json else render(value), file=out)

    if command == "status":
        show(request(path, "GET", "/api/status"), render_status)
    elif command == "calls":
        show(request(path, "GET", "/api/calls"), render_calls)
    elif command == "peers":
        show(request(path, "GET", "/api/peers"), render_peers)
    elif command == "registrations":
        show(request(path, "GET", "/api/registrations"), render_registrations)
    elif command == "hangup":
        call = request(path, "POST", f"/api/calls/{_quote(args.call_id)}/hangup")
        show(call, lambda c: f"call {c['id']} ended ({c['from']} -> {c['to']})")
    elif command == "verify":
        return _verify(path, args, out, ask, as_json)
    elif command == "watch":
        for event in events(path):
            print(json.dumps(event) if as_json else render_event(event), file=out, flush=True)
    elif command == "dashboard":
        status = request(path, "GET", "/api/status")
        urls = [x.split("control:", 1)[1] for x in status.get("listeners", [])
                if x.startswith("control:http")]
        if not urls:
            raise ClientError("the HTTP control API is off (control.listen: null)")
        try:
            token = token_file.read_text().strip()
        except OSError as error:
            raise ClientError(f"cannot read the token: {error}") from None
        print(f"{urls[0]}/#token={token}", file=out)
    return 0


def _verify(path: Path, args: argparse.Namespace, out: TextIO, ask: Callable[[str], str],
            as_json: bool) -> int:
    call = request(path, "GET", f"/api/calls/{_quote(args.call_id)}")
    security = call.get("security") or {}
    if security.get("state") != "secure":
        raise ClientError(f"call {call['id']} has no secure media: "
                          f"{security_text(security)}")
    verified = not args.reset
    if verified and not args.yes:
        print(f"Call {call['id']}: {call['from']} -> {call['to']}", file=out)
        print(f"Read the words aloud; the other party must see the same: "
              f"{security.get('sas')}", file=out)
        answer = ask("Do they match? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("Not confirmed. If the words differ, someone may be listening in: "
                  "hang up.", file=out)
            return 1
    call = request(path, "POST", f"/api/calls/{_quote(args.call_id)}/confirm-sas",
                   {"verified": verified})
    if as_json:
        print(json.dumps(call, indent=2), file=out)
    else:
        print(f"call {call['id']}: {security_text(call['security'])}", file=out)
    return 0


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")
