"""How a profile times passes: batched ones against one session's step of the same rounds (on a
virtual clock), and by which clock on each device."""

from __future__ import annotations

import itertools
import time
import types

import pytest
import torch

from meshshard.model.batching import BATCHES
from meshshard.model.profile import _batched, _clock

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
    assert _clock(cpu) is time.process_time  # type: ignore[arg-type]
