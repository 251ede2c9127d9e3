"""The output head's product for a few rows, in the form this CPU runs faster.

torch's linear (x @ Wᵀ) and W @ xᵀ give the same numbers, but for 2-16 rows a CPU's BLAS may
run one of them as a slow general product, and which one depends on the host: one machine
ran SmolLM2's head 2.07x slower for 2 rows than for one through linear and 1.07x through
W @ xᵀ; another, later, 1.06x through linear and 3.31x through W @ xᵀ (`tools/bench_head.py`,
docs/benchmarks/head*.txt). So a shard that holds the head times both forms at load, once
per process, and batched passes use the faster. One row, and prompt chunks of more rows than
measured, keep torch's linear; so does every other device. The decoder layers' matrices keep
torch's linear: chosen the same way they made whole passes no faster (8 rows: 117.5 vs
119.0 ms; 4 rows: 92.7 vs 87.5 ms), though each product alone was.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

ROWS = (2, 3, 4, 6, 8, 12, 16)  # row counts timed; others use the next count below
FASTER = 0.9  # W @ xᵀ is used where it takes at most this share of linear's time
REPEATS = 2  # the fastest of these runs counts: other work on the host only adds time

Timer = Callable[[Callable[[], object]], float]
_chosen: dict[tuple[tuple[int, ...], torch.dtype, int], tuple[bool, ...]] = {}


def _fastest(fn: Callable[[], object]) -> float:
    fn()
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def transposed_rows(weight: torch.Tensor, timer: Timer = _fastest) -> tuple[bool, ...]:
    """For each count in ROWS, whether W @ xᵀ beats linear for this weight's shape here."""
    key = (tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if key not in _chosen:
        with torch.inference_mode():
            chosen = []
            for n in ROWS:
                x = torch.randn(n, weight.shape[1], dtype=weight.dtype)
                linear = timer(partial(F.linear, x, weight))
                transposed = timer(partial(torch.matmul, weight, x.T))
                chosen.append(transposed <= FASTER * linear)
        _chosen[key] = tuple(chosen)
    return _chosen[key]


class RowsLinear(nn.Linear):
    """nn.Linear (no bias) that runs `rows` rows as W @ xᵀ where `transposed` says so."""

    transposed: tuple[bool, ...] = (False,) * len(ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        i = bisect.bisect_right(ROWS, rows) - 1
        if i >= 0 and rows <= ROWS[-1] and self.transposed[i]:
            flat = x.reshape(rows, x.shape[-1])
            return (self.weight @ flat.T).T.reshape(*x.shape[:-1], self.weight.shape[0])
        return F.linear(x, self.weight)


def choose_products(
    modules: Iterable[nn.Module | None], device: torch.device, timer: Timer = _fastest
) -> None:
    """Give the plain (unquantized, bias-free) linear layers in `modules` the faster form."""
    if device.type != "cpu":
        return
    for module in modules:
        if module is None:
            continue
        for linear in module.modules():
            if type(linear) is not nn.Linear:
                continue
            if linear.bias is None and type(linear.weight.data) is torch.Tensor:
                linear.__class__ = RowsLinear
                assert isinstance(linear, RowsLinear)
                linear.transposed = transposed_rows(linear.weight, timer)
