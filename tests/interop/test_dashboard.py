"""The dashboard in a real browser (headless Chromium driven by Selenium): it shows a live call
and its security, confirms the SAS, hangs up, and follows the end of the call (issue 8).

Screenshots go to ``artifacts/dashboard/`` at the repository root (``FREECALL_ARTIFACTS``
overrides the root); the path is printed. docs/dashboard.png is one of them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from harness import Baresip, FreecallDaemon, Harness, wait_until
from harness.calls import USERS_A, USERS_B, phone, static_pair

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Debian's chromium and chromium-driver (scripts/debian-packages.txt), headless; nothing
    is downloaded."""
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail("chromium and chromium-driver are needed (scripts/test installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                "--force-prefers-reduced-motion"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Path:
    root = Path(os.environ.get("FREECALL_ARTIFACTS") or ROOT / "artifacts")
    directory = root / "dashboard"
    directory.mkdir(parents=True, exist_ok=True)
    print(f"\n[dashboard] screenshots in {directory}")
    return directory


def nodes(harness: Harness) -> tuple[FreecallDaemon, FreecallDaemon]:
    """A and B (B A's seed) with no SAS signatures: the call stays "unverified", the state
    whose SAS a person confirms by voice (the signed outcomes are tests/interop/
    test_openpgp.py's)."""
    pair = static_pair(harness, config={"openpgp": {"sign": False}}, seed=True,
                       wait_control=True)
    return pair.a, pair.b


def card(driver: webdriver.Chrome, call_id: str) -> WebElement | None:
    found = driver.find_elements(By.CSS_SELECTOR, f"article.call[data-call-id='{call_id}']")
    return found[0] if found else None


def card_state(driver: webdriver.Chrome, call_id: str) -> tuple[str, str, str] | None:
    """(call state, security class, text) of a call's card, or None."""
    try:
        element = card(driver, call_id)
        if element is None:
            return None
        security = element.find_element(By.CSS_SELECTOR, ".security")
        return (str(element.get_attribute("data-state")),
                str(security.get_attribute("data-security")), element.text)
    except StaleElementReferenceException:  # re-rendered between the two reads
        return None


def click(driver: webdriver.Chrome, call_id: str, selector: str) -> None:
    def attempt() -> bool:
        try:
            element = card(driver, call_id)
            if element is None:
                return False
            button = element.find_element(By.CSS_SELECTOR, selector)
            if not button.is_enabled():
                return False
            button.click()
        except StaleElementReferenceException:
            return False
        return True

    wait_until(attempt, 10, message=f"{selector} to be clickable")


def test_the_dashboard_shows_a_secure_call_confirms_its_sas_and_hangs_it_up(
    harness: Harness, baresip: Callable[..., Baresip], browser: webdriver.Chrome,
    shots: Path,
) -> None:
    a, b = nodes(harness)
    driver = browser
    driver.get(f"{a.control_url}/#token={a.token()}")
    wait_until(lambda: driver.find_element(By.ID, "live").text == "live", 10,
               message="the page to follow the event stream")
    # the token left the address bar and lives in this tab's sessionStorage only
    assert "token" not in driver.current_url
    assert driver.execute_script("return sessionStorage.getItem('freecall-token')") == a.token()
    alice = phone(baresip, a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, b, "bob", USERS_B["bob"], "b.test", 880)
    wait_until(lambda: "alice" in driver.find_element(By.ID, "registrations").text, 10,
               message="alice in the registrations table")
    wait_until(lambda: "b.test" in driver.find_element(By.ID, "peers").text, 20,
               message="node B in the peers table")

    alice.dial("sip:bob@b.test")
    alice.wait_event("CALL_ESTABLISHED", 10)
    bob.wait_event("CALL_ESTABLISHED", 5)

    def secure() -> dict[str, Any] | None:
        calls = [c for c in a.api("GET", "/api/calls") if c["state"] == "active"]
        return calls[0] if calls and calls[0]["security"]["state"] == "secure" else None

    call = wait_until(secure, 10, message="the call to be secure")
    sas = call["security"]["sas"]
    # the live call, secure but not verified, with the SAS to read aloud
    shown = wait_until(lambda: (s := card_state(driver, call["id"])) and s[1] == "unverified"
                       and s, 10, message="the card to show the unverified call")
    assert shown[0] == "active"
    assert "Secure, not verified" in shown[2] and sas in shown[2]
    assert "sip:alice@a.test → sip:bob@b.test" in shown[2]
    wait_until(lambda: "packets in 0," not in (card_state(driver, call["id"]) or ("", "", ""))[2],
               10, message="packet counters to move")
    time.sleep(0.3)
    driver.save_screenshot(str(shots / "1-secure-unverified.png"))
    # "The words match": verified, in the API and on the page
    click(driver, call["id"], "button.confirm")
    wait_until(lambda: (card_state(driver, call["id"]) or ("", "", ""))[1] == "verified", 10,
               message="the card to show the call verified")
    assert a.api("GET", f"/api/calls/{call['id']}")["security"]["verification"] == "verified"
    driver.save_screenshot(str(shots / "2-secure-verified.png"))
    # "Hang up": both phones hear the end, the card says so
    click(driver, call["id"], "button.hangup")
    alice.wait_event("CALL_CLOSED", 5)
    bob.wait_event("CALL_CLOSED", 5)
    ended = wait_until(lambda: (s := card_state(driver, call["id"])) and s[0] == "ended" and s,
                       10, message="the card to show the call ended")
    assert "hung up from the control api" in ended[2].lower()
    assert driver.find_elements(By.ID, "no-live")
    assert not driver.find_elements(By.CSS_SELECTOR, "button.hangup")
    driver.save_screenshot(str(shots / "3-ended.png"))
    assert (shots / "1-secure-unverified.png").stat().st_size > 10_000


def test_the_page_asks_for_a_token_and_refuses_a_wrong_one(
    harness: Harness, browser: webdriver.Chrome, shots: Path
) -> None:
    node = harness.daemon("solo", users={"carol": "pw"}, start=False)
    harness.started.append(node)
    node.start(wait_control=True)
    driver = browser
    driver.get(f"{node.control_url}/")
    form = wait_until(lambda: driver.find_element(By.ID, "login").is_displayed()
                      and driver.find_element(By.ID, "token"), 10, message="the sign-in form")
    form.send_keys("not-the-token")
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait_until(lambda: "wrong or missing token" in driver.find_element(By.ID, "login").text, 10,
               message="the refusal")
    driver.find_element(By.ID, "token").send_keys(node.token())
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait_until(lambda: driver.find_element(By.ID, "main").is_displayed()
               and "carol" not in driver.find_element(By.ID, "login").text
               and driver.find_element(By.ID, "live").text == "live", 10,
               message="the dashboard after signing in")
    driver.save_screenshot(str(shots / "0-idle.png"))
