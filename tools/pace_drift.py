"""Answers back to back on a testbed: how far the coordinator's prediction, priced at the
paces one round of answers measured, lands from the next round. Needs root.

Each round is one answer (`--sessions 1`: its ms a token) or that many at once (their
tokens/s while all decode), then each stage's passes (wall and CPU ms), the paces the peers
publish and what the coordinator predicts from them; at the end, each prediction against the
round after it. Nothing else runs between rounds but the status reads, and once (after the
third) the single process in the first host's share, as `experiments.py concurrency` runs
one between its warm-up answer and its first level. Peers decode one token per pass
(`--speculate 0`) unless told otherwise.

    python tools/pace_drift.py [--testbed lan-3] [--sessions 1] [--answers 7] [--speculate 0]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from experiments import ROOT, measure, predicted, settled, single
from testbed import Testbed, down, up, wait_ready

from meshshard.mesh.report import FLOW_SESSIONS

WITHIN = 0.15  # issue 19's bound on the flow prediction


def reading(tb: Testbed, sessions: int) -> tuple[float, dict[str, Any]]:
    """The coordinator's prediction now (one answer: ms a token; more: their tokens/s), and
    each member's [pace, batch pace]."""
    now = predicted(wait_ready(tb))
    value = now["latency_ms"] if sessions == 1 else now["tokens_per_s_at"][str(sessions)]
    return value, now["paces"]


def next_ratios(predictions: list[float], measured: list[float]) -> list[float]:
    """Each round's measure over the one predicted after the round before it.
    predictions: read once settled (no pace yet, left out), then after each round."""
    return [got / p for p, got in zip(predictions[1:], measured[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="lan-3")
    parser.add_argument("--sessions", type=int, default=1, choices=FLOW_SESSIONS)
    parser.add_argument("--answers", type=int, default=7, help="rounds")
    parser.add_argument("--speculate", type=int, default=0)
    args = parser.parse_args()
    os.environ["MESHSHARD_SPECULATE"] = str(args.speculate)  # peers inherit our environment
    n = args.sessions
    unit, key = ("ms a token", "per_token_ms") if n == 1 else ("tokens/s", "tokens_per_s")
    tb = Testbed.load(ROOT / "peers" / f"{args.testbed}.toml")
    try:
        up(tb, "latency")
        plan = settled(tb)["plan"]
        stages = " ".join(f"{s['device']}[{s['start']}:{s['end']})" for s in plan["stages"])
        print(f"{tb.name}, plan {stages}, head share {plan.get('head_share', 0.0)}, "
              f"--speculate {args.speculate}, {n} answer{'s' * (n > 1)} a round")  # fmt: skip
        pred, paces = reading(tb, n)
        print(f"settled: predicted {pred:.1f} {unit}; paces {paces}")
        measured, predictions = [], [pred]
        for k in range(args.answers):
            m = measure(tb, n, repeats=1)
            measured.append(m[key])
            pred, paces = reading(tb, n)
            predictions.append(pred)
            passes = ", ".join(
                f"{p['host']} {p['rows_per_pass']} rows {p['pass_ms']:.1f} ms "
                f"(cpu {p['cpu_ms']:.1f})"
                for p in m["stages"]
            )
            print(f"round {k}: {m[key]:.1f} {unit}; {passes}; then predicted {pred:.1f}, "
                  f"paces {paces}")  # fmt: skip
            if k == 2:
                print(f"the single process in {tb.hosts[0].name}'s share: "
                      f"{single(tb, 0):.1f} tokens/s")  # fmt: skip
    finally:
        down(tb)
    ratios = next_ratios(predictions, measured)
    near = sum(abs(r - 1) <= WITHIN for r in ratios)
    print(f"each round's {unit} over the one predicted after the round before it: "
          + ", ".join(f"{r:.2f}" for r in ratios)
          + f"; within {WITHIN:.0%}: {near} of {len(ratios)}")  # fmt: skip


if __name__ == "__main__":
    main()
