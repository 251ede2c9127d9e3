"""Speculative decoding's pure parts: drafting by prompt lookup, what a pass confirms, and how
an answer adapts its drafts."""

from __future__ import annotations

import pytest
import torch

from meshshard.chain.speculate import PAUSE_PASSES, Speculator, confirmed, propose
from meshshard.model.sampling import Sampler, SamplingParams


@pytest.mark.parametrize(
    "history, most, draft",
    [
        # The tokens that followed the latest earlier occurrence of the longest suffix.
        ([1, 2, 3, 4, 9, 1, 2, 3], 3, (4, 9, 1)),
        ([1, 2, 3, 4, 9, 1, 2, 3], 8, (4, 9, 1, 2, 3)),  # up to the end of the history
        ([5, 2, 3, 7, 1, 2, 3, 8, 2, 3], 2, (8, 2)),  # the latest occurrence wins
        ([7, 2, 3, 6, 4, 2, 3], 4, (6, 4, 2, 3)),  # two-token suffix when three do not repeat
        ([1, 2, 3, 4, 5, 3], 4, ()),  # one token alone is too weak a match
        ([1, 2, 3, 4], 4, ()),  # nothing repeats
        ([1, 1], 4, ()),
        ([1, 1, 1], 4, (1,)),
        ([1, 2, 1, 2], 0, ()),
        ([], 4, ()),
    ],
)
def test_prompt_lookup_drafts_what_followed_the_suffix_before(
    history: list[int], most: int, draft: tuple[int, ...]
) -> None:
    assert propose(history, most) == draft


def one_hot(*tokens: int, vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    for row, token in enumerate(tokens):
        logits[row, token] = 5.0
    return logits


GREEDY = Sampler(SamplingParams())


@pytest.mark.parametrize(
    "argmaxes, draft, tokens",
    [
        ((4,), (), (4,)),  # no draft: one token
        ((4, 5, 6), (4, 5), (4, 5, 6)),  # all confirmed, plus the pass's own next token
        ((4, 7, 6), (4, 5), (4, 7)),  # the first miss ends the pass, with the true token
        ((3, 5, 6), (4, 5), (3,)),  # a miss at once: one token, as a plain step gives
    ],
)
def test_a_pass_keeps_the_drafts_its_samples_confirm(
    argmaxes: tuple[int, ...], draft: tuple[int, ...], tokens: tuple[int, ...]
) -> None:
    assert confirmed(GREEDY, one_hot(*argmaxes), draft, step=0) == tokens


def test_a_seeded_pass_samples_each_position_as_its_own_step() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=11))
    plain = tuple(sampler(logits[j], 7 + j) for j in range(4))
    # A draft equal to the plain samples is confirmed whole; the bonus token is step 10's.
    assert confirmed(sampler, logits, plain[:3], step=7) == plain
    # Any other draft gives the plain samples up to and including the first difference.
    wrong = (plain[0], (plain[1] + 1) % 50, plain[2])
    assert confirmed(sampler, logits, wrong, step=7) == plain[:2]


def test_logits_must_match_the_draft() -> None:
    with pytest.raises(ValueError, match="rows of logits"):
        confirmed(GREEDY, one_hot(1, 2), (1, 2), step=0)


def test_drafts_grow_while_confirmed_and_shrink_after_a_miss() -> None:
    spec = Speculator(most=8)
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    sizes = []
    for kept_all in (True, True, True, True, False, False):
        draft = spec.draft(history, room=100)
        sizes.append(len(draft))
        spec.passed(len(draft), len(draft) if kept_all else 0)
    assert sizes == [2, 4, 6, 8, 8, 7]
    assert spec.draft(history, room=3) == (4, 5, 6)  # never past the answer's end
    assert spec.draft(history, room=0) == ()
    assert Speculator(most=0).draft(history, room=100) == ()  # --speculate 0


def test_drafting_pauses_where_it_does_not_pay_and_tries_again() -> None:
    spec = Speculator(most=4)
    history = [1, 2, 3, 4, 1, 2, 3]
    misses = 0
    while spec.draft(history, room=100):
        spec.passed(2, 0)
        misses += 1
    assert misses <= 6  # a few misses in a row pause drafting ...
    plain = 1 + sum(1 for _ in range(PAUSE_PASSES - 1) if not spec.draft(history, room=100))
    assert plain == PAUSE_PASSES
    assert spec.draft(history, room=100) == (4,)  # ... then it tries again, carefully
    assert spec.drafted == 2 * misses and spec.kept == 0


def test_a_stage_drops_a_draft_by_cutting_the_frames_rows() -> None:
    from meshshard.chain.tensors import from_wire, rows, to_wire

    hidden = torch.randn(4, 6)
    assert torch.equal(from_wire(rows(to_wire(hidden), 0, 1)), hidden[:1])
    ids = torch.tensor([5, 6, 7])
    assert torch.equal(from_wire(rows(to_wire(ids), 0, 1)), ids[:1])
