"""The single-process greedy answer every mesh answer must equal, on the embedded model."""

from __future__ import annotations

import functools
from typing import Any

from meshshard.config import default_cache_dir
from meshshard.model.generate import LocalChain, generate
from meshshard.model.source import ensure_embedded
from meshshard.model.text import TextCodec


@functools.cache
def _model() -> tuple[LocalChain, Any]:
    model_dir = ensure_embedded(default_cache_dir())
    return LocalChain.load(model_dir), TextCodec.load(model_dir)


def greedy_answer(prompt: str, tokens: int) -> str:
    """The chat answer to `prompt`: greedy, at most `tokens` tokens, stopped at a stop id."""
    chain, codec = _model()
    ids = codec.encode(prompt, chat=True)
    return str(codec.decode(list(generate(chain, ids, tokens, stop_ids=codec.stop_ids))))
