"""Matrix products of a few rows, in the form this CPU runs fastest for each row count.

The forms give the same numbers (each output is the same dot product over the input), but a
CPU's BLAS may run a few rows through one of them as a slow general product, and which one
depends on the host, the matrix and the row count:

- linear: torch's x @ Wᵀ;
- turned: W @ xᵀ; one machine ran SmolLM2's head 2.07x slower for 2 rows than for one
  through linear and 1.07x through W @ xᵀ; another, later, 1.06x through linear and 3.31x
  through W @ xᵀ (`tools/bench_head.py`, docs/benchmarks/head*.txt). Its input and its
  output are made contiguous: the output of W @ xᵀ has xᵀ's layout, and W @ (that)ᵀ ran 5x
  slower on a later machine (docs/experiments/one-row.txt), a 3-row pass 1.2x;
- blocked: linear on BLOCK rows of W at a time, joined. On this project's test host linear
  costs for 4 to 15 rows as if it read W again for every few rows (8 rows 2.6-2.9x one, W in
  cache or not), so a block small enough to stay in a core's L2 is read from there the
  second time: SmolLM2's 30 gate/up matrices took 42.7 ms for 8 rows through linear, 27.6
  blocked, and whole passes of 8 rows 82-92 ms against 110-112 (docs/benchmarks/layers.txt);
- parts: a joined matrix (q/k/v, gate/up) as the matrices it joins.

So a shard times the forms at load, once per process and shape, over its first SWEEP_BYTES
of matrices of that shape (a pass reads each once: one matrix timed again and again would be
found in cache), and passes of a few rows use the fastest. The choices are kept with the
profile measured on them and taken from there by a later process (`chosen`, `adopt`): timed
again at each load, the forms of 2-3-row down, 6-8-row gate/up and 6-12-row head products came
out differently in eight loads within an hour (docs/experiments/forms-kept.txt), so a kept
profile priced passes of other forms than a peer ran. Prompt chunks of more rows than
timed keep linear, as does every device but a CPU. So does one row: run as two rows through
W @ xᵀ it was faster still on one machine, but that moved the mesh's balance of decode steps
and prompt slices (docs/data-plane.md, *One row as two, three as four*).
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROWS = (2, 3, 4, 6, 8, 12, 16)  # row counts timed; others use the next count below
LINEAR, TURNED, BLOCKED, PARTS = "linear", "turned", "blocked", "parts"
FORMS = (LINEAR, TURNED, BLOCKED)
BLOCK = 128  # rows of W a blocked product takes at a time (295 KB of float32 at 576 inputs)
FASTER = 0.9  # another form is used where it takes at most this share of linear's time
RUNS = 2  # of each form, in turns; the fastest counts (other work on the host only adds time)
# A shape is timed over its first matrices holding this much (all, if fewer): more than this
# host's last-level cache (48 MB), as a pass reads its weights from memory. Timed over 8 MB,
# in that cache, by the wall clock, 2 choices of 3 kept linear for gate/up's 4 and 6 rows,
# which blocked took 0.77 and 0.74 of linear's time over 14 layers' matrices; passes of 4 to 7
# rows ran 1.12-1.24x as long for them (docs/benchmarks/forms.txt).
SWEEP_BYTES = 64 * 2**20

Timer = Callable[[Callable[[], object]], float]
Key = tuple[tuple[int, ...], torch.dtype, int, tuple[str, ...]]  # shape, dtype, threads, forms
_chosen: dict[Key, tuple[str, ...]] = {}


def _seconds(fn: Callable[[], object]) -> float:
    """fn's CPU time where torch computes on this thread alone (a CPU quota's pauses and other
    processes' turns on the core are not the form's), else its wall time."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    fn()
    return clock() - start


class Product:
    """x @ Wᵀ for one weight W [out, in], in the form chosen for x's row count."""

    __slots__ = ("_splits", "forms", "weight")

    def __init__(self, weight: torch.Tensor, parts: Sequence[int] = ()) -> None:
        """`parts`: the row counts of the matrices W joins, if any (a form runs them apart)."""
        self.weight = weight
        self.forms: tuple[str, ...] = (LINEAR,) * len(ROWS)
        # Views of W's rows, for the forms that run it piece by piece: nothing is held twice.
        self._splits = {BLOCKED: list(weight.split(BLOCK))}
        if parts:
            self._splits[PARTS] = list(weight.split(list(parts)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < ROWS[0] or rows > ROWS[-1]:
            return F.linear(x, self.weight)
        form = self.forms[bisect.bisect_right(ROWS, rows) - 1]
        if form == LINEAR:
            return F.linear(x, self.weight)
        flat = x.reshape(rows, x.shape[-1])
        return self.run(form, flat).reshape(*x.shape[:-1], self.weight.shape[0])

    def part(self, start: int, end: int) -> Product:
        """The product of W's rows [start, end), in the forms chosen for all of W (cut at
        whole blocks, its blocked form runs the blocks W's does: the same numbers)."""
        part = Product(self.weight[start:end])
        part.forms = self.forms
        return part

    def run(self, form: str, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] through `form`."""
        if form == TURNED:
            return (self.weight @ x.contiguous().T).T.contiguous()
        if form in self._splits:
            return torch.cat([F.linear(x, w) for w in self._splits[form]], dim=-1)
        return F.linear(x, self.weight)


def _sweep(form: str, x: torch.Tensor, products: Sequence[Product]) -> None:
    for p in products:
        p.run(form, x)


def choose(
    products: Iterable[Product], forms: Sequence[str] = (LINEAR, BLOCKED), timer: Timer = _seconds
) -> None:
    """Give each product the fastest of `forms` per row count for its weight's shape here,
    timing each shape once per process over `products` of that shape."""
    by_shape: dict[Key, list[Product]] = defaultdict(list)
    for p in products:
        w = p.weight
        by_shape[(tuple(w.shape), w.dtype, torch.get_num_threads(), tuple(forms))].append(p)
    for key, same in by_shape.items():
        if key not in _chosen:
            _chosen[key] = _fastest_forms(same, forms, timer)
        for p in same:
            p.forms = _chosen[key]


def chosen() -> list[dict[str, object]]:
    """The forms this process chose, as JSON: kept beside the profile measured with them
    (model/profile.py), so that a peer reading that profile later runs what it priced."""
    return [
        {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "threads": threads,
         "forms": list(forms), "rows": list(ROWS), "chosen": list(picked)}
        for (shape, dtype, threads, forms), picked in _chosen.items()
    ]  # fmt: skip


def adopt(entries: Any) -> bool:
    """Take forms `chosen` wrote (in another process) as this process's choices, all or
    none: False where any entry is malformed or of other row counts or forms than these."""
    try:
        taken = dict(_entry(e) for e in entries)
    except (AttributeError, KeyError, TypeError, ValueError):
        return False
    _chosen.update(taken)
    return True


def _entry(e: Any) -> tuple[Key, tuple[str, ...]]:
    forms: tuple[str, ...] = tuple(e["forms"])
    picked: tuple[str, ...] = tuple(e["chosen"])
    dtype = getattr(torch, str(e["dtype"]), None)
    if (
        e["rows"] != list(ROWS)
        or len(picked) != len(ROWS)
        or not set(forms) <= {*FORMS, PARTS}
        or not set(picked) <= set(forms)
        or not isinstance(dtype, torch.dtype)
        or type(e["threads"]) is not int
    ):
        raise ValueError(f"forms of another kind: {e}")
    shape = tuple(int(n) for n in e["shape"])
    return (shape, dtype, e["threads"], forms), picked


@torch.inference_mode()
def _fastest_forms(same: list[Product], forms: Sequence[str], timer: Timer) -> tuple[str, ...]:
    weight = same[0].weight
    timed = same[: max(1, SWEEP_BYTES // (weight.numel() * weight.element_size()))]
    chosen = []
    for n in ROWS:
        x = torch.randn(n, weight.shape[1], dtype=weight.dtype)
        took = dict.fromkeys(forms, float("inf"))
        for _ in range(RUNS):  # in turns: a form timed first would pay for the others' warm-up
            for form in forms:
                took[form] = min(took[form], timer(partial(_sweep, form, x, timed)))
        best = min(forms, key=took.__getitem__)
        chosen.append(best if took[best] <= FASTER * took[LINEAR] else LINEAR)
    return tuple(chosen)


class RowsLinear(nn.Linear):
    """nn.Linear (no bias) whose product runs in the form chosen for its row count."""

    product: Product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)


def choose_products(
    modules: Iterable[nn.Module | None], device: torch.device, timer: Timer = _seconds
) -> None:
    """Give the plain (unquantized, bias-free) linear layers in `modules` the faster forms."""
    if device.type != "cpu":
        return
    chosen: list[Product] = []
    for module in modules:
        if module is None:
            continue
        for linear in module.modules():
            if type(linear) is not nn.Linear:
                continue
            if linear.bias is None and type(linear.weight.data) is torch.Tensor:
                linear.__class__ = RowsLinear
                assert isinstance(linear, RowsLinear)
                linear.product = Product(linear.weight.data)
                chosen.append(linear.product)
    choose(chosen, FORMS, timer)
