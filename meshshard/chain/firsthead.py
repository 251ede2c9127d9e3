"""The first stage's part of the head, where the model ties its head to the embedding the
first stage holds (planner/headsplit.py says when each pays): rows [0, head) of a lone
answer's split step, scored as its hidden state comes while the last stage scores the rest
(picks.py); and a whole wave's head, scored in one product once the wave's rows have come
(wavehead.py). Either way the tokens go into the chain as the steps they feed, and a copy to
each answer's origin, as the last stage sends them unsplit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from meshshard.chain import cores
from meshshard.chain.outbox import Outbox
from meshshard.chain.outputs import followed, refusal
from meshshard.chain.picks import Pick, Picks
from meshshard.chain.speculate import accepted
from meshshard.chain.tensors import from_wire
from meshshard.chain.wavehead import WaveHead
from meshshard.chain.worker import model_idle, run_inline
from meshshard.model.shard import Shard
from meshshard.wire import ErrorCode, PickFrame, StepFrame, TokenFrame

# The best token of vocabulary rows [start, end) for each row of normed hidden states, and
# its logit: the stage's product, timed with its forward passes.
Product = Callable[[torch.Tensor, int, int], tuple[tuple[float, ...], tuple[int, ...]]]
Accept = Callable[[StepFrame, bool], None]  # a step into the chain (False: not at once)


class FirstHead:
    def __init__(self, shard: Shard, outbox: Outbox, product: Product, accept: Accept) -> None:
        self.shard, self.outbox = shard, outbox
        self._product, self._accept = product, accept
        self._picks = Picks()  # split steps' halves waiting for the other
        self._wave = WaveHead(self._score_wave, self._fed)
        self.picks_moved = 0  # split picks scored off the last stage's core (cores.py)
        self.wave_rows = 0  # rows of waves whose head this first stage scored

    async def put(self, frame: StepFrame) -> None:
        """Hidden states to score: a split step's (`head`) or a wave's row (`together`)."""
        if self._refused(frame):
            return
        if frame.together:
            await self._wave.add(frame)
        else:
            self._ours(frame, await run_inline(self._pick_ours, frame))

    def put_now(self, frame: StepFrame) -> bool:
        """`put` without waiting: False (and nothing done) while the model thread is busy."""
        if not model_idle():
            return False
        if self._refused(frame):
            return True
        if frame.together:
            self._wave.add_now(frame)
        else:
            self._ours(frame, self._pick_ours(frame))
        return True

    def take_pick(self, frame: PickFrame) -> None:
        """The last stage's pick of a split step."""
        if (got := self._picks.theirs(frame)) is not None:
            self._picked(*got)

    def held(self) -> list[StepFrame]:
        """A wave's rows held for the rest, no longer waited for (the stage is closing)."""
        return self._wave.take()

    def forget(self, session: str) -> None:
        self._picks.forget(session)
        self._wave.rows.forget(session)

    def _refused(self, frame: StepFrame) -> bool:
        """Refuse hidden states this stage cannot score, as the origin hears of any refused
        step: here only a first stage holding the tied head scores them, a split step's rows
        [0, head) of the vocabulary, a wave's row all of it."""
        shard, vocab = self.shard, self.shard.spec.vocab_size
        fits = frame.head == vocab if frame.together else frame.head < vocab
        if shard.is_first and shard.head_weight is not None and fits:
            return False
        what = f"rows [0, {frame.head}) of a split head"
        if frame.together:
            what = "a wave's whole head"
        message = f"this stage cannot score {what}"
        self.outbox.later(frame, [(frame.origin, refusal(frame, ErrorCode.BAD_FRAME, message))])
        return True

    def _pick_ours(self, frame: StepFrame) -> Pick:
        """This first stage's share of a split step, scored off the last stage's core where
        the two share a host (chain/cores.py)."""
        with cores.apart(frame.core) as moved:
            logits, tokens = self._product(from_wire(frame.tensor), 0, frame.head)
        self.picks_moved += moved
        return Pick(logits, tokens)

    def _ours(self, frame: StepFrame, pick: Pick) -> None:
        if (picked := self._picks.ours(frame, pick)) is not None:
            self._picked(frame, picked)

    def _score_wave(self, rows: list[StepFrame]) -> tuple[int, ...]:
        """The whole head's token of each row, in one product."""
        hidden = torch.cat([from_wire(f.tensor) for f in rows])
        self.wave_rows += len(rows)
        return self._product(hidden, 0, self.shard.spec.vocab_size)[1]

    def _fed(self, rows: list[StepFrame], tokens: tuple[int, ...]) -> None:
        """A wave's tokens into the chain, all queued before any runs."""
        for frame, token in zip(rows, tokens, strict=True):
            self._picked(frame, (token,), at_once=False)

    def _picked(self, frame: StepFrame, picked: tuple[int, ...], at_once: bool = True) -> None:
        """A step's tokens, those of its picks the draft confirms: into the chain as the step
        they feed (what the chain waits for: its pass may run at once), unless they end the
        answer, then to its origin."""
        tokens = accepted(picked, frame.draft)
        plain = replace(frame, head=0, core=None, together=0)
        if (follow := followed(plain, tokens)) is not None:
            self._accept(follow, at_once)
        drafted = len(frame.draft)
        copy = TokenFrame(frame.epoch, frame.session, frame.step, tokens, frame.attempt, drafted)
        self.outbox.send_or_later(frame, [(frame.origin, copy)])
