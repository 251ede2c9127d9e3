"""Drafts for answers the chain feeds itself, made where the chain feeds them: at the first
stage, pure.

An answer that speculates and feeds itself (StepFrame.loop and .drafts) never passes its
origin between tokens, so its guesses of the next tokens (chain/speculate.py) are made by the
first stage, from the token ids it has been fed: the prompt, then each step the last stage
sends round. Ids are kept by position, so a step that starts earlier than what is kept
(unconfirmed drafts, a replay) cuts them there, and confirmed drafts stay as they were fed.
A peer that becomes the first stage mid-answer knows only what it was fed since: its drafts
start from there (drafts never change a token, only how many a pass confirms).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from meshshard.chain.speculate import Speculator
from meshshard.chain.tensors import ids_from_wire, ids_to_wire
from meshshard.wire import StepFrame

MOST_ANSWERS = 256  # answers kept: one whose drop was lost must not stay for ever


@dataclass
class _Answer:
    base: int  # position of history[0]
    speculator: Speculator
    # Ids by position, 8 bytes each (a list of ints takes 36): up to a context's worth for
    # each of MOST_ANSWERS answers.
    history: array[int] = field(default_factory=lambda: array("q"))
    drafted_at: int = -1  # position of the step whose draft is out, and its length
    drafted: int = 0


class Drafter:
    """The first stage's drafting for answers the chain feeds itself."""

    def __init__(self) -> None:
        self._answers: OrderedDict[str, _Answer] = OrderedDict()

    def fed(self, frame: StepFrame) -> StepFrame:
        """Keep the ids of a frame fed to the first stage; a decode step the chain feeds
        itself comes back with a draft of the next tokens, where the history offers one."""
        if not frame.drafts or frame.tensor.dtype != "int64":  # not ids: the stage refuses it
            return frame
        answer = self._answer(frame)
        if answer.drafted and frame.start > answer.drafted_at:
            # The step after a drafted one starts at its last confirmed token.
            kept = min(frame.start - answer.drafted_at - 1, answer.drafted)
            answer.speculator.passed(answer.drafted, kept)
        answer.drafted = 0
        del answer.history[frame.start - answer.base :]
        ids = ids_from_wire(frame.tensor)
        answer.history.extend(ids)
        if not frame.loop or frame.draft or len(ids) != 1:
            return frame
        draft = answer.speculator.draft(answer.history, frame.until - frame.step)
        if not draft:
            return frame
        answer.history.extend(draft)
        answer.drafted_at, answer.drafted = frame.start, len(draft)
        tensor = ids_to_wire(ids + list(draft))
        return replace(frame, tensor=tensor, draft=draft)

    def _answer(self, frame: StepFrame) -> _Answer:
        answer = self._answers.get(frame.session)
        if answer is None or not answer.base <= frame.start <= answer.base + len(answer.history):
            # New, or fed from past what is kept here (this peer became the first stage).
            answer = _Answer(frame.start, Speculator(frame.drafts))
            self._answers[frame.session] = answer
        self._answers.move_to_end(frame.session)
        while len(self._answers) > MOST_ANSWERS:
            self._answers.popitem(last=False)
        return answer

    def forget(self, session: str) -> None:
        self._answers.pop(session, None)

    def __len__(self) -> int:
        return len(self._answers)
