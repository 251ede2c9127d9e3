"""Web pages in the user's real (headless Chromium) browser against a real peer's user API:
the dashboard works, while a page from another origin can neither change the plan, start an
answer nor read the status, and a DNS-rebinding name for loopback is refused outright."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from support.browser import browser_page
from support.procs import Peer, chain_of

pytestmark = pytest.mark.slow

PORT = 7970
EVIL_PORT = 7975  # another origin on the same machine: any site the user visits
# The rebinding name resolves to loopback, as an attacker's DNS would answer.
REBIND = "--host-resolver-rules=MAP rebind.test 127.0.0.1"
ATTACK = """async (api) => {
  const out = {};
  const json = JSON.stringify({use: "even"});
  // A "simple" request: sent without asking, its answer unreadable to the page.
  await fetch(api + "/plan", {method: "POST", mode: "no-cors", body: json}).catch(() => null);
  await fetch(api + "/v1/chat/completions", {method: "POST", mode: "no-cors",
    body: JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 8})})
    .catch(() => null);
  // With JSON the browser must ask first (a preflight), which the API does not grant.
  out.apply = await fetch(api + "/plan", {method: "POST", body: json,
    headers: {"Content-Type": "application/json"}}).then((r) => r.status, () => "blocked");
  out.status = await fetch(api + "/status").then((r) => r.text(), () => "blocked");
  return out;
}"""


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    with chain_of([Peer("solo", PORT, tmp_path, "--memory", "2GB", "--threads", "1")], 1) as one:
        yield one[0]


@pytest.fixture
def evil_site() -> Iterator[str]:
    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html><body>a page the user happens to visit</body></html>")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", EVIL_PORT), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{EVIL_PORT}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def page() -> Iterator[Page]:
    with browser_page(REBIND) as page:
        yield page


def test_only_the_apis_own_pages_drive_it(peer: Peer, evil_site: str, page: Page) -> None:
    before = peer.status()
    assert before is not None
    # The dashboard, from the API's own origin: live, and it applies a plan.
    page.goto(peer.url + "/")
    expect(page.locator("#live")).to_have_text("live", timeout=20_000)
    applied = page.evaluate(
        """() => fetch("/plan", {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify({use: "planner"})}).then((r) => r.status)"""
    )
    assert applied == 200
    own = peer.status()
    assert own is not None and own["plan"]["reason"].startswith("operator")
    # A page from another origin tries everything a page can.
    page.goto(evil_site)
    out = page.evaluate(ATTACK, peer.url)
    assert out == {"apply": "blocked", "status": "blocked"}
    after = peer.status()
    assert after is not None
    assert after["epoch"] == own["epoch"], "a foreign page changed the plan"
    assert after["origin"]["tokens_out"] == before["origin"]["tokens_out"], "it started an answer"
    # DNS rebinding: our own address under the attacker's name is refused, reading included.
    api_port = peer.url.rsplit(":", 1)[1]
    response = page.goto(f"http://rebind.test:{api_port}/status")
    assert response is not None and response.status == 403
    assert "does not answer to the host 'rebind.test'" in page.content()
    # And no page may frame the dashboard.
    with urllib.request.urlopen(peer.url + "/", timeout=10) as resp:
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
