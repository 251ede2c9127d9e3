"""The output head's cost by rows: torch's linear (x @ Wᵀ) against W @ xᵀ, on this CPU.

    python tools/bench_head.py [--threads 1] [--repeats 20]

The head (vocabulary 49152 x hidden 576 for SmolLM2) is the widest product a stage runs.
A batch of B decode steps asks it for B rows; the table shows what B rows cost each way and
the ratio to one row, which is what batching gains or loses at the last stage.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

VOCAB, HIDDEN = 49152, 576
ROWS = (1, 2, 3, 4, 8, 16)


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weight = torch.randn(VOCAB, HIDDEN)
    rows = {}
    for n in ROWS:
        x = torch.randn(n, HIDDEN)
        linear = timed(lambda x=x: torch.nn.functional.linear(x, weight), args.repeats)
        transposed = timed(lambda x=x: (weight @ x.T).T, args.repeats)
        rows[n] = (linear, transposed)
    one = rows[1][0]
    print(f"head {VOCAB} x {HIDDEN} float32, {args.threads} thread(s), median of {args.repeats}")
    head = ("rows", "linear ms", "vs 1 row", "W @ xT ms", "vs 1 row", "gain")
    print("{:>4} {:>10} {:>9} {:>10} {:>9} {:>6}".format(*head))
    for n, (linear, transposed) in rows.items():
        print(
            f"{n:>4} {linear:>10.2f} {linear / one:>9.2f} {transposed:>10.2f} "
            f"{transposed / one:>9.2f} {linear / transposed:>6.2f}"
        )


if __name__ == "__main__":
    main()
