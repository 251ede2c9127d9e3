"""Mesh formation and failure detection with real `meshshard up` processes on loopback.

    python tools/bench_mesh.py [--repeats 3] [--timings lan|test]

Starts three peers bound to 127.0.0.1 (mDNS stays on loopback) and reports, over repeats:
the time from the last peer's start until all three show the same members, coordinator and
plan epoch; and the time from `kill -9` of a planned peer until every survivor marks it dead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import plots  # noqa: E402
from support.procs import Peer, wait_for, wait_for_agreement  # noqa: E402


def once(base: int, timings: str, logs: Path) -> tuple[float, float]:
    peers = [
        Peer(name, base + i, logs, "--memory", "400MB", timings=timings)
        for i, name in enumerate(["peer-a", "peer-b", "peer-c"])
    ]
    try:
        for p in peers:
            p.start()
        started = time.monotonic()
        view = wait_for_agreement(peers, 120, 0.05)
        formed = time.monotonic() - started
        used = {s["device"] for s in view["plan"]["stages"]}
        victim = next(p for p in peers if p.name in used and p.name != view["coordinator"])
        rest = [p for p in peers if p is not victim]
        victim.kill()

        def dead() -> bool:
            views = [p.status() for p in rest]
            return all(
                v is not None
                and any(m["id"] == victim.name and m["state"] == "dead" for m in v["members"])
                for v in views
            )

        detected = wait_for(dead, 30, "detection", 0.05)
        return formed, detected
    finally:
        for p in peers:
            p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timings", choices=["lan", "test"], default="lan")
    args = parser.parse_args()
    formed, detected = [], []
    with tempfile.TemporaryDirectory() as logs:
        for i in range(args.repeats):
            f, d = once(7400 + 10 * i, args.timings, Path(logs))
            formed.append(f)
            detected.append(d)
            time.sleep(1)
    print(f"3 peers on loopback, {args.timings} timings, {args.repeats} runs")
    print(f"{'measure':<44} {'min':>6} {'median':>7} {'max':>6}")
    for name, xs in (
        ("agreement after the last peer starts (s)", formed),
        ("kill -9 until every survivor marks it dead (s)", detected),
    ):
        print(f"{name:<44} {min(xs):>6.2f} {statistics.median(xs):>7.2f} {max(xs):>6.2f}")
    rows = [
        ("agreement after the last start", formed),
        ("kill -9 until all mark it dead", detected),
    ]
    plots.spreads("mesh", f"3 peers on loopback, {args.timings} timings", "seconds", rows)


if __name__ == "__main__":
    main()
