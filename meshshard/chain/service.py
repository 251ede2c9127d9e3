"""The data plane of one peer: follows plans (loads its stage's shard, reports readiness),
serves /chain/ws, and runs sessions for requests that arrive here (the origin)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch
from aiohttp import web

from meshshard.chain.links import LinkError, Links
from meshshard.chain.stage import StageWorker
from meshshard.chain.tensors import to_wire
from meshshard.chain.worker import run_model
from meshshard.mesh.node import ControlNode
from meshshard.mesh.types import PlanRecord
from meshshard.model.shard import Shard
from meshshard.wire import (
    MAX_FRAME_BYTES,
    DataFrame,
    DropFrame,
    ErrorFrame,
    Sampling,
    StepFrame,
    TokenFrame,
    WireError,
    decode_frame,
)

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens per frame, so a long prompt does not hold a stage long
STEP_TIMEOUT = 120.0  # seconds to wait for one token before giving up on a session
READY_TIMEOUT = 120.0
MAX_REPLAYS = 8  # chain breaks one session survives
PLAN_POLL = 0.05  # how often a waiting session checks whether its plan still stands
SAME_PLAN_GRACE = 3.0  # after a break, wait this long for a newer plan before retrying


class ChainError(Exception):
    """A session could not complete: no chain, a stage refused it, or a peer vanished."""


class _Broken(Exception):
    """The plan a session runs on can no longer serve it; replay on the next one."""


@dataclass
class Usage:
    """What one session did, for the caller: timing and the epoch it ran under."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    elapsed_s: float = 0.0
    epoch: tuple[int, str] = (0, "")


class ChainService:
    def __init__(
        self,
        control: ControlNode,
        model_dir: Path,
        dtype: str,
        session: aiohttp.ClientSession,
        hidden_size: int,
    ) -> None:
        self.control = control
        self.model_dir = model_dir
        self.dtype = dtype
        self.hidden_size = hidden_size
        self.stage: StageWorker | None = None
        self._http = session
        self._plans: asyncio.Queue[PlanRecord] = asyncio.Queue()
        self._sessions: dict[str, asyncio.Queue[TokenFrame | ErrorFrame]] = {}
        self._ids = itertools.count()
        self._links: Links | None = None
        self._stage_task: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self.accepting = True
        self.tokens_out = 0
        self.replays = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._links = Links(self._http, self.handle_frame, tg)
            try:
                while True:
                    plan = await self._plans.get()
                    while not self._plans.empty():
                        plan = self._plans.get_nowait()  # only the newest matters
                    try:
                        await self._apply(plan)
                    except Exception as e:  # a shard that fails to load must not end the peer
                        logger.error(
                            "[%s] cannot serve epoch %s: %s", self.control.id, plan.epoch, e
                        )
            finally:
                await self._stop_stage()
                await self._links.close()

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def on_plan(self, plan: PlanRecord) -> None:
        self._plans.put_nowait(plan)

    async def drain(self, deadline: float) -> None:
        """Stop taking requests and wait (until `deadline` seconds) for running sessions."""
        self.accepting = False
        end = time.monotonic() + deadline
        while self._sessions and time.monotonic() < end:
            await asyncio.sleep(0.05)

    # -- plans -------------------------------------------------------------------------------

    async def _apply(self, plan: PlanRecord) -> None:
        me = self.control.id
        mine = plan.stage_of(me)
        if mine is None:
            await self._stop_stage()
            self.control.set_ready(plan.epoch)
            return
        index = plan.stages.index(mine)
        nxt = plan.stages[index + 1].device if index + 1 < len(plan.stages) else None
        next_addr = self.control.addr_of(nxt) if nxt is not None else None
        if nxt is not None and next_addr is None:
            logger.warning("next stage %s is not a live member; waiting for a new plan", nxt)
            return
        current = self.stage
        if current is not None and (current.shard.start, current.shard.end) == (
            mine.start,
            mine.end,
        ):
            current.epoch, current.next_addr = plan.epoch, next_addr
        else:
            await self._stop_stage()
            started = time.monotonic()
            shard = await run_model(Shard.load, self.model_dir, mine.start, mine.end, self.dtype)
            logger.info(
                "[%s] loaded units %d..%d (%.0f MB) in %.1f s for epoch %s",
                me,
                mine.start,
                mine.end - 1,
                shard.weight_bytes() / 1e6,
                time.monotonic() - started,
                plan.epoch,
            )
            assert self._tg is not None and self._links is not None
            self.stage = StageWorker(shard, plan.epoch, next_addr, self._links.send)
            self._stage_task = self._tg.create_task(self.stage.run())
        if self.control.book.current == plan:
            self.control.set_ready(plan.epoch)

    async def _stop_stage(self) -> None:
        if self._stage_task is not None:
            self._stage_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stage_task
        if self.stage is not None:
            await self.stage.refuse_queued("this stage moved to a new plan")
        self._stage_task = None
        self.stage = None

    # -- frames ------------------------------------------------------------------------------

    async def handle_frame(self, frame: DataFrame) -> None:
        match frame:
            case StepFrame():
                stage = self.stage
                if stage is None or stage.epoch != frame.epoch:
                    current = self.control.book.epoch
                    stale = current is not None and frame.epoch < current
                    code = "stale-epoch" if stale else "not-ready"
                    await self._reply_error(frame, code, f"this peer serves epoch {current}")
                    return
                await stage.put(frame)
            case DropFrame():
                if self.stage is not None:
                    await self.stage.put(frame)
            case TokenFrame() | ErrorFrame():
                queue = self._sessions.get(frame.session)
                if queue is not None:
                    queue.put_nowait(frame)

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, heartbeat=10)
        await ws.prepare(request)
        bad = 0
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            try:
                frame = decode_frame(msg.data, self.hidden_size)
            except WireError as e:
                bad += 1
                if bad <= 3 or bad % 1000 == 0:
                    logger.warning(
                        "refused a frame from %s (%d so far): %s", request.remote, bad, e
                    )
                continue
            await self.handle_frame(frame)
        return ws

    async def _reply_error(self, frame: StepFrame, code: str, message: str) -> None:
        error = ErrorFrame(frame.epoch, frame.session, frame.step, code, message)
        with contextlib.suppress(LinkError):
            assert self._links is not None
            await self._links.send(frame.origin, error)

    # -- sessions (this peer as origin) ------------------------------------------------------

    async def ready_plan(
        self, timeout: float = READY_TIMEOUT, newer_than: PlanRecord | None = None
    ) -> PlanRecord:
        """The plan in force once its chain is ready. After a break (`newer_than`), prefer a
        newer plan; the same one is retried only if it stays ready for a while."""
        start = time.monotonic()
        end = start + timeout
        while True:
            plan = self.control.book.current
            retry_same = newer_than is None or time.monotonic() - start > SAME_PLAN_GRACE
            usable = plan is not None and (plan != newer_than or retry_same)
            if plan is not None and usable and self.control.chain_ready(plan):
                return plan
            if time.monotonic() > end:
                why = self.control.plan_error or "the chain is not ready"
                raise ChainError(f"no usable chain after {timeout:.0f} s: {why}")
            await asyncio.sleep(0.05)

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampling: tuple[float, float, int | None] = (0.0, 1.0, None),
        stop_ids: frozenset[int] = frozenset(),
        usage: Usage | None = None,
    ) -> AsyncIterator[int]:
        """Stream new token ids for a prompt through the mesh.

        If the chain breaks (a stage dies, or a new plan moves units), the session waits for
        the next usable chain and replays its token history there (the origin always keeps it),
        then carries on: the caller sees one uninterrupted stream, and with greedy or seeded
        sampling the same tokens as if nothing had happened.
        """
        if not self.accepting:
            raise ChainError("this peer is shutting down")
        if not prompt_ids:
            raise ChainError("empty prompt")
        usage = usage or Usage()
        started = time.monotonic()
        temperature, top_p, seed = sampling
        params = Sampling(temperature, top_p, seed if seed is not None else secrets.randbits(62))
        base = f"{self.control.id}/{next(self._ids)}"
        history = list(prompt_ids)
        produced = 0
        usage.prompt_tokens = len(prompt_ids)
        broken: PlanRecord | None = None
        try:
            for attempt in range(MAX_REPLAYS + 1):
                plan = await self.ready_plan(newer_than=broken)
                usage.epoch = (plan.epoch.term, plan.epoch.coordinator)
                session = f"{base}/{attempt}"
                if attempt:
                    self.replays += 1
                    logger.info(
                        "[%s] session %s: replaying %d tokens on epoch %s",
                        self.control.id, base, len(history), plan.epoch,
                    )  # fmt: skip
                try:
                    attempt_tokens = self._attempt(plan, session, history, produced, params)
                    async with contextlib.aclosing(attempt_tokens) as tokens:
                        async for token in tokens:
                            if produced == 0:
                                usage.ttft_s = time.monotonic() - started
                            if token in stop_ids:
                                return
                            produced += 1
                            usage.completion_tokens = produced
                            self.tokens_out += 1
                            history.append(token)
                            yield token
                            if produced == max_tokens:
                                return
                except _Broken as e:
                    logger.info("[%s] session %s interrupted: %s", self.control.id, base, e)
                    broken = plan
            raise ChainError(f"the chain broke {MAX_REPLAYS + 1} times; giving up")
        finally:
            usage.elapsed_s = time.monotonic() - started

    async def _attempt(
        self, plan: PlanRecord, session: str, history: list[int], step: int, params: Sampling
    ) -> AsyncGenerator[int, None]:
        """Run one session on one plan: prefill `history`, then decode until the caller stops.
        Raises _Broken when this plan can no longer serve it."""
        queue: asyncio.Queue[TokenFrame | ErrorFrame] = asyncio.Queue()
        self._sessions[session] = queue
        me = self.control.membership.me.addr
        try:
            first = self.control.addr_of(plan.stages[0].device)
            if first is None:
                raise _Broken("the first stage is gone")
            ids = torch.tensor(history, dtype=torch.int64)
            for start in range(0, len(ids), PREFILL_CHUNK):
                chunk = ids[start : start + PREFILL_CHUNK]
                last = start + PREFILL_CHUNK >= len(ids)
                frame = StepFrame(
                    plan.epoch, session, step, start, to_wire(chunk), me, last, params
                )
                await self._send(first, frame)
            while True:
                token = await self._next_token(queue, step, plan)
                yield token
                step += 1
                tensor = to_wire(torch.tensor([token], dtype=torch.int64))
                position = len(history)  # the caller appended `token` before resuming us
                frame = StepFrame(plan.epoch, session, step, position - 1, tensor, me, True, params)
                await self._send(first, frame)
        finally:
            del self._sessions[session]
            # Freeing caches must not hold up a replay (a dead stage may take a while to fail).
            assert self._tg is not None
            self._tg.create_task(self._drop(plan, session))

    async def _next_token(
        self, queue: asyncio.Queue[TokenFrame | ErrorFrame], step: int, plan: PlanRecord
    ) -> int:
        waited = 0.0
        while True:
            try:
                async with asyncio.timeout(PLAN_POLL):
                    frame = await queue.get()
            except TimeoutError:
                waited += PLAN_POLL
                if self.control.book.current != plan:
                    raise _Broken(f"the plan moved on to epoch {self.control.book.epoch}") from None
                if any(self.control.addr_of(s.device) is None for s in plan.stages):
                    raise _Broken("a stage left the mesh") from None
                if waited > STEP_TIMEOUT:
                    raise ChainError(f"no token {step} within {STEP_TIMEOUT:.0f} s") from None
                continue
            if isinstance(frame, ErrorFrame):
                if frame.code in ("bad-frame",):
                    raise ChainError(f"{frame.code}: {frame.message}")
                raise _Broken(f"{frame.code}: {frame.message}")
            if frame.step == step:
                return frame.token

    async def _send(self, addr: str, frame: DataFrame) -> None:
        assert self._links is not None
        try:
            await self._links.send(addr, frame)
        except LinkError as e:
            raise _Broken(str(e)) from None

    async def _drop(self, plan: PlanRecord, session: str) -> None:
        for stage in plan.stages:
            addr = self.control.addr_of(stage.device)
            if addr is not None and self._links is not None:
                with contextlib.suppress(LinkError):
                    await self._links.send(addr, DropFrame(plan.epoch, session))
