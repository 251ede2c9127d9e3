"""A slow host's own event-loop stalls while it sets up: with garbage collection as it was,
and as peers run now (collector paused for setup work, imports frozen out of it).

    python tools/bench_stalls.py [--cpu 0.15] [--json FILE]     # needs root (a cgroup)

Each mode runs in a fresh process under a cgroup v1 CPU quota (the testbed's: 0.15 of a core
is its phone). The process's event loop runs the watch peers run (`meshshard.stalls`: a 50 ms
tick; a stall is a tick late by `--threshold`), while the model thread does what a peer does
at start: import the model's code, load the tokenizer, profile the device (afresh, into a
temporary folder) and load a shard. Prints, per mode and step, the step's time and the
stalls during it; a peer's probes go unanswered for each stall's length (a suspicion starts
after 0.2 s unanswered, on LAN timings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GROUP = Path("/sys/fs/cgroup/cpu/mstb-stalls")
MODES = {
    "collected": "the collector on throughout (before)",
    "paused": "setup with the collector paused, imports frozen (now)",
}


async def child(mode: str, threshold: float) -> dict[str, Any]:
    import torch

    from meshshard.chain.worker import run_imports, run_model, run_setup
    from meshshard.config import Config
    from meshshard.model.profile import cached_quick_profile
    from meshshard.model.shard import Shard, import_code
    from meshshard.model.source import resolve_model
    from meshshard.model.text import TextCodec
    from meshshard.stalls import StallWatch

    config = Config()
    model_dir = resolve_model(config.model, config.cache_dir)
    placement = config.placement()
    stalls: list[tuple[float, float]] = []  # (when it ended, its length)

    class Recorded(StallWatch):
        def observe(self, late: float) -> None:
            super().observe(late)
            if late >= self.threshold:
                stalls.append((time.monotonic(), late))

    watcher = asyncio.create_task(Recorded(threshold).run(asyncio.sleep))
    setup, imports = (run_setup, run_imports) if mode == "paused" else (run_model, run_model)
    steps = []
    with tempfile.TemporaryDirectory() as folder:
        work: list[tuple[str, Any, Any, tuple[Any, ...]]] = [
            ("import the model's code", imports, import_code, (model_dir,)),
            ("load the tokenizer", setup, TextCodec.load, (model_dir,)),
            ("profile the device", setup, cached_quick_profile,
             (model_dir, placement, Path(folder))),
            ("load units 14..30", setup, Shard.load,
             (model_dir, 14, 31, torch.float32, "cpu", "none")),
        ]  # fmt: skip
        for name, runner, fn, args in work:
            start = time.monotonic()
            await runner(fn, *args)
            await asyncio.sleep(0.5)  # a collection may come just after
            end = time.monotonic()
            during = [round(late, 2) for t, late in stalls if start <= t <= end]
            steps.append({"step": name, "seconds": round(end - start - 0.5, 1), "stalls_s": during})
    watcher.cancel()
    return {"mode": mode, "steps": steps}


def run_limited(mode: str, cpu: float, threshold: float) -> dict[str, Any]:
    GROUP.mkdir(exist_ok=True)
    period = max(4_000, round(1_000 / cpu))  # as tools/testbed.py sets them
    (GROUP / "cpu.cfs_period_us").write_text(str(period))
    (GROUP / "cpu.cfs_quota_us").write_text(str(round(cpu * period)))
    cmd = [sys.executable, __file__, "--child", mode, "--threshold", str(threshold)]
    enter = f'echo $$ > {GROUP}/cgroup.procs && exec "$@"'
    out = subprocess.run(
        ["sh", "-c", enter, "sh", *cmd], capture_output=True, text=True, check=True, cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", type=float, default=0.15, help="cores the process may use")
    parser.add_argument("--threshold", type=float, default=0.2, help="seconds late to count")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.threshold))))
        return
    if os.geteuid() != 0:
        sys.exit("bench_stalls: needs root (a cgroup of its own)")
    runs = []
    try:
        for mode in MODES:
            runs.append(run_limited(mode, args.cpu, args.threshold))
    finally:
        GROUP.rmdir()
    print(f"{args.cpu} of a core; stalls of {args.threshold} s or more of the event loop")
    print(f"{'mode':<55} {'step':<24} {'s':>6}  stalls (s)")
    for run in runs:
        for step in run["steps"]:
            stalls = ", ".join(f"{s:.2f}" for s in step["stalls_s"]) or "-"
            print(f"{MODES[run['mode']]:<55} {step['step']:<24} {step['seconds']:>6.1f}  {stalls}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": args.cpu, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
