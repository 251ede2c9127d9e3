"""The dashboard in a real headless Chromium against a real 3-peer mesh on loopback: it shows
the members and the plan, follows a peer's death to the new plan, previews a plan, and streams
an answer. Screenshots go to artifacts/ for people to look at."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from support.browser import browser_page
from support.procs import ROOT, Peer, settled

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "artifacts"


@pytest.fixture
def peers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Peer]]:
    # 400 MB each: a chain needs two of the three, so one can die and the mesh replans.
    monkeypatch.setenv("MESHSHARD_LOG_FORMAT", "json")  # and the logs are for machines
    started = [
        Peer(f"peer-{c}", 7900 + i, tmp_path, "--memory", "400MB", "--threads", "1").start()
        for i, c in enumerate("abc")
    ]
    try:
        yield started
    finally:
        for p in started:
            p.kill()


@pytest.fixture
def page() -> Iterator[Page]:
    with browser_page(width=1400, height=1100) as page:
        yield page


def test_dashboard_follows_the_mesh(peers: list[Peer], page: Page) -> None:
    view = settled(peers)
    coordinator = next(p for p in peers if p.name == view["coordinator"])
    page.goto(coordinator.url + "/")

    # Three members and the plan in force, live.
    expect(page.locator("#live")).to_have_text("live", timeout=20_000)
    expect(page.locator("#members tbody tr.alive")).to_have_count(3, timeout=20_000)
    stages = [s["device"] for s in view["plan"]["stages"]]
    expect(page.locator("#chain .stage")).to_have_count(len(stages))
    for i, device in enumerate(stages):
        expect(page.locator("#chain .stage").nth(i)).to_contain_text(device)
    expect(page.locator("#coordinator")).to_have_text(coordinator.name)
    for idle in {p.name for p in peers} - set(stages):  # and why the others are not in it
        expect(page.locator(f"#leftout li[data-left-out='{idle}']")).to_contain_text(idle)
    ARTIFACTS.mkdir(exist_ok=True)

    # The chat box streams an answer through the mesh, piece by piece.
    page.evaluate(
        """() => { window.pieces = 0; new MutationObserver(() => window.pieces++)
                   .observe(document.getElementById('chat-output'),
                            {childList: true, characterData: true, subtree: true}); }"""
    )
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#chat-send")
    expect(page.locator("#chat-output")).to_have_attribute("data-done", "1", timeout=120_000)
    expect(page.locator("#chat-output")).to_contain_text("Paris")
    assert page.evaluate("window.pieces") > 3, "the answer arrived at once, not streamed"
    expect(page.locator("#meas-ms")).not_to_have_text("-", timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "dashboard-3-peers.png"), full_page=True)

    # A preview without one stage's device plans around it and applies nothing.
    left = next(p for p in peers if p.name in stages and p is not coordinator)
    epoch = page.locator("#epoch").inner_text()
    page.check(f"#preview-exclude input[value='{left.name}']")
    page.click("#preview-btn")
    expect(page.locator("#preview-result")).to_contain_text("not applied", timeout=10_000)
    expect(page.locator("#preview-result")).not_to_contain_text(left.name)
    expect(page.locator("#epoch")).to_have_text(epoch)

    # A stage's peer dies: the page shows it dead, the new plan without it, and why.
    now = coordinator.status()
    assert now is not None
    in_force = {s["device"] for s in now["plan"]["stages"]}
    victim = next(p for p in peers if p.name in in_force and p is not coordinator)
    victim.kill()
    row = page.locator(f"#members tbody tr[data-member='{victim.name}']")
    expect(row).to_have_class(re.compile(r"\bdead\b"), timeout=30_000)
    expect(page.locator("#chain")).not_to_contain_text(victim.name, timeout=60_000)
    expect(page.locator("#chain .stage").first).to_be_visible()
    expect(page.locator("#events")).to_contain_text(re.compile(rf"{victim.name} \w+ -> dead"))
    replanned = re.compile(rf"plan epoch .*\({victim.name} (gone|suspect)\)")
    expect(page.locator("#events")).to_contain_text(replanned)
    page.screenshot(path=str(ARTIFACTS / "dashboard-after-death.png"), full_page=True)

    # The same numbers for machines.
    with urllib.request.urlopen(coordinator.url + "/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert re.search(r"^meshshard_tokens_generated_total [1-9]", metrics, re.M), metrics
    assert re.search(r'^meshshard_membership_changes_total\{state="dead"\} [1-9]', metrics, re.M)
    assert re.search(r'^meshshard_stage_step_seconds_count\{phase="decode"\} [1-9]', metrics, re.M)

    # One JSON object per log line; state changes name the node and the plan epoch.
    lines = [json.loads(line) for line in coordinator.log.read_text().splitlines()]
    changes = [x for x in lines if "node" in x]
    assert any(x["kind"] == "plan" and x["epoch"] != "-" for x in changes)
    assert any(f"{victim.name} " in x["msg"] and "dead" in x["msg"] for x in changes)
    assert all(x["node"] == coordinator.name for x in changes)
