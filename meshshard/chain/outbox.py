"""A stage's outputs on their way: sent at once where the links take them (`send_now`: an open
raw link with room and nothing before it on it, rawlinks.py), else by sender tasks, in order
behind what they hold, so the next pass starts while the last one's frames go out.

A prompt's activations go by a sender of their own: on a slow link they would hold up the
decode steps computed after them (links.py sends them by another socket)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import torch

from meshshard.chain import cores
from meshshard.chain.lanes import BULK, lane
from meshshard.chain.outputs import Later, Normed, Output, Sends, refusal, sends
from meshshard.chain.tensors import to_wire
from meshshard.chain.worker import model_idle, run_inline
from meshshard.wire import DataFrame, ErrorCode, ErrorFrame, PickFrame, StepFrame, TensorData

logger = logging.getLogger(__name__)

Send = Callable[[str, DataFrame], Awaitable[None]]
SendNow = Callable[[str, DataFrame], bool]  # a send that cannot wait: False if it did not
# The last stage's pick of a split step's rows, from its normed hidden states
PickTheirs = Callable[[StepFrame, torch.Tensor], PickFrame]
OUTBOX = 2  # batches computed ahead of their sending


class Outbox:
    def __init__(
        self,
        send: Send,
        send_now: SendNow,
        next_addr: str | None,
        head_rows: int,
        pick: PickTheirs,
        vocab: int = 0,
    ) -> None:
        self._send, self._send_now = send, send_now
        self._next_addr, self._head_rows, self._pick = next_addr, head_rows, pick
        self._vocab = vocab  # rows of the whole head, which a wave's first stage scores
        # Batches computed and not sent (at most OUTBOX from the compute task; what is left
        # of outputs that went out at once may join them).
        self._batches: asyncio.Queue[tuple[list[StepFrame], Sequence[Output]]] = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()
        self._bulk: asyncio.Queue[tuple[StepFrame, Output]] = asyncio.Queue()
        self.unsent = 0  # batches and bulk frames computed and not yet sent
        self._stopped = False  # the senders ran and stopped: nothing queued now goes out

    async def run(self) -> None:
        """Send what is queued, until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._send_bulk())
                await self._send_batches()
        finally:
            self._stopped = True

    async def sent(self) -> None:
        """Until everything queued has been sent."""
        await self._batches.join()
        await self._bulk.join()

    def put(self, batch: list[StepFrame], outputs: Sequence[Output]) -> None:
        self.unsent += 1
        self._batches.put_nowait((batch, outputs))

    async def room(self) -> None:
        """Until fewer than OUTBOX batches wait to be sent."""
        while self._batches.qsize() >= OUTBOX:
            self._room.clear()
            await self._room.wait()

    def emit_now(self, frame: StepFrame, out: Output) -> bool:
        """Send a step's output where its links take it at once; the rest is queued. False:
        nothing went (`put` it all)."""
        if isinstance(out, Normed) and out.together:
            return self._send_now(frame.loop, self._whole(frame, out))
        if isinstance(out, Normed):
            # The hidden states first: the first stage scores its rows while this one does.
            if not self._send_now(frame.loop, self._ahead(frame, out.hidden)):
                return False
            self.send_or_later(frame, [(frame.loop, self._pick(frame, out.hidden))])
        else:
            self.send_or_later(frame, sends(frame, out, self._next_addr))
        return True

    def send_or_later(self, frame: StepFrame, todo: Sends) -> None:
        """Send `todo` in order, at once as far as the links take it, the rest queued."""
        for i, (addr, f) in enumerate(todo):
            if not self._send_now(addr, f):
                self.later(frame, todo[i:])
                return

    def later(self, frame: StepFrame, todo: Sends) -> None:
        if not self._stopped:
            self.put([frame], [Later(tuple(todo))])
            return
        # The senders have stopped (a pick that came after the stage closed): at once or never.
        for addr, f in todo:
            if not self._send_now(addr, f):
                logger.warning("stage stopped: could not send %s to %s", type(f).__name__, addr)

    async def error(self, frame: StepFrame, code: ErrorCode, message: str, have: int = 0) -> None:
        try:
            await self._send(frame.origin, refusal(frame, code, message, have))
        except Exception as e:
            logger.warning("could not report %s to %s: %s", code, frame.origin, e)

    async def _send_batches(self) -> None:
        while True:
            batch, outputs = await self._batches.get()
            try:
                for frame, out in zip(batch, outputs, strict=True):
                    if isinstance(out, TensorData) and lane(frame) == BULK:
                        self.unsent += 1
                        self._bulk.put_nowait((frame, out))
                    else:
                        await self._emit(frame, out)
            finally:
                self.unsent -= 1
                self._batches.task_done()
                self._room.set()

    async def _send_bulk(self) -> None:
        while True:
            frame, out = await self._bulk.get()
            try:
                await self._emit(frame, out)
            finally:
                self.unsent -= 1
                self._bulk.task_done()

    async def _emit(self, frame: StepFrame, out: Output) -> None:
        if isinstance(out, Normed):
            try:
                if out.together:
                    await self._send(frame.loop, self._whole(frame, out))
                else:
                    await self._split(frame, out.hidden)
            except Exception as e:  # a peer gone mid-send: tell the origin, keep serving others
                _undelivered(frame, e)
                await self.error(frame, ErrorCode.INTERNAL, f"next hop failed: {e}")
            return
        failures: list[tuple[DataFrame, Exception]] = []
        for addr, f in sends(frame, out, self._next_addr):
            try:
                await self._send(addr, f)
            except Exception as e:
                failures.append((f, e))
        for f, error in failures:  # after the rest: an origin hears of a step after its tokens
            _undelivered(frame, error)
            if not isinstance(f, ErrorFrame):
                failing = f if isinstance(f, StepFrame) else frame
                await self.error(failing, ErrorCode.INTERNAL, f"next hop failed: {error}")

    async def _split(self, frame: StepFrame, hidden: torch.Tensor) -> None:
        """The hidden states to the first stage first, then this stage's picks of the rest
        of the vocabulary: the two are scored at once. (The pick may run on the loop: a send
        has written its frame to the socket when it returns. In the model thread it ran
        later, 61.2 ms a token against 59.3 on the loop, chain-runs.txt.)"""
        await self._send(frame.loop, self._ahead(frame, hidden))
        await self._send(frame.loop, await run_inline(self._pick, frame, hidden))

    def _ahead(self, frame: StepFrame, hidden: torch.Tensor) -> StepFrame:
        # Our pick runs on this thread unless the model thread is busy (`run_inline`): only
        # then is this thread's core where it runs.
        core = cores.here() if model_idle() else None
        return replace(frame, tensor=to_wire(hidden), head=self._head_rows, core=core)

    def _whole(self, frame: StepFrame, out: Normed) -> StepFrame:
        return replace(frame, tensor=to_wire(out.hidden), head=self._vocab, together=out.together)


def _undelivered(frame: StepFrame, e: Exception) -> None:
    logger.warning("stage could not pass on %s step %d: %s", frame.session, frame.step, e)
