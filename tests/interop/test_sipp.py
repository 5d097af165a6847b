"""SIPp against the daemon: registration with a challenge, calls to a SIPp UAS registered as a
user, CANCEL, a BYE from the callee, and a busy callee (RFC 3261 sections 10, 16, 9.1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness import Baresip, FreecallDaemon, Sipp, SippProcess, SippResult

SCENARIOS = Path(__file__).parent / "scenarios"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def register(
    sipp: Sipp, node: FreecallDaemon, user: str, contact_port: int, *, trusted: bool = False
) -> SippResult:
    """REGISTER with a 401 challenge; from a trusted source, without one."""
    return sipp.run(
        SCENARIOS / ("register_trusted.xml" if trusted else "register.xml"), str(node.sip_addr),
        service=user, auth=None if trusted else (user, USERS[user]),
        variables={"contact_port": str(contact_port)}, time_limit=10,
    )


def callee(
    sipp: Sipp, node: FreecallDaemon, scenario: str | Path, *, trusted: bool = False
) -> SippProcess:
    """A SIPp UAS registered as bob (the REGISTER comes from another SIPp, from another port)."""
    uas = sipp.start(scenario, service="bob", time_limit=30, calls=1000)
    result = register(sipp, node, "bob", uas.port, trusted=trusted)
    assert result.returncode == 0 and result.successful == 1, result
    return uas


def caller(sipp: Sipp, node: FreecallDaemon, scenario: str) -> SippResult:
    return sipp.run(
        SCENARIOS / scenario, str(node.sip_addr), service="bob", auth=("alice", USERS["alice"]),
        variables={"caller": "alice"}, time_limit=15,
    )


def test_register_with_a_401_challenge(
    freecall_daemon: Callable[..., FreecallDaemon], sipp: Sipp
) -> None:
    node = freecall_daemon(users=USERS)
    result = register(sipp, node, "alice", 5999)
    assert result.returncode == 0 and result.successful == 1
    log = node.log_text()
    assert "registered alice@" in log and "sip:alice@127.0.0.1:5999" in log


def test_builtin_uac_calls_a_registered_sipp_uas(
    freecall_daemon: Callable[..., FreecallDaemon], sipp: Sipp
) -> None:
    """SIPp's built-in uac (no digest, hence a trusted source) through the daemon to SIPp's
    built-in uas registered as bob: INVITE/180/200/ACK/BYE/200 all through the proxy."""
    node = freecall_daemon(users=USERS, config={"sip": {"trusted": ["127.0.0.1/32"]}})
    uas = callee(sipp, node, "uas", trusted=True)
    result = sipp.run("uac", str(node.sip_addr), service="bob", calls=5, rate=5, time_limit=20)
    assert result.returncode == 0 and result.successful == 5 and result.failed == 0, result
    uas.stop()
    assert node.log_text().count("answered") == 5


def test_call_with_proxy_authentication(
    freecall_daemon: Callable[..., FreecallDaemon], sipp: Sipp
) -> None:
    node = freecall_daemon(users=USERS)
    uas = callee(sipp, node, "uas")
    result = caller(sipp, node, "uac_auth.xml")
    assert result.returncode == 0 and result.successful == 1, result
    uas.stop()
    log = node.log_text()
    assert "answered" in log and "hung up by caller" in log


def test_cancel_before_answer(
    freecall_daemon: Callable[..., FreecallDaemon], sipp: Sipp, baresip: Callable[..., Baresip]
) -> None:
    """SIPp calls a baresip that rings without answering, and cancels: 200 to the CANCEL,
    487 to the INVITE, and the phone stops ringing."""
    node = freecall_daemon(users=USERS)
    bob = baresip("bob", registrar=node.sip_addr, password=USERS["bob"], answer="manual")
    bob.wait_registered()
    result = caller(sipp, node, "uac_cancel.xml")
    assert result.returncode == 0 and result.successful == 1, result
    bob.wait_event("CALL_INCOMING", 5)
    bob.wait_event("CALL_CLOSED", 5)
    assert "cancelled" in node.log_text()


def test_bye_from_the_callee(freecall_daemon: Callable[..., FreecallDaemon], sipp: Sipp) -> None:
    node = freecall_daemon(users=USERS)
    uas = callee(sipp, node, SCENARIOS / "uas_bye.xml")
    result = caller(sipp, node, "uac_wait_bye.xml")
    assert result.returncode == 0 and result.successful == 1, result
    assert uas.stop().successful == 1
    assert "hung up by callee" in node.log_text()


def test_busy_is_propagated(freecall_daemon: Callable[..., FreecallDaemon], sipp: Sipp) -> None:
    node = freecall_daemon(users=USERS)
    uas = callee(sipp, node, SCENARIOS / "uas_busy.xml")
    result = caller(sipp, node, "uac_busy.xml")
    assert result.returncode == 0 and result.successful == 1, result
    assert uas.stop().successful == 1
    assert "failed 486" in node.log_text()
