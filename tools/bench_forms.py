"""How the forms of a few rows' products are chosen, and what the choice costs a pass.

One process, one thread, SmolLM2-135M float32, the shard of units [17, 32) (14 decoder layers
and the head: lan-3's laptop, the 2-peer mesh's second peer). The forms are chosen (products.py)
in turns the way they were (over 8 MB of each shape's matrices, timed by the wall clock, 3 runs)
and the way they are (SWEEP_BYTES, the thread's CPU time, RUNS), a few times each; then passes
of 3 to 8 rows (sessions of 24 positions) are timed with every set of choices, in turns, the
thread's CPU time, best of 6. Last, blocked over linear for each shape's products of 4-8 rows,
timed over 8 MB of its matrices and over all 14 layers' (as a pass reads them).

    python tools/bench_forms.py [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
from bench_chain import embedded_model  # noqa: E402
from bench_layers import all_products  # noqa: E402

from meshshard.model import fused  # noqa: E402
from meshshard.model import products as P  # noqa: E402
from meshshard.model.shard import Shard  # noqa: E402

OLD_SWEEP, OLD_RUNS = 8 * 2**20, 3
POSITIONS = 24  # each timed pass's sessions hold this many positions before it
KINDS = {"qkv": "qkv", "gate/up": "gate_up", "o": "o", "down": "down"}  # label: attribute


def wall(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_ms(fn: Callable[[], object], runs: int = 5) -> float:
    took = []
    for _ in range(runs):
        start = time.thread_time()
        fn()
        took.append(time.thread_time() - start)
    return min(took) * 1000


@contextmanager
def sessions(shard: Shard, rows: int) -> Iterator[list[str]]:
    """`rows` sessions of POSITIONS positions on the shard, for timed_pass; dropped after."""
    names = [f"r{rows}s{i}" for i in range(rows)]
    for n in names:
        shard.prefill(n, torch.randn(POSITIONS, shard.spec.hidden_size), logits=1)
    try:
        yield names
    finally:
        for n in names:
            shard.drop(n)


def timed_pass(shard: Shard, names: list[str]) -> float:
    """One decode pass of the sessions `names`, each cut back to POSITIONS first: ms of the
    thread's CPU."""
    for n in names:
        shard.truncate(n, POSITIONS)
    xs = [torch.randn(1, shard.spec.hidden_size) for _ in names]
    start = time.thread_time()
    shard.decode_batch(names, xs, [1] * len(names))
    return (time.thread_time() - start) * 1000


def letters(forms: tuple[str, ...]) -> str:
    return "".join(f[0] for f in forms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shard = Shard.load(embedded_model(), 17, 32)
    layers = [f for f in shard._fused if f is not None]
    products = all_products(shard)
    new = (P.SWEEP_BYTES, P._seconds, P.RUNS)

    def choose(sweep: int, timer: P.Timer, runs: int) -> tuple[list[tuple[str, ...]], float]:
        P._chosen.clear()
        P.SWEEP_BYTES, P.RUNS = sweep, runs
        start = time.perf_counter()
        fused.choose_products(layers, timer)
        P.choose([shard.lm_head.product], P.FORMS, timer)  # as Shard.load's head
        return [p.forms for p in products], time.perf_counter() - start

    print(f"forms for rows {P.ROWS} (l linear, b blocked, p parts, t turned), layer 0 and head")
    sets: dict[str, list[tuple[str, ...]]] = {}
    for trial in range(args.trials):
        for name, how in (("8 MB wall", (OLD_SWEEP, wall, OLD_RUNS)), ("now", new)):
            forms, took = choose(*how)
            sets[f"{name} #{trial + 1}"] = forms
            first = {k: letters(getattr(layers[0], v).forms) for k, v in KINDS.items()}
            head = letters(shard.lm_head.product.forms)
            print(f"{name + ' #' + str(trial + 1):<13} chosen in {took:.2f} s: "
                  + " ".join(f"{k} {v}" for k, v in first.items()) + f" head {head}")  # fmt: skip
    P.SWEEP_BYTES, P.RUNS = new[0], new[2]
    print("a pass of k rows, ms of CPU (best of 6, every set in turns):")
    print(f"{'rows':>4}  " + "  ".join(f"{k:>13}" for k in sets))
    for rows in (3, 4, 6, 7, 8):
        took: dict[str, list[float]] = {k: [] for k in sets}
        with sessions(shard, rows) as names:
            for _ in range(6):
                for key, forms in sets.items():
                    for p, f in zip(products, forms, strict=True):
                        p.forms = f
                    took[key].append(timed_pass(shard, names))
        print(f"{rows:>4}  " + "  ".join(f"{min(v):>13.1f}" for v in took.values()))
    print("blocked/linear time, each shape's products, over 8 MB of its matrices | all 14 layers':")
    for label, attr in KINDS.items():
        same = [getattr(f, attr) for f in layers]
        weight = same[0].weight
        few = same[: max(1, OLD_SWEEP // (weight.numel() * weight.element_size()))]
        line = []
        for rows in (4, 6, 8):
            x = torch.randn(rows, weight.shape[1])
            ratios = []
            for group in (few, same):
                linear = best_ms(partial(P._sweep, P.LINEAR, x, group))
                blocked = best_ms(partial(P._sweep, P.BLOCKED, x, group))
                ratios.append(blocked / linear)
            line.append(f"{rows} rows {ratios[0]:.2f} | {ratios[1]:.2f}")
        print(f"  {label:<8} " + ", ".join(line))


if __name__ == "__main__":
    main()
