"""The single-process greedy answer every mesh answer must equal, on the embedded model."""

from __future__ import annotations

import functools
from typing import Any

import torch

from meshshard.config import default_cache_dir
from meshshard.model.generate import LocalChain
from meshshard.model.source import ensure_embedded
from meshshard.model.text import TextCodec

# Batches of sessions and replays differ from one session's pass in the last float bits
# (about 1e-5 in the logits): an answer that passes closer to a tie than this may flip there.
MARGIN = 0.02


@functools.cache
def _model() -> tuple[LocalChain, Any]:
    model_dir = ensure_embedded(default_cache_dir())
    return LocalChain.load(model_dir), TextCodec.load(model_dir)


@functools.cache
def greedy_answer(prompt: str, tokens: int) -> str:
    """The chat answer to `prompt`: greedy, at most `tokens` tokens, stopped at a stop id.
    Fails for a prompt whose answer passes a near-tie: tests compare answers exactly."""
    chain, codec = _model()
    ids = codec.encode(prompt, chat=True)
    session = f"reference/{prompt}"
    out: list[int] = []
    logits = chain.step(session, torch.tensor(ids), 0)
    try:
        while len(out) < tokens:
            top = torch.topk(logits, 2)
            gap = float(top.values[0] - top.values[1])
            assert gap > MARGIN, f"{prompt!r} passes a near-tie ({gap:.4f}): pick another prompt"
            token = int(top.indices[0])
            if token in codec.stop_ids:
                break
            out.append(token)
            if len(out) < tokens:
                logits = chain.step(session, torch.tensor([token]), len(ids) + len(out) - 1)
    finally:
        chain.drop(session)
    return str(codec.decode(out))
