"""A stage's outputs on their way (chain/outbox.py), without a model."""

from __future__ import annotations

import asyncio

import torch

from meshshard.chain.outbox import Outbox
from meshshard.chain.tensors import to_wire
from meshshard.types import Epoch
from meshshard.wire import DataFrame, PickFrame, Sampling, StepFrame, TokenFrame

EPOCH = Epoch(2, "b")


def step() -> StepFrame:
    ids = to_wire(torch.tensor([5]))
    return StepFrame(EPOCH, "s", 3, 7, ids, "origin:1", True, Sampling(0.0, 1.0, 0))


def no_pick(frame: StepFrame, hidden: torch.Tensor) -> PickFrame:
    raise AssertionError("no split step here")


async def test_what_waits_before_the_senders_start_goes_when_they_do() -> None:
    """A stage made for a new plan may be handed frames before its task first runs: what it
    cannot send at once is queued, not dropped."""
    sent: list[tuple[str, DataFrame]] = []
    now: list[tuple[str, DataFrame]] = []
    taking = False

    async def send(addr: str, frame: DataFrame) -> None:
        sent.append((addr, frame))

    def send_now(addr: str, frame: DataFrame) -> bool:
        if taking:
            now.append((addr, frame))
        return taking

    box = Outbox(send, send_now, None, 0, no_pick)
    tokens = [TokenFrame(EPOCH, "s", i, (i,)) for i in range(3)]
    box.send_or_later(step(), [("origin:1", tokens[0]), ("origin:1", tokens[1])])
    task = asyncio.create_task(box.run())
    await asyncio.sleep(0)
    await box.sent()
    assert sent == [("origin:1", tokens[0]), ("origin:1", tokens[1])]
    taking = True
    box.send_or_later(step(), [("origin:1", tokens[2])])  # the link takes it: at once
    assert now == [("origin:1", tokens[2])] and len(sent) == 2
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
