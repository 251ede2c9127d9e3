"""oneDNN's prepacked weights against the forms products.py chooses, per product and per pass.

One process, one thread, SmolLM2-135M float32, the shard of units [17, 32) (14 decoder layers
and the head: lan-3's laptop, the 2-peer mesh's second peer), its forms chosen as at load.
oneDNN's linear reads W from a copy laid out for it once (torch.ops.mkldnn's reorder; one
layout serves every row count), where a BLAS product of a few rows repacks W on each call.

- each shape's products over all 14 layers' matrices (as a pass reads them from memory),
  ms of CPU a product: linear, the chosen form, oneDNN prepacked;
- whole decode passes of k rows (sessions of 24 positions), ms of CPU, the chosen forms
  against every product prepacked, in turns, best of 6;
- the most a prepacked product's output moves from the chosen form's, and from linear's own
  one row at a time.

The prepacked copy is held beside W (one row keeps W: prepacked, it ran slower here), so a
shard would hold its matrices twice.

    python tools/bench_packed.py
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_chain import embedded_model  # noqa: E402
from bench_forms import KINDS, best_ms, sessions, timed_pass  # noqa: E402
from bench_layers import all_products  # noqa: E402

from meshshard.model import products as P  # noqa: E402
from meshshard.model.shard import Shard  # noqa: E402

PRODUCT_ROWS = (1, 2, 4, 8, 16)
PASS_ROWS = (1, 2, 3, 4, 6, 8, 12, 16)


def prepacked(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 8)


def through(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def main() -> None:
    torch.set_num_threads(1)
    shard = Shard.load(embedded_model(), 17, 32)
    layers = [f for f in shard._fused if f is not None]
    packed = {id(p): prepacked(p.weight) for p in all_products(shard)}
    print("a product over all 14 layers' matrices (the head: its one), ms of CPU each, best of 5:")
    print(f"{'shape':<8} {'rows':>4} {'linear':>8} {'chosen':>8} {'prepacked':>9} {'ratio':>6}")
    groups = {k: [getattr(f, a) for f in layers] for k, a in KINDS.items()}
    groups["head"] = [shard.lm_head.product]
    for label, same in groups.items():
        for rows in PRODUCT_ROWS:
            x = torch.randn(rows, same[0].weight.shape[1])
            linear = best_ms(partial(P._sweep, P.LINEAR, x, same)) / len(same)
            chosen = best_ms(lambda x=x, same=same: [p(x) for p in same]) / len(same)
            ours = [packed[id(p)] for p in same]
            pre = best_ms(lambda x=x, ours=ours: [through(w, x) for w in ours]) / len(same)
            print(f"{label:<8} {rows:>4} {linear:>8.3f} {chosen:>8.3f} {pre:>9.3f} "
                  f"{pre / chosen:>6.2f}")  # fmt: skip
    original = P.Product.__call__
    use = {"packed": False}

    def call(self: P.Product, x: torch.Tensor) -> torch.Tensor:
        if not use["packed"]:
            return original(self, x)
        rows = x.numel() // x.shape[-1]
        out = through(packed[id(self)], x.reshape(rows, x.shape[-1]))
        return out.reshape(*x.shape[:-1], self.weight.shape[0])

    P.Product.__call__ = call  # type: ignore[method-assign]
    print("a decode pass of k rows, ms of CPU (best of 6, in turns):")
    print(f"{'rows':>4} {'chosen':>8} {'prepacked':>9} {'ratio':>6}")
    for rows in PASS_ROWS:
        took: dict[bool, list[float]] = {False: [], True: []}
        with sessions(shard, rows) as names:
            for _ in range(6):
                for on in (False, True):
                    use["packed"] = on
                    took[on].append(timed_pass(shard, names))
        a, b = min(took[False]), min(took[True])
        print(f"{rows:>4} {a:>8.1f} {b:>9.1f} {b / a:>6.2f}")
    use["packed"] = False
    moved, alone = 0.0, 0.0
    for p in all_products(shard):
        x = torch.randn(8, p.weight.shape[1])
        moved = max(moved, float((through(packed[id(p)], x) - p(x)).abs().max()))
        apart = torch.cat([F.linear(x[i : i + 1], p.weight) for i in range(8)])
        alone = max(alone, float((apart - F.linear(x, p.weight)).abs().max()))
    print(f"8 rows, the most an output moved: prepacked against the chosen form {moved:.1e}; "
          f"linear one row at a time against 8 at once {alone:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
