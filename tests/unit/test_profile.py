"""How a profile times passes: batched ones against one session's step of the same rounds (on a
virtual clock), again where a timing is implausible, and by which clock on each device."""

from __future__ import annotations

import itertools
import time
import types

import pytest
import torch

from meshshard.model.batching import BATCHES
from meshshard.model.profile import BATCH_ROUNDS, PLAUSIBLE, TIMINGS, _batched, _clock

# A pass of n rows costs what it costs at the host's speed of the moment; the host slows and
# speeds up between rounds (this project's test host swings by a quarter within minutes).
COST = {1: 10.0, 2: 11.0, 3: 12.0, 4: 16.0, 8: 20.0, 16: 30.0}
SPEEDS = (1.0, 1.6, 0.9, 1.3, 1.1, 1.45, 0.95)


class _Host:
    def __init__(self) -> None:
        self.now = 0.0
        self.passes = 0
        self._sizes = len(COST)
        self._speeds = itertools.cycle(SPEEDS)
        self.speed = next(self._speeds)

    def run(self, rows: int) -> None:
        self.now += COST[rows] * self.speed
        self.passes += 1
        if self.passes % self._sizes == 0:  # a round done: the host moves on
            self.speed = next(self._speeds)


class _Shard:
    """What _batched asks of a shard, its passes costing time on the host."""

    layers = (object(),)
    layer_ids = (1,)

    def __init__(self, host: _Host) -> None:
        self.host = host
        self.grown = False

    def prefill(self, *args: object, **kwargs: object) -> None:
        pass

    def export(self, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1), torch.zeros(1)

    def install(self, *args: object) -> None:
        pass

    def drop(self, session: str) -> None:
        pass

    def decode_batch(self, sessions: list[str], xs: list[torch.Tensor]) -> None:
        assert len(sessions) == len(xs)
        if not self.grown:  # the caches' untimed growth, all sessions at once
            self.grown = True
            return
        self.host.run(len(sessions))


def test_batched_passes_are_timed_against_one_step_of_the_same_rounds() -> None:
    host = _Host()
    ratios = _batched(
        _Shard(host),  # type: ignore[arg-type]
        torch.zeros(4, 8),
        lambda: host.run(1),
        lambda _: None,
        lambda: host.now,
    )
    # Each round's passes share its speed, so the medians' ratios are the costs' own, however
    # the host moved between rounds (timed apart, a round's speed entered a ratio whole).
    assert ratios == {size: pytest.approx(COST[size] / COST[1]) for size in BATCHES}


def _timed(host: _Host, slowed: list[float]) -> tuple[dict[int, float], int]:
    """_batched's ratios where the single steps of each timing take `slowed[k]` times their
    cost (another process's burst on the host), and how many single steps it took."""
    singles = 0

    def single() -> None:
        nonlocal singles
        before = host.now
        host.run(1)
        timing = singles // BATCH_ROUNDS
        host.now += (host.now - before) * (slowed[timing] - 1 if timing < len(slowed) else 0)
        singles += 1

    ratios = _batched(
        _Shard(host),  # type: ignore[arg-type]
        torch.zeros(4, 8),
        single,
        lambda _: None,
        lambda: host.now,
    )
    return ratios, singles


def test_passes_timed_under_one_rows_are_timed_again() -> None:
    ratios, singles = _timed(_Host(), [2.0])
    # Slowed twice over, the first timing put 2 rows at 0.55 of one: timed again, as they cost.
    assert COST[2] / (2 * COST[1]) < PLAUSIBLE
    assert singles == 2 * BATCH_ROUNDS
    assert ratios == {size: pytest.approx(COST[size] / COST[1]) for size in BATCHES}


def test_a_host_that_keeps_slowing_one_row_keeps_the_least_implausible_timing() -> None:
    ratios, singles = _timed(_Host(), [2.0, 1.3, 1.5, 1.0])
    assert singles == TIMINGS * BATCH_ROUNDS  # no more timings than that
    assert ratios == {size: pytest.approx(COST[size] / (1.3 * COST[1])) for size in BATCHES}


def test_passes_on_cuda_are_timed_once_their_kernels_are_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waited: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    clock = _clock(gpu)  # type: ignore[arg-type]
    before = clock()
    assert clock() >= before and waited == [torch.device("cuda", 0)] * 2
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        # One torch thread: the model thread's own CPU time, not the event loop's beside it.
        torch.set_num_threads(1)
        assert _clock(cpu) is time.thread_time  # type: ignore[arg-type]
        torch.set_num_threads(2)
        assert _clock(cpu) is time.process_time  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
