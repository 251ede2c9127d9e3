"""Time lost to churn: from `kill -9` of a stage to the next token at the caller.

    python tools/bench_churn.py [--repeats 3]

Four real peers on loopback (300 MB each, so a chain takes three and one is spare). A greedy
answer streams from the coordinator; after ten tokens a middle stage is killed. Reported: the
longest gap between two tokens (the stall the kill caused) and, for reference, the median gap.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.procs import Peer, wait_for  # noqa: E402

PROMPT = "Tell me a long story about a lighthouse keeper and a storm."


def once(base: int, logs: Path) -> tuple[float, float]:
    peers = [
        Peer(f"churn-{c}", base + i, logs, "--memory", "300MB", "--threads", "1", timings="lan")
        for i, c in enumerate("abcd")
    ]
    try:
        for p in peers:
            p.start()

        def ready() -> bool:
            s = peers[0].status()
            return bool(s and s["chain_ready"] and len(s["plan"]["stages"]) == 3)

        wait_for(ready, 180, "a 3-stage chain", 0.2)
        time.sleep(2)
        status = peers[0].status()
        assert status is not None
        by_name = {p.name: p for p in peers}
        stages = status["plan"]["stages"]
        origin, victim = by_name[stages[0]["device"]], by_name[stages[1]["device"]]
        arrivals: list[float] = []
        body = {
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 80,
            "temperature": 0,
            "stream": True,
        }

        def stream() -> None:
            req = urllib.request.Request(
                origin.url + "/v1/chat/completions",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=300) as resp:
                for raw in resp:
                    if b'"content"' in raw:
                        arrivals.append(time.monotonic())

        thread = threading.Thread(target=stream)
        thread.start()
        wait_for(lambda: len(arrivals) >= 10, 120, "ten tokens", 0.005)
        victim.kill()
        thread.join(300)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        return max(gaps), statistics.median(gaps)
    finally:
        for p in peers:
            p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    stalls, normal = [], []
    with tempfile.TemporaryDirectory() as logs:
        for i in range(args.repeats):
            stall, gap = once(7900 + 10 * i, Path(logs))
            stalls.append(stall)
            normal.append(gap)
    print(f"4 peers on loopback, lan timings, kill -9 of the middle stage, {args.repeats} runs")
    print(f"{'measure':<40} {'min':>6} {'median':>7} {'max':>6}")
    for name, xs in (
        ("kill -9 to the next token (s)", stalls),
        ("normal gap between tokens (s)", normal),
    ):
        print(f"{name:<40} {min(xs):>6.2f} {statistics.median(xs):>7.2f} {max(xs):>6.2f}")


if __name__ == "__main__":
    main()
