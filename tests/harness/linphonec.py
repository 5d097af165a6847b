"""linphonec 5.1 (linphone-cli), headless: commands through a FIFO, results scraped from output.

Use it for ZRTP (baresip in Debian has no ZRTP module) and as a second, independent SIP stack.
Adapted from the shared recipes (linphone_call.sh, interop_call.sh); their gotchas, handled here:
  L1  linphonec opens no SIP socket at all unless ``$HOME/.local/share/linphone/`` exists: each
      instance gets its own HOME with that directory;
  L2  ``status register`` lies: registration is read from the log (``LinphoneRegistrationOk``);
      it rewrites its ``-c`` file on exit (we never reuse one); there is no null sound card
      (``soundcard use files`` + ``play``/``record``); a FIFO opened for reading blocks until a
      writer appears, so the harness opens it O_RDWR first and keeps that descriptor, which also
      means linphonec never sees EOF;
  L3  its RTP would leave loopback: ``[rtp] bind_address=127.0.0.1``.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .addr import SipAddr, SipTransport
from .ports import PortBlock
from .proc import LogWatcher, ManagedProcess, pdeathsig_prefix, wait_until
from .wav import make_tone_wav

MediaEncryption = Literal["none", "srtp", "zrtp", "dtls"]

# stdout lines (linphonec 5.1.65):
#   "Call 1 with <sip:carol@127.0.0.1:5070> connected."
#   "Call 1 with <sip:...> ended (Call terminated)."      / "Call 1 ... error"
#   "Receiving new incoming call from <sip:...>, assigned id 1"
#   "Call 1 is fully encrypted and auth token is gaed."   (ZRTP: the SAS)
CONNECTED = r"Call \d+ with .*? connected\."
ENDED = r"Call \d+ with .*? (?:ended|error)"
INCOMING = r"Receiving new incoming call from"
SAS = r"auth token is (\w+)"
REGISTERED = r"to \[LinphoneRegistrationOk\]"
REGISTRATION_FAILED = r"to \[LinphoneRegistrationFailed\]"

# baresip-style names for the same moments, so tests can treat both phones alike
EVENT_PATTERNS = {
    "CALL_ESTABLISHED": CONNECTED,
    "CALL_CLOSED": ENDED,
    "CALL_INCOMING": INCOMING,
    "CALL_MENC": SAS,
}


@dataclass(frozen=True, slots=True)
class OrtpStats:
    """The counters of one ``AUDIO SESSION'S RTP STATISTICS`` block of the -d 6 log."""

    sent: int
    received: int
    lost: int


def parse_ortp_stats(log: str) -> list[OrtpStats]:
    """Parse every audio statistics block of a liblinphone log::

        ortp-message-             AUDIO SESSION'S RTP STATISTICS
        ortp-message-sent                                        150 packets
        ortp-message-received                                    150 packets
        ortp-message-incoming cumulative lost                      0 packets
    """
    stats = []
    for chunk in log.split("AUDIO SESSION'S RTP STATISTICS")[1:]:
        head = "\n".join(chunk.splitlines()[:16])

        def count(label: str, text: str = head) -> int:
            m = re.search(rf"ortp-message-{label}\s+(\d+) packets", text)
            return int(m.group(1)) if m else 0

        stats.append(OrtpStats(count("sent"), count("received"),
                               count("incoming cumulative lost")))
    return stats


class Linphonec:
    """A headless linphonec user agent registered at ``registrar``."""

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
        realm: str | None = None,
        auto_answer: bool = True,
        tone_hz: float = 660.0,
        tone_seconds: float = 120.0,
        media_encryption: MediaEncryption = "none",
        reg_expires: int = 60,
        lifetime: int = 900,
        binary: str = "linphonec",
        register: bool = True,
    ) -> None:
        self.name = name
        self.user = user or name
        self.home = directory
        self.registrar = SipAddr.of(registrar, transport or "udp")
        self.transport: SipTransport = transport or self.registrar.transport
        self.password = password
        self.domain = domain
        self.realm = realm
        self.auto_answer = auto_answer
        self.tone_hz = tone_hz
        self.tone_seconds = tone_seconds
        self.media_encryption = media_encryption
        self.reg_expires = reg_expires
        self.lifetime = lifetime
        self.binary = binary
        self.register = register  # False: an outside SIP endpoint that only sends via the proxy
        self.ports = ports
        self.sip_port = ports.take(2)
        self.audio_port = ports.take(2, align=2)  # RTP + RTCP
        self.video_port = ports.take(2, align=2)
        self.rc_path = directory / "linphonerc"
        self.fifo_path = directory / "in"
        self.tone_path = directory / "tone.wav"
        self.recorded_wav = directory / "rec.wav"
        self.out_path = directory / "linphonec.out"  # stdout: calls, SAS
        self.lib_log = directory / "liblinphone.log"  # -d 6 log: registration, SDP, RTP stats
        self.out = LogWatcher(self.out_path)
        self.lib = LogWatcher(self.lib_log)
        self.process: ManagedProcess | None = None
        self._fifo_fd: int | None = None

    @property
    def aor(self) -> str:
        host = self.domain if self.domain is not None else str(self.registrar)
        return f"sip:{self.user}@{host}"

    def rc_text(self) -> str:
        enc = self.media_encryption
        lines = [
            "[sip]",
            f"sip_port={self.sip_port}",
            "sip_tcp_port=0",
            "sip_tls_port=0",
            "guess_hostname=0",
            f"media_encryption={enc}",
            f"media_encryption_mandatory={0 if enc == 'none' else 1}",
            f'contact="{self.user}" <sip:{self.user}@127.0.0.1>',
            "inc_timeout=30",
            "",
            "[rtp]",
            "bind_address=127.0.0.1",
            f"audio_rtp_port={self.audio_port}",
            f"video_rtp_port={self.video_port}",
            "text_rtp_port=0",
            "",
            "[video]",
            "display=0",
            "capture=0",
            "",
            "[proxy_0]",
            f"reg_proxy=<sip:{self.registrar};transport={self.transport}>",
            # every request through the registrar (its outbound proxy), as with baresip's
            # outbound=: the domain need not resolve
            f"reg_route=<sip:{self.registrar};transport={self.transport};lr>",
            f"reg_identity=sip:{self.user}@"
            f"{self.domain if self.domain is not None else self.registrar}",
            f"reg_expires={self.reg_expires}",
            f"reg_sendregister={int(self.register)}",
            "publish=0",
        ]
        if self.password is not None:
            lines += [
                "",
                "[auth_info_0]",
                f"username={self.user}",
                f"passwd={self.password}",
                *([f"realm={self.realm}"] if self.realm else []),
                f"domain={self.domain if self.domain is not None else self.registrar.host}",
            ]
        return "\n".join(lines) + "\n"

    # -- life cycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Linphonec:
        """Create HOME, config, tone and FIFO; start linphonec; set up file-based audio."""
        (self.home / ".local" / "share" / "linphone").mkdir(parents=True, exist_ok=True)  # L1
        self.rc_path.write_text(self.rc_text())
        make_tone_wav(self.tone_path, self.tone_hz, self.tone_seconds)
        if self.fifo_path.exists():
            self.fifo_path.unlink()
        os.mkfifo(self.fifo_path, 0o600)
        # O_RDWR never blocks on a FIFO (Linux) and keeps a writer open: no EOF for linphonec (L2)
        self._fifo_fd = os.open(self.fifo_path, os.O_RDWR | os.O_CLOEXEC)
        argv = [self.binary, "-c", str(self.rc_path), "-d", "6", "-l", str(self.lib_log)]
        if self.auto_answer:
            argv.append("-a")
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "XDG_RUNTIME_DIR")}
        env["HOME"] = str(self.home)
        # linphonec has no "quit after N s" option: coreutils timeout is the safety net, and
        # linphonec gets its own parent-death signal so it cannot outlive timeout(1)
        self.process = ManagedProcess(
            f"linphonec-{self.name}",
            ["timeout", "-k", "5", str(self.lifetime), *pdeathsig_prefix(), *argv],
            log_path=self.out_path, cwd=self.home, env=env, stdin=self._fifo_fd,
        ).start()
        wait_until(lambda: self.lib_log.exists() or self._dead(), timeout,
                   message=f"linphonec {self.name} to start")
        self.send("soundcard use files")  # no sound card: WAV files in and out (L2)
        self.send(f"play {self.tone_path}")
        self.send(f"record {self.recorded_wav}")
        return self

    def _dead(self) -> bool:
        if self.process is not None and not self.process.alive():
            raise AssertionError(f"linphonec {self.name} exited: {self.process.describe_exit()}")
        return False

    def send(self, line: str) -> None:
        """One linphonec command line (``call URI``, ``terminate``, ``calls``, ...)."""
        if self._fifo_fd is None:
            raise AssertionError(f"linphonec {self.name} is not started")
        os.write(self._fifo_fd, line.encode() + b"\n")

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.process is None:
            return None
        if self.process.alive() and self._fifo_fd is not None:
            with contextlib.suppress(OSError):
                self.send("quit")
            self.process.wait(timeout / 2)
        rc = self.process.stop(timeout / 2)  # SIGTERM to timeout(1), which passes it on
        if self._fifo_fd is not None:
            os.close(self._fifo_fd)
            self._fifo_fd = None
        return rc

    # -- registration and calls ------------------------------------------------------------------

    def wait_registered(self, timeout: float = 10.0) -> None:
        self.lib.wait_for(REGISTERED, timeout, since=0, fail=REGISTRATION_FAILED,
                          process=self.process)

    def registered(self, timeout: float = 10.0) -> bool:
        try:
            self.wait_registered(timeout)
        except AssertionError:
            return False
        return True

    def dial(self, uri: str) -> None:
        self.out.mark()
        self.send(f"call {uri}")

    def hangup(self) -> None:
        self.send("terminate")

    def accept(self) -> None:
        self.send("answer")

    def wait_event(self, type_: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for the next stdout line meaning ``type_`` (baresip event names, see
        ``EVENT_PATTERNS``); a call ending fails a wait for anything else at once."""
        pattern = EVENT_PATTERNS[type_]
        fail = None if type_ == "CALL_CLOSED" else ENDED
        return self.out.wait_for(pattern, timeout, fail=fail, process=self.process)

    def wait_established(self, timeout: float = 10.0) -> None:
        self.wait_event("CALL_ESTABLISHED", timeout)

    def wait_closed(self, timeout: float = 10.0) -> None:
        self.wait_event("CALL_CLOSED", timeout)

    def sas(self, timeout: float = 10.0) -> str:
        """The ZRTP short authentication string linphonec shows (``auth token is gaed``)."""
        return self.out.wait_for(SAS, timeout, since=0, process=self.process).group(1)

    # -- results ---------------------------------------------------------------------------------

    def rtp_stats(self) -> list[OrtpStats]:
        """oRTP's end-of-stream statistics, one per audio session, oldest first."""
        return parse_ortp_stats(self.lib.text())

    def rtp_received_packets(self) -> list[int]:
        return [s.received for s in self.rtp_stats()]

    def output(self) -> str:
        return self.out.text()

    def __repr__(self) -> str:
        return f"<Linphonec {self.name} {self.aor} sip={self.sip_port}>"
