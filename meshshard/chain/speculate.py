"""Speculative decoding without a draft model, pure: guess the next tokens from the session's
own history (prompt lookup), let the chain verify them in one pass, and keep drafting only
where it pays.

A pass that verifies k drafted tokens runs k+1 positions through every stage and returns the
longest prefix that the sampler itself confirms, plus its own next token: sampling is
deterministic per position (a seed and the step), so a draft is kept exactly when it equals
that position's sample, and greedy or seeded answers are those of plain decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

LONGEST_NGRAM = 3  # suffix lengths tried, longest first ...
SHORTEST_NGRAM = 2  # ... one token alone matches too often to be worth a longer pass
KEEP_RATE = 0.2  # drafted tokens confirmed, on average, below which drafting pauses
PAUSE_PASSES = 16  # plain passes before drafting is tried again
RATE_WEIGHT = 0.3  # of the newest pass in the confirmation rate


def propose(history: Sequence[int], most: int) -> tuple[int, ...]:
    """Up to `most` tokens that followed the latest earlier occurrence of the history's
    longest repeated suffix (LONGEST_NGRAM down to SHORTEST_NGRAM tokens)."""
    if most <= 0:
        return ()
    n_tokens = len(history)
    for n in range(min(LONGEST_NGRAM, n_tokens - 1), SHORTEST_NGRAM - 1, -1):
        suffix = list(history[n_tokens - n :])
        # The latest occurrence that is followed by at least one token, not the suffix itself.
        for i in range(n_tokens - n - 1, -1, -1):
            if history[i] == suffix[0] and list(history[i : i + n]) == suffix:
                return tuple(history[i + n : i + n + most])
    return ()


def confirmed(
    sample: Callable[[torch.Tensor, int], int],
    logits: torch.Tensor,
    draft: Sequence[int],
    step: int,
) -> tuple[int, ...]:
    """The tokens a pass produces: position j's sample (step + j), for as long as each
    sample equals the draft's token there, then the first that does not (or the one after
    the whole draft). `logits`: [vocab] without a draft, [len(draft) + 1, vocab] with one."""
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.shape[0] != len(draft) + 1:
        raise ValueError(f"{rows.shape[0]} rows of logits for a draft of {len(draft)}")
    return accepted((sample(row, step + j) for j, row in enumerate(rows)), draft)


def accepted(picked: Iterable[int], draft: Sequence[int]) -> tuple[int, ...]:
    """Each position's token for as long as it equals the draft's there, then the first that
    does not (or the one after the whole draft); `picked` is read no further."""
    tokens = []
    for j, token in enumerate(picked):
        tokens.append(token)
        if j == len(draft) or token != draft[j]:
            break
    return tuple(tokens)


@dataclass
class Speculator:
    """One answer's drafting: how many tokens to guess next, adapted to how many of its
    guesses the chain confirmed (more after a fully confirmed draft, fewer after a miss),
    paused while too few are confirmed for the longer passes to pay."""

    most: int  # 0: never draft
    k: int = 2
    rate: float = 1.0  # moving average of the share of drafted tokens confirmed
    paused: int = 0  # plain passes left before drafting again
    drafted: int = 0
    kept: int = 0

    def draft(self, history: Sequence[int], room: int) -> tuple[int, ...]:
        """Guesses for the next pass; `room`: tokens the answer may still take after the one
        the pass produces anyway."""
        if self.most <= 0 or room <= 0:
            return ()
        if self.paused:
            self.paused -= 1
            return ()
        return propose(history, min(self.k, self.most, room))

    def passed(self, drafted: int, kept: int) -> None:
        """A pass came back: `kept` of its `drafted` tokens were confirmed."""
        if not drafted:
            return
        self.drafted += drafted
        self.kept += kept
        self.rate += RATE_WEIGHT * (kept / drafted - self.rate)
        self.k = min(self.most, self.k + 2) if kept == drafted else max(1, self.k - 1)
        if self.rate < KEEP_RATE:
            self.paused, self.rate, self.k = PAUSE_PASSES, 1.0, 1
