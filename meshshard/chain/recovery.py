"""What an origin does when its answer's chain speaks or falls silent, pure: continue, feed
again from an earlier position, leave the plan for the next (or the same one after a grace),
or give up. The origin's driver (`origin.py`) only carries the actions out."""

from __future__ import annotations

from dataclasses import dataclass

from meshshard.config import Timings
from meshshard.wire import ErrorCode


@dataclass(frozen=True)
class Wait:
    """Nothing to do: keep waiting for the token."""


@dataclass(frozen=True)
class FeedFrom:
    """A stage holds only `position` positions: feed the answer again from there."""

    position: int


@dataclass(frozen=True)
class Leave:
    """This plan cannot serve the answer: go on with the next plan, or with this one again
    once `grace` seconds have passed without a newer one."""

    why: str
    grace: float


@dataclass(frozen=True)
class Fail:
    """The answer cannot go on; `busy`: only for now, for want of memory."""

    why: str
    busy: bool = False


Action = Wait | FeedFrom | Leave | Fail


def after_error(code: ErrorCode, message: str, have: int, start: int, timings: Timings) -> Action:
    """An error frame of the current try, for the step fed from position `start`."""
    match code:
        case ErrorCode.CACHE_MISS | ErrorCode.UNKNOWN_SESSION:
            # A later chunk of a feed already sent again says so too: only a gap matters.
            return FeedFrom(have) if have < start else Wait()
        case ErrorCode.NO_HANDOFF:
            return Wait()  # late news of the handoff phase: a gap shows as a cache miss
        case ErrorCode.BAD_FRAME:
            return Fail(f"{code}: {message}")
        case ErrorCode.BUSY:
            return Fail(message, busy=True)
        case ErrorCode.NOT_READY:
            return Leave(f"{code}: {message}", timings.not_ready_retry)  # ready in a moment
        case ErrorCode.STALE_EPOCH | ErrorCode.INTERNAL:
            return Leave(f"{code}: {message}", timings.same_plan_grace)


def after_change(
    step: int, waited: float, newer_ready: str | None, stage_gone: bool, timings: Timings
) -> Action:
    """No token yet, and the mesh may have changed: `newer_ready` names a newer plan whose
    chain is ready; `stage_gone`: a stage of this plan left the mesh."""
    if newer_ready is not None:
        return Leave(f"the plan moved on to epoch {newer_ready}", timings.same_plan_grace)
    if stage_gone:
        return Leave("a stage left the mesh", timings.same_plan_grace)
    if waited > timings.step_timeout:
        return Fail(f"no token {step} within {timings.step_timeout:.0f} s")
    return Wait()
