"""What a stage's pass gives each step, and what that sends where: hidden states for the next
stage, or at the last stage the tokens each step confirmed (with the step they feed, sent to
the first stage itself), or the normed hidden states of a step whose head is split, or an
error for its origin. Pure: no model, no I/O."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from meshshard.chain.speculate import confirmed
from meshshard.chain.tensors import ids_to_wire
from meshshard.model.sampling import Sampler, SamplingParams
from meshshard.model.shard import UnknownSession
from meshshard.wire import (
    DataFrame,
    ErrorCode,
    ErrorFrame,
    StepFrame,
    TensorData,
    TokenFrame,
    WireError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Normed:
    """A lone greedy step's normed hidden states [rows, hidden] (its token's, and its
    draft's), whose head is split between the last stage and the first; or one step's of a
    wave of `together`, whose whole head the first stage scores (chain/picks.py)."""

    hidden: torch.Tensor
    together: int = 0


@dataclass(frozen=True)
class Failed:
    """A step its pass could not run, to tell its origin of."""

    code: ErrorCode
    message: str
    have: int = 0


@dataclass(frozen=True)
class Later:
    """Frames of a step's output still to send, in order (those before went at once)."""

    sends: tuple[tuple[str, DataFrame], ...]


# What a pass gives a step: hidden states, or tokens, or what is left to send of either
Output = TensorData | tuple[int, ...] | Normed | Failed | Later
Sends = list[tuple[str, DataFrame]]  # frames and where each goes, in order


class CacheMiss(Exception):
    """A step continues from a position this stage's cache does not reach."""

    def __init__(self, have: int) -> None:
        super().__init__(f"this stage holds {have} positions of the session")
        self.have = have


def refusal(
    frame: StepFrame,
    code: ErrorCode = ErrorCode.STALE_EPOCH,
    message: str = "this stage moved to a new plan",
    have: int = 0,
) -> ErrorFrame:
    """The error that tells `frame`'s origin its step did not run here."""
    return ErrorFrame(frame.epoch, frame.session, frame.step, code, message, frame.attempt, have)


def failed(batch: list[StepFrame], e: Exception, sessions: list[str]) -> list[Output]:
    """What to tell the origins of a batch whose pass raised `e` (`sessions`: those the
    stage holds)."""
    if isinstance(e, CacheMiss):  # only a lone step's pass checks where its cache ends
        if batch[0].session in sessions:
            return [Failed(ErrorCode.CACHE_MISS, str(e), e.have)] * len(batch)
        unknown = f"unknown session {batch[0].session!r}"
        return [Failed(ErrorCode.UNKNOWN_SESSION, unknown)] * len(batch)
    if isinstance(e, UnknownSession):
        return [Failed(ErrorCode.UNKNOWN_SESSION, str(e))] * len(batch)
    if isinstance(e, ValueError | WireError):
        return [Failed(ErrorCode.BAD_FRAME, str(e))] * len(batch)
    # A bug must cost these steps, not the peer.
    logger.error("stage failed on %d steps", len(batch), exc_info=e)
    return [Failed(ErrorCode.INTERNAL, f"stage failed: {e}")] * len(batch)


def sends(frame: StepFrame, out: Output, next_addr: str | None) -> Sends:
    """What a step's output sends where, in order (all but a split head's, whose pick is
    made between its two frames)."""
    if isinstance(out, Later):
        return list(out.sends)
    if isinstance(out, Failed):
        return [(frame.origin, refusal(frame, out.code, out.message, out.have))]
    if isinstance(out, TensorData):
        assert next_addr is not None
        return [(next_addr, replace(frame, tensor=out))]
    if not frame.sample or isinstance(out, Normed):
        return []
    # The next step first (it is what the chain waits for), then the origin's copy.
    drafted = len(frame.draft)
    copy = TokenFrame(frame.epoch, frame.session, frame.step, out, frame.attempt, drafted)
    follow = followed(frame, out)
    return [(follow.loop, follow), (frame.origin, copy)] if follow else [(frame.origin, copy)]


def sampled(batch: list[StepFrame], outs: list[torch.Tensor]) -> list[tuple[int, ...]]:
    """The tokens each step's logits confirm. Greedy steps' rows are picked by one argmax
    over all of them (one copy off the device); others sample with their seeds, row by row."""
    greedy = [i for i, f in enumerate(batch) if f.sample and f.sampling.temperature == 0]
    logits = [outs[i].reshape(-1, outs[i].shape[-1]) for i in greedy]
    best = torch.argmax(torch.cat(logits), dim=-1).tolist() if logits else []
    picked: dict[int, list[int]] = {}
    for i, rows_of_i in zip(greedy, logits, strict=True):
        n = rows_of_i.shape[0]
        picked[i], best = best[:n], best[n:]
    tokens: list[tuple[int, ...]] = []
    for i, (f, out) in enumerate(zip(batch, outs, strict=True)):
        if not f.sample:
            tokens.append(())
            continue
        if i in picked:
            sample = _looked_up(picked[i], f.step)
        else:
            s = f.sampling
            sample = Sampler(SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=s.seed))
        tokens.append(confirmed(sample, out.cpu(), f.draft, f.step))
    return tokens


def followed(frame: StepFrame, tokens: tuple[int, ...]) -> StepFrame | None:
    """The step after `frame` that the last stage sends to the first itself, when the origin
    asked for it (`loop`) and the answer goes on: tokens then go round the chain without a
    hop through the origin. It feeds the last token at its position: a draft's positions
    past it were not confirmed, and the first stage drafts anew (chain/drafts.py)."""
    step = frame.step + len(tokens)
    if not frame.loop or step > frame.until or set(tokens) & set(frame.stops):
        return None
    start = frame.start + frame.tensor.shape[0] - len(frame.draft) + len(tokens) - 1
    tensor = ids_to_wire(tokens[-1:])
    return replace(frame, step=step, start=start, tensor=tensor, sample=True, draft=(), ends=0)


def _looked_up(tokens: list[int], step: int) -> Callable[[torch.Tensor, int], int]:
    """A sampler that answers from tokens picked already: step + j's is tokens[j]."""
    return lambda _, k: tokens[k - step]
