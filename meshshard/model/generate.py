"""Generation over a chain of shards in one process: the reference every mesh answer must match."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from meshshard.model.sampling import Sampler, SamplingParams
from meshshard.model.shard import Shard

_session_ids = itertools.count()


class LocalChain:
    """Shards covering all units, in order, called one after another."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        if not shards or shards[0].start != 0 or not shards[-1].is_last:
            raise ValueError("a chain must start at the embed unit and end at the head")
        for a, b in itertools.pairwise(shards):
            if a.end != b.start:
                raise ValueError(
                    f"shards do not meet: [{a.start},{a.end}) then [{b.start},{b.end})"
                )
        self.shards = list(shards)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        cuts: Sequence[int] = (),
        dtype: str = "float32",
        device: str = "cpu",
        quantize: str = "none",
    ) -> LocalChain:
        """Load the model split at unit indices `cuts` (none: one shard with every unit)."""
        from meshshard.model.shard import load_spec

        n = load_spec(model_dir).num_units
        bounds = [0, *cuts, n]
        return cls(
            [
                Shard.load(model_dir, a, b, dtype, device, quantize)
                for a, b in itertools.pairwise(bounds)
            ]
        )

    def step(self, session: str, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run tokens `ids` at positions start.. through every shard; returns next-token logits."""
        positions = torch.arange(start, start + ids.shape[0])
        x = ids
        for shard in self.shards:
            x = shard.prefill(session, x, positions)
        return x.cpu()  # logits, for a sampler on the host

    def drop(self, session: str) -> None:
        for shard in self.shards:
            shard.drop(session)


def generate(
    chain: LocalChain,
    prompt_ids: Sequence[int],
    max_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: frozenset[int] = frozenset(),
) -> Iterator[int]:
    """Yield new token ids until a stop id (not yielded) or max_tokens."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    session = f"local/{next(_session_ids)}"
    sample = Sampler(params or SamplingParams())
    try:
        logits = chain.step(session, torch.tensor(list(prompt_ids)), 0)
        position = len(prompt_ids)
        for i in range(max_tokens):
            token = sample(logits, i)
            if token in stop_ids:
                return
            yield token
            if i + 1 == max_tokens:
                return
            logits = chain.step(session, torch.tensor([token]), position)
            position += 1
    finally:
        chain.drop(session)
