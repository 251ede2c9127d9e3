"""Time lost to churn: a stage killed (`kill -9`) or leaving gracefully (SIGTERM) mid-answer.

    python tools/bench_churn.py [--repeats 3]

Four real peers on loopback (300 MB each, so a chain takes three and one is spare). A greedy
answer streams from the coordinator; after ten tokens the middle stage is killed, or told to
leave. Reported per case: the longest gap between two tokens (the stall), that stall less the
median gap (the time the event added), and for a leave, how long the peer took to exit.
Targets: the next token within 3 s of a kill; a graceful leave adds under 0.5 s.
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

import plots  # noqa: E402
from support.procs import Peer, wait_for  # noqa: E402

PROMPT = "Tell me a long story about a lighthouse keeper and a storm."


def once(base: int, logs: Path, graceful: bool) -> tuple[float, float, float]:
    """(longest gap, median gap, seconds the victim took to exit) for one run."""
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
        started = time.monotonic()
        if graceful:
            victim.stop(timeout=60)
        else:
            victim.kill()
        exited = time.monotonic() - started
        thread.join(300)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        return max(gaps), statistics.median(gaps), exited
    finally:
        for p in peers:
            p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logs", type=Path, help="keep the peers' logs here")
    args = parser.parse_args()
    runs: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for i in range(args.repeats):
            for graceful in (False, True):
                base = 7900 + 20 * i + (10 if graceful else 0)
                runs[graceful].append(once(base, logs, graceful))
    print(f"4 peers on loopback, lan timings, the middle stage goes, {args.repeats} runs each")
    print(f"{'measure':<44} {'min':>6} {'median':>7} {'max':>6}")
    rows = []
    for graceful, name in ((False, "kill -9"), (True, "graceful leave")):
        stalls = [r[0] for r in runs[graceful]]
        added = [r[0] - r[1] for r in runs[graceful]]
        rows += [
            (f"{name}: longest gap between tokens (s)", stalls),
            (f"{name}: time added, gap less median (s)", added),
        ]
        if graceful:
            rows.append((f"{name}: SIGTERM to exit (s)", [r[2] for r in runs[graceful]]))
    rows.append(("normal gap between tokens (s)", [r[1] for r in runs[False] + runs[True]]))
    for name, xs in rows:
        print(f"{name:<44} {min(xs):>6.2f} {statistics.median(xs):>7.2f} {max(xs):>6.2f}")
    plots.spreads("churn", "A stage leaves mid-answer (min, median, max)", "seconds", rows)


if __name__ == "__main__":
    main()
