"""The console in a real browser (issue 11 item 3): Playwright drives Debian's Chromium
(never `playwright install`); skipped, loudly, when either is missing. Saves the
README's screenshots to docs/ops/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.system import System, magic_phone, running_system, unique_phone
from tests.support.tools import CHROMIUM, require, require_playwright

pytestmark = [pytest.mark.browser, pytest.mark.slow]

OPS_TOKEN = "ops-browser-token-abcdefghijkl"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "ops"
CHAIN = ["telegram", "whatsapp", "sms"]


@pytest.fixture(scope="module")
def system(pg_server_url: str, redis_url: str, template_db: str) -> Iterator[System]:
    with running_system(
        pg_server_url, redis_url, template=template_db, extra_env={"OPS_TOKENS": OPS_TOKEN}
    ) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(CHROMIUM, "chromium")
    require_playwright()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield launched
        finally:
            launched.close()


def test_a_person_signs_in_reads_the_overview_and_finds_a_fallback_chain(
    system: System, browser: Any
) -> None:
    # Given a run: three codes delivered by telegram, one after telegram's failure
    # callback by whatsapp, and one that every channel failed
    happy = [unique_phone() for _ in range(3)]
    fell_back, failing = magic_phone(1), magic_phone(1, 13, 1)
    ids = [
        system.api.post("/v1/messages", json={"to": to, "channels": CHAIN}).json()["id"]
        for to in [*happy, fell_back, failing]
    ]
    for message_id in ids:
        system.wait_final(message_id)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        # When a person opens the console, they are asked to sign in
        page.goto(f"{system.web_url}/ops")
        assert page.url.endswith("/ops/signin")
        page.fill("#token", OPS_TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(f"{system.web_url}/ops")

        # Then the overview's last hour matches what the run sent, per channel
        hour = page.locator("[data-test=window-1]")

        def cell(channel: str, column: str) -> str:
            row = hour.locator(f"tr[data-channel={channel}]")
            text: str = row.locator(f"[data-test={column}]").inner_text()
            return text

        assert cell("telegram", "attempts") == "5"
        assert cell("telegram", "delivered") == "3"
        assert cell("telegram", "failed") == "2"
        assert cell("telegram", "fallback_rate") == "40%"
        assert cell("whatsapp", "attempts") == "2"
        assert cell("whatsapp", "delivered") == "1"
        assert cell("sms", "attempts") == "1"
        assert cell("sms", "failed") == "1"
        assert page.locator("[data-test=queue-depth]").inner_text() == "0"
        assert page.locator("[data-test=latest-failed] tbody tr").count() == 1
        assert fell_back not in page.content() and failing not in page.content()
        page.screenshot(path=str(SHOTS / "console-overview.png"), full_page=True)

        # When they look a message up by its full recipient
        page.click("text=Lookup")
        page.fill("#q", fell_back)
        page.click("form.search button")
        # Then they see its fallback chain, recipient masked
        message = page.locator("[data-test=message]").first
        assert message.locator("[data-test=message-status]").inner_text() == "delivered"
        assert message.locator("[data-test=recipient]").inner_text() == "+7999***0000"
        attempts = message.locator("[data-test=attempt]")
        assert attempts.count() == 2
        assert [attempts.nth(i).get_attribute("data-channel") for i in range(2)] == [
            "telegram", "whatsapp",
        ]
        assert [attempts.nth(i).locator("[data-test=attempt-status]").inner_text()
                for i in range(2)] == ["failed", "delivered"]
        fallbacks = message.locator("[data-test=fallbacks]").inner_text()
        assert "telegram → whatsapp" in fallbacks and "failure callback" in fallbacks
        assert fell_back not in page.content()
        page.screenshot(path=str(SHOTS / "console-lookup.png"), full_page=True)

        # When they sign out, Then the console asks for the token again
        page.click("text=Sign out")
        page.wait_for_url(f"{system.web_url}/ops/signin")
        page.goto(f"{system.web_url}/ops")
        assert page.url.endswith("/ops/signin")
    finally:
        page.close()
