"""baresip 1.0.0, headless, driven over its ctrl_tcp socket (JSON in netstrings).

Adapted from the shared shell recipes (baresip_mkcfg.sh, bsctl.py). Their gotchas, handled here:
  B1  ``net_interface 127.0.0.1``, never ``lo``;
  B2  baresip binds TLS on SIP port + 1: each UA gets its own block of ports;
  B3  ctrl_tcp sends events only to the newest connection: one long-lived connection per UA,
      read by a thread into an event list; ``CALL_CLOSED`` may come before the hangup reply;
  B4  ``ausine`` needs 48 kHz stereo; modules are loaded from the config file; ``statmode_default
      off``; baresip may not quit while its registrar is gone: ``stop()`` is bounded and ends with
      SIGKILL, and fixtures stop UAs before the registrar.
The audio source is a sine tone (``tone_hz``) and the sink a bridge nobody reads; ``sndfile`` dumps
each call's encoded and decoded audio to WAV (``decoded_wavs()``) so a test can check it heard the
peer's tone.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .addr import SipAddr, SipTransport
from .netns import connect_in
from .netstring import NetstringDecoder, NetstringError, encode_json
from .ports import PortBlock
from .proc import HarnessTimeout, ManagedProcess, tail, wait_until

MediaEnc = Literal["none", "srtp", "srtp-mand", "srtp-mandf", "dtls_srtp"]


class BaresipError(AssertionError):
    """baresip refused a command or a call failed while a test waited for it."""


# --- end-of-call statistics -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RtpStats:
    """One block of baresip's end-of-call ``rtp_stats`` output (``rtp_stats yes``).

    ``tx``/``rx`` map the row names (``packets``, ``avg. bitrate``, ``errors``, ``lost``,
    ``jitter``) to the Transmit and Receive columns.
    """

    media: str
    tx: Mapping[str, float] = field(default_factory=dict)
    rx: Mapping[str, float] = field(default_factory=dict)

    @property
    def tx_packets(self) -> int:
        return int(self.tx.get("packets", 0))

    @property
    def rx_packets(self) -> int:
        return int(self.rx.get("packets", 0))

    @property
    def rx_lost(self) -> int:
        return int(self.rx.get("lost", 0))


_STATS_HEAD = re.compile(r"^(\w+)\s+Transmit:\s+Receive:\s*$")
_STATS_ROW = re.compile(r"^([A-Za-z][A-Za-z. ]*?):\s+(-?[\d.]+)\s+(-?[\d.]+)(?:\s+\(.*\))?\s*$")


def parse_rtp_stats(log: str) -> list[RtpStats]:
    """Every ``rtp_stats`` block in a baresip log, in order (one per stream per call)::

        audio           Transmit:     Receive:
        packets:            151          151
        avg. bitrate:      64.3         64.3  (kbit/s)
        errors:               0            0
    """
    blocks: list[RtpStats] = []
    lines = log.splitlines()
    i = 0
    while i < len(lines):
        head = _STATS_HEAD.match(lines[i].strip())
        i += 1
        if not head:
            continue
        tx: dict[str, float] = {}
        rx: dict[str, float] = {}
        while i < len(lines):
            row = _STATS_ROW.match(lines[i].strip())
            if not row:
                break
            tx[row.group(1)], rx[row.group(1)] = float(row.group(2)), float(row.group(3))
            i += 1
        blocks.append(RtpStats(head.group(1), tx, rx))
    return blocks


# --- the ctrl_tcp client ------------------------------------------------------------------------


class BaresipCtrl:
    """One long-lived ctrl_tcp connection: commands with replies matched by token, and events.

    A reader thread drains the socket continuously, so events are never lost while the test
    sleeps, and every event is kept (``events``) for assertions and failure reports.
    """

    def __init__(self, port: int, name: str = "baresip", host: str = "127.0.0.1",
                 namespace: str | None = None) -> None:
        self.name = name
        self.sock = (connect_in(namespace, host, port) if namespace is not None
                     else socket.create_connection((host, port), timeout=5))
        self.sock.settimeout(None)
        self.events: list[dict[str, Any]] = []
        self._responses: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._error: str | None = None
        self._tokens = itertools.count(1)
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name=f"ctrl-{name}", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        decoder = NetstringDecoder()
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                for payload in decoder.feed(data):
                    msg = json.loads(payload.decode("utf-8", "replace"))
                    msg["_t"] = time.monotonic()
                    with self._cond:
                        if msg.get("response"):
                            self._responses[str(msg.get("token"))] = msg
                        else:
                            self.events.append(msg)
                        self._cond.notify_all()
        except (OSError, NetstringError, json.JSONDecodeError) as exc:
            self._error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def command(self, command: str, params: str = "", *, timeout: float = 10.0) -> dict[str, Any]:
        """Send one command and return its response (``{"ok": ..., "data": ...}``)."""
        token = f"{command}-{next(self._tokens)}"
        with self._send_lock:
            self.sock.sendall(encode_json({"command": command, "params": params, "token": token}))
        deadline = time.monotonic() + timeout
        with self._cond:
            while token not in self._responses:
                left = deadline - time.monotonic()
                if self._closed:
                    raise BaresipError(f"{self.name}: ctrl connection closed before the reply to "
                                       f"{command!r} ({self._error or 'EOF'})")
                if left <= 0:
                    raise HarnessTimeout(f"{self.name}: no reply to {command!r} in {timeout:g} s")
                self._cond.wait(left)
            return self._responses.pop(token)

    def wait(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Wait (under the lock) until ``predicate()`` is truthy; None on timeout or close."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._cond.wait(left)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(timeout=2)


# --- the softphone ------------------------------------------------------------------------------


_MEDIAENC_MODULES = {"none": None, "srtp": "srtp.so", "srtp-mand": "srtp.so",
                     "srtp-mandf": "srtp.so", "dtls_srtp": "dtls_srtp.so"}


class Baresip:
    """A headless baresip user agent registered at ``registrar``.

    ``domain`` is the AOR's host (``alice@domain``); when given, the registrar is used as the
    outbound proxy (what a softphone pointed at a freecall daemon does). Without it the AOR is
    ``user@registrar`` (what the Kamailio recipes do).
    """

    def __init__(
        self,
        name: str,
        *,
        directory: Path,
        ports: PortBlock,
        registrar: str | tuple[str, int] | SipAddr,
        password: str | None = None,
        domain: str | None = None,
        transport: SipTransport | None = None,
        user: str | None = None,
        auth_user: str | None = None,
        answer: Literal["auto", "manual"] = "auto",
        tone_hz: float = 440.0,
        mediaenc: MediaEnc = "none",
        regint: int = 60,
        codecs: Sequence[str] = ("PCMU",),
        rtp_timeout: int = 10,
        lifetime: int = 900,
        extra_config: Mapping[str, str] | None = None,
        extra_account_params: str = "",
        binary: str = "baresip",
        namespace: str | None = None,
    ) -> None:
        self.name = name
        self.namespace = namespace
        """Runs on that network namespace's host (``ip netns exec``), its loopback its own."""
        self.user = user or name
        self.directory = directory
        self.registrar = SipAddr.of(registrar, transport or "udp")
        self.transport: SipTransport = transport or self.registrar.transport
        self.password = password
        self.domain = domain
        self.auth_user = auth_user
        self.answer = answer
        self.tone_hz = tone_hz
        self.mediaenc = mediaenc
        self.regint = regint
        self.codecs = tuple(codecs)
        self.rtp_timeout = rtp_timeout
        self.lifetime = lifetime
        self.extra_config = dict(extra_config or {})
        self.extra_account_params = extra_account_params
        self.binary = binary
        # ports: SIP (UDP+TCP), SIP+1 (TLS, B2), ctrl_tcp, then an even RTP range
        self.ports = ports
        self.sip_port = ports.take(2)
        self.ctrl_port = ports.take(1)
        self.rtp_ports = ports.take_range(20, align=2)
        self.snd_dir = directory / "snd"
        self.log_path = directory / "baresip.log"
        self.process: ManagedProcess | None = None
        self.ctrl: BaresipCtrl | None = None
        self._consumed: set[int] = set()
        self._mark = 0  # events before this index cannot fail a wait fast
        self._seen_calls: set[str] = set()  # call ids of events already returned to the test

    # -- configuration ---------------------------------------------------------------------------

    @property
    def aor(self) -> str:
        host = self.domain if self.domain is not None else str(self.registrar)
        return f"sip:{self.user}@{host}"

    def account_line(self) -> str:
        t = self.transport
        params = [f"regint={self.regint}", f"answermode={self.answer}",
                  f"audio_codecs={','.join(self.codecs)}"]
        if self.domain is not None:
            params.insert(0, f'outbound="sip:{self.registrar};transport={t}"')
        if self.password is not None:
            params.append(f"auth_pass={self.password}")
        if self.auth_user is not None:
            params.append(f"auth_user={self.auth_user}")
        if self.mediaenc != "none":
            params.append(f"mediaenc={self.mediaenc}")
        if self.extra_account_params:
            params.append(self.extra_account_params.lstrip(";"))
        return f"<{self.aor};transport={t}>;" + ";".join(params)

    def config_text(self) -> str:
        enc_module = _MEDIAENC_MODULES[self.mediaenc]
        lines = [
            "# generated by tests/harness/baresip.py: headless, loopback only",
            "poll_method epoll",
            f"sip_listen 127.0.0.1:{self.sip_port}",
            "call_local_timeout 30",
            "call_max_calls 4",
            f"audio_player aubridge,{self.name}-sink",
            f"audio_source ausine,{self.tone_hz:g}",
            f"audio_alert aubridge,{self.name}-alert",
            "ausrc_srate 48000",
            "auplay_srate 48000",
            "ausrc_channels 2",
            "auplay_channels 2",
            "audio_level no",
            "audio_buffer 20-160",
            f"rtp_ports {self.rtp_ports[0]}-{self.rtp_ports[1]}",
            "rtcp_mux no",
            "jitter_buffer_delay 5-10",
            "rtp_stats yes",
            f"rtp_timeout {self.rtp_timeout}",
            "net_interface 127.0.0.1",
            "module_path /usr/lib/baresip/modules",
            "module g711.so",
            "module ausine.so",
            "module aubridge.so",
            "module sndfile.so",
            f"snd_path {self.snd_dir}",
            *([f"module {enc_module}"] if enc_module else []),
            "module_tmp uuid.so",
            "module_tmp account.so",
            "module_app menu.so",
            "statmode_default off",
            "module_app ctrl_tcp.so",
            "module_app debug_cmd.so",
            f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}",
            *(f"{key} {value}" for key, value in self.extra_config.items()),
        ]
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        self.snd_dir.mkdir(parents=True, exist_ok=True)
        (self.directory / "config").write_text(self.config_text())
        (self.directory / "accounts").write_text(self.account_line() + "\n")
        (self.directory / "contacts").write_text("")

    # -- life cycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Baresip:
        """Write the config, start baresip and connect to its ctrl_tcp socket."""
        self.write_config()
        # -t: baresip quits by itself after `lifetime` seconds whatever happens (a safety net)
        self.process = ManagedProcess(
            f"baresip-{self.name}",
            [*(["ip", "netns", "exec", self.namespace] if self.namespace else []),
             self.binary, "-f", str(self.directory), "-t", str(self.lifetime)],
            log_path=self.log_path, cwd=self.directory,
        ).start()

        def connect() -> BaresipCtrl | None:
            assert self.process is not None
            if not self.process.alive():
                raise BaresipError(f"baresip {self.name} exited at start-up: "
                                   f"{self.process.describe_exit()}")
            try:
                return BaresipCtrl(self.ctrl_port, self.name, namespace=self.namespace)
            except OSError:
                return None

        self.ctrl = wait_until(connect, timeout, interval=0.1,
                               message=f"baresip {self.name} ctrl_tcp on {self.ctrl_port}")
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """``quit`` over ctrl_tcp, then SIGTERM, then SIGKILL; all bounded (gotcha B4)."""
        if self.process is None:
            return None
        if self.ctrl is not None:
            if self.process.alive() and not self.ctrl.closed:
                with contextlib.suppress(OSError):
                    self.ctrl.sock.sendall(encode_json({"command": "quit", "params": "",
                                                        "token": "quit"}))
            self.process.wait(timeout / 2)
            self.ctrl.close()
        return self.process.stop(timeout / 2)

    # -- commands --------------------------------------------------------------------------------

    def _require_ctrl(self) -> BaresipCtrl:
        if self.ctrl is None:
            raise BaresipError(f"baresip {self.name} is not started")
        return self.ctrl

    def command(self, command: str, params: str = "", *, timeout: float = 10.0,
                check: bool = True) -> dict[str, Any]:
        """Run a baresip command (``dial``, ``hangup``, ``reginfo``, ``callstat``, ...)."""
        response = self._require_ctrl().command(command, params, timeout=timeout)
        if check and not response.get("ok"):
            raise BaresipError(f"baresip {self.name}: {command} {params!r} failed: "
                               f"{response.get('data')!r}")
        return response

    def dial(self, uri: str) -> dict[str, Any]:
        """Start a call; wait for it with ``wait_event("CALL_ESTABLISHED", ...)``."""
        self.mark()
        return self.command("dial", uri)

    def hangup(self) -> None:
        self.command("hangup", check=False)  # "no active call" is not worth failing a teardown

    def accept(self) -> None:
        self.command("accept")

    def callstat(self) -> str:
        return str(self.command("callstat").get("data", ""))

    def reginfo(self) -> str:
        return str(self.command("reginfo").get("data", ""))

    def registration_state(self) -> str:
        """``OK`` (200 received), ``ERR`` (a failure response), ``zzz`` (no answer yet)."""
        m = re.search(r"\b(OK|ERR|zzz)\b", _strip_ansi(self.reginfo()))
        return m.group(1) if m else "?"

    def is_registered(self) -> bool:
        return self.registration_state() == "OK"

    def registered(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` for the registration; True if it succeeded (False at once on a
        failure response)."""
        try:
            self.wait_registered(timeout)
        except AssertionError:
            return False
        return True

    def wait_registered(self, timeout: float = 10.0) -> None:
        """Wait for a 200 to REGISTER; fail at once on a failure response (401 with a wrong
        password, 403, 404...) or if baresip exits. Registration usually completes before the
        ctrl connection is up, so the state comes from ``reginfo``, not from events."""

        def check() -> bool:
            if self.process is not None and not self.process.alive():
                raise BaresipError(self.process.describe_exit())
            state = self.registration_state()
            if state == "ERR" or self.find_events("REGISTER_FAIL"):
                reasons = [line for line in _strip_ansi(self.log_text()).splitlines()
                           if line.startswith("reg:")]
                raise BaresipError(f"baresip {self.name}: registration of {self.aor} failed: "
                                   f"{reasons[-1] if reasons else self.reginfo_safe()}")
            return state == "OK"

        wait_until(check, timeout, interval=0.1,
                   message=lambda: f"baresip {self.name} to register ({self.reginfo_safe()})")

    def reginfo_safe(self) -> str:
        try:
            return " ".join(_strip_ansi(self.reginfo()).split())
        except (AssertionError, OSError) as exc:
            return f"reginfo failed: {exc}"

    # -- events ----------------------------------------------------------------------------------

    @property
    def events(self) -> list[dict[str, Any]]:
        return self._require_ctrl().events

    def find_events(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("type") == type_]

    def mark(self) -> None:
        """Forget past events for fail-fast purposes (a new call starts)."""
        self._mark = len(self.events)

    def wait_event(
        self,
        type_: str,
        timeout: float = 10.0,
        *,
        match: Callable[[dict[str, Any]], bool] | None = None,
        fail_on: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Return the oldest not-yet-returned event of ``type_`` (waiting up to ``timeout``).

        Each event is returned once, so waiting twice for ``CALL_ESTABLISHED`` waits for two
        calls. Fails fast when an event in ``fail_on`` (default: ``CALL_CLOSED`` unless that is
        what is awaited) arrives after the last ``dial``/``mark`` for a call the test has not seen
        yet: a rejected call does not run into the timeout, while the unawaited end of a call the
        test already followed does not fail the wait for the next one.
        """
        ctrl = self._require_ctrl()
        fail_types = set(fail_on if fail_on is not None else
                         () if type_ == "CALL_CLOSED" else ("CALL_CLOSED",))
        failure: list[dict[str, Any]] = []

        def find() -> dict[str, Any] | None:
            for i, event in enumerate(ctrl.events):
                if i in self._consumed:
                    continue
                if event.get("type") == type_ and (match is None or match(event)):
                    self._consumed.add(i)
                    if event.get("id"):
                        self._seen_calls.add(str(event["id"]))
                    return event
                if (i >= self._mark and event.get("type") in fail_types
                        and str(event.get("id")) not in self._seen_calls):
                    self._consumed.add(i)
                    failure.append(event)
                    return event
            return None

        event = ctrl.wait(find, timeout)
        if failure:
            raise BaresipError(f"baresip {self.name}: {failure[0].get('type')} "
                               f"({failure[0].get('param')!r}) while waiting for {type_}\n"
                               f"{self.event_summary()}")
        if event is None:
            raise HarnessTimeout(f"baresip {self.name}: no {type_} within {timeout:g} s "
                                 f"(ctrl {'closed' if ctrl.closed else 'open'})\n"
                                 f"{self.event_summary()}\nlog:\n{tail(self.log_path, 15)}")
        return dict(event)

    def event_summary(self, last: int = 12) -> str:
        events = self.events[-last:] if self.ctrl else []
        return "events: " + (", ".join(f"{e.get('type')}({e.get('param', '')})" for e in events)
                             or "none")

    # -- results ---------------------------------------------------------------------------------

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def rtp_stats(self) -> list[RtpStats]:
        """End-of-call statistics blocks, oldest first (printed when each call ends)."""
        return parse_rtp_stats(self.log_text())

    def wait_rtp_stats(self, count: int = 1, timeout: float = 5.0) -> list[RtpStats]:
        """Wait until ``count`` stats blocks were printed (they follow ``CALL_CLOSED``)."""
        return wait_until(lambda: (s := self.rtp_stats()) and len(s) >= count and s, timeout,
                          message=f"{count} rtp_stats block(s) in {self.log_path}")

    def decoded_wavs(self) -> list[Path]:
        """Decoded-audio dumps (what this UA heard), oldest first.

        sndfile names them by the second the call started (``dump-<time>-dec.wav``): two calls
        starting in the same second share one file.
        """
        return sorted(self.snd_dir.glob("*-dec.wav"), key=lambda p: (p.stat().st_mtime, p.name))

    def last_decoded_wav(self) -> Path:
        wavs = self.decoded_wavs()
        if not wavs:
            raise AssertionError(f"baresip {self.name}: no decoded WAV in {self.snd_dir}")
        return wavs[-1]

    def __repr__(self) -> str:
        return f"<Baresip {self.name} {self.aor} sip={self.sip_port} ctrl={self.ctrl_port}>"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)
