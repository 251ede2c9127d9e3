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


def test_lan_3_comes_up_answers_and_goes_down() -> None:
    toml = str(ROOT / "peers" / "lan-3.toml")
    try:
        up = run_testbed("up", toml)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "lan-3 up (3 hosts" in up.stdout
        answer = run_testbed("ask", toml, "What is the capital of France? Answer in one sentence.")
        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout
    finally:
        down = run_testbed("down", toml)
    assert down.returncode == 0 and down.stdout.strip() == "down", down.stdout + down.stderr
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "mstb" not in ns
    assert not list(Path("/sys/fs/cgroup/cpu").glob("mstb*"))
