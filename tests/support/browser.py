"""Debian's Chromium, headless, for tests of pages in a real browser (Playwright's own
browser download needs a hub this machine cannot reach)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# Chromium's own background traffic is refused by this closed network: keep it quiet.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def browser_page(*flags: str, width: int = 1280, height: int = 900) -> Iterator[Page]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*FLAGS, *flags])
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()
