"""What a stage refuses before admitting a step: token ids outside the vocabulary, ids where
hidden states belong, hidden states where ids belong, and hidden states that are not finite.
The wire passes each of these (it knows no model's vocabulary nor which stage a frame
reaches, and leaves a tensor's values to where it is used); run, each failed its pass and
with it every session batched beside it, or, for a split head, the handler that took it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from meshshard.chain.stage import StageWorker
from meshshard.chain.tensors import to_wire
from meshshard.model.shard import Shard, load_spec
from meshshard.types import Epoch
from meshshard.wire import DataFrame, Sampling, StepFrame

EPOCH = Epoch(1, "a")
GREEDY = Sampling(temperature=0.0, top_p=1.0, seed=0)


def _frame(tensor: torch.Tensor, **extra: Any) -> StepFrame:
    return StepFrame(EPOCH, "s", 0, 0, to_wire(tensor), "origin", True, GREEDY, **extra)


def _worker(model: Path, start: int, end: int) -> StageWorker:
    async def send(addr: str, frame: DataFrame) -> None:
        raise AssertionError("nothing is sent")

    last = end == load_spec(model).num_units
    return StageWorker(Shard.load(model, start, end), EPOCH, None if last else "next:1", send)


@pytest.mark.parametrize(
    ("ids", "fit"),
    [([0, 5, 17], True), ([-1], False), ([3, 10**6], False), ([2**31 - 1], False)],
)
def test_the_first_stage_takes_ids_of_its_vocabulary(
    tiny_model: Path, ids: list[int], fit: bool
) -> None:
    worker = _worker(tiny_model, 0, 2)
    problem = worker.unfit(_frame(torch.tensor(ids)))
    assert (problem is None) == fit
    assert fit or f"0 to {load_spec(tiny_model).vocab_size - 1}" in str(problem)


def test_the_vocabulary_is_checked_at_its_last_id(tiny_model: Path) -> None:
    vocab = load_spec(tiny_model).vocab_size
    worker = _worker(tiny_model, 0, 2)
    assert worker.unfit(_frame(torch.tensor([vocab - 1]))) is None
    assert worker.unfit(_frame(torch.tensor([vocab]))) is not None


def test_each_stage_takes_its_own_kind_of_tensor(tiny_model: Path) -> None:
    spec = load_spec(tiny_model)
    hidden = torch.zeros(2, spec.hidden_size)
    first, later = _worker(tiny_model, 0, 2), _worker(tiny_model, 2, spec.num_units)
    assert "token ids, not hidden states" in str(first.unfit(_frame(hidden)))
    assert "hidden states, not token ids" in str(later.unfit(_frame(torch.tensor([1, 2]))))
    assert later.unfit(_frame(hidden)) is None
    # A split head's hidden states go to the first stage's part of the head, not its layers.
    head = _frame(hidden[:1], loop="127.0.0.1:1", until=9, head=16)
    assert first.unfit(head) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_hidden_states_must_be_finite(tiny_model: Path, bad: float) -> None:
    spec = load_spec(tiny_model)
    hidden = torch.zeros(2, spec.hidden_size)
    hidden[1, 7] = bad
    later = _worker(tiny_model, 2, spec.num_units)
    assert "NaN or infinity" in str(later.unfit(_frame(hidden)))
    # ... also those of a split head, which the first stage scores outside any pass.
    head = _frame(hidden[1:], loop="127.0.0.1:1", until=9, head=16)
    assert "NaN or infinity" in str(_worker(tiny_model, 0, 2).unfit(head))
