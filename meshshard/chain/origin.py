"""The origin side of a peer: the answers asked of it, run through the chain of the plan in
force, one uninterrupted stream per answer whatever the mesh does meanwhile.

When the plan changes under an answer, it moves to the new chain: caches of units that moved
come from their old owners (KV handoff); what cannot (the owner died) is rebuilt by feeding
the answer's token history again (the origin always keeps it). What to do after an error
frame, a change in the mesh or a silence is decided by `recovery.py`; this driver carries it
out. With greedy or seeded sampling the tokens are those of an undisturbed run.

About our usual module's limit, for a reason: waiting for a chain, running an attempt and
moving caches are the three phases of one answer's life and share its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from meshshard.chain.handoff import moves
from meshshard.chain.inbox import Inbox, next_frame
from meshshard.chain.meter import TokenMeter
from meshshard.chain.recovery import Fail, FeedFrom, Leave, after_change, after_error
from meshshard.chain.seam import ControlPlane
from meshshard.chain.speculate import Speculator
from meshshard.chain.stats import ChainStats
from meshshard.chain.tensors import to_wire
from meshshard.clock import Clock, Pulse
from meshshard.config import Timings
from meshshard.events import EventLog
from meshshard.model.spec import ModelSpec
from meshshard.types import PlanRecord, SessionId
from meshshard.wire import (
    DataFrame,
    DropFrame,
    ErrorCode,
    ErrorFrame,
    HandoffDone,
    HandoffRequest,
    Sampling,
    StepFrame,
    TokenFrame,
)
from meshshard.wire.data import MAX_STOPS

PREFILL_CHUNK = 256  # prompt tokens per frame, so a long prompt does not hold a stage long
MAX_REPLAYS = 8  # chain breaks one answer survives

Send = Callable[[str, DataFrame], Awaitable[None]]


MAX_EARLY = 64  # tokens of later steps kept for an answer while it waits for one before them


class ChainError(Exception):
    """An answer could not complete: no chain, a stage refused it, or a peer vanished."""


class ChainBusy(ChainError):
    """A stage cannot hold another answer's KV cache now; worth asking again later."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MeshTooSmall(ChainError):
    """The serving members cannot run the model (the planner says why); worth asking again
    once a peer joins."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Left(Exception):
    """The plan an answer runs on can no longer serve it (`recovery.Leave`)."""

    def __init__(self, leave: Leave) -> None:
        super().__init__(leave.why)
        self.grace = leave.grace


@dataclass
class Usage:
    """What one answer did, for the caller: timing and the epoch it ran under."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    elapsed_s: float = 0.0
    epoch: tuple[int, str] = (0, "")


class Origin:
    def __init__(
        self,
        control: ControlPlane,
        spec: ModelSpec,
        send: Send,
        events: EventLog,
        stats: ChainStats,
        pulse: Pulse,
        clock: Clock,
        timings: Timings,
        speculate: int = 0,
    ) -> None:
        self.control, self.spec, self._send = control, spec, send
        self.speculate = speculate  # most tokens an answer drafts per pass
        self.events, self.stats, self.pulse = events, stats, pulse
        self.clock, self.timings = clock, timings
        self.meter = TokenMeter(clock.now)
        self.accepting = True
        self._sessions: dict[SessionId, Inbox] = {}
        # Answer ids never repeat, across restarts too (a stage remembers ended ones).
        run = secrets.token_hex(3)
        self._ids = (SessionId(f"{control.node}/{run}.{n}") for n in itertools.count())
        self._tg: asyncio.TaskGroup | None = None

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def start(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg

    def deliver(self, frame: TokenFrame | ErrorFrame | HandoffDone) -> None:
        """A frame for one of our answers (others' late news is dropped)."""
        inbox = self._sessions.get(SessionId(frame.session))
        if inbox is not None:
            inbox.put(frame)

    async def drain(self, deadline: float) -> None:
        """Stop taking answers and wait (until `deadline` seconds) for the running ones."""
        self.accepting = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                while self._sessions:
                    await self.pulse.after(self.pulse.version)

    async def ready_plan(self, newer_than: PlanRecord | None, grace: float) -> PlanRecord:
        """The plan in force once its chain is ready. After a break (`newer_than`), prefer a
        newer plan; the same one is retried only once `grace` seconds have passed. While the
        serving members cannot hold the model at all, give up after `too_small_grace`."""
        start = self.clock.now()
        impossible: float | None = None  # since when no plan can exist
        while True:
            seen = self.pulse.version
            now = self.clock.now()
            waited = now - start
            plan = self.control.plan()
            retry_same = newer_than is None or waited > grace
            usable = plan is not None and (plan != newer_than or retry_same)
            if plan is not None and usable and self.control.ready(plan):
                return plan
            left = self.timings.ready_timeout - waited
            if self.control.plan_possible():
                impossible = None
            else:
                impossible = now if impossible is None else impossible
                verdict = self.timings.too_small_grace - (now - impossible)
                if verdict <= 0:
                    raise MeshTooSmall(
                        f"the mesh cannot run the model now: {self.control.why_no_plan()}",
                        self.timings.too_small_grace,
                    )
                left = min(left, verdict + 0.001)
            if left <= 0:
                why = self.control.why_no_plan() or "the chain is not ready"
                raise ChainError(f"no usable chain after {self.timings.ready_timeout:.0f} s: {why}")
            # Wake on a change, when the grace for the same plan ends, or for the verdict.
            wake = left if retry_same else min(left, grace - waited + 0.001)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wake):
                    await self.pulse.after(seen)

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampling: tuple[float, float, int | None] = (0.0, 1.0, None),
        stop_ids: frozenset[int] = frozenset(),
        usage: Usage | None = None,
    ) -> AsyncGenerator[int, None]:
        """Stream new token ids for a prompt through the mesh."""
        if not self.accepting:
            raise ChainError("this peer is shutting down")
        if not prompt_ids:
            raise ChainError("empty prompt")
        usage = usage or Usage()
        started = self.clock.now()
        temperature, top_p, seed = sampling
        params = Sampling(temperature, top_p, seed if seed is not None else secrets.randbits(62))
        session = next(self._ids)
        reserve = len(prompt_ids) + max_tokens
        inbox = Inbox()
        self._sessions[session] = inbox
        self.stats.sessions_started += 1
        history = list(prompt_ids)
        produced = 0
        usage.prompt_tokens = len(prompt_ids)
        broken: PlanRecord | None = None
        grace = self.timings.same_plan_grace
        used: list[PlanRecord] = []
        speculator = Speculator(self.speculate)
        try:
            for attempt in range(MAX_REPLAYS + 1):
                plan = await self.ready_plan(broken, grace)
                usage.epoch = (plan.epoch.term, plan.epoch.coordinator)
                # Every stage of the last plan holds all but the newest token (not yet fed).
                cached = len(history) - 1 if produced else 0
                if used and used[-1] != plan:
                    self.events.add(
                        "session",
                        f"session {session} moves to epoch {plan.epoch} at {len(history)} tokens",
                    )
                    if cached:
                        await self._move_caches(used[-1], plan, session, attempt, cached, inbox)
                if plan not in used:
                    used.append(plan)
                try:
                    run = self._attempt(
                        plan, session, attempt, inbox, history, produced, cached, params,
                        reserve, speculator, max_tokens, stop_ids,
                    )  # fmt: skip
                    async with contextlib.aclosing(run) as tokens:
                        async for token in tokens:
                            if produced == 0:
                                usage.ttft_s = self.clock.now() - started
                            if token in stop_ids:
                                return
                            produced += 1
                            usage.completion_tokens = produced
                            self.stats.tokens_out += 1
                            self.meter.token(session)
                            history.append(token)
                            yield token
                            if produced == max_tokens:
                                return
                except _Left as e:
                    self.events.add("session", f"session {session} interrupted: {e}")
                    broken, grace = plan, e.grace
            raise ChainError(f"the chain broke {MAX_REPLAYS + 1} times; giving up")
        finally:
            usage.elapsed_s = self.clock.now() - started
            del self._sessions[session]
            self.meter.end(session)
            self.pulse.fire()
            # Freeing caches must not hold up the caller (a dead stage may take a while to fail).
            assert self._tg is not None
            self._tg.create_task(self._drop(used, session))

    async def _attempt(
        self,
        plan: PlanRecord,
        session: SessionId,
        attempt: int,
        inbox: Inbox,
        history: list[int],
        step: int,
        start: int,
        params: Sampling,
        reserve: int,
        speculator: Speculator,
        max_tokens: int,
        stop_ids: frozenset[int],
    ) -> AsyncGenerator[int, None]:
        """Run an answer on one plan from position `start` (what its stages are believed to
        hold), decoding until the caller stops. Raises _Left when the plan can no longer
        serve it, or when a newer chain is ready to take it over. A decode step may carry a
        draft of the next tokens (`speculator`); a pass then yields every token it confirmed.

        The chain feeds itself: the last stage sends each token straight to the first stage
        as the next step, and a copy here (StepFrame.loop), so a token does not hop through
        this peer's answer on its way round; this peer sends steps again only to start, and
        after a replay. The first stage then drafts (StepFrame.drafts, chain/drafts.py);
        this peer drafts only for an answer with too many stop tokens to loop. (This peer's
        work on the copy then runs beside the stages' passes: see docs/data-plane.md for what
        that cost while passes ran in the model thread, and why short ones run on the
        loop.)"""
        first = self.control.address_of(plan.stages[0].device)
        if first is None:
            raise _Left(Leave("the first stage is gone", self.timings.same_plan_grace))
        loops = len(stop_ids) <= MAX_STOPS
        loop = (first, max_tokens - 1, tuple(sorted(stop_ids))) if loops else ("", 0, ())
        drafts = self.speculate if loops else 0
        looping = False  # the chain is feeding itself the steps we wait for
        draft: tuple[int, ...] = ()
        # Tokens of later steps that came before the one awaited: the first stage of a split
        # head sends its copy after the next step's pass, which may come round sooner.
        early: dict[int, TokenFrame] = {}
        while True:
            if (newer := self._newer_ready(plan)) is not None:
                why = f"moving to the ready chain of epoch {newer}"
                raise _Left(Leave(why, self.timings.same_plan_grace))
            if not looping:
                fed = history[start:]
                # Drafts ride on decode steps only, and never past the answer's last token.
                draft = ()
                if len(fed) == 1 and not loops:
                    draft = speculator.draft(history, max_tokens - step - 1)
                ids = torch.tensor(fed + list(draft), dtype=torch.int64)
                for offset in range(0, len(ids), PREFILL_CHUNK):
                    chunk = ids[offset : offset + PREFILL_CHUNK]
                    last = offset + PREFILL_CHUNK >= len(ids)
                    frame = StepFrame(
                        plan.epoch, session, step, start + offset, to_wire(chunk),
                        self.control.address, last, params, attempt, reserve,
                        draft if last else (), *(loop if last else ("", 0, ())), drafts,
                        ends=start + len(fed) if len(fed) > 1 else 0,
                    )  # fmt: skip
                    try:
                        await self._send(first, frame)
                    except Exception as e:  # the first stage's link failed
                        raise _Left(Leave(str(e), self.timings.same_plan_grace)) from None
                looping = loops
            action = await self._next_token(inbox, plan, attempt, step, start, early)
            if isinstance(action, FeedFrom):
                early.clear()
                self.events.add(
                    "replay",
                    f"session {session}: a stage holds {action.position} of {start} positions; "
                    "feeding again",
                )
                self.stats.replays += 1
                start = action.position
                looping = False
                continue
            # A stage cannot confirm what was not drafted, nor the first stage draft more
            # than it was told.
            drafted = min(action.drafted, self.speculate) if loops else len(draft)
            tokens = action.tokens[: drafted + 1]
            if not loops:
                speculator.passed(drafted, len(tokens) - 1)
            self.stats.passes += 1
            self.stats.drafted += drafted
            self.stats.kept += len(tokens) - 1
            for token in tokens:
                yield token  # the caller appends it to `history` before resuming us
                step += 1
            # Stages may hold unconfirmed draft positions past this: the next step cuts them.
            start = len(history) - 1

    def _newer_ready(self, plan: PlanRecord) -> str | None:
        """The epoch of a newer plan whose chain is ready: answers move to it between steps."""
        current = self.control.plan()
        if current is not None and current.epoch > plan.epoch and self.control.ready(current):
            return str(current.epoch)
        return None

    async def _next_token(
        self,
        inbox: Inbox,
        plan: PlanRecord,
        attempt: int,
        step: int,
        start: int,
        early: dict[int, TokenFrame],
    ) -> TokenFrame | FeedFrom:
        """The tokens from `step` on, or where to feed again from; raises what recovery
        decides. Tokens of later steps that arrive first wait in `early`."""
        if (kept := early.pop(step, None)) is not None:
            return kept
        started = self.clock.now()
        while True:
            seen = self.pulse.version
            waited = self.clock.now() - started
            if inbox.empty():  # nothing said yet: has the mesh moved under this try?
                gone = any(self.control.address_of(s.device) is None for s in plan.stages)
                action = after_change(step, waited, self._newer_ready(plan), gone, self.timings)
                if isinstance(action, Leave | Fail):
                    self._act(action)
            frame = await next_frame(inbox, self.pulse, seen, self.timings.step_timeout - waited)
            match frame:
                case None:
                    continue  # the mesh changed, or time ran out: look again
                case TokenFrame(attempt=a, step=s) if a == attempt and s == step:
                    return frame
                case TokenFrame(attempt=a, step=s) if a == attempt and s > step:
                    if len(early) < MAX_EARLY:
                        early[s] = frame
                case ErrorFrame(attempt=a) if a == attempt:
                    action = after_error(frame.code, frame.message, frame.have, start, self.timings)
                    if isinstance(action, FeedFrom):
                        return action
                    if isinstance(action, Leave | Fail):
                        self._act(action)

    def _act(self, action: Leave | Fail) -> None:
        """Carry out a recovery decision that ends this try."""
        if isinstance(action, Leave):
            raise _Left(action)
        if action.busy:
            raise ChainBusy(action.why, self.timings.busy_retry)
        raise ChainError(action.why)

    async def _move_caches(
        self,
        old: PlanRecord,
        new: PlanRecord,
        session: SessionId,
        attempt: int,
        length: int,
        inbox: Inbox,
    ) -> None:
        """Ask the old owners of units that moved to hand their caches to the new owners, and
        wait until they have (or cannot: then the feed finds the gap and replays)."""
        planned = moves(old, new, self.spec.num_units)
        if any(self.control.address_of(m.source) is None for m in planned):
            return  # a cache died with its owner: the whole chain replays, handoffs are moot
        targets = []
        for move in planned:
            source = self.control.address_of(move.source)
            target = self.control.address_of(move.target)
            if source is None or target is None:
                continue
            req = HandoffRequest(
                new.epoch, session, attempt, move.start, move.end, length, target,
                self.control.address,
            )  # fmt: skip
            try:
                await self._send(source, req)
            except Exception:
                continue
            targets.append(move.target)
        # A source may leave as soon as it has sent (a graceful leave ends so): what matters
        # is that the new owners are there to take the caches and say so.
        waiting = len(targets)
        started = self.clock.now()
        while waiting:
            seen = self.pulse.version
            left = self.timings.handoff_timeout - (self.clock.now() - started)
            alive = all(self.control.address_of(n) is not None for n in targets)
            if not alive or left <= 0:
                self.events.add("handoff", f"session {session}: handoff incomplete")
                return
            match await next_frame(inbox, self.pulse, seen, left):
                case HandoffDone(attempt=a) if a == attempt:
                    waiting -= 1
                    self.stats.handoffs += 1
                    self.events.add(
                        "handoff",
                        f"session {session}: KV cache of {length} positions handed over "
                        f"for epoch {new.epoch}",
                    )
                case ErrorFrame(attempt=a, code=ErrorCode.NO_HANDOFF) as refused if a == attempt:
                    self.events.add("handoff", f"session {session}: {refused.message}")
                    waiting -= 1

    async def _drop(self, plans: list[PlanRecord], session: SessionId) -> None:
        nodes = {stage.device for plan in plans for stage in plan.stages}
        epoch = plans[-1].epoch if plans else None
        for node in sorted(nodes):
            addr = self.control.address_of(node)
            if addr is not None and epoch is not None:
                with contextlib.suppress(Exception):
                    await self._send(addr, DropFrame(epoch, session))
