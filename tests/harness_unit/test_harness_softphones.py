"""Softphone wrappers without the softphones: generated configs, and the ctrl_tcp client
against a scripted fake of baresip's ctrl_tcp module."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.addr import SipAddr
from harness.baresip import Baresip, BaresipCtrl, BaresipError
from harness.linphonec import Linphonec
from harness.netstring import NetstringDecoder, encode_json
from harness.ports import PortBlock
from harness.proc import HarnessTimeout


def _event(type_: str, param: str = "") -> dict[str, Any]:
    return {"event": True, "class": "call", "type": type_, "param": param, "id": "c1"}


class FakeCtrl:
    """Answers like baresip 1.0.0's ctrl_tcp: events interleaved with token-tagged responses."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.commands: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.server.accept()
        dec = NetstringDecoder()
        with conn:
            while data := conn.recv(4096):
                for raw in dec.feed(data):
                    cmd = json.loads(raw)
                    self.commands.append(cmd)
                    for msg in self.script(cmd):
                        conn.sendall(encode_json(msg))
                        time.sleep(0.01)

    def script(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        reply = {"response": True, "ok": True, "data": "", "token": cmd["token"]}
        name, params = cmd["command"], cmd["params"]
        if name == "dial" and "nobody" in params:
            return [reply, _event("CALL_CLOSED", "408 Request Timeout")]
        if name == "dial":
            return [_event("CALL_LOCAL_SDP", "offer"), reply, _event("CALL_RINGING"),
                    _event("CALL_ESTABLISHED", params)]
        if name == "hangup":  # CALL_CLOSED comes before the reply (gotcha B3)
            return [_event("CALL_CLOSED", "Connection reset by user"), reply]
        if name == "reginfo":
            return [{**reply, "data": "\n--- User Agents (1) ---\n> sip:alice@127.0.0.1:5070"
                                      "   \x1b[32mOK \x1b[;m  Expires 60s\n"}]
        if name == "silent":
            return []
        return [{**reply, "ok": False, "data": f"command not found ({name})"}]

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def ua(tmp_path: Path) -> Iterator[Baresip]:
    fake = FakeCtrl()
    phone = Baresip("alice", directory=tmp_path, ports=PortBlock(15000, 32, None),
                    registrar="127.0.0.1:5070", password="pw")
    phone.ctrl = BaresipCtrl(fake.port, "alice")
    yield phone
    phone.ctrl.close()
    fake.close()


def test_call_flow_and_event_consumption(ua: Baresip) -> None:
    assert ua.dial("sip:bob@example.org")["ok"]
    assert ua.wait_event("CALL_ESTABLISHED", 5)["param"] == "sip:bob@example.org"
    with pytest.raises(HarnessTimeout, match="no CALL_ESTABLISHED"):
        ua.wait_event("CALL_ESTABLISHED", 0.3)  # each event is returned once
    ua.hangup()
    assert ua.wait_event("CALL_CLOSED", 5)["param"] == "Connection reset by user"
    assert [e["type"] for e in ua.events] == ["CALL_LOCAL_SDP", "CALL_RINGING",
                                             "CALL_ESTABLISHED", "CALL_CLOSED"]


def test_the_unawaited_end_of_a_followed_call_does_not_fail_the_next_wait(ua: Baresip) -> None:
    # like a callee: the test saw call c1 established but never waited for its CALL_CLOSED
    ua.dial("sip:bob@example.org")
    ua.wait_event("CALL_ESTABLISHED", 5)
    ua.command("hangup")  # its CALL_CLOSED (call c1) arrives, and nobody waits for it
    assert ua.find_events("CALL_CLOSED")
    with pytest.raises(HarnessTimeout):
        ua.wait_event("CALL_ESTABLISHED", 0.3)  # times out instead of failing on c1's end


def test_a_closed_call_fails_the_wait_at_once(ua: Baresip) -> None:
    ua.dial("sip:nobody@example.org")
    t = time.monotonic()
    with pytest.raises(BaresipError, match=r"CALL_CLOSED \('408 Request Timeout'\) while waiting"):
        ua.wait_event("CALL_ESTABLISHED", 10)
    assert time.monotonic() - t < 2
    # a new dial starts afresh: the old CALL_CLOSED does not fail the next call
    ua.dial("sip:bob@example.org")
    ua.wait_event("CALL_ESTABLISHED", 5)


def test_registration_state_and_command_errors(ua: Baresip) -> None:
    assert ua.registration_state() == "OK"
    ua.wait_registered(1)
    assert ua.registered(1)
    with pytest.raises(BaresipError, match="command not found"):
        ua.command("bogus")
    assert ua.command("bogus", check=False)["ok"] is False
    with pytest.raises(HarnessTimeout, match="no reply to 'silent'"):
        ua.command("silent", timeout=0.3)


def test_ctrl_reports_a_closed_connection(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    ctrl = BaresipCtrl(server.getsockname()[1], "x")
    conn, _ = server.accept()
    conn.close()
    with pytest.raises(BaresipError, match="closed before the reply"):
        ctrl.command("reginfo", timeout=5)
    ctrl.close()
    server.close()


def test_baresip_config_like_the_kamailio_recipes(tmp_path: Path) -> None:
    ua = Baresip("bob", directory=tmp_path, ports=PortBlock(15000, 32, None),
                 registrar=("127.0.0.1", 5070), password="bobpw", tone_hz=880, answer="manual")
    assert (ua.sip_port, ua.ctrl_port, ua.rtp_ports) == (15000, 15002, (15004, 15023))
    assert ua.aor == "sip:bob@127.0.0.1:5070"
    assert ua.account_line() == ("<sip:bob@127.0.0.1:5070;transport=udp>;regint=60;"
                                 "answermode=manual;audio_codecs=PCMU;auth_pass=bobpw")
    ua.write_config()
    config = (tmp_path / "config").read_text()
    for line in ("sip_listen 127.0.0.1:15000", "net_interface 127.0.0.1", "audio_source ausine,880",
                 "ctrl_tcp_listen 127.0.0.1:15002", "rtp_ports 15004-15023", "rtp_stats yes",
                 "statmode_default off", f"snd_path {tmp_path / 'snd'}"):
        assert line in config.splitlines(), line
    assert "srtp" not in config
    assert (tmp_path / "snd").is_dir()


def test_baresip_behind_an_outbound_proxy(tmp_path: Path) -> None:
    ua = Baresip("alice", directory=tmp_path, ports=PortBlock(15000, 32, None),
                 registrar=SipAddr("127.0.0.1", 5060, "tcp"), domain="example.org",
                 password="pw", mediaenc="srtp-mand", extra_account_params=";ptime=20")
    assert ua.aor == "sip:alice@example.org"
    assert ua.account_line() == (
        '<sip:alice@example.org;transport=tcp>;outbound="sip:127.0.0.1:5060;transport=tcp";'
        "regint=60;answermode=auto;audio_codecs=PCMU;auth_pass=pw;mediaenc=srtp-mand;ptime=20")
    assert "module srtp.so" in ua.config_text()


def test_linphonerc(tmp_path: Path) -> None:
    lp = Linphonec("carol", directory=tmp_path, ports=PortBlock(15000, 32, None),
                   registrar="127.0.0.1:5070", password="pw", media_encryption="zrtp")
    rc = lp.rc_text().splitlines()
    for line in ("sip_port=15000", "bind_address=127.0.0.1", "audio_rtp_port=15002",
                 "video_rtp_port=15004", "media_encryption=zrtp", "media_encryption_mandatory=1",
                 "reg_proxy=<sip:127.0.0.1:5070;transport=udp>",
                 "reg_identity=sip:carol@127.0.0.1:5070", "passwd=pw", "domain=127.0.0.1"):
        assert line in rc, line


def test_sip_addr() -> None:
    assert str(SipAddr.of("[::1]:5060")) == "[::1]:5060"
    assert SipAddr.of(("127.0.0.1", 5070), "tcp") == SipAddr("127.0.0.1", 5070, "tcp")
    assert SipAddr.of("127.0.0.1:5060").transport == "udp"
