"""A product's cost by rows: torch's linear (x @ Wᵀ) against W @ xᵀ, on this CPU.

    python tools/bench_head.py [--threads 1] [--repeats 20]

For SmolLM2's output head (vocabulary 49152 x hidden 576), the widest product a stage runs,
and each matrix of a decoder layer (the MLP's 1536 x 576 and 576 x 1536, attention's
576 x 576 and 192 x 576). A batch of B decode steps asks each for B rows; the tables show
what B rows cost each way and the ratio to one row, which is what batching gains or loses.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

MATRICES = {
    "head": (49152, 576),
    "mlp gate/up": (1536, 576),
    "mlp down": (576, 1536),
    "attention q/o": (576, 576),
    "attention k/v": (192, 576),
}
ROWS = (1, 2, 3, 4, 6, 8, 16)


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
    for name, (out, inner) in MATRICES.items():
        table(name, torch.randn(out, inner), args.threads, args.repeats)


def table(name: str, weight: torch.Tensor, threads: int, repeats: int) -> None:
    rows = {}
    for n in ROWS:
        x = torch.randn(n, weight.shape[1])
        linear = timed(lambda x=x: torch.nn.functional.linear(x, weight), repeats)
        transposed = timed(lambda x=x: (weight @ x.T).T, repeats)
        rows[n] = (linear, transposed)
    one = rows[1][0]
    out, inner = weight.shape
    print(f"{name} {out} x {inner} float32, {threads} thread(s), median of {repeats}")
    head = ("rows", "linear ms", "vs 1 row", "W @ xT ms", "vs 1 row", "gain")
    print("{:>4} {:>10} {:>9} {:>10} {:>9} {:>6}".format(*head))
    for n, (linear, transposed) in rows.items():
        print(
            f"{n:>4} {linear:>10.3f} {linear / one:>9.2f} {transposed:>10.3f} "
            f"{transposed / one:>9.2f} {linear / transposed:>6.2f}"
        )


if __name__ == "__main__":
    main()
