"""freecall interop test harness: real softphones and SIPp on loopback, bounded and leak-free.

A test (through the fixtures in tests/interop/conftest.py) reads::

    daemon = freecall_daemon(users={"alice": "pw-a", "bob": "pw-b"})
    alice = baresip("alice", registrar=daemon.sip_addr, password="pw-a", tone_hz=440)
    bob = baresip("bob", registrar=daemon.sip_addr, password="pw-b", tone_hz=880)
    alice.wait_registered(); bob.wait_registered()
    alice.dial("sip:bob@127.0.0.1")
    alice.wait_event("CALL_ESTABLISHED", 10)
    ...
    assert_tone(alice.last_decoded_wav(), 880)

Outside pytest, ``with Harness(run_dir) as h: h.baresip(...)`` does the same.
"""

from .addr import SipAddr, SipTransport
from .baresip import Baresip, BaresipCtrl, BaresipError, RtpStats, parse_rtp_stats
from .daemon import FreecallDaemon
from .linphonec import Linphonec, OrtpStats, parse_ortp_stats
from .netstring import NetstringDecoder, NetstringError, encode, encode_json
from .ports import PortAllocator, PortBlock, PortPool, PortsExhausted, port_free
from .proc import (
    HarnessTimeout,
    LogWatcher,
    ManagedProcess,
    port_listening,
    wait_port,
    wait_until,
)
from .session import Harness, MissingTool, keep_artifacts, require
from .sipp import UAS_NO180, Sipp, SippProcess, SippResult, parse_stats_csv
from .wav import ToneAnalysis, analyse_wav, assert_tone, make_tone_wav, tone_ratio, wav_tone

__all__ = [
    "UAS_NO180",
    "Baresip",
    "BaresipCtrl",
    "BaresipError",
    "FreecallDaemon",
    "Harness",
    "HarnessTimeout",
    "Linphonec",
    "LogWatcher",
    "ManagedProcess",
    "MissingTool",
    "NetstringDecoder",
    "NetstringError",
    "OrtpStats",
    "PortAllocator",
    "PortBlock",
    "PortPool",
    "PortsExhausted",
    "RtpStats",
    "SipAddr",
    "SipTransport",
    "Sipp",
    "SippProcess",
    "SippResult",
    "ToneAnalysis",
    "analyse_wav",
    "assert_tone",
    "encode",
    "encode_json",
    "keep_artifacts",
    "make_tone_wav",
    "parse_ortp_stats",
    "parse_rtp_stats",
    "parse_stats_csv",
    "port_free",
    "port_listening",
    "require",
    "tone_ratio",
    "wait_port",
    "wait_until",
    "wav_tone",
]
