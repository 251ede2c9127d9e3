"""Passes of a few rows with the forms chosen at load, padded where chosen and not.

One process, one thread, SmolLM2-135M float32, the shard of units [17, 32) (14 decoder layers
and the head: lan-3's laptop, the 2-peer mesh's second peer). Its products' forms are chosen
as at load (products.py), which pads a row count to a larger one where that count's products
run clearly faster. Then decode passes of 1 to 9 rows (sessions of 24 positions), the thread's
CPU time, best of 4, in turns: the chosen forms, and the same forms with no count padded.
Repeated `--rounds` times, every round printed.

    python tools/bench_padded.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
from bench_chain import embedded_model  # noqa: E402
from bench_forms import KINDS, letters, sessions, timed_pass  # noqa: E402
from bench_layers import all_products  # noqa: E402

from meshshard.model import products as P  # noqa: E402
from meshshard.model.shard import Shard  # noqa: E402

ROW_COUNTS = range(1, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shard = Shard.load(embedded_model(), 17, 32)
    layers = [f for f in shard._fused if f is not None]
    products = all_products(shard)
    chosen = [p.pads for p in products]
    print(f"forms for rows {P.ROWS} (l linear, b blocked, p parts, t turned; padded to), layer 0:")
    for label, attr in KINDS.items():
        p = getattr(layers[0], attr)
        print(f"  {label:<8} {letters(p.forms)}  {' '.join(str(n or '-') for n in p.pads)}")
    head = shard.lm_head.product
    print(f"  {'head':<8} {letters(head.forms)}  {' '.join(str(n or '-') for n in head.pads)}")
    print("a decode pass of k rows, ms of CPU, best of 4 (padded as chosen | never padded: ratio)")
    print("rows  " + "  ".join(f"{'round ' + str(r + 1):>21}" for r in range(args.rounds)))
    took: dict[int, list[tuple[float, float]]] = {k: [] for k in ROW_COUNTS}
    for _ in range(args.rounds):
        for rows in ROW_COUNTS:
            with sessions(shard, rows) as names:
                timed_pass(shard, names)  # the sessions' first pass pays for their caches
                best = {"padded": float("inf"), "plain": float("inf")}
                for _ in range(4):
                    for how in best:
                        for p, pads in zip(products, chosen, strict=True):
                            p.pads = pads if how == "padded" else (0,) * len(P.ROWS)
                        best[how] = min(best[how], timed_pass(shard, names))
            took[rows].append((best["padded"], best["plain"]))
    for rows, pairs in took.items():
        cells = [f"{a:5.1f} | {b:5.1f}: {a / b:4.2f}" for a, b in pairs]
        print(f"{rows:>4}  " + "  ".join(f"{c:>21}" for c in cells))


if __name__ == "__main__":
    main()
