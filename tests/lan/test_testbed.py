"""The namespace testbed comes up from its TOML, answers, and goes down leaving nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.netns import can_make_namespaces

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / "tools" / "testbed.py")]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(can_make_namespaces() is not None, reason=str(can_make_namespaces())),
]


def run_testbed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=timeout)


def ring_gives_one_process_tokens() -> None:
    """tools/ring.py's bare processes in lan-3's hosts (the hardware's bound the concurrency
    experiment compares one answer with) decode what one process does, the head split or not."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_layers import decode, load
    from ring import ring
    from testbed import Testbed

    tb = Testbed.load(ROOT / "peers" / "lan-3.toml")
    stages = [("desk", 0, 17), ("laptop", 17, 32)]
    _, want = decode([load(0, 32, "fused")], 8)
    for head in (0, 5_000):  # split, tokens 229 and 8083 come from either side's rows
        passes, per_token, fed = ring(tb, stages, head, tokens=8)
        assert len(passes) == 2 and per_token > 0
        assert len(fed) == 8 and fed[1:] == want[:7], (head, fed, want)


def test_lan_3_comes_up_answers_and_goes_down() -> None:
    toml = str(ROOT / "peers" / "lan-3.toml")
    try:
        up = run_testbed("up", toml)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "lan-3 up (3 hosts" in up.stdout
        answer = run_testbed("ask", toml, "What is the capital of France? Answer in one sentence.")
        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout
        ring_gives_one_process_tokens()
    finally:
        down = run_testbed("down", toml)
    assert down.returncode == 0 and down.stdout.strip() == "down", down.stdout + down.stderr
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "mstb" not in ns
    assert not list(Path("/sys/fs/cgroup/cpu").glob("mstb*"))
