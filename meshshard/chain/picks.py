"""A split head's two picks of a pass's tokens, matched (planner/headsplit.py says when it
pays).

The last stage sends a lone greedy step's normed hidden states (a row for its token and one
for each drafted token) to the first stage (a StepFrame with `head` rows), then scores the
vocabulary from there on and sends its best token of each row (a PickFrame); the first stage
scores rows [0, head) of the embedding it shares with the head meanwhile. Each logit is the
dot product the whole head computes for that row, so the better of the two picks of a row,
ties to the lower id as argmax breaks them, is the whole head's token there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar

from meshshard.model.products import BLOCK
from meshshard.wire import PickFrame, StepFrame

MOST_WAITING = 256  # halves held for their other half: a lost one must not pile up


@dataclass(frozen=True)
class Pick:
    """One end's best token of each row over its share of the vocabulary, and its logit."""

    logits: tuple[float, ...]
    tokens: tuple[int, ...]


def split_rows(share: float, vocab: int) -> int:
    """Rows [0, n) of the vocabulary the first stage scores for a `share` (0: none), cut
    where the whole head's product cuts its rows too: at a block of the blocked form (a
    small vocabulary's at 16 rows), so each logit is the same sum in the same order.
    (Cut anywhere, a tiny model's logits moved in their last bit.)"""
    unit = BLOCK if vocab >= 4 * BLOCK else 16
    n = round(share * vocab / unit) * unit
    return n if 0 < n < vocab else 0


def better(a: Pick, b: Pick) -> tuple[int, ...]:
    """Row by row, the token of the higher logit; of equal ones the lower id. (Picks of
    unequal rows, from a peer that misbehaves, give the rows both have.)"""
    rows = zip(a.logits, a.tokens, b.logits, b.tokens, strict=False)
    return tuple(min((-la, ta), (-lb, tb))[1] for la, ta, lb, tb in rows)


_Key = tuple[str, int, int]  # session, step, attempt
T = TypeVar("T")


class Picks:
    """The first stage's halves of split steps and the last stage's picks, each held until
    the other comes."""

    def __init__(self) -> None:
        self._ours: OrderedDict[_Key, tuple[StepFrame, Pick]] = OrderedDict()
        self._theirs: OrderedDict[_Key, Pick] = OrderedDict()

    def ours(self, frame: StepFrame, pick: Pick) -> tuple[int, ...] | None:
        """This stage's pick for a split step: the picked tokens, if the last stage's came
        first."""
        key = (frame.session, frame.step, frame.attempt)
        if (theirs := self._theirs.pop(key, None)) is not None:
            return better(pick, theirs)
        _hold(self._ours, key, (frame, pick))
        return None

    def theirs(self, frame: PickFrame) -> tuple[StepFrame, tuple[int, ...]] | None:
        """The last stage's pick: the step and the picked tokens, if this stage's came first."""
        key = (frame.session, frame.step, frame.attempt)
        pick = Pick(frame.logits, frame.tokens)
        if (held := self._ours.pop(key, None)) is not None:
            step, ours = held
            return step, better(ours, pick)
        _hold(self._theirs, key, pick)
        return None

    def forget(self, session: str) -> None:
        for held in (self._ours, self._theirs):
            for key in [k for k in held if k[0] == session]:
                del held[key]

    def __len__(self) -> int:
        return len(self._ours) + len(self._theirs)


def _hold(held: OrderedDict[_Key, T], key: _Key, value: T) -> None:
    held[key] = value
    while len(held) > MOST_WAITING:
        held.popitem(last=False)
