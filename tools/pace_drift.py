"""Lone answers back to back on a testbed: how far the coordinator's prediction, priced at
the paces measured by one answer, lands from the next answer. Needs root.

Each answer's ms a token and each stage's passes (wall and CPU ms), then the paces the
peers publish and the ms a token the coordinator predicts from them; at the end, each
prediction against the answer after it. Nothing else runs between answers but the status
reads, and once (after the third) the single process in the first host's share, as
`experiments.py concurrency` runs one between its warm-up answer and its first level.
Peers decode one token per pass (`--speculate 0`) unless told otherwise.

    python tools/pace_drift.py [--testbed lan-3] [--answers 7] [--speculate 0]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from experiments import ROOT, measure, predicted, settled, single
from testbed import Testbed, down, up, wait_ready

WITHIN = 0.15  # issue 19's bound on the flow prediction


def reading(tb: Testbed) -> tuple[float, dict[str, Any]]:
    """The coordinator's ms a token for one answer now, and each member's [pace, batch pace]."""
    now = predicted(wait_ready(tb))
    return now["latency_ms"], now["paces"]


def next_ratios(predictions: list[float], measured: list[float]) -> list[float]:
    """Each answer's ms a token over the one predicted after the answer before it.
    predictions: read once settled (no pace yet, left out), then after each answer."""
    return [got / p for p, got in zip(predictions[1:], measured[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="lan-3")
    parser.add_argument("--answers", type=int, default=7)
    parser.add_argument("--speculate", type=int, default=0)
    args = parser.parse_args()
    os.environ["MESHSHARD_SPECULATE"] = str(args.speculate)  # peers inherit our environment
    tb = Testbed.load(ROOT / "peers" / f"{args.testbed}.toml")
    try:
        up(tb, "latency")
        plan = settled(tb)["plan"]
        stages = " ".join(f"{s['device']}[{s['start']}:{s['end']})" for s in plan["stages"])
        print(f"{tb.name}, plan {stages}, head share {plan.get('head_share', 0.0)}, "
              f"--speculate {args.speculate}")  # fmt: skip
        pred, paces = reading(tb)
        print(f"settled: predicted {pred:.1f} ms a token; paces {paces}")
        measured, predictions = [], [pred]
        for k in range(args.answers):
            m = measure(tb, 1, repeats=1)
            measured.append(m["per_token_ms"])
            pred, paces = reading(tb)
            predictions.append(pred)
            passes = ", ".join(
                f"{p['host']} {p['pass_ms']:.1f} ms (cpu {p['cpu_ms']:.1f})" for p in m["stages"]
            )
            print(f"answer {k}: {m['per_token_ms']:.1f} ms a token; {passes}; then predicted "
                  f"{pred:.1f}, paces {paces}")  # fmt: skip
            if k == 2:
                print(f"the single process in {tb.hosts[0].name}'s share: "
                      f"{single(tb, 0):.1f} tokens/s")  # fmt: skip
    finally:
        down(tb)
    ratios = next_ratios(predictions, measured)
    near = sum(abs(r - 1) <= WITHIN for r in ratios)
    print("each answer's ms a token over the one predicted after the answer before it: "
          + ", ".join(f"{r:.2f}" for r in ratios)
          + f"; within {WITHIN:.0%}: {near} of {len(ratios)}")  # fmt: skip


if __name__ == "__main__":
    main()
