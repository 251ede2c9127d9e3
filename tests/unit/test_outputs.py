"""What a stage's outputs send where (chain/outputs.py), without a model."""

from __future__ import annotations

import torch

from meshshard.chain.outputs import CacheMiss, Failed, Later, failed, sends
from meshshard.chain.tensors import to_wire
from meshshard.types import Epoch
from meshshard.wire import ErrorCode, ErrorFrame, Sampling, StepFrame, TokenFrame, WireError

EPOCH = Epoch(2, "b")
GREEDY = Sampling(temperature=0.0, top_p=1.0, seed=0)


def step(loop: str = "", until: int = 10, stops: tuple[int, ...] = ()) -> StepFrame:
    ids = to_wire(torch.tensor([5]))
    return StepFrame(
        EPOCH, "s", 3, 7, ids, "origin:1", True, GREEDY, loop=loop, until=until, stops=stops
    )


def test_hidden_states_go_to_the_next_stage_as_the_same_step() -> None:
    hidden = to_wire(torch.zeros(1, 4))
    ((addr, frame),) = sends(step(), hidden, "next:1")
    assert addr == "next:1" and isinstance(frame, StepFrame)
    assert (frame.session, frame.step, frame.start, frame.tensor) == ("s", 3, 7, hidden)


def test_tokens_feed_the_first_stage_before_the_origin_hears_of_them() -> None:
    (ahead, copy) = sends(step(loop="first:1"), (9,), None)
    assert ahead[0] == "first:1" and isinstance(ahead[1], StepFrame)
    assert (ahead[1].step, ahead[1].start, ahead[1].draft) == (4, 8, ())
    assert copy[0] == "origin:1" and isinstance(copy[1], TokenFrame) and copy[1].tokens == (9,)


def test_an_answer_that_ends_feeds_nothing() -> None:
    for frame in (step(), step(loop="first:1", until=3), step(loop="first:1", stops=(9,))):
        ((addr, copy),) = sends(frame, (9,), None)
        assert addr == "origin:1" and isinstance(copy, TokenFrame)


def test_failures_and_what_was_left_go_as_they_are() -> None:
    ((addr, error),) = sends(step(), Failed(ErrorCode.CACHE_MISS, "short", 5), None)
    assert addr == "origin:1" and isinstance(error, ErrorFrame)
    assert (error.code, error.have, error.step) == (ErrorCode.CACHE_MISS, 5, 3)
    left = (("x:1", error),)
    assert sends(step(), Later(left), None) == list(left)


def test_a_pass_that_raised_tells_each_step_why() -> None:
    batch = [step(), step()]
    assert (
        failed(batch, CacheMiss(4), ["s"])
        == [Failed(ErrorCode.CACHE_MISS, str(CacheMiss(4)), 4)] * 2
    )
    assert failed(batch, CacheMiss(0), [])[0].code == ErrorCode.UNKNOWN_SESSION
    assert failed(batch, WireError("bad"), ["s"])[0] == Failed(ErrorCode.BAD_FRAME, "bad")
    assert failed(batch, RuntimeError("bug"), ["s"])[1].code == ErrorCode.INTERNAL
