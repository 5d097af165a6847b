"""Fixtures for interop tests: real softphones and SIPp against the freecall daemon.

A test reads like::

    @pytest.mark.slow
    def test_two_softphones_call(freecall_daemon, baresip):
        daemon = freecall_daemon(users={"alice": "pw-a", "bob": "pw-b"})
        alice = baresip("alice", registrar=daemon.sip_addr, password="pw-a", tone_hz=440)
        bob = baresip("bob", registrar=daemon.sip_addr, password="pw-b", tone_hz=880)
        alice.wait_registered()
        bob.wait_registered()
        alice.dial("sip:bob@127.0.0.1")
        alice.wait_event("CALL_ESTABLISHED", 10)
        bob.wait_event("CALL_ESTABLISHED", 10)
        time.sleep(3)
        alice.hangup()
        alice.wait_event("CALL_CLOSED", 5)
        assert_tone(alice.last_decoded_wav(), 880)

Every process a test starts is stopped at teardown in reverse start order (phones before the
daemon), pass or fail; its ports are released; a missing program fails the test (scripts/test
installs them all). When a test fails, its whole run directory (configs, logs, ctrl events,
WAVs, SIPp CSVs) is copied to ``artifacts/<test id>/`` at the repository root
(``FREECALL_ARTIFACTS`` overrides the place).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from harness import Baresip, FreecallDaemon, Harness, Linphonec, PortAllocator, Sipp
from harness.session import keep_artifacts

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/interop is an interop test (``-m "not interop"`` skips them)."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.interop)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture(scope="session")
def port_allocator() -> Iterator[PortAllocator]:
    allocator = PortAllocator()
    yield allocator
    allocator.release_all()


def _artifact_dir(config: pytest.Config, nodeid: str) -> Path:
    root = os.environ.get("FREECALL_ARTIFACTS") or str(config.rootpath / "artifacts")
    return Path(root) / re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:150]


@pytest.fixture
def harness(
    request: pytest.FixtureRequest, tmp_path: Path, port_allocator: PortAllocator
) -> Iterator[Harness]:
    """The test's run directory, ports and processes; everything is stopped at teardown."""
    h = Harness(tmp_path / "run", port_allocator, on_missing=pytest.fail)
    try:
        yield h
    finally:
        stop_errors = h.close()
        reports = request.node.stash.get(_REPORTS, {})
        if any(rep.failed for rep in reports.values()) or stop_errors:
            dest = keep_artifacts(h.run_dir, _artifact_dir(request.config, request.node.nodeid))
            print(f"\n[harness] artifacts kept in {dest}")
        if stop_errors:
            pytest.fail("harness could not stop: " + "; ".join(stop_errors), pytrace=False)


@pytest.fixture
def baresip(harness: Harness) -> Callable[..., Baresip]:
    """``baresip(name, registrar=..., password=..., tone_hz=..., answer="auto"|"manual",
    mediaenc=..., domain=..., transport=...)`` -> a started ``Baresip`` (``Harness.baresip``)."""
    return harness.baresip


@pytest.fixture
def linphonec(harness: Harness) -> Callable[..., Linphonec]:
    """``linphonec(name, registrar=..., password=..., media_encryption="zrtp", ...)`` -> a started
    ``Linphonec`` (its SAS: ``.sas()``; what it heard: ``.recorded_wav``)."""
    return harness.linphonec


@pytest.fixture
def sipp(harness: Harness) -> Sipp:
    """The test's SIPp runner: ``uas = sipp.start(UAS_NO180)``, ``sipp.run("uac", uas.addr)``."""
    return harness.sipp


@pytest.fixture
def freecall_daemon(harness: Harness) -> Callable[..., FreecallDaemon]:
    """``freecall_daemon(name="node", users={"alice": "pw"}, domains=[...], config={...})`` -> a
    started ``FreecallDaemon`` (``.sip_addr``, ``.public_addr``, ``.api(...)``)."""
    return harness.daemon
