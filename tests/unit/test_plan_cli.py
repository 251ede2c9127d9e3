"""`meshshard plan` as a user runs it, on every instance shipped in peers/."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshshard.planner.cost import SESSIONS

PEERS = sorted((Path(__file__).resolve().parents[2] / "peers").glob("*.*"))
# Testbeds for tools/testbed.py (hosts, not devices) live beside the planner instances.
TESTBEDS = [p for p in PEERS if p.suffix == ".toml" and "[[hosts]]" in p.read_text()]
INSTANCES = [p for p in PEERS if p.suffix in (".json", ".toml") and p not in TESTBEDS]


def meshshard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshshard", *args], capture_output=True, text=True, timeout=120
    )


def test_peers_holds_the_papers_testbed_and_the_demo() -> None:
    names = {p.name for p in INSTANCES}
    assert {"paper-llama2-7b.json", "paper-llama2-70b.json", "local-demo.json"} <= names
    assert any(p.suffix == ".toml" for p in INSTANCES)


@pytest.mark.parametrize("path", INSTANCES, ids=lambda p: p.name)
@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_plan_json_is_the_design_format(path: Path, objective: str) -> None:
    result = meshshard("plan", str(path), "--objective", objective, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert set(plan) == {"objective", "stages", "latency_ms", "bottleneck_ms", "tokens_per_s"}
    assert plan["objective"] == objective
    stages = plan["stages"]
    assert stages[0]["start"] == 0
    assert all(a["end"] == b["start"] for a, b in itertools.pairwise(stages))
    assert len({s["device"] for s in stages}) == len(stages)
    # Tokens/s with 8 answers in flight: the busiest stage or link, or 8 tokens going round.
    per_token = max(plan["bottleneck_ms"], plan["latency_ms"] / SESSIONS)
    assert plan["tokens_per_s"] == pytest.approx(1000 / per_token, rel=1e-3)


@pytest.mark.parametrize("path", INSTANCES, ids=lambda p: p.name)
def test_plan_table_and_comparison(path: Path) -> None:
    table = meshshard("plan", str(path))
    assert table.returncode == 0, table.stderr
    assert "objective latency (exact)" in table.stdout and "return" in table.stdout
    compare = meshshard("plan", str(path), "--compare")
    assert compare.returncode == 0, compare.stderr
    for method in ("ours (latency)", "ours (throughput)", "edge-solo", "cloud-edge-even",
                   "cloud-edge-opt", "edgeshard-latency", "edgeshard-throughput", "even",
                   "memory-weighted"):  # fmt: skip
        assert method in compare.stdout


def test_slow_server_link_changes_the_plan() -> None:
    root = Path(__file__).resolve().parents[2] / "peers"
    fast = json.loads(meshshard("plan", str(root / "paper-llama2-7b.json"), "--json").stdout)
    slow_run = meshshard("plan", str(root / "paper-llama2-7b-slow-server.json"), "--json")
    slow = json.loads(slow_run.stdout)
    assert fast["stages"][1]["device"] == "rtx3090-0"  # straight from the source to the GPU
    assert slow["stages"][1]["device"] != "rtx3090-0"  # around the 10 Mbit/s link
    assert slow["latency_ms"] > fast["latency_ms"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read"),
        ("{not json", "not valid JSON"),
        ('{"units": [{"name": "a", "mem": -5}], "devices": [], "source": "x"}', "non-negative"),
        (
            '{"units": [{"name": "a", "mem": 1}], "devices": [{"name": "d", "mem": 1, "ms": [1]}],'
            ' "source": "nobody"}',
            "unknown source",
        ),
        (
            '{"units": [{"name": "a", "mem": 9}], "devices": [{"name": "d", "mem": 1, "ms": [1]}],'
            ' "source": "d"}',
            "does not fit",
        ),
    ],
)
def test_bad_instances_are_one_line_and_exit_2(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "instance.json"
    if content is not None:
        path.write_text(content)
    result = meshshard("plan", str(path))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_plan_and_help_do_not_import_torch() -> None:
    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from meshshard.cli import cli\n"
        "r = CliRunner().invoke(cli, ['plan', sys.argv[1], '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    path = Path(__file__).resolve().parents[2] / "peers" / "local-demo.json"
    out = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_approximate_mode_says_so_with_its_bound() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    from bench_planner import random_mesh

    from meshshard.planner import evaluate, solve

    inst = random_mesh(20, 12, seed=3)
    plan = solve(inst, "latency")
    assert not plan.exact and plan.bound >= 1.0
    assert plan.to_json()["approximate"]["bound"] == round(plan.bound, 4)
    assert evaluate(inst, plan.stages).latency_ms == pytest.approx(plan.cost.latency_ms)


@pytest.mark.parametrize("path", TESTBEDS, ids=lambda p: p.name)
def test_a_testbed_is_not_taken_for_an_instance(path: Path) -> None:
    out = meshshard("plan", str(path))
    assert out.returncode == 2 and "is a testbed" in out.stderr
