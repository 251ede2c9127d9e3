"""One stage of the chain: runs its shard over incoming steps, each session's in order, batching
decode steps of different sessions into one forward pass (schedule.py says which steps a pass
runs), and passes results on.

Forward passes run in the model thread so the peer's event loop (gossip, sockets) stays
responsive, except decode passes short enough to run on the loop itself while that thread is
idle (worker.run_inline: they then do not share the GIL with the loop's work); whatever else
touches a cache (drops, handoffs) runs in the model thread too, so never under a forward pass.

A step that arrives while the stage is idle, and whose pass is short, runs at once where it
arrives (`put_now`, from a raw link's reading callback, or `put`), and what it gives goes out
at once where its link can take it (`send_now`): no task wakes between a frame's arrival and
its pass, or between the pass and the next frame's writing. Anything else goes by the compute
task and the senders, in order behind what they hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import torch

from meshshard.chain.drafts import Drafter
from meshshard.chain.firsthead import FirstHead
from meshshard.chain.outbox import Outbox, Send, SendNow
from meshshard.chain.outputs import CacheMiss, Normed, Output, failed, refusal, sampled
from meshshard.chain.passes import PassCosts, one_token
from meshshard.chain.picks import split_rows
from meshshard.chain.schedule import Schedule
from meshshard.chain.tensors import finite, from_wire, ids_from_wire, to_wire
from meshshard.chain.waves import Waves
from meshshard.chain.worker import model_idle, run_inline, run_model
from meshshard.model.shard import Shard
from meshshard.types import Epoch
from meshshard.wire import ErrorCode, PickFrame, StepFrame

logger = logging.getLogger(__name__)

# (steps in a batch, seconds its forward pass took, whether all were single-token decodes)
Observe = Callable[[int, float, bool], None]
MAX_QUEUE = 64  # steps waiting here before senders are made to wait
# A decode pass measured at most this long runs on the event loop (worker.run_inline): a probe
# arriving meanwhile waits for it, well inside probe timeouts (150-200 ms).
INLINE_MS = 40.0


class StageWorker:
    def __init__(
        self,
        shard: Shard,
        epoch: Epoch,
        next_addr: str | None,
        send: Send,
        observe: Observe | None = None,
        waves: Waves = (1,),
        head_share: float = 0.0,
        drafter: Drafter | None = None,
        send_now: SendNow | None = None,
        wave_head: bool = False,
    ) -> None:
        self.shard = shard
        # Drafts for answers the chain feeds itself are made where it feeds them: here, at
        # the first stage (the peer's, so they outlive a plan that keeps it first).
        self._drafter = drafter if shard.is_first else None
        self.costs = PassCosts()
        self.schedule = Schedule(shard, self.costs, waves)
        # Vocabulary rows the first stage scores of a lone greedy step (the plan's share),
        # where this last stage's head is tied to the first stage's embedding.
        spec = shard.spec
        tied = next_addr is None and spec.tied_embeddings and not shard.is_first
        self.head_rows = split_rows(head_share, spec.vocab_size) if tied else 0
        self.wave_head = wave_head and tied  # a whole wave's head to the first stage
        self.epoch = epoch
        self.next_addr = next_addr  # None: this is the last stage, it samples
        self.outbox = Outbox(
            send, send_now or (lambda _addr, _frame: False), next_addr, self.head_rows,
            self._pick_theirs, spec.vocab_size,
        )  # fmt: skip
        # At a first stage, its part of the head: a split step's share, a wave's whole head.
        self.first_head = FirstHead(shard, self.outbox, self._pick, self._accept)
        self._has_work = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self.steps = 0
        self.batches = 0
        self.forward_s = 0.0  # wall time of all forward passes
        self.forward_cpu_s = 0.0  # ... and the CPU time of the thread that ran them
        self._observe = observe
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def refuse_queued(self, message: str) -> None:
        """This stage is being replaced: tell the origin of every waiting step."""
        for frame in self.first_head.held():
            await self.outbox.error(frame, ErrorCode.STALE_EPOCH, message)
        while self.schedule.queue:
            await self.outbox.error(self.schedule.queue.popleft(), ErrorCode.STALE_EPOCH, message)
        self._has_room.set()

    async def put(self, frame: StepFrame) -> None:
        if frame.head:  # hidden states for this first stage's part of the head
            await self.first_head.put(frame)
            return
        while len(self.schedule.queue) >= MAX_QUEUE and not self._closing:
            self._has_room.clear()
            await self._has_room.wait()
        if self._closing:
            await self.outbox.error(frame, ErrorCode.STALE_EPOCH, "this stage moved to a new plan")
            return
        self._accept(frame)

    def put_now(self, frame: StepFrame, at_once: bool = True) -> bool:
        """`put` without waiting (and its pass run here, where `_run_now` can and `at_once`):
        False (and nothing done) where it would wait, for room in the queue or for the model
        thread."""
        if frame.head:
            return self.first_head.put_now(frame)
        if len(self.schedule.queue) >= MAX_QUEUE or self._closing:
            return False
        self._accept(frame, at_once)
        return True

    def unfit(self, frame: StepFrame) -> str | None:
        """Why this stage cannot run `frame`'s step, asked before it is admitted (None: it
        can). The wire checks a tensor's form and a hidden state's width, not which kind a
        stage takes, whether ids are in the vocabulary nor hidden states finite: a step that
        fails in its pass fails every session batched with it, and one for the head here
        fails where it is scored, outside any pass."""
        ids = frame.tensor.dtype == "int64"
        if not ids and not finite(frame.tensor):
            return "hidden states hold NaN or infinity"
        if frame.head:  # hidden states for this first stage's part of the head
            return None
        if not self.shard.is_first:
            return "a stage after the first takes hidden states, not token ids" if ids else None
        if not ids:
            return "the first stage takes token ids, not hidden states"
        got, vocab = ids_from_wire(frame.tensor), self.shard.spec.vocab_size
        if min(got) < 0 or max(got) >= vocab:
            return f"token ids must be in the vocabulary, 0 to {vocab - 1}"
        return None

    def _accept(self, frame: StepFrame, at_once: bool = True) -> None:
        """Queue a step, and run it at once where it can (`_run_now`; not `at_once`: a wave's
        steps wait for each other)."""
        if self._closing:
            self.outbox.later(frame, [(frame.origin, refusal(frame))])
            return
        if self._drafter is not None:
            frame = self._drafter.fed(frame)
        self.schedule.add(frame, time.perf_counter())
        if not at_once or not self._run_now(frame):
            self._has_work.set()

    def _run_now(self, frame: StepFrame) -> bool:
        """Run `frame`'s pass here and now, and send what it gives where that can go at
        once: when it is the only step waiting, a decode step whose pass is short
        (`_short`), the compute task idle and the model thread too. The pass then starts
        without a task's wake, as on the loop it runs anyway."""
        if (
            len(self.schedule.queue) != 1
            or self._has_work.is_set()
            or not self._idle.is_set()
            or not model_idle()
            or not self.schedule.decodable(frame)
        ):
            return False
        split = self._splits([frame])
        if not self._short([frame], split):
            return False
        batch = self.schedule.take(time.perf_counter())
        if isinstance(batch, float):  # held for steps due soon: the compute task holds it
            return False
        started = time.perf_counter()
        seconds = None
        try:
            outputs = self._pass(batch, split)
        except Exception as e:
            outputs = failed(batch, e, self.shard.sessions)
        else:
            seconds = time.perf_counter() - started
        for i, (f, out) in enumerate(zip(batch, outputs, strict=True)):
            if not self.outbox.emit_now(f, out):
                self.outbox.put(batch[i:], outputs[i:])
                break
        if seconds is not None:  # after the sends: they are what the chain waits for
            self._count(batch, split, seconds)
        return True

    def _pick(
        self, hidden: torch.Tensor, start: int, end: int
    ) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """A pick, counted with the forward passes (it is the head's share of one), so the
        step-cost meter does not take it for work beside them."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return self.shard.pick(hidden, start, end)
        finally:
            self.forward_s += time.perf_counter() - wall
            self.forward_cpu_s += time.thread_time() - cpu

    def forget_picks(self, session: str) -> None:
        self.first_head.forget(session)

    def take_pick(self, frame: PickFrame) -> None:
        """The last stage's pick of a split step."""
        self.first_head.take_pick(frame)

    async def run(self) -> None:
        """Forward passes, with their outputs sent beside them: the next batch starts while
        the last one's frames go out."""
        async with asyncio.TaskGroup() as tg:
            senders = tg.create_task(self.outbox.run())
            await self._compute()
            await self.outbox.sent()
            senders.cancel()

    async def _compute(self) -> None:
        while not self._closing:
            await self._has_work.wait()
            self._idle.clear()
            try:
                while self.schedule.queue and not self._closing:
                    batch = self.schedule.take(time.perf_counter())
                    if isinstance(batch, float):  # held for rows due soon
                        self._has_work.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._has_work.wait(), batch)
                        continue
                    if len(self.schedule.queue) < MAX_QUEUE:
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
        await self.outbox.sent()
        await self.refuse_queued(message)

    async def _run_batch(self, batch: list[StepFrame]) -> None:
        started = time.perf_counter()
        split = self._splits(batch)
        run = run_inline if self._short(batch, split) else run_model
        try:
            outputs = await run(self._pass, batch, split)
        except Exception as e:
            outputs = failed(batch, e, self.shard.sessions)
        else:
            self._count(batch, split, time.perf_counter() - started)
        self.outbox.put(batch, outputs)
        # The sender goes first, then whatever else waits (a pass on the loop did not yield).
        await asyncio.sleep(0)
        await self.outbox.room()

    def _count(self, batch: list[StepFrame], split: bool, seconds: float) -> None:
        self.schedule.passed(batch, time.perf_counter())
        self.forward_s += seconds
        self.steps += len(batch)
        self.batches += 1
        decode = self.costs.record(batch, seconds * 1000, split)
        if logger.isEnabledFor(logging.DEBUG):
            prompts = [f for f in batch if not one_token(f)]
            rows_, ms = sum(f.tensor.shape[0] for f in prompts), seconds * 1000
            steps = len(batch) - len(prompts)
            logger.debug("pass: %d decode steps, %d prompt rows, %.1f ms", steps, rows_, ms)
        if self._observe is not None:
            self._observe(len(batch), seconds, decode)

    def _short(self, batch: list[StepFrame], split: bool) -> bool:
        """Whether the batch is decode steps whose passes of its size (or without the head,
        `split`; or of its rows, verifying drafts) took at most INLINE_MS, with every output
        before it sent: a pass on the loop would hold up what is still going out (the rest
        of the last wave, behind one send that had to wait). On the loop, the peer's other
        work waits for the pass: an origin's on the tokens of the step that started it
        would otherwise share the interpreter lock with it (docs/data-plane.md)."""
        return not self.outbox.unsent and 0 < self.costs.took(batch, split) <= INLINE_MS

    def _pass(self, batch: list[StepFrame], split: bool = False) -> Sequence[Output]:
        """The batch's forward pass, and what it passes on: hidden states as wire bytes, or
        at the last stage the tokens each step confirmed (greedy rows picked in one call),
        or the normed hidden states of a step whose head is `split`."""
        cpu = time.thread_time()
        try:
            outs = self._forward(batch, head=not split)
            if self.next_addr is not None:
                return [to_wire(out) for out in outs]
            if split and len(batch) > 1:  # a wave's rows, and slices that sample nothing
                together = sum(f.sample for f in batch)
                return [
                    Normed(out, together=together) if f.sample else ()
                    for f, out in zip(batch, outs, strict=True)
                ]
            if split:
                return [Normed(outs[0])]
            return sampled(batch, outs)
        finally:
            self.forward_cpu_s += time.thread_time() - cpu

    def _splits(self, batch: list[StepFrame]) -> bool:
        """Whether to leave the head of this batch to the first stage: to split it, one
        greedy decode step (verifying a draft or not) of the only session here, whose next
        step the chain feeds itself; whole, where the plan says, a wave of two or more such
        steps without drafts (the one wave of every session here, or one of several), with
        any prompt slices beside it that sample nothing. (Were a long prompt's slices to
        bring the wave's head back here, the answers would wait through it for as long as it
        goes through, on top of the slices: lan-3, 3.2-3.9x their usual gap, testbed.md run
        82.)"""
        if len(batch) > 1:
            steps = [f for f in batch if f.sample]
            # Beside the wave only slices of several rows, as PassCosts tells a pass's
            # prompt rows from its steps (a row's step among the wave's would skew its time).
            beside = not any(one_token(f) for f in batch if not f.sample)
            whole = self.wave_head and len(steps) > 1
            return whole and beside and all(_fed_greedy(f) and not f.draft for f in steps)
        if not self.head_rows or len(self.shard.sessions) != 1:
            return False
        return _fed_greedy(batch[0])

    def _forward(self, batch: list[StepFrame], head: bool = True) -> list[torch.Tensor]:
        for f in batch:
            # What admission reserved, allocated once (a step that misses makes no session:
            # it must meet the miss it is).
            if f.reserve and self.schedule.continues(f):
                self.shard.reserve(f.session, f.reserve)
        if len(batch) > 1:
            for f in batch:
                self.shard.truncate(f.session, f.start)
            xs = [from_wire(f.tensor) for f in batch]
            read = [len(f.draft) + 1 if f.sample else 0 for f in batch]
            return self.shard.decode_batch([f.session for f in batch], xs, read, head)
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
        logits = len(frame.draft) + 1 if frame.sample else 0  # a draft's positions are sampled
        return [self.shard.prefill(frame.session, x, positions, logits=logits, head=head)]

    def _pick_theirs(self, frame: StepFrame, hidden: torch.Tensor) -> PickFrame:
        """The last stage's pick of a split step: the rows from head_rows on."""
        logits, tokens = self._pick(hidden, self.head_rows, self.shard.spec.vocab_size)
        return PickFrame(frame.epoch, frame.session, frame.step, tokens, logits, frame.attempt)


def _fed_greedy(f: StepFrame) -> bool:
    """A greedy decode step whose next step the chain feeds itself."""
    greedy = f.sample and f.sampling.temperature == 0
    return greedy and bool(f.loop) and one_token(f) and f.step + 1 <= f.until
