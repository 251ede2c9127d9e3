"""Two stages of a real (tiny) model in one process, each frame between them handed over in
order: the chain a wave's head at the first stage is checked on, on the CPU and on CUDA."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from meshshard.chain.stage import StageWorker
from meshshard.chain.tensors import to_wire
from meshshard.model.generate import LocalChain, generate
from meshshard.model.shard import Shard, load_spec
from meshshard.types import Epoch
from meshshard.wire import DataFrame, ErrorFrame, Sampling, StepFrame, TokenFrame

EPOCH = Epoch(1, "a")
GREEDY = Sampling(temperature=0.0, top_p=1.0, seed=0)


class Chain:
    """A first and a last stage of `model` (on devices `first` and `last`), the tokens each
    answer's origin hears, and the errors."""

    def __init__(
        self,
        model: Path,
        wave_head: bool,
        first: str = "cpu",
        last: str = "cpu",
        waves: tuple[int, ...] = (1,),
    ) -> None:
        n = load_spec(model).num_units
        cut = n // 2
        self.tokens: dict[str, list[int]] = {}
        self.errors: list[ErrorFrame] = []
        head = Shard.load(model, 0, cut, device=first)
        self.first = StageWorker(head, EPOCH, "last", self._to_last, waves=waves)
        tail = Shard.load(model, cut, n, device=last)
        self.last = StageWorker(tail, EPOCH, None, self._to_first, waves=waves, wave_head=wave_head)

    async def _to_last(self, addr: str, frame: DataFrame) -> None:
        if isinstance(frame, StepFrame):
            await self.last.put(frame)
        else:
            self._heard(frame)

    async def _to_first(self, addr: str, frame: DataFrame) -> None:
        if isinstance(frame, StepFrame):
            await self.first.put(frame)
        else:
            self._heard(frame)

    def _heard(self, frame: DataFrame) -> None:
        if isinstance(frame, TokenFrame):
            self.tokens.setdefault(frame.session, []).extend(frame.tokens)
        else:
            assert isinstance(frame, ErrorFrame)
            self.errors.append(frame)

    async def answer(self, prompts: list[list[int]], tokens: int) -> None:
        """Each prompt's answer, asked together, the chain feeding itself, until each has
        its tokens."""
        tasks = [asyncio.create_task(w.run()) for w in (self.first, self.last)]
        try:
            for i, prompt in enumerate(prompts):
                await self.first.put(prompt_step(f"s{i}", prompt, tokens))
            async with asyncio.timeout(30):
                while sum(map(len, self.tokens.values())) < len(prompts) * tokens:
                    await asyncio.sleep(0.01)
        finally:
            for w in (self.first, self.last):
                await w.close("done")
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def prompt_step(session: str, prompt: list[int], tokens: int) -> StepFrame:
    tensor = to_wire(torch.tensor(prompt))
    return StepFrame(
        EPOCH, session, 0, 0, tensor, "origin", True, GREEDY, loop="first", until=tokens - 1
    )


def greedy(model: Path, prompt: list[int], n: int, device: str = "cpu") -> list[int]:
    return list(generate(LocalChain.load(model, (), device=device), prompt, n))
