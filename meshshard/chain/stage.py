"""One stage of the chain: runs its shard over incoming steps, in order, batching decode steps
of different sessions into one forward pass, and passes results on.

Forward passes run in the model thread so the peer's event loop (gossip, sockets) stays
responsive; whatever else touches a cache (drops, handoffs) runs there too, so never under a
forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace

import torch

from meshshard.chain.speculate import confirmed
from meshshard.chain.tensors import first_rows, from_wire, to_wire
from meshshard.chain.worker import run_model
from meshshard.model.batching import MAX_BATCH
from meshshard.model.sampling import Sampler, SamplingParams
from meshshard.model.shard import Shard, UnknownSession
from meshshard.types import Epoch
from meshshard.wire import DataFrame, ErrorCode, ErrorFrame, StepFrame, TokenFrame, WireError

logger = logging.getLogger(__name__)

Send = Callable[[str, DataFrame], Awaitable[None]]
# (steps in a batch, seconds its forward pass took, whether all were single-token decodes)
Observe = Callable[[int, float, bool], None]
MAX_QUEUE = 64  # steps waiting here before senders are made to wait
STEP_WEIGHT = 0.2  # of the newest batch in the step time average


class CacheMiss(Exception):
    """A step continues from a position this stage's cache does not reach."""

    def __init__(self, have: int) -> None:
        super().__init__(f"this stage holds {have} positions of the session")
        self.have = have


def _fitted(batch: list[StepFrame]) -> list[StepFrame]:
    """The batch with drafts cut so that its padded pass runs no more positions than a full
    batch of single steps (MAX_BATCH): every row pays for the longest row, so one long draft
    must not multiply the others' cost. Cutting a draft is safe: the last stage confirms
    what is left of it, and the origin drafts less next time."""
    most = MAX_BATCH // len(batch) - 1
    return [
        replace(f, tensor=first_rows(f.tensor, 1 + most), draft=f.draft[:most])
        if len(f.draft) > most
        else f
        for f in batch
    ]


class StageWorker:
    def __init__(
        self,
        shard: Shard,
        epoch: Epoch,
        next_addr: str | None,
        send: Send,
        observe: Observe | None = None,
    ) -> None:
        self.shard = shard
        self.epoch = epoch
        self.next_addr = next_addr  # None: this is the last stage, it samples
        self._send = send
        self._queue: deque[StepFrame] = deque()
        self._has_work = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self.steps = 0
        self.batches = 0
        self.step_ms = 0.0  # moving average of one decode batch's forward pass
        self.forward_s = 0.0  # wall time of all forward passes
        self.forward_cpu_s = 0.0  # ... and the model thread's CPU time in them
        self._observe = observe
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def refuse_queued(self, message: str) -> None:
        """This stage is being replaced: tell the origin of every waiting step."""
        while self._queue:
            await self._error(self._queue.popleft(), ErrorCode.STALE_EPOCH, message)
        self._has_room.set()

    async def put(self, frame: StepFrame) -> None:
        while len(self._queue) >= MAX_QUEUE and not self._closing:
            self._has_room.clear()
            await self._has_room.wait()
        if self._closing:
            await self._error(frame, ErrorCode.STALE_EPOCH, "this stage moved to a new plan")
            return
        self._queue.append(frame)
        self._has_work.set()

    async def run(self) -> None:
        while not self._closing:
            await self._has_work.wait()
            self._idle.clear()
            try:
                while self._queue and not self._closing:
                    batch = self._take_batch()
                    if len(self._queue) < MAX_QUEUE:
                        self._has_room.set()
                    await self._run_batch(batch)
            finally:
                self._idle.set()
            self._has_work.clear()

    async def close(self, message: str) -> None:
        """Finish the batch in hand (a cache is never moved under a forward pass), then
        refuse what is still queued."""
        self._closing = True
        self._has_work.set()
        await self._idle.wait()
        await self.refuse_queued(message)

    def _take_batch(self) -> list[StepFrame]:
        """The next frame, plus following decode steps (a token, and maybe a draft to verify)
        of other prefilled sessions."""
        first = self._queue.popleft()
        batch = [first]
        if not self._decodable(first):
            return batch
        seen = {first.session}
        while self._queue and len(batch) < MAX_BATCH:
            nxt = self._queue[0]
            if nxt.session in seen or not self._decodable(nxt):
                break
            self._queue.popleft()
            batch.append(nxt)
            seen.add(nxt.session)
        return _fitted(batch) if len(batch) > 1 else batch

    def _decodable(self, frame: StepFrame) -> bool:
        # A cache may hold more than the step continues from: a draft's unconfirmed tokens.
        return (
            frame.tensor.shape[0] - len(frame.draft) == 1
            and frame.session in self.shard.sessions
            and (not self.shard.layers or self.shard.cache_length(frame.session) >= frame.start)
        )

    async def _run_batch(self, batch: list[StepFrame]) -> None:
        started = time.perf_counter()
        try:
            outputs = await run_model(self._compute, batch)
        except CacheMiss as e:
            session = batch[0].session
            if session in self.shard.sessions:
                await self._error(batch[0], ErrorCode.CACHE_MISS, str(e), e.have)
            else:
                await self._error(
                    batch[0], ErrorCode.UNKNOWN_SESSION, f"unknown session {session!r}"
                )
            return
        except (ValueError, WireError, UnknownSession) as e:
            code = (
                ErrorCode.UNKNOWN_SESSION if isinstance(e, UnknownSession) else ErrorCode.BAD_FRAME
            )
            for frame in batch:
                await self._error(frame, code, str(e))
            return
        except Exception as e:  # a bug must cost these steps, not the peer
            logger.exception("stage failed on %d steps", len(batch))
            for frame in batch:
                await self._error(frame, ErrorCode.INTERNAL, f"stage failed: {e}")
            return
        seconds = time.perf_counter() - started
        self.forward_s += seconds
        self.steps += len(batch)
        self.batches += 1
        decode = all(f.tensor.shape[0] == 1 for f in batch)
        if decode:  # prefills take longer per step: they would hide the decode time
            ms = seconds * 1000
            self.step_ms = (
                ms if not self.step_ms else self.step_ms + STEP_WEIGHT * (ms - self.step_ms)
            )
        if self._observe is not None:
            self._observe(len(batch), seconds, decode)
        for frame, out in zip(batch, outputs, strict=True):
            await self._emit(frame, out)

    def _compute(self, batch: list[StepFrame]) -> list[torch.Tensor]:
        cpu = time.thread_time()
        try:
            return self._forward(batch)
        finally:
            self.forward_cpu_s += time.thread_time() - cpu

    def _forward(self, batch: list[StepFrame]) -> list[torch.Tensor]:
        if len(batch) > 1:
            for f in batch:
                self.shard.truncate(f.session, f.start)
            xs = [from_wire(f.tensor) for f in batch]
            return self.shard.decode_batch([f.session for f in batch], xs)
        (frame,) = batch
        if self.shard.layers:
            # A resumed session continues from what the origin believes is cached: shorter
            # here means the origin must go back; longer means recompute (same values).
            have = self.shard.cache_length(frame.session)
            if have < frame.start:
                raise CacheMiss(have)
            self.shard.truncate(frame.session, frame.start)  # some layers may hold more
        x = from_wire(frame.tensor)
        positions = torch.arange(frame.start, frame.start + x.shape[0])
        logits = len(frame.draft) + 1  # a draft's positions are each sampled
        return [self.shard.prefill(frame.session, x, positions, logits=logits)]

    async def _emit(self, frame: StepFrame, out: torch.Tensor) -> None:
        try:
            if self.next_addr is not None:
                await self._send(self.next_addr, replace(frame, tensor=to_wire(out)))
            elif frame.sample:
                s = frame.sampling
                params = SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=s.seed)
                # The one copy off the device.
                tokens = confirmed(Sampler(params), out.cpu(), frame.draft, frame.step)
                await self._send(
                    frame.origin,
                    TokenFrame(frame.epoch, frame.session, frame.step, tokens, frame.attempt),
                )
        except Exception as e:  # a peer gone mid-send: tell the origin, keep serving others
            logger.warning("stage could not pass on %s step %d: %s", frame.session, frame.step, e)
            await self._error(frame, ErrorCode.INTERNAL, f"next hop failed: {e}")

    async def _error(self, frame: StepFrame, code: ErrorCode, message: str, have: int = 0) -> None:
        error = ErrorFrame(
            frame.epoch, frame.session, frame.step, code, message, frame.attempt, have
        )
        try:
            await self._send(frame.origin, error)
        except Exception as e:
            logger.warning("could not report %s to %s: %s", code, frame.origin, e)
