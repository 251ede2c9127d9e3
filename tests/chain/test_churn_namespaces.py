"""The crash test on three hosts in network namespaces joined by a bridge: a stage is killed
mid-answer and the answer, asked with `meshshard ask` on the origin's host, is unchanged."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.netns import Bridge, can_make_namespaces
from support.procs import ROOT, Peer, wait_for, wait_for_chain
from support.reference import greedy_answer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(can_make_namespaces() is not None, reason=str(can_make_namespaces())),
]

PROMPT = "Tell me a long story about a lighthouse keeper and a storm."
NEW = 64


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[Peer]]:
    net = Bridge(3).up()
    # 400 MB each: the model needs two of them, so any one may die.
    peers = [
        Peer(
            f"host-{i}",
            7117,
            tmp_path,
            "--memory",
            "400MB",
            "--threads",
            "1",
            host=net.address(i),
            netns=name,
        ).start()
        for i, name in enumerate(net.hosts)
    ]
    try:
        yield peers
    finally:
        for p in peers:
            p.kill()
        net.down()
        assert net.leftovers() == []


def test_answer_survives_a_stage_killed_on_the_namespace_testbed(hosts: list[Peer]) -> None:
    peers = hosts
    want = greedy_answer(PROMPT, NEW)
    try:
        wait_for_chain(peers[0], 2, timeout=240)
    except AssertionError:
        raise AssertionError("\n\n".join(p.tail() for p in peers)) from None
    status = peers[0].status()
    assert status is not None
    by_name = {p.name: p for p in peers}
    stages = status["plan"]["stages"]
    origin, victim = by_name[stages[0]["device"]], by_name[stages[-1]["device"]]
    assert origin.netns is not None
    ask = subprocess.Popen(
        ["ip", "netns", "exec", origin.netns, sys.executable, "-m", "meshshard", "ask", PROMPT]
        + ["--peer", origin.url, "--max-tokens", str(NEW)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert ask.stdout is not None
        head = b""
        deadline = time.monotonic() + 120
        while len(head) < 40 and time.monotonic() < deadline:
            piece = ask.stdout.read1(64)  # type: ignore[attr-defined]
            if not piece:
                break
            head += piece
        assert len(head) >= 40, ask.stderr.read() if ask.stderr else head
        victim.kill()
        rest, err = ask.communicate(timeout=300)
    finally:
        ask.kill()
    assert ask.returncode == 0, err.decode()
    assert (head + rest).decode().strip() == want.strip()

    def replanned() -> bool:
        after = origin.status()
        return bool(
            after
            and after["chain_ready"]
            and victim.name not in {s["device"] for s in after["plan"]["stages"]}
        )

    wait_for(replanned, 30, "a plan without the dead host")
    after = origin.status()
    assert after is not None and after["origin"]["replays"] >= 1
