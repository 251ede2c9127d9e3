"""The first stage's drafts for answers the chain feeds itself: kept ids, by position."""

from __future__ import annotations

from dataclasses import replace

import torch

from meshshard.chain import drafts
from meshshard.chain.drafts import Drafter
from meshshard.chain.tensors import from_wire, to_wire
from meshshard.types import Epoch
from meshshard.wire import Sampling, StepFrame

E = Epoch(1, "a")
GREEDY = Sampling(0.0, 1.0, 0)
LOOP = "127.0.0.1:7001"


def fed(start: int, ids: list[int], step: int = 0, loop: str = LOOP, **kw: object) -> StepFrame:
    tensor = to_wire(torch.tensor(ids, dtype=torch.int64))
    frame = StepFrame(E, "s", step, start, tensor, "127.0.0.1:7000", True, GREEDY, 0, 0)
    return replace(frame, loop=loop, until=63, drafts=8, **kw)  # type: ignore[arg-type]


def ids_of(frame: StepFrame) -> list[int]:
    return from_wire(frame.tensor).tolist()


PROMPT = [1, 2, 3, 4, 5, 6, 1, 2]  # "1 2" was followed by 3 4 5 6


def test_a_step_the_chain_feeds_itself_carries_a_draft_from_the_prompt() -> None:
    drafter = Drafter()
    first, rest = fed(0, PROMPT[:5], loop=""), fed(5, PROMPT[5:])
    assert drafter.fed(first) == first and drafter.fed(rest) == rest  # a prompt: no draft
    step = drafter.fed(fed(8, [3], step=1))
    assert step.draft == (4, 5) and ids_of(step) == [3, 4, 5]  # two at first, as the origin's
    assert step.start == 8 and step.step == 1


def test_what_a_pass_confirmed_grows_the_next_draft_and_the_rest_is_cut() -> None:
    drafter = Drafter()
    drafter.fed(fed(0, PROMPT))
    assert drafter.fed(fed(8, [3], step=1)).draft == (4, 5)
    # Both confirmed: the next step feeds the token after them, at position 11.
    assert drafter.fed(fed(11, [6], step=4)).draft == (1, 2, 3, 4)
    # The first of four confirmed, then 5 where the draft said 2: "1 5" was never seen.
    assert drafter.fed(fed(13, [5], step=6)).draft == ()
    # Positions 12 and 13 hold the confirmed 1 and the new 5, the draft's 2 3 4 are gone:
    # "5 6" was last followed by 1 5 6. A miss took the draft's length from 4 to 3.
    assert drafter.fed(fed(14, [6], step=7)).draft == (1, 5, 6)


def test_answers_that_do_not_speculate_or_feed_from_the_origin_get_no_draft() -> None:
    drafter = Drafter()
    plain = replace(fed(0, PROMPT), drafts=0)
    assert drafter.fed(plain) == plain and len(drafter) == 0
    drafter.fed(fed(0, PROMPT))
    from_origin = fed(8, [3], step=1, loop="")
    assert drafter.fed(from_origin) == from_origin  # recorded, not drafted
    drafted = fed(9, [4, 5], step=2, draft=(5,))
    assert drafter.fed(drafted) == drafted  # the origin's draft stands
    hidden = replace(fed(10, [3], step=3), tensor=to_wire(torch.zeros(1, 8)))
    assert drafter.fed(hidden) == hidden  # not ids: left to the stage to refuse


def test_a_draft_never_runs_past_the_answers_last_step() -> None:
    drafter = Drafter()
    drafter.fed(fed(0, PROMPT))
    assert drafter.fed(fed(8, [3], step=62)).draft == (4,)  # until 63: one more step
    drafter.forget("s")
    drafter.fed(fed(0, PROMPT))
    assert drafter.fed(fed(8, [3], step=63)).draft == ()


def test_a_peer_first_mid_answer_drafts_from_what_it_was_fed_since() -> None:
    drafter = Drafter()
    assert drafter.fed(fed(40, [1, 2, 3, 1])) == fed(40, [1, 2, 3, 1])  # a replay's feed
    assert drafter.fed(fed(44, [2], step=1)).draft == (3, 1)
    # Fed again from before what it keeps (a replay further back): afresh from there.
    drafter.fed(fed(10, [7, 7, 7, 7]))
    assert drafter.fed(fed(14, [8], step=1)).draft == ()


def test_answers_kept_are_bounded_and_forgotten() -> None:
    drafter = Drafter()
    for i in range(drafts.MOST_ANSWERS + 5):
        drafter.fed(replace(fed(0, PROMPT), session=f"s{i}"))
    assert len(drafter) == drafts.MOST_ANSWERS
    drafter.forget(f"s{drafts.MOST_ANSWERS + 4}")
    assert len(drafter) == drafts.MOST_ANSWERS - 1
