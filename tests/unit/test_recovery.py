"""What an origin does after an error frame or a change in the mesh: a pure table."""

from __future__ import annotations

import pytest

from meshshard.chain.recovery import (
    Action,
    Fail,
    FeedFrom,
    Leave,
    Wait,
    after_change,
    after_error,
)
from meshshard.config import TEST_TIMINGS as T
from meshshard.wire import ErrorCode as E


@pytest.mark.parametrize(
    "code, have, start, action",
    [
        # A stage holds fewer positions than this feed continues from: feed again from there.
        (E.CACHE_MISS, 12, 40, FeedFrom(12)),
        (E.UNKNOWN_SESSION, 0, 40, FeedFrom(0)),
        # ... but once fed again from there, later chunks' misses are old news.
        (E.CACHE_MISS, 12, 12, Wait()),
        (E.UNKNOWN_SESSION, 0, 0, Wait()),
        (E.NO_HANDOFF, 0, 40, Wait()),  # a gap, if any, shows as a miss
        # The plan cannot serve: the next one, or this one again after a grace.
        (E.STALE_EPOCH, 0, 40, Leave("stale-epoch: m", T.same_plan_grace)),
        (E.INTERNAL, 0, 40, Leave("internal: m", T.same_plan_grace)),
        (E.NOT_READY, 0, 40, Leave("not-ready: m", T.not_ready_retry)),  # ready in a moment
        # Hopeless, or hopeless for now.
        (E.BAD_FRAME, 0, 40, Fail("bad-frame: m")),
        (E.BUSY, 0, 0, Fail("m", busy=True)),
    ],
)
def test_after_an_error_frame(code: E, have: int, start: int, action: Action) -> None:
    assert after_error(code, "m", have, start, T) == action


def test_every_error_code_has_an_answer() -> None:
    for code in E:
        assert after_error(code, "m", 0, 0, T) is not None


@pytest.mark.parametrize(
    "waited, newer, gone, action",
    [
        (1.0, None, False, Wait()),
        (1.0, "9/b", False, Leave("the plan moved on to epoch 9/b", T.same_plan_grace)),
        (1.0, None, True, Leave("a stage left the mesh", T.same_plan_grace)),
        (1.0, "9/b", True, Leave("the plan moved on to epoch 9/b", T.same_plan_grace)),
        (T.step_timeout + 1, None, False, Fail(f"no token 7 within {T.step_timeout:.0f} s")),
        # A newer ready chain wins over giving up: the answer moves to it.
        (T.step_timeout + 1, "9/b", False, Leave("the plan moved on to epoch 9/b", 2.0)),
    ],
)
def test_after_a_change_or_a_silence(
    waited: float, newer: str | None, gone: bool, action: Action
) -> None:
    assert after_change(7, waited, newer, gone, T) == action
